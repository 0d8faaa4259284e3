"""Benchmark of the Models Genesis corruption on 64 x 64 x 32 cubes (stored (32, 64, 64)).

Prints ms per cube and the speed-up over (a), a faithful re-implementation of the reference
(`benchmarks/reference_genesis.py`), for: (b) `corrupt` (numpy, one thread), (c) `corrupt_batch`
on CPU, (d) `corrupt_batch` on CUDA when available. Run: python benchmarks/transforms.py
[--cubes N] [--batch B] [--gpu-batch B].
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from reference_genesis import reference_corrupt  # noqa: E402

from pipeline.transforms import corrupt, corrupt_batch  # noqa: E402

SHAPE = (32, 64, 64)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cubes", type=int, default=64, help="cubes for (a) and (b)")
    ap.add_argument("--batch", type=int, default=32, help="batch size for (c)")
    ap.add_argument("--batches", type=int, default=4, help="batches timed for (c)")
    ap.add_argument("--gpu-batch", type=int, default=256, help="batch size for (d)")
    ap.add_argument("--gpu-batches", type=int, default=20, help="batches timed for (d)")
    args = ap.parse_args()
    data = np.random.default_rng(0).random((args.cubes, *SHAPE), dtype=np.float32)
    rows = []

    py, npr = random.Random(0), np.random.default_rng(0)
    start = time.perf_counter()
    for c in data:
        reference_corrupt(c[None], py, npr)
    ref_ms = (time.perf_counter() - start) / len(data) * 1e3
    rows.append(("(a) reference (Python loops)", ref_ms))

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    corrupt(data[0], rng)
    start = time.perf_counter()
    for c in data:
        corrupt(c, rng)
    rows.append(("(b) corrupt, numpy, 1 thread", (time.perf_counter() - start) / len(data) * 1e3))

    torch.set_num_threads(os.cpu_count() or 1)
    batch = torch.from_numpy(np.resize(data, (args.batch, 1, *SHAPE)).copy())
    gen = torch.Generator().manual_seed(0)
    corrupt_batch(batch, gen)
    start = time.perf_counter()
    for _ in range(args.batches):
        corrupt_batch(batch, gen)
    ms = (time.perf_counter() - start) / (args.batches * args.batch) * 1e3
    rows.append((f"(c) corrupt_batch, CPU, batch {args.batch}, {torch.get_num_threads()} threads", ms))

    if torch.cuda.is_available():
        gb = torch.from_numpy(np.resize(data, (args.gpu_batch, 1, *SHAPE)).copy()).cuda()
        ggen = torch.Generator(device="cuda").manual_seed(0)
        for _ in range(3):
            corrupt_batch(gb, ggen)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.gpu_batches):
            corrupt_batch(gb, ggen)
        torch.cuda.synchronize()
        ms = (time.perf_counter() - start) / (args.gpu_batches * args.gpu_batch) * 1e3
        rows.append((f"(d) corrupt_batch, {torch.cuda.get_device_name()}, batch {args.gpu_batch}", ms))
    else:
        rows.append(("(d) corrupt_batch, CUDA: not available", float("nan")))

    print(f"cube (D, H, W) = {SHAPE}, {args.cubes} cubes for (a)/(b)")
    for name, ms in rows:
        rate = 1e3 / ms if ms == ms else float("nan")
        print(f"{name:55s} {ms:9.3f} ms/cube {rate:9.0f} cubes/s  x{ref_ms / ms:7.1f} vs (a)")


if __name__ == "__main__":
    main()
