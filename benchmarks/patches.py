"""Patch extraction and loader speed, and loader memory as the store grows.

Prints:
  extraction cubes/s (genesis patches pretrain, 1 and 2 Dask workers) on phantom scans;
  store MB per cube: the store as built (int16 clipped HU when exact) against the same cubes stored as
  float32 (`cube_encoding="float32"`, the format-1 layout; target: <= 55%);
  loader cubes/s from the patch store on one core, without corruption (target >= 500) and with
  the Models Genesis corruption (corrupt_batch, CPU, batch 6);
  peak RSS of a process streaming a whole patch store, for a store and one 10x larger (target: flat); the 10x
  store is assembled like an extracted one (CRC32C per cube) and must pass `genesis stores verify`'s checks.

`--quick` runs every step on the smallest data (2 tiny phantoms, 16x16x16 cubes) in well under a minute: a
check that the benchmark still runs, not a measurement (its targets are not judged).

    .venv/bin/python benchmarks/patches.py [--scans 6] [--quick] [--work DIR]
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench_common import verdict, work_folder  # benchmarks/: run as scripts, their folder is on sys.path

QUICK_SCANS = 2


def quick_phantom():
    """The smallest phantom the sample writer makes (40 x 64 x 64, coarse voxels)."""
    from pipeline.sample_data.phantom import tiny_config

    return tiny_config()


def quick_cubes():
    """Pretraining cubes that fit the quick phantom: the reference's rule on 16 x 16 x 16 cubes (the corruption
    needs >= 14 voxels a side), small borders."""
    from pipeline.patches.config import PretrainPatchConfig

    return PretrainPatchConfig(cube_size=(16, 16, 16), per_scan=10, border_yx=4, border_z=2, min_slices=16)


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
    """A patch store `factor` times larger: the source's cubes repeated, copy k's scans named `<scan_id>#k`.

    Built the way extraction builds a store (`pipeline.patches.assemble`): the source's stored cubes are saved as
    encoded parts and assembled into a new array of the source's shard size, every inner chunk with its CRC32C, then
    the index and, last, the attributes (n_cubes, counts, a key of its own). `PatchStore` opens it and every shard
    passes `verify`, as `genesis stores verify` checks; copying shard files under new numbers would not (the shard
    grid of the larger array cuts rows elsewhere, and a shard the layout needs would be missing)."""
    import numpy as np
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zarr

    import storage_schemas
    from pipeline.patches.store import PatchStore
    from pipeline.patches.assemble import assemble, save_part

    if factor < 1:
        raise ValueError(f"grow_store: factor must be >= 1, got {factor}")
    source = PatchStore(src)
    n, shard_rows = len(source), source.shard_rows
    if dst.exists():
        raise ValueError(f"grow_store: {dst} already exists; remove it first")
    scratch = dst.parent / f".{dst.name}-parts"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    try:
        # one part per source shard (bounded memory), in the stored encoding: the cubes are not decoded and re-encoded
        parts = [save_part(scratch / f"{start:09d}", source.read(np.arange(start, min(n, start + shard_rows))))
                 for start in range(0, n, shard_rows)]
        zarr.open_group(str(dst), mode="w")
        names = tuple(source.cubes.metadata.dimension_names or ("cube", "c", "z", "y", "x"))
        assemble(dst, "cubes", parts * factor, tuple(source.cubes.shape[1:]), str(source.cubes.dtype), shard_rows,
                 names)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    idx = source.index
    copies = [idx.assign(row=idx["row"] + k * n, scan_id=idx["scan_id"] + (f"#{k}" if k else ""))
              for k in range(factor)]
    big = pd.concat(copies, ignore_index=True)
    pq.write_table(storage_schemas.check_table("patch_index", pa.Table.from_pandas(big, preserve_index=False),
                                               str(dst / "index.parquet")), dst / "index.parquet")
    attrs = copy.deepcopy(source.attrs)
    attrs.update(key=hashlib.sha256(f"{source.key} x{factor}".encode()).hexdigest()[:16], n_cubes=len(big),
                 counts={s: c * factor for s, c in attrs["counts"].items()}, shard_rows=shard_rows,
                 grown_from={"path": str(src), "key": source.key, "factor": factor})
    storage_schemas.validate_attrs("patch_store", {"genesis": attrs}, str(dst))
    zarr.open_group(str(dst), mode="r+").attrs.update({"genesis": attrs})  # last, as a build writes them


def megabytes(path) -> float:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 1e6


def loader_memory(path: str) -> dict:
    """Cubes streamed and peak RSS of a fresh process reading the whole store (`--measure-loader`)."""
    out = subprocess.run([sys.executable, __file__, "--measure-loader", path], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"measuring the loader on {path} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scans", type=int, default=None, help=f"phantom scans (default 6; --quick {QUICK_SCANS})")
    ap.add_argument("--quick", action="store_true", help="every step on the smallest data: a smoke run, not figures")
    ap.add_argument("--work", type=Path, help="work in DIR and keep it (default: a temporary folder, removed)")
    ap.add_argument("--measure-loader", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure_loader:
        _one_core()
        n, _ = loader_rate(args.measure_loader, corrupt=False)
        # VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss across exec, so a child would report its parent's
        peak = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
        print(json.dumps({"cubes": n, "peak_rss": peak}))
        return
    scans = args.scans or (QUICK_SCANS if args.quick else 6)
    if scans < 1:
        ap.error(f"--scans must be >= 1, got {scans}")

    from pipeline.patches.config import PretrainPatchConfig
    from pipeline.patches.extract import extract_pretrain
    from pipeline.patches.store import PatchStore
    from pipeline.sample_data import make_sample_data
    from pipeline.volume_store.convert import convert

    quick = args.quick
    with work_folder(args.work, "genesis-bench-patches-") as work:
        make_sample_data(work / "data", n_scans=scans, seed=0, include_real=False,
                         config=quick_phantom() if quick else None)
        assert convert([str(work / "data")], str(work / "vs"), workers=2, progress=False).ok
        cfg = quick_cubes() if quick else PretrainPatchConfig()
        rates = {}
        for workers in (1, 2):
            shutil.rmtree(work / f"ps{workers}", ignore_errors=True)  # fresh: a reused store measures nothing
            res = extract_pretrain(str(work / "vs"), cfg, out_root=str(work / f"ps{workers}"), workers=workers,
                                   progress=False)
            rates[workers] = (res.n_cubes, res.seconds)
        path = str(res.path)

        print(f"patch store: {res.n_cubes} cubes of {'x'.join(map(str, cfg.cube_size))} from {scans} phantom "
              f"scans{' (quick: tiny phantoms and cubes)' if quick else ''}, {megabytes(path):.1f} MB")
        f32 = extract_pretrain(str(work / "vs"), PretrainPatchConfig(**{**cfg.__dict__, "cube_encoding": "float32"}),
                               out_root=str(work / "ps_f32"), workers=2, progress=False)
        assert f32.n_cubes == res.n_cubes
        ps, ps32 = PatchStore(path), PatchStore(f32.path)
        rows = ps.index["row"].to_numpy()
        assert ps.read_cubes(rows).tobytes() == ps32.read_cubes(rows).tobytes(), "decoded cubes differ"
        per, per32 = megabytes(path) / res.n_cubes, megabytes(f32.path) / res.n_cubes
        print(f"store MB per cube                    : {per:.3f} as built ({ps.cube_encoding['kind']}, "
              f"{ps.cubes.dtype}); {per32:.3f} as float32 ({ps32.cubes.dtype}); ratio {per / per32:.2f} "
              f"(target <= 0.55) {verdict(per / per32 <= 0.55, quick)}; decoded cubes bit-identical")
        for workers, (n, s) in rates.items():
            label = f"extraction, {workers} Dask worker(s)"
            print(f"{label:37s}: {n / s:8.1f} cubes/s ({s:.2f} s, incl. cluster start)")
        _one_core()
        loader_rate(path, corrupt=False)  # warm the page cache
        n, s = loader_rate(path, corrupt=False)
        print(f"loader, 1 core, no corruption        : {n / s:8.1f} cubes/s (target >= 500) "
              f"{verdict(n / s >= 500, quick)}")
        n, s = loader_rate(path, corrupt=True)
        print(f"loader + corrupt_batch, 1 core, B=6  : {n / s:8.1f} cubes/s")
        big = work / "big"
        shutil.rmtree(big, ignore_errors=True)
        t0 = time.perf_counter()
        grow_store(Path(path), big, 10)
        grown = PatchStore(big)
        assert len(grown) == 10 * res.n_cubes
        damaged = [r for r in grown.verify() if r[0] != "ok"]
        assert not damaged, f"the 10x store fails its integrity checks: {damaged}"
        print(f"10x store                            : {len(grown)} cubes, {megabytes(big):.1f} MB, assembled in "
              f"{time.perf_counter() - t0:.2f} s; verify: index and "
              f"{-(-len(grown) // grown.shard_rows)} shards ok (CRC32C per cube)")
        mem = {name: loader_memory(p) for name, p in (("1x", path), ("10x", str(big)))}
        r = mem["10x"]["peak_rss"] / mem["1x"]["peak_rss"]
        print(f"loader peak RSS, whole store streamed: {mem['1x']['cubes']} cubes {mem['1x']['peak_rss'] / 1e6:.0f} MB; "
              f"{mem['10x']['cubes']} cubes {mem['10x']['peak_rss'] / 1e6:.0f} MB; ratio {r:.2f} "
              f"(target: flat) {verdict(r < 1.2, quick)}")


if __name__ == "__main__":
    main()
