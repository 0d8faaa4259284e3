"""Batched torch version of the corruption, on the batch's device (CPU or CUDA).

`corrupt_batch` draws every random choice of a batch as tensors (`sample_batch_params`) and
applies them (`apply_batch`):

- on CUDA (and on the CPU when `_CPU_KERNELS` is False) with whole-batch tensor operations: no
  Python loop over voxels, shuffle blocks or cubes (only over the 3 flip axes, the <= 5 paint
  boxes and the <= max-block-volume Fisher-Yates steps), and a fixed number of host syncs per
  batch (sizes of the key draw and of the Fisher-Yates steps), none per block;
- on the CPU with the compiled per-cube kernels of `_kernels` (the ones `apply` uses), one cube
  per thread on ``torch.get_num_threads()`` threads. CPU-drawn params then carry one key seed
  and one noise seed per cube (``key_seeds``/``noise_seeds``) instead of materialised keys and
  noise: the kernels generate them on the fly.

`params_to_batch` turns numpy-drawn `GenesisParams` into the same tensor form (keys and paint
noise as seeds for the CPU kernels, materialised from their seeds otherwise), so
`apply_batch(batch, list_of_params)` reproduces `apply` cube by cube: the shuffle uses the same
keys, Fisher-Yates rule and last-writer rule, the Bezier table is built with the same float64
operations, and the per-voxel lookup uses the same float32 operations.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from . import _kernels
from .config import GenesisConfig
from .flip import flip_parity
from .genesis import GenesisParams, apply_arrays
from .local_shuffle import _NO_KEYS, KEY_BITS, max_block_sides, offset_table, shuffle_keys
from .nonlinear import TABLE_CELLS
from .paint import paint_noise
from .shapes import spatial_shape

_CPU_KERNELS = True
"""CPU batches use the compiled per-cube kernels (False: the tensor path, as on CUDA)."""

_PAINT_CODE = {"none": 0, "inpaint": 1, "outpaint": 2}


@dataclass(frozen=True, eq=False)
class BatchParams:
    """The random choices of a batch of B cubes, as tensors on one device."""

    shape: tuple[int, int, int]
    flip: torch.Tensor            # (B, 3) bool: flip parity per spatial axis
    shuffle: torch.Tensor         # (B,) bool
    block_origins: torch.Tensor   # (B, N, 3) int64 (rows of unshuffled cubes unused)
    block_sizes: torch.Tensor     # (B, N, 3) int64
    shuffle_keys: torch.Tensor    # (T,) int64 in [0, 2**24): shuffled cubes' keys, in order
                                  # (empty when key_seeds is given)
    nonlinear: torch.Tensor       # (B,) bool
    bezier: torch.Tensor          # (B, 4) float64: (a, b, c, d)
    decreasing: torch.Tensor      # (B,) bool
    paint: torch.Tensor           # (B,) int64: 0 none, 1 in-painting, 2 out-painting
    boxes: torch.Tensor           # (B, M, 6) int64: origin (z, y, x), size (z, y, x)
    box_valid: torch.Tensor       # (B, M) bool
    noise: torch.Tensor           # (B, D, H, W) float32 in [0, 1) (empty when noise_seeds is given)
    bezier_samples: int = GenesisConfig().bezier_samples
    key_seeds: torch.Tensor | None = None    # (B,) int64: keys = `shuffle_keys` stream of the seed
    noise_seeds: torch.Tensor | None = None  # (B,) int64: noise = `paint_noise(seed)`


def _check_batch(batch: torch.Tensor) -> tuple[int, tuple[int, int, int]]:
    if not isinstance(batch, torch.Tensor):
        raise TypeError(f"batch must be a torch.Tensor of shape (B, 1, D, H, W), got {type(batch).__name__}")
    if batch.dim() != 5 or batch.shape[1] != 1:
        raise ValueError(f"batch shape must be (B, 1, D, H, W), got {tuple(batch.shape)}")
    if batch.dtype != torch.float32:
        raise ValueError(f"batch dtype must be torch.float32, got {batch.dtype}")
    return batch.shape[0], spatial_shape(batch.shape[2:])


def _leading_successes(coins: torch.Tensor) -> torch.Tensor:
    """(B, K) bool -> (B, K) bool: True for the coins before the first failure."""
    return torch.cumprod(coins.to(torch.int64), dim=1).bool()


def sample_batch_params(generator: torch.Generator, batch_size: int, shape,
                        config: GenesisConfig = GenesisConfig(), device=None) -> BatchParams:
    """Draw the corruption of ``batch_size`` cubes with ``generator``; tensors end on ``device``."""
    shape = spatial_shape(shape)
    gdev = generator.device
    device = torch.device(device) if device is not None else gdev
    b, (d, h, w) = batch_size, shape
    sides = torch.tensor(shape, device=gdev)

    def rand(*size, dtype=torch.float32):
        return torch.rand(size, generator=generator, device=gdev, dtype=dtype)

    def randint(low, high, size):
        return torch.randint(low, high, size, generator=generator, device=gdev)

    # flip
    active = _leading_successes(rand(b, config.max_flips) < config.flip_rate)
    axes = randint(0, 3, (b, config.max_flips))
    flips = torch.stack([((axes == a) & active).sum(1) % 2 == 1 for a in range(3)], dim=1)
    # local shuffle
    shuffle = rand(b) < config.local_shuffle_rate
    n = config.shuffle_blocks
    maxes = max_block_sides(shape, config)
    compact = device.type == "cpu" and _CPU_KERNELS
    if compact:
        # the CPU kernels need no big tensor draws: blocks, keys and noise come from one
        # SplitMix64 seed each per cube (torch's CPU generator is slow for millions of values)
        seeds = randint(0, 2**62, (b, 3)).cpu()
        origins = torch.empty((b, n, 3), dtype=torch.int64)
        sizes = torch.empty((b, n, 3), dtype=torch.int64)
        _kernels.blocks_from_seeds(seeds[:, 0].numpy(), np.array(maxes, np.int64),
                                   np.array(shape, np.int64), origins.numpy(), sizes.numpy())
        key_seeds, noise_seeds = seeds[:, 1], seeds[:, 2]
        keys = torch.zeros(0, dtype=torch.int64)
    else:
        key_seeds = noise_seeds = None
        sizes = torch.stack([randint(1, m + 1, (b, n)) for m in maxes], dim=-1)
        origins = (rand(b, n, 3, dtype=torch.float64) * (sides - sizes + 1)).floor().to(torch.int64)
        total = int(sizes[shuffle].prod(-1).sum())
        keys = randint(0, 2**KEY_BITS, (total,))
    # non-linear
    nonlinear = rand(b) < config.nonlinear_rate
    bezier = rand(b, 4, dtype=torch.float64)
    decreasing = rand(b) < 0.5
    # painting
    painted = rand(b) < config.paint_rate
    inpaint = rand(b) < config.inpaint_share
    paint = torch.where(painted, torch.where(inpaint, 1, 2), 0)
    m = max(config.inpaint_max_boxes, 1 + config.outpaint_max_extra_boxes)
    coins = rand(b, m)
    in_valid = _leading_successes(coins < config.inpaint_box_prob)
    in_valid[:, config.inpaint_max_boxes:] = False
    out_valid = torch.cat([torch.ones(b, 1, dtype=torch.bool, device=gdev),
                           _leading_successes(coins[:, 1:] < config.outpaint_box_prob)], dim=1)
    out_valid[:, 1 + config.outpaint_max_extra_boxes:] = False
    in_sizes = torch.stack([randint(s // 6, s // 3 + 1, (b, m)) for s in shape], dim=-1)
    out_sizes = sides - torch.stack([randint(3 * s // 7, 4 * s // 7 + 1, (b, m)) for s in shape], dim=-1)
    is_in = (paint == 1)[:, None]
    box_sizes = torch.where(is_in[..., None], in_sizes, out_sizes)
    border = config.paint_border
    room = sides - box_sizes - 2 * border + 1
    box_origins = border + (rand(b, m, 3, dtype=torch.float64) * room).floor().to(torch.int64)
    box_valid = torch.where(is_in, in_valid, out_valid) & (paint > 0)[:, None]
    if compact:
        noise = torch.zeros((0, d, h, w), dtype=torch.float32)
    else:
        noise = rand(b, d, h, w)
    to = dict(device=device)
    return BatchParams(
        shape=shape, flip=flips.to(**to), shuffle=shuffle.to(**to),
        block_origins=origins.to(**to), block_sizes=sizes.to(**to), shuffle_keys=keys.to(**to),
        nonlinear=nonlinear.to(**to), bezier=bezier.to(**to), decreasing=decreasing.to(**to),
        paint=paint.to(**to), boxes=torch.cat([box_origins, box_sizes], -1).to(**to),
        box_valid=box_valid.to(**to), noise=noise.to(**to), bezier_samples=config.bezier_samples,
        key_seeds=None if key_seeds is None else key_seeds.to(**to),
        noise_seeds=None if noise_seeds is None else noise_seeds.to(**to))


def params_to_batch(params: Sequence[GenesisParams], device=None) -> BatchParams:
    """Stack numpy-drawn params into a `BatchParams`: keys and noise as the params' seeds for
    the CPU kernels, regenerated from the seeds for the tensor path."""
    if len(params) == 0:
        raise ValueError("params_to_batch needs at least one GenesisParams")
    shape = tuple(params[0].shape)
    samples = {p.bezier_samples for p in params}
    if any(tuple(p.shape) != shape for p in params) or len(samples) != 1:
        raise ValueError("all params of a batch must share one cube shape and bezier_samples")
    b = len(params)
    compact = torch.device(device if device is not None else "cpu").type == "cpu" and _CPU_KERNELS
    n = max((len(p.shuffle_blocks.sizes) for p in params if p.shuffle), default=0)
    origins = np.zeros((b, n, 3), np.int64)
    sizes = np.ones((b, n, 3), np.int64)
    keys = []
    for i, p in enumerate(params):
        if p.shuffle:
            if len(p.shuffle_blocks.sizes) != n:
                raise ValueError("all shuffled params of a batch must have the same number of blocks")
            origins[i], sizes[i] = p.shuffle_blocks.origins, p.shuffle_blocks.sizes
            if not compact:
                keys.append(shuffle_keys(p.shuffle_blocks))
    m = max([len(p.boxes) for p in params] + [1])
    boxes = np.zeros((b, m, 6), np.int64)
    valid = np.zeros((b, m), bool)
    noise = np.zeros((0 if compact else b, *shape), np.float32)
    for i, p in enumerate(params):
        for k, box in enumerate(p.boxes):
            boxes[i, k] = (*box.origin, *box.size)
            valid[i, k] = True
        if p.paint != "none" and not compact:
            noise[i] = paint_noise(p.noise_seed, shape)
    bez = np.array([p.bezier.points if p.nonlinear else (0.5,) * 4 for p in params], np.float64)
    t = lambda a: torch.as_tensor(a, device=device)  # noqa: E731
    return BatchParams(
        shape=shape,  # type: ignore[arg-type]
        flip=t(np.array([flip_parity(p.flip_axes) for p in params], bool)),
        shuffle=t(np.array([p.shuffle for p in params], bool)),
        block_origins=t(origins), block_sizes=t(sizes),
        shuffle_keys=t(np.concatenate(keys) if keys else np.zeros(0, np.int64)),
        nonlinear=t(np.array([p.nonlinear for p in params], bool)), bezier=t(bez),
        decreasing=t(np.array([bool(p.nonlinear and p.bezier.decreasing) for p in params], bool)),
        paint=t(np.array([_PAINT_CODE[p.paint] for p in params], np.int64)),
        boxes=t(boxes), box_valid=t(valid), noise=t(noise), bezier_samples=samples.pop(),
        key_seeds=t(np.array([p.shuffle_blocks.key_seed if p.shuffle else 0 for p in params],
                             np.int64)) if compact else None,
        noise_seeds=t(np.array([p.noise_seed for p in params], np.int64)) if compact else None)


_TABLES: dict = {}


def _offset_table(shape, maxes, device) -> torch.Tensor:
    key = (shape, maxes, str(device))
    if key not in _TABLES:
        _TABLES[key] = torch.tensor(offset_table(shape, maxes), device=device).reshape(-1)
    return _TABLES[key]


def _shuffle(x: torch.Tensor, origins: torch.Tensor, sizes: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Local shuffle of S cubes x (S, D, H, W); same rules as `_kernels.shuffle_cube`.

    Fisher-Yates for all blocks at once: ``perm`` is (max volume, blocks) with the blocks
    sorted by decreasing volume, so step i touches only the prefix of blocks with volume > i.
    Then every voxel finds its last writer (scatter-max of element indices) and gathers from
    the source slot that writer's permutation assigns.
    """
    s, d, h, w = x.shape
    n = sizes.shape[1]
    dev = x.device
    r = s * n
    sizes_f, origins_f = sizes.reshape(-1, 3), origins.reshape(-1, 3)
    vol = sizes_f.prod(-1)
    total = int(vol.sum())
    if keys.numel() != total:
        raise ValueError(f"shuffle_keys has {keys.numel()} keys, the blocks have {total} voxels")
    if total == 0:
        return x.clone()
    maxes = tuple(int(v) for v in sizes_f.amax(0).tolist())
    mz, my, mx = maxes
    vmax = mz * my * mx
    table = _offset_table((d, h, w), maxes, dev)
    size_class = ((sizes_f[:, 0] - 1) * my + (sizes_f[:, 1] - 1)) * mx + (sizes_f[:, 2] - 1)
    start = torch.cumsum(vol, 0) - vol
    keys = keys.to(dev, torch.int64)
    # Fisher-Yates: for i = vmax-1 .. 1, blocks with volume > i swap perm[i] and perm[r_i]
    order = torch.argsort(vol, descending=True, stable=True)
    longer = torch.bincount(vol, minlength=vmax + 2).flip(0).cumsum(0).flip(0)  # [v]: vol >= v
    n_longer = longer.tolist()
    pdtype = torch.int16 if vmax < 2**15 else torch.int32
    perm = torch.arange(vmax, dtype=pdtype, device=dev)[:, None].repeat(1, r)
    start_sorted = start[order]
    cols = torch.arange(r, device=dev)
    for i in range(vmax - 1, 0, -1):
        c = n_longer[i + 1]
        if c == 0:
            continue
        k = keys[start_sorted[:c] + i]
        t = (k * (i + 1)) >> KEY_BITS
        row = perm[i, :c].clone()
        perm[i, :c] = perm[t, cols[:c]]
        perm[t, cols[:c]] = row
    pos = torch.empty_like(order)
    pos[order] = cols
    # last writer of every voxel, and its source slot
    cube = cols // n
    origin_flat = cube * (d * h * w) + (origins_f[:, 0] * h + origins_f[:, 1]) * w + origins_f[:, 2]
    block_of = torch.repeat_interleave(cols, vol, output_size=total)
    element = torch.arange(total, device=dev)
    slot = element - start[block_of]
    dest = origin_flat[block_of] + table[size_class[block_of] * vmax + slot]
    last = torch.full((s * d * h * w,), -1, dtype=torch.int64, device=dev)
    last.scatter_reduce_(0, dest, element, reduce="amax")
    e = last.clamp_min(0)
    b = block_of[e]
    j = e - start[b]
    src_slot = perm[j, pos[b]].to(torch.int64)
    src = origin_flat[b] + table[size_class[b] * vmax + src_slot]
    flat = x.reshape(-1)
    out = torch.where(last >= 0, flat[src], flat)
    return out.reshape(x.shape)


def _bezier_tables(bezier: torch.Tensor, decreasing: torch.Tensor, n: int) -> torch.Tensor:
    """(S, 4097) float64 tables; same float64 operations as `nonlinear.bezier_table`."""
    dev = bezier.device
    t = torch.arange(n, dtype=torch.float64, device=dev) / (n - 1)
    u = 1.0 - t
    w1, w2, w3 = 3.0 * t * t * u, 3.0 * t * u * u, u * u * u
    a, b, c, d = (bezier[:, k:k + 1] for k in range(4))
    xv = w1 * a + w2 * c + w3
    yv = w1 * b + w2 * d + w3
    xs = torch.sort(xv, dim=1).values
    ys = torch.where(decreasing[:, None], yv, torch.sort(yv, dim=1).values)
    grid = torch.arange(TABLE_CELLS + 1, dtype=torch.float64, device=dev) / TABLE_CELLS
    grid = grid.expand(len(bezier), -1).contiguous()
    i = (torch.searchsorted(xs, grid, right=True) - 1).clamp(0, n - 2)
    x0, x1 = xs.gather(1, i), xs.gather(1, i + 1)
    y0, y1 = ys.gather(1, i), ys.gather(1, i + 1)
    span = x1 - x0
    wgt = torch.where(span > 0, (grid - x0) / torch.where(span > 0, span, 1.0), 0.0)
    return y0 + (y1 - y0) * wgt


def _table_lookup(x: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """x (S, D, H, W) float32 through per-cube tables; same float32 ops as `table_lookup`."""
    lo = tables.to(torch.float32)
    step = torch.cat([lo[:, 1:] - lo[:, :-1], torch.zeros_like(lo[:, :1])], dim=1)
    flat = x.reshape(len(x), -1)
    scaled = flat.clamp(0.0, 1.0) * float(TABLE_CELLS)
    i = scaled.to(torch.int32).clamp(max=TABLE_CELLS - 1).to(torch.int64)
    f = scaled - i.to(torch.float32)
    out = lo.gather(1, i) + step.gather(1, i) * f
    return out.clamp(0.0, 1.0).reshape(x.shape)


def _box_mask(boxes: torch.Tensor, valid: torch.Tensor, shape) -> torch.Tensor:
    """(B, D, H, W) bool union of each cube's valid boxes (loop over the <= M boxes only)."""
    dev = boxes.device
    b = boxes.shape[0]
    ranges = [torch.arange(s, device=dev) for s in shape]
    mask = torch.zeros((b, *shape), dtype=torch.bool, device=dev)
    for k in range(boxes.shape[1]):
        o, sz = boxes[:, k, :3], boxes[:, k, 3:]
        inside = [(r >= o[:, a, None]) & (r < (o[:, a] + sz[:, a])[:, None]) for a, r in enumerate(ranges)]
        box = inside[0][:, :, None, None] & inside[1][:, None, :, None] & inside[2][:, None, None, :]
        mask |= box & valid[:, k, None, None, None]
    return mask


def apply_batch(batch: torch.Tensor, params) -> tuple[torch.Tensor, torch.Tensor]:
    """(corrupted, target) for a (B, 1, D, H, W) float32 batch and a `BatchParams` or a list
    of numpy-drawn `GenesisParams` (one per cube)."""
    b, shape = _check_batch(batch)
    if not isinstance(params, BatchParams):
        params = params_to_batch(list(params), device=batch.device)
    if tuple(params.shape) != shape or params.flip.shape[0] != b:
        raise ValueError(f"params are for {params.flip.shape[0]} cubes of shape {params.shape}, "
                         f"the batch has {b} cubes of shape {shape}")
    if batch.device.type == "cpu" and _CPU_KERNELS:
        return _apply_cpu(batch, params)
    keys, noise = _materialise(params, batch.device)
    x = batch[:, 0]
    for a in range(3):
        x = torch.where(params.flip[:, a, None, None, None], x.flip(1 + a), x)
    target = x
    out = x.clone()
    idx = params.shuffle.nonzero().squeeze(1)
    if idx.numel():
        out[idx] = _shuffle(out[idx], params.block_origins[idx], params.block_sizes[idx], keys)
    idx = params.nonlinear.nonzero().squeeze(1)
    if idx.numel():
        tables = _bezier_tables(params.bezier[idx], params.decreasing[idx], params.bezier_samples)
        out[idx] = _table_lookup(out[idx], tables)
    mask = _box_mask(params.boxes, params.box_valid, shape)
    mode = params.paint[:, None, None, None]
    noisy = ((mode == 1) & mask) | ((mode == 2) & ~mask)
    out = torch.where(noisy, noise, out)
    return out[:, None].contiguous(), target[:, None].contiguous()


def _materialise(params: BatchParams, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(keys, noise) as tensors on ``device``, generated from the seeds where params carry them."""
    keys, noise = params.shuffle_keys, params.noise
    if params.key_seeds is not None:
        vols = params.block_sizes.prod(-1).sum(-1).cpu().numpy()
        parts = [_kernels.hash_keys(int(seed), 0, int(v)) for seed, v, on in
                 zip(params.key_seeds.tolist(), vols, params.shuffle.tolist()) if on]
        keys = torch.as_tensor(np.concatenate(parts) if parts else _NO_KEYS)
    if params.noise_seeds is not None:
        noise = torch.zeros((len(params.paint), *params.shape), dtype=torch.float32)
        for i, (seed, mode) in enumerate(zip(params.noise_seeds.tolist(), params.paint.tolist())):
            if mode:
                noise[i] = torch.from_numpy(paint_noise(seed, params.shape))
    return keys.to(device), noise.to(device)


_POOLS: dict = {}
_POOL_LOCK = threading.Lock()


def _pool(threads: int) -> ThreadPoolExecutor:
    with _POOL_LOCK:
        if threads not in _POOLS:
            _POOLS[threads] = ThreadPoolExecutor(threads, thread_name_prefix="genesis-cpu")
        return _POOLS[threads]


def _apply_cpu(batch: torch.Tensor, params: BatchParams) -> tuple[torch.Tensor, torch.Tensor]:
    """CPU batch: the compiled per-cube kernels (`apply_arrays`), one cube per thread."""
    b, (d, h, w) = batch.shape[0], params.shape
    x = batch.detach()[:, 0].contiguous().numpy()
    np_ = lambda t: None if t is None else t.detach().cpu().numpy()  # noqa: E731
    flip, shuffle, nonlinear = np_(params.flip), np_(params.shuffle), np_(params.nonlinear)
    origins = np.ascontiguousarray(np_(params.block_origins), dtype=np.int64)
    sizes = np.ascontiguousarray(np_(params.block_sizes), dtype=np.int64)
    keys = np.ascontiguousarray(np_(params.shuffle_keys), dtype=np.int64)
    key_seeds, noise_seeds = np_(params.key_seeds), np_(params.noise_seeds)
    bezier, decreasing, paint = np_(params.bezier), np_(params.decreasing), np_(params.paint)
    boxes, valid, noise = np_(params.boxes), np_(params.box_valid), np_(params.noise)
    if origins.shape != sizes.shape or origins.shape[:1] != (b,):
        raise ValueError(f"block_origins/block_sizes must be (B, N, 3), got {origins.shape}, {sizes.shape}")
    if shuffle.any() and sizes.size:
        lo = min(int(origins.min()), int(sizes.min()) - 1)
        hi = (origins + sizes).reshape(-1, 3).max(0)
        if lo < 0 or np.any(hi > np.array((d, h, w))):
            raise ValueError(f"shuffle blocks do not fit in a cube of shape {(d, h, w)}")
    vols = np.where(shuffle, (sizes[..., 0] * sizes[..., 1] * sizes[..., 2]).sum(-1), 0)
    key_start = np.cumsum(vols) - vols
    if key_seeds is None and keys.shape[0] != int(vols.sum()):
        raise ValueError(f"shuffle_keys has {keys.shape[0]} keys, the blocks have {int(vols.sum())} voxels")
    out = torch.empty((b, 1, d, h, w), dtype=torch.float32)
    target = torch.empty((b, 1, d, h, w), dtype=torch.float32)
    out_np, target_np = out.numpy(), target.numpy()

    def one(i: int) -> None:
        sh = None
        if shuffle[i]:
            if key_seeds is None:
                sh = (origins[i], sizes[i], keys, int(key_start[i]), 0)
            else:
                sh = (origins[i], sizes[i], _NO_KEYS, 0, int(key_seeds[i]))
        bz = None
        if nonlinear[i]:
            bz = (*(float(v) for v in bezier[i]), bool(decreasing[i]), int(params.bezier_samples))
        cube_boxes = [(box[:3], box[3:]) for box, ok in zip(boxes[i], valid[i]) if ok]
        cube_noise = int(noise_seeds[i]) if noise_seeds is not None else noise[i]
        apply_arrays(x[i], flip[i], sh, bz, int(paint[i]), cube_boxes, cube_noise,
                     out_np[i, 0], target_np[i, 0])

    threads = min(torch.get_num_threads(), b)
    if threads > 1:
        list(_pool(threads).map(one, range(b)))
    else:
        for i in range(b):
            one(i)
    return out, target


def corrupt_batch(batch: torch.Tensor, generator: torch.Generator,
                  config: GenesisConfig = GenesisConfig()) -> tuple[torch.Tensor, torch.Tensor]:
    """Corrupt a (B, 1, D, H, W) float32 batch on its device; draws with ``generator``."""
    b, shape = _check_batch(batch)
    params = sample_batch_params(generator, b, shape, config, device=batch.device)
    return apply_batch(batch, params)
