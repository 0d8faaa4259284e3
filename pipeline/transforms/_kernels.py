"""Compiled (numba) CPU kernels of the corruptions: local shuffle, Bezier table, table lookup.

These are the CPU implementation of the numpy path (`apply`) and of the torch path when the
batch is on the CPU; CUDA batches use the tensor code in `batched` (which computes the same
results with whole-batch tensor operations). Every kernel is ``nogil``, so the torch CPU path
runs one cube per thread. ``cache=True`` keeps the compiled code in ``__pycache__``: the first
call in a fresh environment compiles (a few seconds), later processes load it.

Definitions shared with the tensor path (they fix the results bit for bit):

- shuffle keys: element ``e`` (block-major, C-order slot within the block) of a cube has the
  24-bit key ``splitmix64(key_seed + (e + 1) * 0x9E3779B97F4A7C15) >> 40`` (`hash_keys`), or an
  explicit key array (the torch-drawn `BatchParams.shuffle_keys`);
- block ``b``'s permutation is the stable argsort of its keys (ties by slot); slot ``j`` of the
  block receives the ORIGINAL value of slot ``perm[j]``;
- every voxel takes the value given by its LAST writer (the largest block index covering it).
"""

from __future__ import annotations

import numpy as np
from numba import njit

KEY_BITS = 24
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)
_SKEY = np.uint64(64 - KEY_BITS)
_SLOT_MASK = np.uint64(0xFFFFFFFF)
_S32 = np.uint64(32)
_INSERTION_MAX = 48


def hash_keys(seed: int, start: int, count: int) -> np.ndarray:
    """Keys of elements ``start .. start + count - 1`` for ``seed`` (int64 in [0, 2**24))."""
    e = np.arange(start + 1, start + count + 1, dtype=np.uint64)
    z = np.uint64(seed) + e * _GOLDEN
    z = (z ^ (z >> _S30)) * _M1
    z = (z ^ (z >> _S27)) * _M2
    z = z ^ (z >> _S31)
    return (z >> _SKEY).astype(np.int64)


@njit(cache=True, nogil=True, inline="always")
def _hash_key(seed, e):
    z = seed + np.uint64(e + 1) * _GOLDEN
    z = (z ^ (z >> _S30)) * _M1
    z = (z ^ (z >> _S27)) * _M2
    z = z ^ (z >> _S31)
    return z >> _SKEY


@njit(cache=True, nogil=True)
def shuffle_cube(src, out, origins, sizes, keys, key_start, seed, h, w):
    """Local shuffle of one cube: ``src``/``out`` flat float32 (D*H*W,), ``out`` already a
    copy of ``src``; ``origins``/``sizes`` (N, 3) int; keys from ``keys[key_start:]`` or, when
    ``keys`` is empty, from ``hash_keys(seed, ...)``."""
    n = origins.shape[0]
    owner = np.empty(src.shape[0], np.int32)
    owner[:] = -1
    maxvol = 1
    for b in range(n):
        oz, oy, ox = origins[b, 0], origins[b, 1], origins[b, 2]
        sz, sy, sx = sizes[b, 0], sizes[b, 1], sizes[b, 2]
        vol = sz * sy * sx
        if vol > maxvol:
            maxvol = vol
        for z in range(sz):
            for y in range(sy):
                row = ((oz + z) * h + oy + y) * w + ox
                for x in range(sx):
                    owner[row + x] = b
    useed = np.uint64(seed)
    explicit = keys.shape[0] > 0
    dst = np.empty(maxvol, np.int64)
    buf = np.empty(maxvol, np.uint64)
    e0 = key_start
    for b in range(n):
        oz, oy, ox = origins[b, 0], origins[b, 1], origins[b, 2]
        sz, sy, sx = sizes[b, 0], sizes[b, 1], sizes[b, 2]
        vol = sz * sy * sx
        k = 0
        owns = False
        for z in range(sz):
            for y in range(sy):
                row = ((oz + z) * h + oy + y) * w + ox
                for x in range(sx):
                    d = row + x
                    dst[k] = d
                    if owner[d] == b:
                        owns = True
                    k += 1
        if owns:
            # packed (key << 32 | slot): sorting gives the stable argsort of the keys
            for j in range(vol):
                if explicit:
                    key = np.uint64(keys[e0 + j])
                else:
                    key = _hash_key(useed, e0 + j)
                buf[j] = (key << _S32) | np.uint64(j)
            if vol <= _INSERTION_MAX:
                for i in range(1, vol):
                    v = buf[i]
                    m = i - 1
                    while m >= 0 and buf[m] > v:
                        buf[m + 1] = buf[m]
                        m -= 1
                    buf[m + 1] = v
            else:
                buf[:vol] = np.sort(buf[:vol])
            for j in range(vol):
                d = dst[j]
                if owner[d] == b:
                    out[d] = src[dst[np.int64(buf[j] & _SLOT_MASK)]]
        e0 += vol


@njit(cache=True, nogil=True)
def bezier_table(a, b, c, d, decreasing, n, cells, table):
    """The Bezier curve sampled at ``t = k / (n - 1)`` (x sorted; y sorted unless
    ``decreasing``), interpolated as ``np.interp`` at ``k / cells``, k = 0..cells, into
    ``table`` (float64, cells + 1). Same float64 operations as `nonlinear.bezier_table`."""
    xv = np.empty(n, np.float64)
    yv = np.empty(n, np.float64)
    xmono = True
    ymono = True
    for k in range(n):
        t = k / (n - 1)
        u = 1.0 - t
        w1 = 3.0 * t * t * u
        w2 = 3.0 * t * u * u
        w3 = u * u * u
        xv[k] = w1 * a + w2 * c + w3
        yv[k] = w1 * b + w2 * d + w3
        if k > 0:
            if xv[k] > xv[k - 1]:
                xmono = False
            if yv[k] > yv[k - 1]:
                ymono = False
    # the curve runs from (1, 1) at t = 0 to (0, 0) at t = 1 and is monotone for control
    # points in [0, 1]: sorting is a reversal unless rounding broke the order somewhere
    xs = xv[::-1].copy() if xmono else np.sort(xv)
    if decreasing:
        ys = yv
    else:
        ys = yv[::-1].copy() if ymono else np.sort(yv)
    i = 0
    for g in range(cells + 1):
        x = g / cells
        # i = searchsorted(xs, x, side="right") - 1, clipped to [0, n - 2]
        while i < n - 1 and xs[i + 1] <= x:
            i += 1
        j = min(i, n - 2)
        x0 = xs[j]
        x1 = xs[j + 1]
        span = x1 - x0
        wgt = (x - x0) / span if span > 0 else 0.0
        table[g] = ys[j] + (ys[j + 1] - ys[j]) * wgt


@njit(cache=True, nogil=True)
def table_lookup(src, table, cells, out):
    """Piecewise-linear map of flat float32 ``src`` through a float64 (cells + 1) table, with
    the float32 operations of `nonlinear.table_lookup`; result in ``out`` (may be ``src``)."""
    lo = table.astype(np.float32)
    step = np.empty_like(lo)
    for g in range(cells):
        step[g] = lo[g + 1] - lo[g]
    step[cells] = np.float32(0.0)
    fc = np.float32(cells)
    zero = np.float32(0.0)
    one = np.float32(1.0)
    for v in range(src.shape[0]):
        s = min(max(src[v], zero), one) * fc
        i = min(np.int32(s), cells - 1)
        f = s - np.float32(i)
        r = lo[i] + step[i] * f
        out[v] = min(max(r, zero), one)
