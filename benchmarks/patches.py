"""Patch extraction and loader speed, and loader memory as the store grows.

Prints:
  extraction cubes/s (genesis patches pretrain, 1 and 2 Dask workers) on phantom scans;
  store MB per cube: the store as built (int16 clipped HU when exact) against the same cubes stored as
  float32 (`cube_encoding="float32"`, the format-1 layout; target: <= 55%);
  loader cubes/s from the patch store on one core, without corruption (target >= 500) and with
  the Models Genesis corruption (corrupt_batch, CPU, batch 6);
  peak RSS of a process streaming a whole patch store, for a store and one 10x larger (target: flat); the 10x
  store is assembled like an extracted one (CRC32C per cube) and must pass `genesis stores verify`'s checks.

`--bucket` adds the same store in a bucket: built there (extraction cubes/s into `s3://`), the 10x store copied
there, and the loader's cubes/s and peak RSS from `s3://` against the same store on local disk (target: >= 70%
of local cubes/s, memory flat). `--bucket` alone starts moto's S3 server on 127.0.0.1 for the run (stopped by pid
at the end); `--bucket s3://BUCKET/PREFIX` uses that bucket with the standard AWS environment (AWS_ENDPOINT_URL,
the keys, the region) and removes what it wrote there.

`--quick` runs every step on the smallest data (2 tiny phantoms, 16x16x16 cubes) in well under a minute: a
check that the benchmark still runs, not a measurement (its targets are not judged).

    .venv/bin/python benchmarks/patches.py [--scans 6] [--quick] [--work DIR] [--bucket [s3://BUCKET/PREFIX]]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import json
import shutil
import uuid
import subprocess
import sys
import time
from pathlib import Path

from bench_common import verdict, work_folder  # benchmarks/: run as scripts, their folder is on sys.path

QUICK_SCANS = 2
REPO = Path(__file__).resolve().parent.parent


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
    if "://" in str(path):
        from pipeline.storage.objects import open_tree

        return sum(o.size for o in open_tree(str(path)).list()) / 1e6
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 1e6


@contextlib.contextmanager
def bucket_root(arg: str):
    """A fresh prefix to work in: under `arg` (s3://BUCKET/PREFIX, the AWS environment's endpoint and keys), or with
    `arg` "moto" in a bucket of moto's S3 server, started here on 127.0.0.1 and stopped by pid at the end (the
    AWS variables of this process point at it, so Dask workers and the loader's subprocesses reach it too). What
    the run wrote is removed."""
    from pipeline.storage.objects import open_tree

    server = None
    if arg == "moto":
        sys.path.insert(0, str(REPO / "tests"))
        try:
            from s3_server import S3Server, configure_environment, new_bucket
        finally:
            sys.path.remove(str(REPO / "tests"))
        server = S3Server(configure_environment())
        arg = f"s3://{new_bucket(server, 'genesis-bench')}"
    try:
        tree = open_tree(f"{arg.rstrip('/')}/genesis-bench-patches-{uuid.uuid4().hex[:8]}")
        tree.check()
        try:
            yield tree.url
        finally:
            tree.delete_prefix("")
    finally:
        if server is not None:
            server.stop()


def copy_store(src: Path, url: str) -> None:
    """A published patch store on disk copied under `url` as a build publishes it there: every object, then the
    root zarr.json (the commit object) last."""
    from pipeline.storage.objects import open_tree

    tree = open_tree(url)
    files = sorted(p for p in src.rglob("*") if p.is_file() and p.relative_to(src).as_posix() != "zarr.json")
    for p in files:
        tree.write(p.relative_to(src).as_posix(), p.read_bytes())
    tree.write("zarr.json", (src / "zarr.json").read_bytes())


def steady_rate(path: str, epochs: int = 3, batch: int = 6) -> tuple[int, float, float]:
    """(cubes per epoch, best cubes/s of epochs 1.., reads per second then) of one loader over the whole store, as
    training iterates it: epoch 0 opens the store (from a bucket: its shard indices) and warms the page cache."""
    from pipeline.data import CubeStreamConfig, PatchCubes

    ds = PatchCubes(path, CubeStreamConfig(split="all", batch_size=batch), rank=0, world_size=1)
    best, per_s = 0.0, 0.0
    for epoch in range(epochs):
        ds.set_epoch(epoch)
        before = ds.store.requests
        t0 = time.perf_counter()
        n = sum(b.shape[0] for b in ds.batches())
        s = time.perf_counter() - t0
        if epoch and n / s > best:
            best, per_s = n / s, (ds.store.requests - before) / s
    return n, best, per_s


def bucket_figures(args, work: Path, cfg, path: str, big: Path, quick: bool) -> None:
    """The store built into a bucket, and the loader from there against local disk (`--bucket`)."""
    from pipeline.data import CubeStreamConfig
    from pipeline.patches.extract import extract_pretrain
    from pipeline.patches.store import PatchStore

    with bucket_root(args.bucket) as root:
        where = "moto S3 server on 127.0.0.1" if args.bucket == "moto" else root.split("/genesis-bench-")[0]
        res = extract_pretrain(str(work / "vs"), cfg, out_root=f"{root}/ps", workers=2, progress=False)
        assert PatchStore(res.path).key == PatchStore(path).key
        print(f"bucket ({where}):")
        print(f"extraction into s3://, 2 Dask workers  : {res.n_cubes / res.seconds:8.1f} cubes/s "
              f"({res.seconds:.2f} s, incl. cluster start); {megabytes(res.path):.1f} MB in the bucket")
        copy_store(big, f"{root}/big")
        remote_big = f"{root}/big"
        rows = PatchStore(remote_big).index["row"].to_numpy()
        assert PatchStore(remote_big).read_cubes(rows[:12]).tobytes() == PatchStore(big).read_cubes(rows[:12]).tobytes()
        for label, local, remote in (("store", path, res.path), ("10x store", str(big), remote_big)):
            local_n, local_rate, _ = steady_rate(local)
            n, rate, gets = steady_rate(remote)
            assert n == local_n
            shards = -(-len(PatchStore(local)) // PatchStore(local).shard_rows)
            print(f"loader, 1 core, {label} ({shards} shards), epochs 1-2: local disk {local_rate:7.1f} cubes/s, s3:// "
                  f"{rate:7.1f} cubes/s = {rate / local_rate:.0%} of local (target >= 70%) "
                  f"{verdict(rate >= 0.7 * local_rate, quick)}; {gets:.0f} GET/s, {rate / max(gets, 1e-9):.1f} "
                  f"cubes per GET")
        mem = {name: loader_memory(p) for name, p in (("local", str(big)), ("1x", res.path), ("10x", remote_big))}
        r = mem["10x"]["peak_rss"] / mem["1x"]["peak_rss"]
        config = CubeStreamConfig()
        window = 2 * config.bucket_window * config.buffer_size  # cubes held: the window served and the one ahead
        judged = verdict(r < 1.2, quick) if mem["1x"]["cubes"] >= window else \
            f"(not judged: the store holds fewer than the {window} cubes of two bucket windows)"
        print(f"loader peak RSS from s3://, whole store: {mem['1x']['cubes']} cubes {mem['1x']['peak_rss'] / 1e6:.0f} "
              f"MB; {mem['10x']['cubes']} cubes {mem['10x']['peak_rss'] / 1e6:.0f} MB; ratio {r:.2f} (target: flat) "
              f"{judged}; the 10x store from local disk {mem['local']['peak_rss'] / 1e6:.0f} MB (a bucket holds "
              f"{window} cubes as stored, and the reads in flight)")


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
    ap.add_argument("--bucket", nargs="?", const="moto", metavar="s3://BUCKET/PREFIX",
                    help="also build and read the store in a bucket (alone: a moto S3 server started for the run)")
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
        if args.bucket:
            bucket_figures(args, work, cfg, path, big, quick)


if __name__ == "__main__":
    main()
