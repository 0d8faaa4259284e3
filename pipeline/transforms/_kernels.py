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
- block ``b``'s permutation ``perm`` (n = its volume, k_i = the key of its slot i) is the
  Fisher-Yates shuffle ``perm = [0..n-1]; for i = n-1 down to 1: swap(perm[i], perm[r_i])``
  with ``r_i = (k_i * (i + 1)) >> 24`` (uniform in 0..i up to a 2**-24 bias; k_0 is unused);
  slot ``j`` of the block receives the ORIGINAL value of slot ``perm[j]``;
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
_SBITS = np.uint64(KEY_BITS)
_S32 = np.uint64(32)


def hash_keys(seed: int, start: int, count: int) -> np.ndarray:
    """Keys of elements ``start .. start + count - 1`` for ``seed`` (int64 in [0, 2**24)): the
    top 24 bits of the SplitMix64 stream of ``seed``."""
    out = np.empty(count, np.int64)
    _fill_keys(np.uint64(seed), start, out)
    return out


@njit(cache=True, nogil=True, inline="always")
def _splitmix(seed, e):
    """Output ``e`` (0-based) of the SplitMix64 stream of ``seed`` (uint64)."""
    z = seed + np.uint64(e + 1) * _GOLDEN
    z = (z ^ (z >> _S30)) * _M1
    z = (z ^ (z >> _S27)) * _M2
    return z ^ (z >> _S31)


@njit(cache=True, nogil=True, inline="always")
def _hash_key(seed, e):
    return _splitmix(seed, e) >> _SKEY


@njit(cache=True, nogil=True)
def blocks_from_seeds(seeds, maxes, shape, origins, sizes):
    """Shuffle blocks of B cubes from one seed each: block i of a cube uses outputs 3i..3i+2 of
    the SplitMix64 stream of its seed, as six 32-bit fields f; side = 1 + (f * max) >> 32,
    origin = (f * (S - side + 1)) >> 32. ``origins``/``sizes``: (B, N, 3) int64, filled."""
    m32 = np.uint64(0xFFFFFFFF)
    for c in range(seeds.shape[0]):
        useed = np.uint64(seeds[c])
        for i in range(origins.shape[1]):
            for a in range(3):
                z = _splitmix(useed, 3 * i + a)
                side = 1 + np.int64(((z & m32) * np.uint64(maxes[a])) >> _S32)
                room = np.uint64(shape[a] - side + 1)
                sizes[c, i, a] = side
                origins[c, i, a] = np.int64(((z >> _S32) * room) >> _S32)


@njit(cache=True, nogil=True)
def _fill_keys(seed, start, out):
    for i in range(out.shape[0]):
        out[i] = np.int64(_hash_key(seed, start + i))


@njit(cache=True, nogil=True)
def shuffle_cube(src, out, origins, sizes, keys, key_start, seed, h, w):
    """Local shuffle of one cube: ``src``/``out`` flat float32 (D*H*W,), ``out`` already a
    copy of ``src``; ``origins``/``sizes`` (N, 3) int64; element keys from
    ``keys[key_start:]`` or, when ``keys`` is empty, the SplitMix64 stream of ``seed``.

    Blocks are visited last to first: a voxel belongs to the first block (in that order) that
    covers it, i.e. to its last writer; a block that owns no voxel is skipped, the others draw
    their Fisher-Yates permutation and write their owned voxels.
    """
    n = origins.shape[0]
    seen = np.zeros(src.shape[0], np.uint8)
    mz = my = mx = 1
    total = 0
    for b in range(n):
        total += sizes[b, 0] * sizes[b, 1] * sizes[b, 2]
        mz = max(mz, sizes[b, 0])
        my = max(my, sizes[b, 1])
        mx = max(mx, sizes[b, 2])
    maxvol = mz * my * mx
    # flat offsets of the slots of every block size, C order within the block
    table = np.empty((mz, my, mx, maxvol), np.int64)
    for a in range(mz):
        for c in range(my):
            for e in range(mx):
                k = 0
                for z in range(a + 1):
                    for y in range(c + 1):
                        for x in range(e + 1):
                            table[a, c, e, k] = (z * h + y) * w + x
                            k += 1
    useed = np.uint64(seed)
    explicit = keys.shape[0] > 0
    dst = np.empty(maxvol, np.int64)
    owned = np.empty(maxvol, np.int64)
    perm = np.empty(maxvol, np.int64)
    e1 = key_start + total
    for b in range(n - 1, -1, -1):
        sz, sy, sx = sizes[b, 0], sizes[b, 1], sizes[b, 2]
        base = (origins[b, 0] * h + origins[b, 1]) * w + origins[b, 2]
        vol = sz * sy * sx
        e0 = e1 - vol
        e1 = e0
        offs = table[sz - 1, sy - 1, sx - 1]
        cnt = 0
        for j in range(vol):
            d = base + offs[j]
            dst[j] = d
            owned[cnt] = j
            cnt += 1 - seen[d]
            seen[d] = 1
        if cnt == 0:
            continue
        for j in range(vol):
            perm[j] = j
        for i in range(vol - 1, 0, -1):
            if explicit:
                key = np.uint64(keys[e0 + i])
            else:
                key = _hash_key(useed, e0 + i)
            r = np.int64((key * np.uint64(i + 1)) >> _SBITS)
            t = perm[i]
            perm[i] = perm[r]
            perm[r] = t
        for q in range(cnt):
            j = owned[q]
            out[dst[j]] = src[dst[perm[j]]]


@njit(cache=True, nogil=True)
def noise_field(seed, out):
    """Fill flat float32 ``out`` with U[0, 1) values: the top 24 bits of the SplitMix64 stream
    of ``seed``, times 2**-24 (exact in float32)."""
    useed = np.uint64(seed)
    scale = np.float32(1.0 / (1 << KEY_BITS))
    for v in range(out.shape[0]):
        out[v] = np.float32(_hash_key(useed, v)) * scale


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
