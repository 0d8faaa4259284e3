"""Task patch store build speed and per-task memory, for the five target tasks (issue 7, section 6).

Per task, on its sample dataset (`genesis sample-data --dataset ...`, default sizes, no real scans):
  cubes/s building the task patch store with 1 and 2 Dask workers (fresh out roots, nothing reused;
  wall time of `extract_task`, cluster start and assembly included) and the speed-up 2w/1w;
  the peak memory of each case's Dask task (VmHWM reset per task), max and median in MiB, and
  against the case's level-0 scans (voxels x itemsize of every scan the case reads);
  memory against the number of scans: the largest per-case peak with --scans N and with 2N.
The memory figures come from the 2-worker builds: there every case runs in a worker process; with
one worker the cluster runs threads in this process, whose earlier allocations hide a task's growth.
Targets: 2 workers >= 1.6 x one; memory flat in the number of scans: the largest per-case peak with
2N scans is within 1.2 x, or 32 MiB, of the one with N (growth measured in a reused worker process
moves by tens of MiB with the allocator's state, so small peaks need the absolute allowance).
The "balance bound" is the best speed-up 2 workers can reach on these cases, from the 1-worker
per-case seconds (total / max(total / 2, longest case)): few, uneven cases cap it below 2.

`--quick` runs every step on the smallest data (each dataset's small sample, `small=True`, 3 scans, memory
check with 4; PE 5 and 6, the fewest that hold ECC's three folds): a check that the benchmark still runs, not
a measurement (its targets are not judged).

    .venv/bin/python benchmarks/task_patches.py [--tasks ncc,ncs,ecc,lcs,bms] [--scans 6] [--mem-scans 12]
        [--seed 0] [--quick] [--work DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path

import numpy as np

from bench_common import verdict, work_folder  # benchmarks/: run as scripts, their folder is on sys.path

MiB = 1024 * 1024
ALL_TASKS = ("ncc", "ncs", "ecc", "lcs", "bms")


def task_spec(name: str):
    from pipeline.tasks import get_task

    spec = get_task(name)
    if name == "ncc":  # `--negative-ratio all`: every candidate is a cube
        spec = dataclasses.replace(spec, sampling=dataclasses.replace(spec.sampling, negatives_per_positive=None))
    return spec


class Skipped(Exception):
    pass


QUICK_SCANS, QUICK_MEM_SCANS = 3, 4
QUICK_DATASET_SCANS = {"pe": (5, 6)}
"""(scans, memory-check scans) of a quick run where 3 and 4 are too few: ECC's split needs patients of three folds."""


def sample_sizes(dataset: str, args) -> tuple[int, int]:
    """(scans, memory-check scans) of `dataset`'s samples: the options given, else the quick or the default sizes."""
    if args.quick and args.scans is None:
        scans, mem = QUICK_DATASET_SCANS.get(dataset, (QUICK_SCANS, QUICK_MEM_SCANS))
    else:
        scans = args.scans or 6
        mem = 2 * scans
    return scans, mem if args.mem_scans is None else args.mem_scans


def volume_store(dataset: str, n_scans: int, seed: int, where: Path, small: bool = False) -> tuple[str, float, float]:
    """Sample data + volume store; returns (store path, sample seconds, convert seconds)."""
    from pipeline.sample_data.datasets import write_sample
    from pipeline.volume_store.convert import convert

    t0 = time.perf_counter()
    try:
        summary = write_sample(dataset, where / "data", n_scans=n_scans, seed=seed, small=small, include_real=False)
    except (ImportError, ModuleNotFoundError) as exc:
        raise Skipped(f"sample writer for {dataset} not available ({type(exc).__name__}: {exc})") from exc
    status = str(getattr(summary, "status", "") or "")
    if status.startswith("skipped"):
        raise Skipped(f"sample {dataset}: {status}")
    t1 = time.perf_counter()
    res = convert([str(where / "data")], str(where / "vs"), workers=2, progress=False)
    if not res.ok:
        raise Skipped(f"convert of the {dataset} sample failed: {res}")
    return str(where / "vs"), t1 - t0, time.perf_counter() - t1


def case_bytes(vs: str, patch_store: Path) -> dict[str, int]:
    """Level-0 bytes (voxels x itemsize) of every scan each case reads, by case_id."""
    import pyarrow.parquet as pq

    from pipeline.volume_store.store import VolumeStore

    cat = VolumeStore(vs).catalog()
    size = {r.scan_id: int(np.prod(list(r.shape))) * np.dtype(r.dtype).itemsize for r in cat.itertuples()}
    scans = pq.read_table(patch_store / "scans.parquet").to_pylist()
    return {c["case_id"]: sum(size.get(s, 0) for s in c["scan_ids"]) for c in scans}


def n_scans(vs: str) -> int:
    from pipeline.volume_store.store import VolumeStore

    return len(VolumeStore(vs).catalog())


def build(vs: str, spec, seed: int, out_root: Path, workers: int) -> dict:
    from pipeline.patches.task_extract import extract_task

    shutil.rmtree(out_root, ignore_errors=True)
    load = os.getloadavg()[0]
    res = extract_task(vs, spec, seed=seed, out_root=str(out_root), workers=workers, progress=False)
    assert not res.reused, "a fresh out root must not reuse a store"
    sizes = case_bytes(vs, Path(res.path))
    tasks = [t for t in res.tasks if t.get("task_peak_bytes") is not None]
    peaks = [t["task_peak_bytes"] for t in tasks]
    # a worker process's first task also pays one-time set-up (zarr's event loop and pools, allocator arenas):
    # "warm" peaks leave each process's first task out
    first = {}
    for t in sorted(tasks, key=lambda t: t["started"]):
        first.setdefault(t["pid"], t["case_id"])
    warm = [t["task_peak_bytes"] for t in tasks if first.get(t["pid"]) != t["case_id"]] or peaks
    rel = [t["task_peak_bytes"] / sizes[t["case_id"]] for t in tasks if sizes.get(t["case_id"])]
    secs = [t["seconds"] for t in tasks]
    total = sum(secs)
    return {"workers": workers, "cubes": res.n_cubes, "seconds": res.seconds, "cases": len(tasks),
            "pids": len({t["pid"] for t in tasks}), "peak_max": max(peaks, default=0),
            "peak_med": statistics.median(peaks) if peaks else 0, "peak_warm": max(warm, default=0),
            "rel_max": max(rel, default=float("nan")),
            "rel_med": statistics.median(rel) if rel else float("nan"), "case_seconds": total,
            "longest": max(secs, default=0.0), "bound": total / max(total / 2, max(secs, default=0.0)) if total else 1.0,
            "scan_mib_max": max(sizes.values(), default=0) / MiB, "load": (load + os.getloadavg()[0]) / 2,
            "phases": dict(res.phases)}


def run_task(name: str, args, work: Path) -> dict:
    spec = task_spec(name)
    row = {"task": name, "dataset": spec.dataset}
    scans, mem_scans = sample_sizes(spec.dataset, args)
    vs, t_sample, t_conv = volume_store(spec.dataset, scans, args.seed, work / f"{name}-n{scans}",
                                        small=args.quick)
    row["scans"] = n_scans(vs)
    print(f"[{name}] {spec.dataset} sample, {scans} requested -> {row['scans']} scans in the store "
          f"(sample {t_sample:.1f} s, convert {t_conv:.1f} s)", flush=True)
    for w in (1, 2):
        b = build(vs, spec, args.seed, work / f"{name}-n{scans}" / f"ps-w{w}", w)
        row[w] = b
        print(f"[{name}]   {w} worker(s): {b['cubes']} cubes from {b['cases']} cases in {b['seconds']:.2f} s "
              f"= {b['cubes'] / b['seconds']:.1f} cubes/s; per-case work {b['case_seconds']:.2f} s "
              f"(longest case {b['longest']:.2f} s), {b['pids']} worker process(es), load avg {b['load']:.1f}; "
              f"task peak max {b['peak_max'] / MiB:.0f} MiB (after each worker's first task "
              f"{b['peak_warm'] / MiB:.0f} MiB), median {b['peak_med'] / MiB:.0f} MiB, "
              f"max {b['rel_max']:.2f}x its case's level-0 scans (largest case {b['scan_mib_max']:.0f} MiB); "
              "wall s by phase: " + ", ".join(f"{k} {v:.2f}" for k, v in b["phases"].items()), flush=True)
    row["speedup"] = row[1]["seconds"] / row[2]["seconds"]
    row["overhead"] = row[1]["seconds"] - row[1]["case_seconds"]
    print(f"[{name}]   speed-up 2w/1w {row['speedup']:.2f}x (target >= 1.6, balance bound {row[1]['bound']:.2f}x) "
          f"{verdict(row['speedup'] >= 1.6, args.quick)}; outside the cases (plan, assembly, tables) "
          f"{row['overhead']:.2f} s of the 1-worker build", flush=True)
    if mem_scans:
        where = work / f"{name}-n{mem_scans}"
        vs2, t_sample, t_conv = volume_store(spec.dataset, mem_scans, args.seed, where, small=args.quick)
        b = build(vs2, spec, args.seed, where / "ps-w2", 2)
        row["mem"] = b
        row["mem_scans"] = n_scans(vs2)
        ref = row[2]["peak_max"]
        row["mem_ratio"] = b["peak_max"] / ref if ref else float("nan")
        row["mem_flat"] = b["peak_max"] <= 1.2 * ref or b["peak_max"] - ref <= 32 * MiB
        print(f"[{name}]   memory vs scans: {row['mem_scans']} scans, {b['cubes']} cubes, 2 workers: task peak max "
              f"{b['peak_max'] / MiB:.0f} MiB (after first tasks {b['peak_warm'] / MiB:.0f} MiB), median {b['peak_med'] / MiB:.0f} MiB; against {row['scans']} scans "
              f"{ref / MiB:.0f} MiB: ratio {row['mem_ratio']:.2f} (target flat) "
              f"{verdict(row['mem_flat'], args.quick)}; largest case {b['scan_mib_max']:.0f} MiB against "
              f"{row[2]['scan_mib_max']:.0f} MiB, largest peak/case {b['rel_max']:.2f}x against {row[2]['rel_max']:.2f}x "
              f"(sample {t_sample:.1f} s, convert {t_conv:.1f} s)",
              flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default=",".join(ALL_TASKS), help="comma-separated task names (default all five)")
    ap.add_argument("--scans", type=int, default=None,
                    help=f"scans (cases) per sample (default 6; --quick {QUICK_SCANS})")
    ap.add_argument("--mem-scans", type=int, default=None,
                    help=f"scans for the memory-vs-scans check (default 2 x --scans, --quick {QUICK_MEM_SCANS}; "
                         f"0 skips it)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true",
                    help="every step on each dataset's small sample: a smoke run, not figures")
    ap.add_argument("--work", "--keep", dest="keep",
                    help="work in DIR and keep it (default: a temporary folder, removed)")
    args = ap.parse_args()
    warnings.filterwarnings("ignore", message="Port 8787 is already in use")  # another cluster's dashboard
    if (args.scans is not None and args.scans < 1) or (args.mem_scans is not None and args.mem_scans < 0):
        ap.error(f"--scans must be >= 1 and --mem-scans >= 0, got {args.scans} and {args.mem_scans}")
    names = [t.strip().lower() for t in args.tasks.split(",") if t.strip()]
    unknown = sorted(set(names) - set(ALL_TASKS))
    if unknown:
        ap.error(f"unknown task(s) {', '.join(unknown)}; choose from {', '.join(ALL_TASKS)}")
    rows, skipped, failed = [], [], []
    t0 = time.perf_counter()
    with work_folder(args.keep, "genesis-bench-task-patches-") as work:
        for name in names:
            try:
                rows.append(run_task(name, args, work))
            except Skipped as exc:  # the sample's material is not available here: not the benchmark's fault
                skipped.append((name, str(exc)))
                print(f"[{name}] skipped: {exc}", flush=True)
            except Exception as exc:  # a task that cannot be built must not hide the others' figures, nor pass
                failed.append((name, f"{type(exc).__name__}: {exc}"))
                print(f"[{name}] failed: {type(exc).__name__}: {exc}", flush=True)
                traceback.print_exc()
    print()
    sizes = sorted({sample_sizes(task_spec(n).dataset, args) for n in names})
    print("task patch stores, " + " or ".join(f"{n} scans" for n, _ in sizes)
          + f" per {'small ' if args.quick else ''}sample (memory check with "
          + " or ".join(str(m) for _, m in sizes) + f"), seed {args.seed}, {time.perf_counter() - t0:.0f} s in all")
    head = (f"{'task':<5}{'scans':>6}{'cases':>6}{'cubes':>7}{'1w s':>8}{'1w c/s':>8}{'2w s':>8}{'2w c/s':>8}{'2w/1w':>7}"
            f"{'bound':>7}{'fixed s':>8}{'load':>6}{'peak max':>10}{'median':>8}{'max/scan':>9}{'scans2':>7}{'peak2':>7}{'ratio':>7}")
    print(head)
    print("-" * len(head))
    for r in rows:
        a, b = r[1], r[2]
        m = r.get("mem")
        print(f"{r['task']:<5}{r['scans']:>6}{b['cases']:>6}{b['cubes']:>7}{a['seconds']:>8.2f}{a['cubes'] / a['seconds']:>8.1f}"
              f"{b['seconds']:>8.2f}{b['cubes'] / b['seconds']:>8.1f}{r['speedup']:>6.2f}x{a['bound']:>6.2f}x"
              f"{r['overhead']:>8.2f}{(a['load'] + b['load']) / 2:>6.1f}"
              f"{b['peak_max'] / MiB:>7.0f}MiB{b['peak_med'] / MiB:>5.0f}MiB{b['rel_max']:>8.2f}x"
              + (f"{r['mem_scans']:>7}{m['peak_max'] / MiB:>4.0f}MiB{r['mem_ratio']:>7.2f}" if m else f"{'-':>7}" * 3))
    for name, why in skipped:
        print(f"{name:<5} skipped: {why}")
    for name, why in failed:
        print(f"{name:<5} FAILED: {why}")
    if rows:
        print("targets: 2w/1w >= 1.6 -> " + ", ".join(f"{r['task']} {verdict(r['speedup'] >= 1.6, args.quick)}"
                                                   for r in rows)
              + "; memory flat (2N within 1.2x or 32 MiB of N) -> " + ", ".join(
                  f"{r['task']} {verdict(r['mem_flat'], args.quick)}" for r in rows if "mem" in r))
        print("columns: scans = scans in the volume store, cases = cases that gave cubes; wall seconds of extract_task (Dask cluster start and assembly included); bound = best 2-worker "
              "speed-up the per-case work allows; fixed s = 1-worker wall time outside the cases; load = the machine's "
              "1-min load average during the builds (this machine has " + str(os.cpu_count()) + " cores); peak = per-case Dask task peak (VmHWM growth) in the 2-worker "
              "build's worker processes; max/scan = largest peak over its case's level-0 scans; scans2/peak2/ratio = the memory check's scans, its largest peak, and that over "
              "the largest peak with --scans")
    if failed:
        sys.exit(f"task_patches: {len(failed)} task(s) failed: {', '.join(n for n, _ in failed)}")


if __name__ == "__main__":
    main()
