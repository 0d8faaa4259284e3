"""Conversion speed: the read+compress floor against `genesis convert` with 1 and 2 workers.

Prints, on the same sample scans in one run:
  (a) floor: SimpleITK read + Blosc compression of the arrays (the store's codec), one process
  (b) genesis convert, 1 worker      (c) genesis convert, 2 workers
  (d) a rerun over the finished store
as MB/s of source data and as ratios, plus the peak memory a task needed against the largest
scan. Targets (issue 2): b <= 1.25 x a; c >= 1.7 x faster than b; task memory < 3 x the
largest scan; d < 5% of c.

`--quick` runs every step on the smallest data (2 tiny phantoms, 40 x 64 x 64) in seconds: a check that the
benchmark still runs, not a measurement (its targets are not judged).

`--s3` adds the same conversions into a bucket of a local S3 server (moto, tests/s3_server.py, started and
stopped here): (e) 1 worker and (f) 2 workers into s3://, as MB/s and as a fraction of (b) and (c) on disk
(target, issue 20: >= 0.7), and (g) the rerun over the finished bucket store. moto is a Python server on the
same cores, so these are a floor for what an S3 service gives.

    .venv/bin/python benchmarks/convert.py [--scans 8] [--data DIR] [--repeat N] [--quick] [--work DIR] [--s3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

import numcodecs
import numpy as np
import SimpleITK as sitk
from numcodecs import Blosc

from pipeline.sample_data import make_sample_data
from pipeline.sample_data.phantom import tiny_config
from pipeline.volume_store.convert import convert
from pipeline.volume_store.settings import ConvertSettings

from bench_common import verdict, work_folder  # benchmarks/: run as scripts, their folder is on sys.path


def floor_seconds(mhds: list[Path], settings: ConvertSettings) -> float:
    """Only read every source with SimpleITK and compress its voxels chunk by chunk."""
    numcodecs.blosc.set_nthreads(1)
    codec = Blosc(cname=settings.codec, clevel=settings.clevel,
                  shuffle={"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}[settings.shuffle])
    cz, cy, cx = settings.chunks
    t0 = time.perf_counter()
    for p in mhds:
        img = sitk.ReadImage(str(p))  # kept alive: the view reads its buffer
        arr = sitk.GetArrayViewFromImage(img)
        for z in range(0, arr.shape[0], cz):
            for y in range(0, arr.shape[1], cy):
                for x in range(0, arr.shape[2], cx):
                    codec.encode(np.ascontiguousarray(arr[z:z + cz, y:y + cy, x:x + cx]))
    return time.perf_counter() - t0


def floor_with_store_work_seconds(mhds: list[Path], settings: ConvertSettings) -> float:
    """(a) plus what every stored scan needs beyond it: the source checksum and the pyramid levels."""
    from pipeline.ingest import checksum, discover
    from pipeline.ingest.volume import Volume
    from pipeline.volume_store.image_writer import pyramid

    numcodecs.blosc.set_nthreads(1)
    codec = Blosc(cname=settings.codec, clevel=settings.clevel,
                  shuffle={"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}[settings.shuffle])
    cz, cy, cx = settings.chunks
    sources = {Path(s.files[0]): s for s in discover([str(p) for p in mhds]).scans}
    t0 = time.perf_counter()
    for p in mhds:
        checksum(sources[p])
        img = sitk.ReadImage(str(p))  # kept alive: the view reads its buffer
        arr = sitk.GetArrayViewFromImage(img)
        vol = Volume(voxels=arr, spacing=(2.5, 0.7, 0.7), origin=(0, 0, 0), direction=(), source_direction=(),
                     modality="CT")
        for level, _ in pyramid(vol, settings.pyramid_levels, settings.min_side, settings.pyramid_method):
            for z in range(0, level.shape[0], cz):
                for y in range(0, level.shape[1], cy):
                    for x in range(0, level.shape[2], cx):
                        codec.encode(np.ascontiguousarray(level[z:z + cz, y:y + cy, x:x + cx]))
    return time.perf_counter() - t0


QUICK_SCANS = 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scans", type=int, default=None, help=f"phantom scans (default 8; --quick {QUICK_SCANS})")
    ap.add_argument("--data", help="existing LUNA16-layout folder (default: generate phantoms)")
    ap.add_argument("--repeat", type=int, default=1, help="take the best of N runs of each measurement")
    ap.add_argument("--quick", action="store_true", help="every step on the smallest data: a smoke run, not figures")
    ap.add_argument("--work", type=Path, help="work in DIR and keep it (default: a temporary folder, removed)")
    ap.add_argument("--s3", action="store_true", help="also convert into a bucket of a local S3 server (moto)")
    args = ap.parse_args()
    scans = args.scans or (QUICK_SCANS if args.quick else 8)
    if scans < 1 or args.repeat < 1:
        ap.error(f"--scans and --repeat must be >= 1, got {scans} and {args.repeat}")
    quick = args.quick
    with work_folder(args.work, "genesis-bench-convert-") as work:
        data = Path(args.data) if args.data else work / "data"
        if not args.data:
            make_sample_data(data, n_scans=scans, seed=0, include_real=False,
                             config=tiny_config() if quick else None)
        mhds = sorted(data.rglob("*.mhd"))
        if not mhds:
            raise SystemExit(f"convert benchmark: no .mhd scans under {data}")
        raws = [p.with_suffix(".raw") for p in mhds]
        total = sum(p.stat().st_size for p in mhds + raws)
        largest = max(p.stat().st_size for p in raws)
        for p in mhds + raws:  # same page-cache state for every measurement
            p.read_bytes()
        settings = ConvertSettings()
        mb = total / 1e6

        def best(fn) -> float:
            return min(fn() for _ in range(args.repeat))

        a = best(lambda: floor_seconds(mhds, settings))
        a2 = best(lambda: floor_with_store_work_seconds(mhds, settings))
        summaries = {}

        def run(workers: int) -> float:
            store = work / f"store{workers}"
            shutil.rmtree(store, ignore_errors=True)
            s = convert([str(data)], str(store), settings, workers=workers, progress=False)
            assert s.ok and len(s.converted) == len(mhds), s.report()
            summaries[workers] = s
            return s.seconds

        b = best(lambda: run(1))
        c = best(lambda: run(2))
        d = convert([str(data)], str(work / "store2"), settings, workers=2, progress=False)
        assert len(d.skipped) == len(mhds)
        mem = max(s.task_peak_bytes for s in summaries.values())
        print(f"sample: {len(mhds)} scans, {mb:.1f} MB of source (largest {largest / 1e6:.1f} MB), "
              f"codec blosc {settings.codec} clevel {settings.clevel} {settings.shuffle}, {os.cpu_count()} cores")
        print(f"(a) floor: read + compress, 1 process : {a:7.2f} s  {mb / a:7.1f} MB/s")
        print(f"(a') floor + checksum + pyramid levels: {a2:7.2f} s  {mb / a2:7.1f} MB/s  (the work every stored "
              f"scan needs; not a target)")
        print(f"(b) genesis convert --workers 1       : {b:7.2f} s  {mb / b:7.1f} MB/s  b/a = {b / a:.2f}  "
              f"(target <= 1.25) {verdict(b / a <= 1.25, quick)}; b/a' = {b / a2:.2f}")
        print(f"(c) genesis convert --workers 2       : {c:7.2f} s  {mb / c:7.1f} MB/s  b/c = {b / c:.2f}x "
              f"(target >= 1.7) {verdict(b / c >= 1.7, quick)}")
        print(f"(d) rerun over the finished store     : {d.seconds:7.2f} s  = {100 * d.seconds / c:.1f}% of (c) "
              f"(target < 5%) {verdict(d.seconds / c < 0.05, quick)}")
        print(f"peak memory of one task above its worker's idle RSS: {mem / 1e6:.1f} MB = "
              f"{mem / largest:.2f} x the largest scan (target < 3) {verdict(mem / largest < 3, quick)}; "
              f"worker peak RSS incl. libraries {max(s.peak_rss_bytes for s in summaries.values()) / 1e6:.0f} MB")
        if args.s3:
            bucket_figures(data, len(mhds), mb, settings, best, b, c, quick)


def bucket_figures(data: Path, n: int, mb: float, settings: ConvertSettings, best, b: float, c: float,
                   quick: bool) -> None:
    """(e), (f), (g): the conversions into a bucket of a local S3 server, against (b) and (c) on disk."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from s3_server import S3Server, configure_environment, new_bucket

    server = S3Server(configure_environment())
    try:
        bucket = new_bucket(server, "genesis-bench")
        runs = iter(range(1000))

        def run(workers: int) -> float:
            s = convert([str(data)], f"s3://{bucket}/store{workers}-{next(runs)}", settings, workers=workers,
                        progress=False)
            assert s.ok and len(s.converted) == n, s.report()
            return s.seconds

        e = best(lambda: run(1))
        f = best(lambda: run(2))
        url = f"s3://{bucket}/store-rerun"
        convert([str(data)], url, settings, workers=2, progress=False)
        g = convert([str(data)], url, settings, workers=2, progress=False)
        assert len(g.skipped) == n
        print(f"(e) genesis convert --workers 1 to s3:// : {e:7.2f} s  {mb / e:7.1f} MB/s  = {b / e:.2f} of (b) "
              f"on disk (target >= 0.7) {verdict(b / e >= 0.7, quick)}")
        print(f"(f) genesis convert --workers 2 to s3:// : {f:7.2f} s  {mb / f:7.1f} MB/s  = {c / f:.2f} of (c) "
              f"on disk (target >= 0.7) {verdict(c / f >= 0.7, quick)}")
        print(f"(g) rerun over the finished bucket store: {g.seconds:7.2f} s  (a LIST per scan)")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
