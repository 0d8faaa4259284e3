"""Benchmark of the Models Genesis corruption on 64 x 64 x 32 cubes (stored (32, 64, 64)).

Prints ms per cube and the speed-up over (a), a faithful re-implementation of the reference
(`benchmarks/reference_genesis.py`), for: (b) `corrupt` (numpy, one thread), (c) `corrupt_batch`
on CPU, (d) `corrupt_batch` on CUDA when available, and PASS/MISS against the targets: (b) at least 30x faster than (a);
(c) faster per cube than (b); (d) at least 10,000 cubes/s. (b) runs on one thread; (c) on
torch.get_num_threads() = all cores (one cube per thread in the compiled CPU kernels). The first
call of the compiled (numba) kernels in a process loads them from the cache, or compiles them
(seconds) in a fresh environment: it is made before timing and its time is printed.
`--quick` times 4 cubes, batches of 2 (GPU: 8): a check in seconds that the benchmark still runs, not a
measurement (its targets are not judged).
Run: python benchmarks/transforms.py [--cubes N] [--batch B] [--gpu-batch B] [--quick].
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numba  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from reference_genesis import reference_corrupt  # noqa: E402

from pipeline.transforms import GenesisConfig, corrupt, corrupt_batch  # noqa: E402

SHAPE = (32, 64, 64)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cubes", type=int, default=64, help="cubes for (a) and (b)")
    ap.add_argument("--batch", type=int, default=32, help="batch size for (c)")
    ap.add_argument("--batches", type=int, default=4, help="batches timed for (c)")
    ap.add_argument("--gpu-batch", type=int, default=256, help="batch size for (d)")
    ap.add_argument("--gpu-batches", type=int, default=20, help="batches timed for (d)")
    ap.add_argument("--quick", action="store_true", help="tiny counts (4 cubes, batch 2): a smoke run, not figures")
    args = ap.parse_args()
    if args.quick:
        args.cubes, args.batch, args.batches, args.gpu_batch, args.gpu_batches = 4, 2, 1, 8, 2
    for name in ("cubes", "batch", "batches", "gpu_batch", "gpu_batches"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    data = np.random.default_rng(0).random((args.cubes, *SHAPE), dtype=np.float32)
    rows = []

    py, npr = random.Random(0), np.random.default_rng(0)
    start = time.perf_counter()
    for c in data:
        reference_corrupt(c[None], py, npr)
    ref_ms = (time.perf_counter() - start) / len(data) * 1e3
    rows.append(("(a) reference (Python loops)", ref_ms))

    torch.set_num_threads(1)
    numba.set_num_threads(1)
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    corrupt(data[0], rng, GenesisConfig(local_shuffle_rate=1.0, nonlinear_rate=1.0))
    first_s = time.perf_counter() - start
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

    b_ms, c_ms, d_ms = rows[1][1], rows[2][1], rows[3][1]
    verdict = {
        "(b)": "PASS" if ref_ms / b_ms >= 30 else "MISS",
        "(c)": "PASS" if c_ms < b_ms else "MISS",
        "(d)": "n/a" if d_ms != d_ms else ("PASS" if 1e3 / d_ms >= 10_000 else "MISS"),
    }
    if args.quick:  # a few cubes time nothing reliably
        verdict = {k: "n/a" if v == "n/a" else "(quick: not judged)" for k, v in verdict.items()}
    targets = {"(b)": ">= x30 vs (a)", "(c)": "< (b) per cube", "(d)": ">= 10,000 cubes/s"}
    print(f"cube (D, H, W) = {SHAPE}, {args.cubes} cubes for (a)/(b); "
          f"first kernel call (cache load or JIT, not timed): {first_s:.2f} s")
    for name, ms in rows:
        rate = 1e3 / ms if ms == ms else float("nan")
        key = name[:3]
        tail = f"  {verdict[key]} (target {targets[key]})" if key in verdict else ""
        print(f"{name:55s} {ms:9.3f} ms/cube {rate:9.0f} cubes/s  x{ref_ms / ms:7.1f} vs (a){tail}")


if __name__ == "__main__":
    main()
