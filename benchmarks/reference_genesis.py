"""A faithful re-implementation of the reference Models Genesis corruption, for timing only.

It follows ``pytorch/utils.py`` of MrGiovanni/ModelsGenesis step by step, Python loops
included (10,000 shuffle blocks each shuffled on its own, a 100,000-point Bezier curve from
``scipy.special.comb`` Bernstein polynomials, box-by-box painting), with two changes that do
not alter its cost:

- randomness comes from explicit generators (``random.Random`` for the scalar draws that the
  reference takes from the ``random`` module, ``numpy.random.Generator`` for its
  ``np.random`` array draws) instead of global state;
- the cube is one channel, shape (1, D, H, W) in this project's (z, y, x) order, and the
  reference's flip bug (channel axis flipped, slice axis never) is kept: the flip axis is
  drawn from [0, 1, 2] of the 4-D array, exactly as the reference does.

This is not the project's transform (see ``pipeline.transforms``); it is the baseline that the
benchmark compares against.
"""

from __future__ import annotations

import copy
import random

import numpy as np
from scipy.special import comb


def bernstein_poly(i: int, n: int, t: np.ndarray) -> np.ndarray:
    return comb(n, i) * (t ** (n - i)) * (1 - t) ** i


def bezier_curve(points, n_times: int = 1000):
    n_points = len(points)
    x_points = np.array([p[0] for p in points])
    y_points = np.array([p[1] for p in points])
    t = np.linspace(0.0, 1.0, n_times)
    polynomial_array = np.array([bernstein_poly(i, n_points - 1, t) for i in range(n_points)])
    return np.dot(x_points, polynomial_array), np.dot(y_points, polynomial_array)


def data_augmentation(x, y, py: random.Random, prob: float = 0.5):
    cnt = 3
    while py.random() < prob and cnt > 0:
        degree = py.choice([0, 1, 2])
        x = np.flip(x, axis=degree)
        y = np.flip(y, axis=degree)
        cnt = cnt - 1
    return x, y


def nonlinear_transformation(x, py: random.Random, prob: float = 0.5):
    if py.random() >= prob:
        return x
    points = [[0, 0], [py.random(), py.random()], [py.random(), py.random()], [1, 1]]
    xvals, yvals = bezier_curve(points, n_times=100000)
    if py.random() < 0.5:
        xvals = np.sort(xvals)
    else:
        xvals, yvals = np.sort(xvals), np.sort(yvals)
    return np.interp(x, xvals, yvals)


def local_pixel_shuffling(x, py: random.Random, npr: np.random.Generator, prob: float = 0.5):
    if py.random() >= prob:
        return x
    image_temp = copy.deepcopy(x)
    orig_image = copy.deepcopy(x)
    _, img_rows, img_cols, img_deps = x.shape
    for _ in range(10000):
        bx = py.randint(1, img_rows // 10)
        by = py.randint(1, img_cols // 10)
        bz = py.randint(1, img_deps // 10)
        nx = py.randint(0, img_rows - bx)
        ny = py.randint(0, img_cols - by)
        nz = py.randint(0, img_deps - bz)
        window = orig_image[0, nx:nx + bx, ny:ny + by, nz:nz + bz]
        window = window.flatten()
        npr.shuffle(window)
        window = window.reshape((bx, by, bz))
        image_temp[0, nx:nx + bx, ny:ny + by, nz:nz + bz] = window
    return image_temp


def image_in_painting(x, py: random.Random, npr: np.random.Generator):
    _, img_rows, img_cols, img_deps = x.shape
    cnt = 5
    while cnt > 0 and py.random() < 0.95:
        bx = py.randint(img_rows // 6, img_rows // 3)
        by = py.randint(img_cols // 6, img_cols // 3)
        bz = py.randint(img_deps // 6, img_deps // 3)
        nx = py.randint(3, img_rows - bx - 3)
        ny = py.randint(3, img_cols - by - 3)
        nz = py.randint(3, img_deps - bz - 3)
        x[:, nx:nx + bx, ny:ny + by, nz:nz + bz] = npr.random((bx, by, bz)) * 1.0
        cnt -= 1
    return x


def image_out_painting(x, py: random.Random, npr: np.random.Generator):
    _, img_rows, img_cols, img_deps = x.shape
    image_temp = copy.deepcopy(x)
    x = npr.random(x.shape) * 1.0
    cnt = 5  # the first box always, then up to 4 more while a p=0.95 coin comes up
    first = True
    while first or (cnt > 0 and py.random() < 0.95):
        bx = img_rows - py.randint(3 * img_rows // 7, 4 * img_rows // 7)
        by = img_cols - py.randint(3 * img_cols // 7, 4 * img_cols // 7)
        bz = img_deps - py.randint(3 * img_deps // 7, 4 * img_deps // 7)
        nx = py.randint(3, img_rows - bx - 3)
        ny = py.randint(3, img_cols - by - 3)
        nz = py.randint(3, img_deps - bz - 3)
        x[:, nx:nx + bx, ny:ny + by, nz:nz + bz] = image_temp[:, nx:nx + bx, ny:ny + by, nz:nz + bz]
        cnt -= 1
        first = False
    return x


def reference_corrupt(cube: np.ndarray, py: random.Random, npr: np.random.Generator,
                      flip_rate=0.4, local_rate=0.5, nonlinear_rate=0.9, paint_rate=0.9,
                      inpaint_rate=0.2):
    """One (input, target) pair from a (1, D, H, W) cube, as ``generate_pair`` makes it."""
    y = cube.copy()
    x = copy.deepcopy(y)
    x, y = data_augmentation(x, y, py, flip_rate)
    x = local_pixel_shuffling(x, py, npr, prob=local_rate)
    x = nonlinear_transformation(x, py, nonlinear_rate)
    if py.random() < paint_rate:
        if py.random() < inpaint_rate:
            x = image_in_painting(x, py, npr)
        else:
            x = image_out_painting(x, py, npr)
    return x, y
