"""Patch extraction and loader speed, and loader memory as the store grows.

Prints:
  extraction cubes/s (genesis patches pretrain, 1 and 2 Dask workers) on phantom scans;
  store MB per cube: the store as built (int16 clipped HU when exact) against the same cubes stored as
  float32 (`cube_encoding="float32"`, the format-1 layout; target: <= 55%);
  loader cubes/s from the patch store on one core, without corruption (target >= 500) and with
  the Models Genesis corruption (corrupt_batch, CPU, batch 6);
  peak RSS of a process streaming a whole patch store, for a store and one 10x larger (target: flat).

    .venv/bin/python benchmarks/patches.py [--scans 6]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path



def _one_core() -> None:
    import torch
    import zarr

    torch.set_num_threads(1)
    zarr.config.set({"threading.max_workers": 1})
    import numcodecs

    numcodecs.blosc.set_nthreads(1)


def loader_rate(path: str, corrupt: bool, batch: int = 6) -> tuple[int, float]:
    import torch

    from pipeline.data import CubeStreamConfig, PatchCubes, genesis_pairs

    # `batches()` is what pretraining iterates (views of each read block); a DataLoader would add a collation copy
    ds = PatchCubes(path, CubeStreamConfig(split="all", batch_size=batch), rank=0, world_size=1)
    loader = ds.batches()
    n = 0
    t0 = time.perf_counter()
    if corrupt:
        g = torch.Generator().manual_seed(0)
        for x, _ in genesis_pairs(loader, "cpu", g):
            n += x.shape[0]
    else:
        for b in loader:
            n += b.shape[0]
    return n, time.perf_counter() - t0


def grow_store(src: Path, dst: Path, factor: int) -> None:
    """A patch store `factor` times larger: the same shards repeated under new rows."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    import storage_schemas

    shutil.copytree(src, dst)
    meta = json.loads((src / "cubes" / "zarr.json").read_text())
    n_shards = meta["shape"][0] // meta["codecs"][0]["configuration"]["chunk_shape"][0]
    per = meta["codecs"][0]["configuration"]["chunk_shape"][0]
    for k in range(1, factor):
        for s in range(n_shards):
            shard = src / "cubes" / "c" / str(s) / "0" / "0" / "0" / "0"
            if shard.exists():  # scans without accepted cubes have no shard
                target = dst / "cubes" / "c" / str(k * n_shards + s) / "0" / "0" / "0"
                target.mkdir(parents=True, exist_ok=True)
                shutil.copy(shard, target / "0")
    meta["shape"][0] *= factor
    (dst / "cubes" / "zarr.json").write_text(json.dumps(meta))
    idx = pq.read_table(src / "index.parquet").to_pandas()
    big = pd.concat([idx.assign(row=idx["row"] + k * n_shards * per) for k in range(factor)], ignore_index=True)
    pq.write_table(storage_schemas.check_table("patch_index", pa.Table.from_pandas(big, preserve_index=False), "x"),
                   dst / "index.parquet")
    root = json.loads((dst / "zarr.json").read_text())
    root["attributes"]["genesis"]["n_cubes"] = len(big)
    (dst / "zarr.json").write_text(json.dumps(root))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scans", type=int, default=6)
    ap.add_argument("--measure-loader", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure_loader:
        _one_core()
        n, _ = loader_rate(args.measure_loader, corrupt=False)
        # VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss across exec, so a child would report its parent's
        peak = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
        print(json.dumps({"cubes": n, "peak_rss": peak}))
        return

    from pipeline.patches import PatchStore, PretrainPatchConfig, extract_pretrain
    from pipeline.sample_data import make_sample_data
    from pipeline.volume_store import convert

    work = Path(tempfile.mkdtemp(prefix="genesis-bench-patches-"))
    try:
        make_sample_data(work / "data", n_scans=args.scans, seed=0, include_real=False)
        assert convert([str(work / "data")], str(work / "vs"), workers=2, progress=False).ok
        cfg = PretrainPatchConfig()
        rates = {}
        for workers in (1, 2):
            res = extract_pretrain(str(work / "vs"), cfg, out_root=str(work / f"ps{workers}"), workers=workers,
                                   progress=False)
            rates[workers] = (res.n_cubes, res.seconds)
        path = str(res.path)

        def megabytes(p) -> float:
            return sum(f.stat().st_size for f in Path(p).rglob("*") if f.is_file()) / 1e6

        print(f"patch store: {res.n_cubes} cubes of {'x'.join(map(str, cfg.cube_size))} from {args.scans} phantom "
              f"scans, {megabytes(path):.1f} MB")
        f32 = extract_pretrain(str(work / "vs"), PretrainPatchConfig(cube_encoding="float32"),
                               out_root=str(work / "ps_f32"), workers=2, progress=False)
        assert f32.n_cubes == res.n_cubes
        ps, ps32 = PatchStore(path), PatchStore(f32.path)
        rows = ps.index["row"].to_numpy()
        assert ps.read_cubes(rows).tobytes() == ps32.read_cubes(rows).tobytes(), "decoded cubes differ"
        per, per32 = megabytes(path) / res.n_cubes, megabytes(f32.path) / res.n_cubes
        print(f"store MB per cube                    : {per:.3f} as built ({ps.cube_encoding['kind']}, "
              f"{ps.cubes.dtype}); {per32:.3f} as float32 ({ps32.cubes.dtype}); ratio {per / per32:.2f} "
              f"(target <= 0.55) {'PASS' if per / per32 <= 0.55 else 'MISS'}; decoded cubes bit-identical")
        for workers, (n, s) in rates.items():
            print(f"extraction, {workers} Dask worker(s)     : {n / s:8.1f} cubes/s ({s:.2f} s, incl. cluster start)")
        _one_core()
        loader_rate(path, corrupt=False)  # warm the page cache
        n, s = loader_rate(path, corrupt=False)
        print(f"loader, 1 core, no corruption        : {n / s:8.1f} cubes/s (target >= 500) "
              f"{'PASS' if n / s >= 500 else 'MISS'}")
        n, s = loader_rate(path, corrupt=True)
        print(f"loader + corrupt_batch, 1 core, B=6  : {n / s:8.1f} cubes/s")
        big = work / "big"
        grow_store(Path(path), big, 10)
        mem = {}
        for name, p in (("1x", path), ("10x", str(big))):
            out = subprocess.run([sys.executable, __file__, "--measure-loader", p], capture_output=True, text=True,
                                 check=True)
            mem[name] = json.loads(out.stdout.strip().splitlines()[-1])
        r = mem["10x"]["peak_rss"] / mem["1x"]["peak_rss"]
        print(f"loader peak RSS, whole store streamed: {mem['1x']['cubes']} cubes {mem['1x']['peak_rss'] / 1e6:.0f} MB; "
              f"{mem['10x']['cubes']} cubes {mem['10x']['peak_rss'] / 1e6:.0f} MB; ratio {r:.2f} "
              f"(target: flat) {'PASS' if r < 1.2 else 'MISS'}")
        assert len(PatchStore(big)) == 10 * res.n_cubes
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
