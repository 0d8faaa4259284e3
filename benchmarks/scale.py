"""Stores at full size: conversion, extraction, loading and checking N full-size chest CTs, on local disk and on
a local S3 server, and how the cost grows with N.

The data: N chest-CT phantoms, 512 x 512 in-plane, 100..400 slices, int16 HU (air -1000 outside the body, fat,
soft tissue, lungs about -850, bone +700, Gaussian noise), written slab by slab as LUNA16-like .mhd/.raw files
(subset<K>/<uid>.mhd), so `genesis convert` reads them as CT. Each scan is a pure function of (seed, index); a
folder made for the largest N holds the smaller N's scans as its first ones (hard-linked per N, never copied).

Prints one table, a column per N, for each backend (local disk; the S3 API of a moto server this script starts
on 127.0.0.1, as the tests do):
  conversion MB/s (source bytes / s) with 1 and 2 workers, and its ratio to the read+compress floor (SimpleITK
  read + Blosc with the store's settings, no zarr; 1 process, and 2 processes over halves of the scans);
  peak RSS of a conversion worker and of one task above its worker's idle RSS;
  pretraining extraction cubes/s (2 workers); the loader's cubes/s and peak RSS (a fresh process, one core,
  the whole store streamed after one warm-up pass);
  the times of `genesis stores show` and `genesis stores verify` (subprocesses, as a user runs them);
  store bytes per scan (disk or bucket);
then the targets: cost per scan flat in N (the largest N's at most 1.15x the smallest's; max/min shown), peak memory independent of N (max/min within
1.15), local conversion at most 1.5x the floor, and bucket/disk >= 0.7 for conversion MB/s and loader cubes/s.
A step the S3 backend cannot do yet prints "not supported yet" with the reason, and the run goes on.

`--quick` runs every step on the smallest data (2 scans of 128 x 128 x 36..44, 16^3 cubes, both backends) in
tens of seconds: a check that the benchmark still runs, not a measurement (its targets are not judged).

    .venv/bin/python benchmarks/scale.py [--scans 8 32 64] [--backends local s3] [--quick] [--work DIR] [--out DIR]

Full runs write benchmarks/results/scale.txt and scale.json (after every N, so a stopped run keeps what it
measured); quick runs write into the work folder unless --out says otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from bench_common import verdict, work_folder  # benchmarks/: run as scripts, their folder is on sys.path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
UID_ROOT = "1.3.6.1.4.1.14519.5.2.1.6279.6001.9"
"""LUNA16's series-UID root, with a 9 our own scans start with (no real series UID clashes)."""
STRATA = 8
"""Each block of STRATA scans covers the slice range evenly (in a seeded order), so every N that is a multiple
of 8 has nearly the same mean scan size and a cost per scan compares across N without a small sample's noise."""
FLAT = 1.15
FLOOR_TARGET = 1.5
BUCKET_SHARE = 0.7


# ---- the phantoms: realistic bytes at full size, streamed, never a whole scan (let alone N) in memory


@dataclass(frozen=True)
class PhantomSize:
    """The size of the generated scans: in-plane side, slice-count range, spacing (z, y, x) in mm."""

    inplane: int = 512
    slices: tuple[int, int] = (100, 400)
    spacing: tuple[float, float, float] = (1.25, 0.7, 0.7)
    slab: int = 16
    """Slices rendered at once: the generator's memory is a slab, never a scan."""


FULL = PhantomSize()
QUICK = PhantomSize(inplane=128, slices=(36, 44), spacing=(2.5, 2.8, 2.8))


@dataclass(frozen=True)
class ScanPlan:
    index: int
    uid: str
    subset: int
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    body: tuple[float, float]
    """Semi-axes (x, y) of the body outline in voxels."""
    lung_span: tuple[float, float]
    """Where the lungs start and end, as fractions of the slice range."""
    seed: int

    @property
    def raw_bytes(self) -> int:
        return int(np.prod(self.shape)) * 2


def plan_scan(seed: int, index: int, size: PhantomSize) -> ScanPlan:
    """Scan `index` of the seeded series: its slice count from its stratum, its body shape from its own rng."""
    block, pos = divmod(index, STRATA)
    order = np.random.default_rng([seed, 7, block]).permutation(STRATA)
    rng = np.random.default_rng([seed, index])
    lo, hi = size.slices
    width = (hi - lo + 1) / STRATA
    stratum = int(order[pos])
    slices = int(min(hi, lo + int(width * stratum + rng.random() * width)))
    n = size.inplane
    body = (n * (0.40 + 0.04 * rng.random()), n * (0.28 + 0.03 * rng.random()))
    lung_span = (0.10 + 0.08 * rng.random(), 0.82 + 0.08 * rng.random())
    return ScanPlan(index=index, uid=f"{UID_ROOT}{seed:03d}{index:06d}", subset=index % 10,
                    shape=(slices, n, n), spacing=size.spacing, body=body, lung_span=lung_span, seed=seed)


def _slice_labels(plan: ScanPlan, z: int, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """Noise-free HU of slice z (float32)."""
    nz, n, _ = plan.shape
    a, b = plan.body
    t = (z + 0.5) / nz
    r2 = (xx / a) ** 2 + (yy / b) ** 2
    hu = np.full((n, n), -1000.0, dtype=np.float32)
    hu[r2 <= 1.0] = -100.0                     # subcutaneous fat
    hu[r2 <= 0.86 ** 2] = 40.0                 # muscle and organs
    lo, hi = plan.lung_span
    if lo < t < hi:
        s = np.sin(np.pi * (t - lo) / (hi - lo)) ** 0.5  # lungs grow from the apex and shrink at the diaphragm
        la, lb, dx = 0.36 * a * s, 0.70 * b * s, 0.42 * a
        for side in (-1, 1):
            hu[((xx - side * dx) / max(la, 1.0)) ** 2 + ((yy + 0.05 * b) / max(lb, 1.0)) ** 2 <= 1.0] = -850.0
        theta = np.arctan2(yy / b, xx / a)     # ribs: a broken ring just inside the fat
        hu[(r2 > 0.80 ** 2) & (r2 <= 0.86 ** 2) & (np.cos(14 * theta) > 0.55)] = 700.0
    spine = ((xx / (0.11 * b)) ** 2 + ((yy - 0.72 * b) / (0.11 * b)) ** 2)
    hu[spine <= 1.0] = 700.0
    hu[spine <= 0.45] = 300.0                  # marrow
    hu[(xx + 0.12 * a) ** 2 + (yy - 0.45 * b) ** 2 <= (0.07 * b) ** 2] = 45.0  # aorta
    return hu


def render_slab(plan: ScanPlan, z0: int, z1: int) -> np.ndarray:
    """Slices [z0, z1) as int16 HU; the noise is seeded by (seed, index, z0), so a slab is the same however the
    scan is cut into slabs of that size."""
    _, n, _ = plan.shape
    c = (n - 1) / 2
    yy, xx = np.meshgrid(np.arange(n, dtype=np.float32) - c, np.arange(n, dtype=np.float32) - c, indexing="ij")
    rng = np.random.default_rng([plan.seed, plan.index, z0])
    out = np.empty((z1 - z0, n, n), dtype=np.int16)
    for k, z in enumerate(range(z0, z1)):
        hu = _slice_labels(plan, z, yy, xx)
        hu += rng.standard_normal((n, n), dtype=np.float32) * 20.0
        np.clip(np.rint(hu), -1024, 3071, out=hu)
        out[k] = hu
    return out


def _mhd_header(plan: ScanPlan) -> str:
    nz, ny, nx = plan.shape
    sz, sy, sx = plan.spacing
    return "\n".join([
        "ObjectType = Image", "NDims = 3", "BinaryData = True", "BinaryDataByteOrderMSB = False",
        "CompressedData = False", "TransformMatrix = 1 0 0 0 1 0 0 0 1",
        f"Offset = {-sx * nx / 2:.2f} {-sy * ny / 2:.2f} {-sz * nz:.2f}", "CenterOfRotation = 0 0 0",
        "AnatomicalOrientation = RAI", f"ElementSpacing = {sx:g} {sy:g} {sz:g}", f"DimSize = {nx} {ny} {nz}",
        "ElementType = MET_SHORT", f"ElementDataFile = {plan.uid}.raw", ""])


def write_scan(root: Path, plan: ScanPlan, slab: int) -> Path:
    """subset<K>/<uid>.mhd + .raw under root; the .raw streamed slab by slab to a temporary name, the header
    last, so a scan whose .mhd exists is complete (a rerun skips it)."""
    folder = root / f"subset{plan.subset}"
    folder.mkdir(parents=True, exist_ok=True)
    mhd, raw = folder / f"{plan.uid}.mhd", folder / f"{plan.uid}.raw"
    if mhd.exists() and raw.exists() and raw.stat().st_size == plan.raw_bytes:
        return mhd
    part = raw.with_suffix(".raw.part")
    with open(part, "wb") as f:
        for z0 in range(0, plan.shape[0], slab):
            f.write(render_slab(plan, z0, min(plan.shape[0], z0 + slab)).tobytes())
    os.replace(part, raw)
    mhd.write_text(_mhd_header(plan))
    return mhd


def write_scans(root: Path, n: int, seed: int, size: PhantomSize) -> list[ScanPlan]:
    """Scans 0..n-1 of the seeded series under root (those already there are kept)."""
    plans = [plan_scan(seed, i, size) for i in range(n)]
    for p in plans:
        write_scan(root, p, size.slab)
    return plans


def link_first(root: Path, plans: list[ScanPlan], dest: Path) -> Path:
    """A folder holding exactly `plans`' files, hard-linked from root (no copy): one source folder per N."""
    for p in plans:
        for suffix in (".mhd", ".raw"):
            src = root / f"subset{p.subset}" / f"{p.uid}{suffix}"
            dst = dest / f"subset{p.subset}" / src.name
            if not dst.exists():
                dst.parent.mkdir(parents=True, exist_ok=True)
                os.link(src, dst)
    return dest


# ---- the local S3 server

class LocalS3:
    """moto's S3 server on 127.0.0.1 (tests/s3_server.py), started here and stopped by pid when the run ends.

    The AWS variables of this process point at it, so Dask workers and `genesis` subprocesses reach it too.
    Objects over 1 MB spill to temporary files instead of the server's memory (MOTO_S3_DEFAULT_KEY_BUFFER_SIZE):
    a 64-scan store is several GB."""

    def __init__(self):
        sys.path.insert(0, str(REPO / "tests"))
        try:
            from s3_server import S3Server, configure_environment, new_bucket
        finally:
            sys.path.remove(str(REPO / "tests"))
        os.environ.setdefault("MOTO_S3_DEFAULT_KEY_BUFFER_SIZE", str(2**20))
        self.server = S3Server(configure_environment())
        self.bucket = new_bucket(self.server, "genesis-scale")

    def url(self, name: str) -> str:
        return f"s3://{self.bucket}/{name}"

    def stop(self) -> None:
        self.server.stop()


def tree_bytes(url: str) -> int:
    """Bytes of everything under a store: the files of a folder, the objects under a bucket prefix."""
    if "://" not in url:
        return sum(f.stat().st_size for f in Path(url).rglob("*") if f.is_file())
    from pipeline.storage.objects import open_tree

    return sum(o.size for o in open_tree(url).list())


def remove_tree(url: str) -> None:
    if "://" not in url:
        shutil.rmtree(url, ignore_errors=True)
        return
    from pipeline.storage.objects import open_tree

    open_tree(url).delete_prefix("")


class NotSupported(Exception):
    """A step the S3 backend cannot do yet: printed as such, the run goes on."""


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {text[:160]}"


def _no_stray_folder(work: Path) -> None:
    """Code that does not know URLs treats s3://b/p as the relative path 's3:/b/p': it must not pass as a store."""
    stray = work / "s3:"
    if stray.exists():
        shutil.rmtree(stray, ignore_errors=True)
        raise NotSupported("the s3:// URL was written as a local folder named 's3:'")


# ---- the floor: read the sources and compress their voxels with the store's codec, no zarr

def _floor_part(mhds: list[str]) -> float:
    """benchmarks/convert.py's floor (SimpleITK read, Blosc with the store's settings chunk by chunk, one thread)
    over `mhds`, in this process (a pool process runs it for the 2-process floor)."""
    from convert import floor_seconds  # benchmarks/convert.py: its folder is on sys.path

    from pipeline.volume_store.settings import ConvertSettings

    return floor_seconds([Path(p) for p in mhds], ConvertSettings())


def floor_times(mhds: list[Path]) -> tuple[float, float]:
    """(1 process, 2 processes) seconds: the second splits the scans into halves of equal bytes, as 2 workers
    (largest first) would."""
    one = _floor_part([str(p) for p in mhds])
    halves: list[list[str]] = [[], []]
    loads = [0, 0]
    for p in sorted(mhds, key=lambda p: -p.with_suffix(".raw").stat().st_size):
        k = loads.index(min(loads))
        halves[k].append(str(p))
        loads[k] += p.with_suffix(".raw").stat().st_size
    with ProcessPoolExecutor(2) as pool:
        list(pool.map(_floor_part, [[], []]))  # the processes started and their imports done, outside the timing
        t0 = time.perf_counter()
        list(pool.map(_floor_part, [h for h in halves if h]))
        return one, time.perf_counter() - t0


# ---- the steps, on one backend

def measure_loader(path: str) -> dict:
    """In this (fresh) process, on one core: one warm-up pass over the whole store, then a timed one."""
    import numcodecs
    import torch
    import zarr

    from pipeline.data import CubeStreamConfig, PatchCubes

    torch.set_num_threads(1)
    zarr.config.set({"threading.max_workers": 1})
    numcodecs.blosc.set_nthreads(1)
    ds = PatchCubes(path, CubeStreamConfig(split="all", batch_size=6), rank=0, world_size=1)
    for _ in ds.batches():
        pass
    n, t0 = 0, time.perf_counter()
    for b in ds.batches():
        n += b.shape[0]
    seconds = time.perf_counter() - t0
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so a child would report its parent's
    peak = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    return {"cubes": n, "seconds": seconds, "peak_rss": peak}


def _subprocess(args: list[str], timeout: int = 3600) -> tuple[float, subprocess.CompletedProcess]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(TQDM_DISABLE="1")
    t0 = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, timeout=timeout, env=env, cwd=os.getcwd())
    proc.stdout = proc.stdout.decode("utf-8", errors="replace")
    proc.stderr = proc.stderr.decode("utf-8", errors="replace")
    return time.perf_counter() - t0, proc


def genesis(*args: str) -> float:
    """Seconds of `genesis ARGS` in a fresh process (interpreter start included, as a user sees it)."""
    seconds, proc = _subprocess([sys.executable, "-m", "pipeline.cli", *args])
    if proc.returncode:
        tail = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-1:] or [""]
        raise RuntimeError(f"genesis {' '.join(args)} exited {proc.returncode}: {tail[0][:200]}")
    return seconds


@dataclass(frozen=True)
class Step:
    """What one backend measures for one N."""

    backend: str
    n: int
    source: Path
    work: Path
    source_bytes: int
    quick: bool


def store_url(step: Step, name: str, s3: LocalS3 | None) -> str:
    return s3.url(f"n{step.n}/{name}") if step.backend == "s3" else str(step.work / f"n{step.n}-{name}")


def run_backend(step: Step, s3: LocalS3 | None, floors: tuple[float, float], out: dict) -> None:
    """Every figure of one backend and one N into `out`; on s3 the first step that fails ends this backend's
    figures for this N with a "not supported yet" note (on local disk a failure is a bug, and raised)."""
    from pipeline.patches.config import PretrainPatchConfig
    from pipeline.patches.extract import extract_pretrain
    from pipeline.volume_store.convert import convert

    mb = step.source_bytes / 1e6
    out["load_avg"] = os.getloadavg()[0]  # the cores are shared: a figure taken under load says so
    try:
        for workers in (1, 2):
            url = store_url(step, f"vs{workers}w", s3)
            remove_tree(url)
            s = convert([str(step.source)], url, workers=workers, progress=False)
            _no_stray_folder(step.work)
            if not s.ok or len(s.converted) != step.n:
                raise RuntimeError(f"convert --workers {workers}: {s.report().splitlines()[0]}"
                                   + (f"; {s.failed[0][2]}" if s.failed else ""))
            floor = floors[0] if workers == 1 else floors[1]
            out[f"convert{workers}_s"] = s.seconds
            out[f"convert{workers}_mbps"] = mb / s.seconds
            out[f"convert{workers}_floor"] = s.seconds / floor
            out[f"convert{workers}_s_per_scan"] = s.seconds / step.n
            out[f"convert{workers}_peak_rss_mb"] = s.peak_rss_bytes / 1e6
            out[f"convert{workers}_task_peak_mb"] = s.task_peak_bytes / 1e6
            out["load_avg"] = max(out["load_avg"], os.getloadavg()[0])
            if workers == 1:
                remove_tree(url)  # the 2-worker store is the one the later steps use
        vs = store_url(step, "vs2w", s3)
        out["store_mb_per_scan"] = tree_bytes(vs) / 1e6 / step.n
        out["show_s"] = genesis("stores", "show", vs)
        out["verify_s"] = genesis("stores", "verify", vs)
        out["verify_s_per_scan"] = out["verify_s"] / step.n
        cfg = quick_cubes() if step.quick else PretrainPatchConfig()
        ps_root = store_url(step, "ps", s3)
        remove_tree(ps_root)
        res = extract_pretrain(vs, cfg, out_root=ps_root, workers=2, progress=False)
        _no_stray_folder(step.work)
        out["cubes"] = res.n_cubes
        out["extract_s"] = res.seconds
        out["extract_cubes_per_s"] = res.n_cubes / res.seconds
        out["extract_s_per_scan"] = res.seconds / step.n
        seconds, proc = _subprocess([sys.executable, __file__, "--measure-loader", str(res.path)])
        if proc.returncode:
            raise RuntimeError(f"the loader on {res.path} exited {proc.returncode}: "
                               f"{(proc.stderr.strip().splitlines() or [''])[-1][:200]}")
        got = json.loads(proc.stdout.strip().splitlines()[-1])
        out["loader_cubes_per_s"] = got["cubes"] / got["seconds"]
        out["loader_peak_rss_mb"] = got["peak_rss"] / 1e6
        out["load_avg"] = max(out["load_avg"], os.getloadavg()[0])
    except Exception as exc:
        if step.backend != "s3":
            raise
        out["not_supported"] = _reason(exc)
        if not isinstance(exc, NotSupported):
            out["traceback"] = traceback.format_exc(limit=4)
    finally:
        for name in ("vs1w",):
            try:
                remove_tree(store_url(step, name, s3))
            except Exception:  # noqa: BLE001 - cleanup of a store the backend could not write
                pass


def quick_cubes():
    """The quick phantoms' cubes: 16^3, small borders (benchmarks/patches.py's quick recipe)."""
    from patches import quick_cubes as cubes

    return cubes()


# ---- the table

ROWS = [  # (key, label, format); per backend, a column per N
    ("convert1_mbps", "convert, 1 worker, MB/s", "{:.1f}"),
    ("convert1_floor", "  / floor (1 process)", "{:.2f}x"),
    ("convert2_mbps", "convert, 2 workers, MB/s", "{:.1f}"),
    ("convert2_floor", "  / floor (2 processes)", "{:.2f}x"),
    ("convert2_s_per_scan", "convert, 2 workers, s/scan", "{:.2f}"),
    ("convert1_peak_rss_mb", "worker peak RSS, 1 worker, MB", "{:.0f}"),
    ("convert2_peak_rss_mb", "worker peak RSS, 2 workers, MB", "{:.0f}"),
    ("convert2_task_peak_mb", "task peak above idle, MB", "{:.0f}"),
    ("extract_cubes_per_s", "extraction, 2 workers, cubes/s", "{:.1f}"),
    ("extract_s_per_scan", "extraction, s/scan", "{:.2f}"),
    ("loader_cubes_per_s", "loader, 1 core, cubes/s", "{:.0f}"),
    ("loader_peak_rss_mb", "loader peak RSS, MB", "{:.0f}"),
    ("show_s", "stores show, s", "{:.2f}"),
    ("verify_s", "stores verify, s", "{:.2f}"),
    ("store_mb_per_scan", "store MB per scan", "{:.1f}"),
    ("load_avg", "machine load (1-min average, max seen)", "{:.1f}"),
]
COMMON = [
    ("source_mb_per_scan", "source MB per scan", "{:.1f}"),
    ("mean_slices", "mean slices per scan", "{:.0f}"),
    ("floor1_mbps", "floor read+compress, 1 process, MB/s", "{:.1f}"),
    ("floor2_mbps", "floor read+compress, 2 processes, MB/s", "{:.1f}"),
    ("cluster_start_s", "Dask 2-worker cluster start, s", "{:.2f}"),
]


def _cell(value, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def ratio(values: list[float]) -> float | None:
    values = [v for v in values if v]
    return max(values) / min(values) if len(values) > 1 else None


def render(results: dict, quick: bool) -> str:
    ns = sorted(int(n) for n in results["common"])
    width = 12
    head = f"{'':40s}{'backend':>8s}" + "".join(f"{'N=' + str(n):>{width}s}" for n in ns)
    lines = [results["title"], head]
    for key, label, fmt in COMMON:
        lines.append(f"{label:40s}{'':>8s}" + "".join(f"{_cell(results['common'][str(n)].get(key), fmt):>{width}s}"
                                                      for n in ns))
    for backend in results["backends"]:
        per = results.get(backend, {})
        for key, label, fmt in ROWS:
            lines.append(f"{label:40s}{backend:>8s}" + "".join(
                f"{_cell(per.get(str(n), {}).get(key), fmt):>{width}s}" for n in ns))
        for n in ns:
            why = per.get(str(n), {}).get("not_supported")
            if why:
                lines.append(f"{backend} N={n}: not supported yet ({why})")
    lines.append("targets:")
    lines += targets(results, ns, quick)
    return "\n".join(lines)


def targets(results: dict, ns: list[int], quick: bool) -> list[str]:
    out = []
    local = results.get("local", {})

    def over_n(backend: str, key: str) -> float | None:
        return ratio([results.get(backend, {}).get(str(n), {}).get(key) for n in ns])

    def growth(backend: str, key: str) -> float | None:
        first, last = (results.get(backend, {}).get(str(n), {}).get(key) for n in (ns[0], ns[-1]))
        return last / first if first and last and len(ns) > 1 else None

    def line(label: str, value: float | None, target: str, ok) -> str:
        if value is None:
            return f"  {label}: n/a (needs {'two N' if 'over N' in label else 'both backends'})"
        return f"  {label}: {value:.2f} (target {target}) {verdict(ok(value), quick)}"

    for backend in results["backends"]:
        for key, what in (("convert2_s_per_scan", "convert 2 workers"), ("convert1_s_per_scan", "convert 1 worker"),
                          ("extract_s_per_scan", "extraction"), ("verify_s_per_scan", "stores verify")):
            # the target is that a scan costs no more in a larger archive; a cost per scan that falls with N (the
            # fixed start-up spread over more scans) passes, and max/min shows the spread either way
            out.append(line(f"{backend} cost per scan over N, {what}, N={ns[-1]} / N={ns[0]}", growth(backend, key),
                            f"<= {FLAT}", lambda v: v <= FLAT))
            spread = over_n(backend, key)
            if spread is not None:
                out.append(f"    (max/min over N: {spread:.2f})")
        for key, what in (("convert2_peak_rss_mb", "convert worker peak RSS"),
                          ("convert2_task_peak_mb", "convert task peak"), ("loader_peak_rss_mb", "loader peak RSS")):
            out.append(line(f"{backend} memory over N, {what}, max/min", over_n(backend, key),
                            f"<= {FLAT}", lambda v: v <= FLAT))
    for n in ns:
        for workers in (1, 2):
            v = local.get(str(n), {}).get(f"convert{workers}_floor")
            out.append(line(f"local conversion / floor, {workers} worker(s), N={n}", v, f"<= {FLOOR_TARGET}",
                            lambda v: v <= FLOOR_TARGET))
    if "s3" in results["backends"]:
        for n in ns:
            s3 = results.get("s3", {}).get(str(n), {})
            for key, what in (("convert2_mbps", "conversion MB/s"), ("loader_cubes_per_s", "loader cubes/s"),
                              ("extract_cubes_per_s", "extraction cubes/s")):
                a, b = s3.get(key), local.get(str(n), {}).get(key)
                v = a / b if a and b else None
                out.append(line(f"bucket / disk, {what}, N={n}", v, f">= {BUCKET_SHARE}",
                                lambda v: v >= BUCKET_SHARE))
    return out


def cluster_start_seconds() -> float:
    from pipeline.cluster import dask_client

    t0 = time.perf_counter()
    with dask_client(2, None):
        pass
    return time.perf_counter() - t0


# ---- main

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scans", type=int, nargs="+", default=None, help="the N to run (default 8 32 64; --quick 2)")
    ap.add_argument("--backends", nargs="+", choices=("local", "s3"), default=["local", "s3"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="every step on the smallest data: a smoke run, not figures")
    ap.add_argument("--work", type=Path, help="work in DIR and keep it: the generated scans are reused by a rerun "
                                              "(default: a temporary folder, removed)")
    ap.add_argument("--out", type=Path, help="folder for scale.txt/.json (default benchmarks/results; --quick: the "
                                             "work folder)")
    ap.add_argument("--merge", action="store_true", help="add these N to the results already in --out (the same "
                                                         "sizes and seed), replacing any N measured again")
    ap.add_argument("--measure-loader", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure_loader:
        print(json.dumps(measure_loader(args.measure_loader)))
        return
    ns = sorted(set(args.scans or ([2] if args.quick else [8, 32, 64])))
    if ns[0] < 1:
        ap.error(f"--scans must be >= 1, got {ns}")
    size = QUICK if args.quick else FULL
    work_arg = args.work.resolve() if args.work else None
    out_dir = args.out.resolve() if args.out else None
    s3 = None
    with work_folder(work_arg, "genesis-bench-scale-") as work:
        out_dir = out_dir or (work if args.quick else RESULTS)
        out_dir.mkdir(parents=True, exist_ok=True)
        stem = "scale_quick" if args.quick else "scale"
        os.chdir(work)  # code that takes s3://b/p for a relative path writes here, never into the repository
        results: dict = {"title": "", "backends": list(args.backends), "common": {}, "quick": args.quick,
                         "size": json.loads(json.dumps(asdict(size))), "seed": args.seed, "cores": os.cpu_count()}
        earlier = out_dir / f"{stem}.json"
        if args.merge and earlier.exists():
            old = json.loads(earlier.read_text())
            if old.get("size") != results["size"] or old.get("seed") != args.seed:
                ap.error(f"--merge: {earlier} holds other sizes or another seed")
            results.update({k: v for k, v in old.items() if k not in ("title", "backends")})
            results["backends"] = [b for b in ("local", "s3") if b in old["backends"] or b in args.backends]
        try:
            if "s3" in args.backends:
                s3 = LocalS3()
            t0 = time.perf_counter()
            had = {m.stem for m in (work / "data").rglob("*.mhd")}
            plans = write_scans(work / "data", ns[-1], args.seed, size)
            made = [p for p in plans if p.uid not in had]
            rate = sum(p.raw_bytes for p in made) / 1e6 / (time.perf_counter() - t0)
            generated = f"{len(made)} generated at {rate:.0f} MB/s" if made else "all reused from --work"
            for n in ns:
                src = link_first(work / "data", plans[:n], work / f"set{n}")
                mhds = sorted(src.rglob("*.mhd"))
                nbytes = sum(p.raw_bytes for p in plans[:n]) + sum(p.stat().st_size for p in mhds)
                for p in mhds:  # the same page-cache state for every measurement
                    p.with_suffix(".raw").read_bytes()
                f1, f2 = floor_times(mhds)
                results["common"][str(n)] = {
                    "source_mb_per_scan": nbytes / 1e6 / n, "source_mb": nbytes / 1e6,
                    "mean_slices": float(np.mean([p.shape[0] for p in plans[:n]])),
                    "floor1_s": f1, "floor2_s": f2, "floor1_mbps": nbytes / 1e6 / f1, "floor2_mbps": nbytes / 1e6 / f2,
                    "cluster_start_s": cluster_start_seconds()}
                for backend in args.backends:
                    out = results.setdefault(backend, {})[str(n)] = {}  # a merged N measured again: anew
                    run_backend(Step(backend, n, src, work, nbytes, args.quick), s3, (f1, f2), out)
                    for name in ("vs2w", "ps"):  # this N's stores: disk and the server's memory are for the next N
                        try:
                            remove_tree(store_url(Step(backend, n, src, work, nbytes, args.quick), name, s3))
                        except Exception:  # noqa: BLE001
                            pass
                results["title"] = (
                    f"scale: N = {', '.join(map(str, sorted(int(k) for k in results['common'])))} chest-CT phantoms of "
                    f"{size.inplane}x{size.inplane} x {size.slices[0]}..{size.slices[1]} slices (int16), "
                    f"{os.cpu_count()} cores; scans {generated}"
                    + (" (quick: tiny scans, 16^3 cubes)" if args.quick else ""))
                text = render(results, args.quick)
                (out_dir / f"{stem}.txt").write_text(text + "\n")
                (out_dir / f"{stem}.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
                print(f"--- after N={n} ---", flush=True)
            print(text)
        finally:
            if s3 is not None:
                s3.stop()


if __name__ == "__main__":
    main()
