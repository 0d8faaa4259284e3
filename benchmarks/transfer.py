"""The transfer grid (`pipeline.transfer`, issue 8 section 8): how fast it runs fine-tunings, what a Ray Train
start-up costs and what grouping buys, GPU sharing, and what pretraining does on the sample tasks.

Prints:
  1. CPU, the same scratch fine-tunings (the "speed grid": --speed-tasks x --speed-seeds, full labels) run three
     ways (after an unmeasured 1-epoch fine-tuning per task that warms file caches and Ray), each with a fresh
     MLflow database and Ray storage path (nothing finished earlier can be reused):
     one trial at a time (max_concurrent 1, 1 fine-tuning per trial), 2 trials at once (1 per trial), and 2 at
     once with --group fine-tunings per trial. Per way: fine-tunings per hour (cells / wall time of the
     `transfer` call, checks, Tune and the table included) and where each trial's time goes, from MLflow alone:
       trial wall       = last child run's end - first child run's start (a trial creates its group's child
                          runs right before it fits its TorchTrainer, and rank 0 ends each run after its test
                          evaluation and model registration);
       fine-tuning time = child run's end - the start of its first training epoch, which is estimated as the
                          first `epoch_seconds` record's timestamp - that epoch's training seconds - one
                          validation pass (the median gap between later epoch records minus their training
                          seconds; 0 when the run had one epoch);
       start-up         = trial wall - the sum of its fine-tunings' times, split into the Ray Train start-up
                          (trial start -> first fine-tuning's first epoch: worker group, imports, data, init)
                          and the set-up between the fine-tunings of a group (model, MLflow params, data);
       start-up share   = start-up / trial wall (for one fine-tuning per trial: time from trial start to its
                          first epoch / its whole time).
  2. GPU (when torch.cuda.is_available()): trials per hour with 1, 2 and 4 trials sharing one GPU
     (gpus_per_trial 1, 0.5, 0.25; max_concurrent 1, 2, 4; one fine-tuning per trial, --gpu-preset,
     --gpu-epochs, scratch). Target: 4 per GPU >= 2.5 x one. On a machine without a GPU it says so.
  3. Science: a tiny Models Genesis U-Net pretrained here (`pipeline.training.pretrain`, preset tiny) on the
     sample LUNA16 data, fine-tuned against scratch on every --tasks sample task at every --label-fractions,
     over --seeds. Per task at the lowest label fraction: pretrained - scratch of the task's first metric (in
     points of %), paired by seed and test fold (one seed: the same head initialisation and batch order for both; a label
     fraction's training rows are the same for every seed), mean and 95% t-interval over seeds (scipy.stats.t).
     Whatever it shows: these are tiny models, a handful of scans and 4 epochs.

Everything is built in --work (default /tmp/genesis-bench-transfer) and reused when it is there: sample data
(a marker file per dataset), volume stores (convert skips converted scans), task and pretraining patch stores
(content-keyed), the pretrained weights (keyed by the pretraining patch store and config). Figures go to
<work>/transfer_figures.json.

    .venv/bin/python benchmarks/transfer.py [--work DIR] [--tasks ncc,ncs,ecc,lcs,bms] [--seeds 0,1,2]
        [--label-fractions 0.25,1] [--speed-tasks ecc,lcs] [--speed-seeds 4] [--group 4] [--epochs N]
        [--gpu-preset paper] [--gpu-epochs 2] [--gpu-trials 8] [--skip speed,gpu,science] [--quick]
        [--no-warmup] [--verbose]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path

ALL_TASKS = ("ncc", "ncs", "ecc", "lcs", "bms")
# sample scans per dataset: the demo's (`make demo`), enough patients for three splits each
SAMPLES = {"luna16": (4, False), "lidc": (3, True), "pe": (6, True), "lits": (6, True), "brats": (4, True)}


# --------------------------------------------------------------------------- data

def sample_store(work: Path, dataset: str, seed: int) -> str:
    """Sample data of `dataset` and its volume store under `work`, built once."""
    from pipeline.sample_data.datasets import write_sample
    from pipeline.volume_store.convert import convert
    from pipeline.volume_store.store import VolumeStore

    n, small = SAMPLES[dataset]
    data = work / "data" / f"{dataset}-n{n}-s{seed}"
    vs = work / "volumes" / f"{dataset}-n{n}-s{seed}"
    if not (data / ".bench-done").exists():
        t0 = time.perf_counter()
        summary = write_sample(dataset, data, n_scans=n, seed=seed, small=small, include_real=False)
        status = str(getattr(summary, "status", "") or "")
        if status.startswith("skipped"):
            raise RuntimeError(f"sample {dataset}: {status}")
        (data / ".bench-done").write_text("ok\n")
        print(f"  sample {dataset}: {n} scans{' (small)' if small else ''} in {time.perf_counter() - t0:.1f} s",
              flush=True)
    if not (vs / ".bench-done").exists():
        t0 = time.perf_counter()
        res = convert([str(data)], str(vs), workers=2, progress=False)
        if not res.ok:
            raise RuntimeError(f"convert of the {dataset} sample failed: {res}")
        (vs / ".bench-done").write_text("ok\n")
        print(f"  volume store {dataset}: {len(VolumeStore(vs).catalog())} scans in {time.perf_counter() - t0:.1f} s",
              flush=True)
    return str(vs)


def task_stores(work: Path, tasks: list[str], seed: int) -> tuple[dict[str, str], dict[str, str]]:
    """task -> task patch store (the registry's spec, as `genesis patches task` builds it); task -> why not."""
    from pipeline.patches.task_extract import extract_task
    from pipeline.tasks import get_task

    stores, missing = {}, {}
    for task in tasks:
        spec = get_task(task)
        try:
            vs = sample_store(work, spec.dataset, seed)
            t0 = time.perf_counter()
            res = extract_task(vs, spec, seed=0, out_root=str(work / "patch_stores"), workers=2, progress=False)
            stores[task] = str(res.path)
            if not res.reused:
                print(f"  task store {task}: {res.n_cubes} cubes in {time.perf_counter() - t0:.1f} s", flush=True)
        except Exception as exc:  # noqa: BLE001 - a task without data must not hide the others' figures
            missing[task] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            print(f"  task {task}: no store ({missing[task]})", flush=True)
    return stores, missing


def store_summary(path: str, fractions: list[float]) -> str:
    from pipeline.patches.store import PatchStore

    ps = PatchStore(path)
    split = ps.index["split"].value_counts()
    per = ", ".join(f"{f:g}: {len(ps.fraction_rows(f))}" for f in fractions)
    return (f"{len(ps)} cubes (train {split.get('train', 0)}, validation {split.get('validation', 0)}, "
            f"test {split.get('test', 0)}; whole-volume test scans {int((ps.scans['n_cubes'] == 0).sum())}); "
            f"training cubes by label fraction {per}")


def pretrained_weights(work: Path, seed: int, epochs: int | None) -> tuple[str, str]:
    """A tiny Models Genesis U-Net pretrained on the sample LUNA16 data, as a state-dict file (an init any
    fresh tracking database can read); (path, how it was made)."""
    import torch

    from pipeline.patches.extract import extract_pretrain
    from pipeline.model_io.load import load_model_state
    from pipeline.training.config import tiny
    from pipeline.training.pretrain import pretrain

    vs = sample_store(work, "luna16", seed)
    patches = extract_pretrain(vs, out_root=str(work / "patch_stores"), workers=2, progress=False)
    config = tiny().with_overrides(epochs=epochs)
    what = (f"tiny preset, {config.epochs} epochs x {config.steps_per_epoch} steps, batch {config.batch_size}, "
            f"on {patches.n_cubes} cubes of pretraining patch store {patches.key}")
    out = work / "pretrained" / f"genesis-tiny-{patches.key}-e{config.epochs}.pt"
    if out.exists():
        return str(out), what + " (reused)"
    t0 = time.perf_counter()
    where = work / "pretrained" / f"run-{time.strftime('%Y%m%d-%H%M%S')}"
    uri = f"sqlite:///{where.resolve()}/mlflow.db"
    where.mkdir(parents=True, exist_ok=True)
    res = pretrain(str(patches.path), config, workers=1, tracking_uri=uri, storage_path=str(where / "ray"),
                   system_metrics=False)
    if res.error:
        raise RuntimeError(f"pretraining failed: {res.error}")
    state = load_model_state(uri, "models:/genesis-pretrained/latest")
    torch.save(state, out)
    m = res.metrics
    return str(out), what + (f"; pretrained now in {time.perf_counter() - t0:.0f} s, best validation loss "
                             f"{m.get('best_val_loss', float('nan')):.4f}")


# --------------------------------------------------------------------------- one measured grid

@dataclass
class Measured:
    label: str
    grid: object
    seconds: float
    result: object
    place: Path
    runs: list[dict] = field(default_factory=list)
    trials: list[dict] = field(default_factory=list)


def fresh_place(work: Path, label: str) -> Path:
    place = work / "runs" / f"{label.split()[0]}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    place.mkdir(parents=True, exist_ok=False)
    return place


def measure(work: Path, label: str, grid, stores: dict[str, str], verbose: int, place: Path | None = None) -> Measured:
    """Run `grid` into a fresh tracking database and storage path (or rerun it in `place`, where the finished
    fine-tunings are reused and the failed ones run again); its wall time and per-run timings."""
    from pipeline.transfer.run import transfer

    rerun = place is not None
    place = place or fresh_place(work, label)
    print(f"\n[{label}] {grid_text(grid)} -> {place}{' (rerun)' if rerun else ''}", flush=True)
    t0 = time.perf_counter()
    result = transfer(grid, {t: stores[t] for t in grid.tasks}, tracking_uri=f"sqlite:///{place.resolve()}/mlflow.db",
                      storage_path=str(place / "ray"), results_dir=str(place / "results"), verbose=verbose)
    seconds = time.perf_counter() - t0
    if result.reused and not rerun:
        raise RuntimeError(f"[{label}] {result.reused} fine-tunings were reused from a fresh database")
    m = Measured(label, grid, seconds, result, place)
    m.runs = run_timings(result.tracking_uri, result.parent_run_id)
    m.trials = trial_timings(grid, stores, m.runs)
    n_ok = int((result.cells["status"] == "FINISHED").sum())
    print(f"[{label}] {len(result.cells)} fine-tunings ({n_ok} finished, {len(result.failed)} failed) in "
          f"{len(m.trials)} trials, {seconds:.1f} s -> {3600 * len(result.cells) / seconds:.0f} fine-tunings/h",
          flush=True)
    for _, f in result.failed.iterrows():
        print(f"[{label}]   failed: {f['task']} {f['init']} f{f['label_fraction']:g} s{f['seed']}: "
              f"{f['status']} {str(f['error'])[:300]}", flush=True)
    return m


def grid_text(grid) -> str:
    return (f"{len(grid.tasks)} task(s) {','.join(grid.tasks)} x {len(grid.inits)} init(s) x "
            f"{len(grid.label_fractions)} fraction(s) x {len(grid.seeds)} seed(s), preset {grid.preset}"
            f"{'' if grid.epochs is None else f' (epochs <= {grid.epochs})'}, max_concurrent {grid.max_concurrent}, "
            f"{grid.group_size} per trial, gpus_per_trial {grid.gpus_per_trial:g}")


def run_timings(uri: str, parent: str) -> list[dict]:
    """Per child run: start, end (s since the epoch), estimated first-epoch start, epochs, training seconds."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_run(parent).info.experiment_id
    rows = []
    for run in client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{parent}'", max_results=10000):
        tags = run.data.tags
        if "genesis.cell" not in tags:
            continue
        hist = sorted(client.get_metric_history(run.info.run_id, "epoch_seconds"), key=lambda m: m.step)
        row = {"cell": tags["genesis.cell"], "task": tags.get("task"), "init": tags.get("init"),
               "seed": int(tags.get("seed", -1)), "status": run.info.status,
               "start": run.info.start_time / 1000, "end": (run.info.end_time or 0) / 1000 or math.nan,
               "epochs": len(hist), "train_s": sum(m.value for m in hist), "first_epoch": math.nan, "val_s": math.nan}
        if hist:
            # the record is written after the epoch's training and its validation pass
            gaps = [(b.timestamp - a.timestamp) / 1000 - b.value for a, b in zip(hist, hist[1:])]
            val = max(0.0, statistics.median(gaps)) if gaps else 0.0
            row["val_s"] = val
            row["first_epoch"] = hist[0].timestamp / 1000 - hist[0].value - val
        rows.append(row)
    return rows


def trial_timings(grid, stores: dict[str, str], runs: list[dict]) -> list[dict]:
    """Per trial (the grid's groups, rebuilt from the same cells and keys `transfer` used): wall, the sum of
    its fine-tunings' times, start-up split into the Ray Train start-up and the set-up between fine-tunings."""
    from pipeline.transfer.grid import cells_of, group_cells
    from pipeline.transfer.run import inspect_stores

    by_cell: dict[str, dict] = {}
    for r in sorted(runs, key=lambda r: (r["status"] == "FINISHED", r["start"])):  # a rerun: its finished run
        by_cell[r["cell"]] = r
    keys, folds, _ = inspect_stores(grid, {t: p for t, p in stores.items() if t in grid.tasks})
    cells = cells_of(grid, keys, folds)
    trials = []
    for group in group_cells(cells, grid.group_size):
        rs = [by_cell[c.key] for c in group if c.key in by_cell and math.isfinite(by_cell[c.key]["first_epoch"])
              and math.isfinite(by_cell[c.key]["end"])]
        if len(rs) != len(group):
            continue  # a fine-tuning that never trained: no timing for its trial
        rs.sort(key=lambda r: r["first_epoch"])
        start, end = min(r["start"] for r in rs), max(r["end"] for r in rs)
        own = [r["end"] - r["first_epoch"] for r in rs]
        wall = end - start
        ray_startup = rs[0]["first_epoch"] - start
        trials.append({"task": group[0].task, "n": len(rs), "start": start, "end": end, "wall": wall,
                       "own": sum(own), "own_each": own, "train": sum(r["train_s"] for r in rs),
                       "startup": wall - sum(own), "ray_startup": ray_startup,
                       "between": wall - sum(own) - ray_startup})
    return trials


def speed_figures(m: Measured) -> dict:
    n = len(m.result.cells)
    t = m.trials
    wall = sum(x["wall"] for x in t)
    own = [o for x in t for o in x["own_each"]]
    span = (max(x["end"] for x in t) - min(x["start"] for x in t)) if t else math.nan
    return {"label": m.label, "finetunings": n, "failed": len(m.result.failed), "trials": len(t),
            "max_concurrent": m.grid.max_concurrent, "per_trial": m.grid.group_size,
            "gpus_per_trial": m.grid.gpus_per_trial, "seconds": m.seconds, "per_hour": 3600 * n / m.seconds,
            "trials_per_hour": 3600 * len(t) / m.seconds if t else math.nan,
            "span_s": span, "outside_trials_s": m.seconds - span,
            # trial slots (max_concurrent of them over the span) spent inside a trial, not in Tune between trials
            "slot_use": wall / (span * m.grid.max_concurrent) if t else math.nan,
            "trial_wall_s": wall / len(t) if t else math.nan,
            "ray_startup_s": statistics.mean(x["ray_startup"] for x in t) if t else math.nan,
            "between_s": sum(x["between"] for x in t) / max(1, sum(x["n"] - 1 for x in t)) if t else math.nan,
            "startup_per_ft_s": sum(x["startup"] for x in t) / sum(x["n"] for x in t) if t else math.nan,
            "startup_share": sum(x["startup"] for x in t) / wall if wall else math.nan,
            "ft_s": statistics.mean(own) if own else math.nan,
            "train_s": sum(x["train"] for x in t) / len(own) if own else math.nan,
            "epochs": statistics.mean(r["epochs"] for r in m.runs) if m.runs else math.nan,
            "trial_list": [{k: v for k, v in x.items()} for x in t]}


def print_speed(f: dict) -> None:
    print(f"[{f['label']}]   trial wall {f['trial_wall_s']:.1f} s on average: Ray Train start-up "
          f"{f['ray_startup_s']:.1f} s per trial, set-up between a group's fine-tunings {f['between_s']:.1f} s "
          f"(n/a with 1 per trial), start-up {f['startup_per_ft_s']:.1f} s per fine-tuning = "
          f"{100 * f['startup_share']:.0f}% of trial time; a fine-tuning itself {f['ft_s']:.1f} s "
          f"({f['epochs']:.1f} epochs, {f['train_s']:.1f} s of it training steps); trial slots busy "
          f"{100 * f['slot_use']:.0f}% of the trials' span (the rest: Tune between trials, unequal ends); outside "
          f"that span (driver checks, MLflow set-up, Ray Tune start, table) {f['outside_trials_s']:.1f} s", flush=True)


# --------------------------------------------------------------------------- science

def science_figures(m: Measured, pretrained: str) -> list[dict]:
    """Per task, at the lowest label fraction (and the others): pretrained - scratch, paired by seed and, for a
    fold-based task (ECC), by test fold: each (seed, fold) pair is one replicate, so n counts pairs."""
    import numpy as np
    from scipy import stats

    cells = m.result.cells
    ok = cells[(cells["status"] == "FINISHED") & np.isfinite(cells["value"].astype(float))]
    if "fold" not in ok.columns:
        ok = ok.assign(fold=np.nan)
    ok = ok.assign(fold=ok["fold"].astype(float).fillna(-1).astype(int))
    out = []
    for task in m.grid.tasks:
        for fraction in sorted(m.grid.label_fractions):
            sel = ok[(ok["task"] == task) & np.isclose(ok["label_fraction"], fraction)]
            pre = sel[sel["init"] == pretrained].set_index(["seed", "fold"])["value"] * 100
            scr = sel[sel["init"] == "scratch"].set_index(["seed", "fold"])["value"] * 100
            seeds = sorted(set(pre.index) & set(scr.index))
            d = np.array([float(pre[s] - scr[s]) for s in seeds])
            metric = cells.loc[cells["task"] == task, "metric"]
            row = {"task": task, "label_fraction": fraction, "metric": str(metric.iloc[0]) if len(metric) else "",
                   "seeds": [list(map(int, p)) for p in seeds], "n": len(d),
                   "scratch": float(scr.loc[seeds].mean()) if seeds else math.nan,
                   "pretrained": float(pre.loc[seeds].mean()) if seeds else math.nan,
                   "diff": float(d.mean()) if len(d) else math.nan, "lo": math.nan, "hi": math.nan,
                   "diffs": d.tolist(),
                   "failed": int(((cells["task"] == task) & np.isclose(cells["label_fraction"], fraction)).sum()
                                 - len(sel))}
            if len(d) >= 2:
                half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d))
                row["lo"], row["hi"] = float(row["diff"] - half), float(row["diff"] + half)
            out.append(row)
    return out


# --------------------------------------------------------------------------- main

def csv_list(text: str, kind=str) -> list:
    return [kind(t.strip()) for t in text.split(",") if t.strip()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/genesis-bench-transfer", type=Path,
                    help="work folder (data, stores, runs), reused when it exists")
    ap.add_argument("--tasks", default=",".join(ALL_TASKS), help="tasks of the science grid (default all five)")
    ap.add_argument("--seeds", default="0,1,2", help="seeds of the science grid")
    ap.add_argument("--label-fractions", default="0.25,1", help="label fractions of the science grid")
    ap.add_argument("--speed-tasks", default="ecc,lcs", help="tasks of the CPU speed grid")
    ap.add_argument("--speed-seeds", type=int, default=4, help="seeds per task of the CPU speed grid (0..N-1)")
    ap.add_argument("--group", type=int, default=4, help="fine-tunings per trial of the grouped CPU run")
    ap.add_argument("--epochs", type=int, default=None, help="cap the tiny preset's 4 epochs (CPU grids)")
    ap.add_argument("--pretrain-epochs", type=int, default=None,
                    help="tiny pretraining epochs (default the preset's 8)")
    ap.add_argument("--gpu-preset", default="paper", choices=("tiny", "paper"))
    ap.add_argument("--gpu-epochs", type=int, default=2)
    ap.add_argument("--gpu-trials", type=int, default=8, help="trials (one fine-tuning each) per GPU-sharing level")
    ap.add_argument("--skip", default="", help="comma-separated parts to leave out: speed, gpu, science")
    ap.add_argument("--data-seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true",
                    help="smallest meaningful run: speed grid ecc x 2 seeds (group 2), science ecc,lcs x 2 seeds at "
                         "the lowest fraction only, 2 epochs, pretraining 2 epochs, GPU 4 trials")
    ap.add_argument("--no-warmup", action="store_true",
                    help="leave out the unmeasured 1-epoch fine-tunings (one per speed task) before the CPU speed grid")
    ap.add_argument("--verbose", action="store_true", help="Ray worker logs and Tune's progress")
    args = ap.parse_args()
    if args.quick:
        args.tasks, args.seeds, args.speed_tasks, args.speed_seeds, args.group = "ecc,lcs", "0,1", "ecc", 2, 2
        args.label_fractions = str(min(csv_list(args.label_fractions, float)))
        args.epochs = args.epochs or 2
        args.pretrain_epochs = args.pretrain_epochs or 2
        args.gpu_trials = min(args.gpu_trials, 4)
    tasks, speed_tasks = csv_list(args.tasks.lower()), csv_list(args.speed_tasks.lower())
    unknown = sorted(set(tasks + speed_tasks) - set(ALL_TASKS))
    if unknown:
        ap.error(f"unknown task(s) {', '.join(unknown)}; choose from {', '.join(ALL_TASKS)}")
    seeds, fractions = csv_list(args.seeds, int), csv_list(args.label_fractions, float)
    skip = set(csv_list(args.skip))
    if args.group < 2 or args.speed_seeds < 1:
        ap.error(f"--group must be >= 2 (got {args.group}) and --speed-seeds >= 1 (got {args.speed_seeds})")
    warnings.filterwarnings("ignore", message="Port 8787 is already in use")
    # the table's t-test on seeds that gave identical values (a model that predicts one class): p is nan anyway
    warnings.filterwarnings("ignore", message="Precision loss occurred in moment calculation")
    os.environ.setdefault("TQDM_DISABLE", "1")
    verbose = 1 if args.verbose else 0
    if not verbose:
        import logging

        import mlflow  # noqa: F401 - mlflow sets its loggers' level on import: quieten them after it

        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # with verbose 0 the legacy reporter prints nothing
        logging.getLogger("mlflow").setLevel(logging.WARNING)  # "Creating initial MLflow database tables..."

    import ray
    import torch

    from pipeline.transfer.grid import GridConfig
    from pipeline.transfer.run import TRIAL_RESOURCE

    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    gpu_name = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    machine = f"{os.cpu_count()} CPUs, " + (f"GPU {gpu_name}" if gpu_name else "no GPU")
    figures: dict = {"machine": {"cpus": os.cpu_count(), "gpu": gpu_name},
                     "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    print(f"work folder {work} ({machine})", flush=True)
    print("data (built once, reused):", flush=True)
    t0 = time.perf_counter()
    stores, missing = task_stores(work, sorted(set(tasks + speed_tasks), key=ALL_TASKS.index), args.data_seed)
    for task, path in stores.items():
        print(f"  {task}: {Path(path).name}: {store_summary(path, fractions)}", flush=True)
    print(f"  data ready in {time.perf_counter() - t0:.1f} s", flush=True)
    tasks = [t for t in tasks if t in stores]
    speed_tasks = [t for t in speed_tasks if t in stores]

    ray.init(num_cpus=os.cpu_count(), resources={TRIAL_RESOURCE: 1000}, include_dashboard=False,
             log_to_driver=bool(verbose))
    speed: list[dict] = []
    gpu: list[dict] = []
    science: list[dict] = []
    science_rerun = 0
    pretrained_what = ""
    try:
        # ---- 1. CPU: sequential vs 2 at once vs grouped
        if "speed" not in skip and speed_tasks:
            base = dict(tasks=tuple(speed_tasks), inits=("scratch",), seeds=tuple(range(args.speed_seeds)),
                        label_fractions=(1.0,), preset="tiny", epochs=args.epochs, gpus_per_trial=0.0)
            ways = [("sequential-1pt", dict(max_concurrent=1, cells_per_trial=1)),
                    ("concurrent2-1pt", dict(max_concurrent=2, cells_per_trial=1)),
                    (f"concurrent2-{args.group}pt", dict(max_concurrent=2, cells_per_trial=args.group))]
            if not args.no_warmup:  # the first Ray Train run on a fresh machine also pays cold file caches
                try:
                    measure(work, "warm-up (not counted)", GridConfig(**{**base, "seeds": (0,), "epochs": 1},
                                                                       max_concurrent=1, cells_per_trial=1),
                            stores, verbose)
                except Exception as exc:  # noqa: BLE001
                    print(f"[warm-up] failed: {type(exc).__name__}: {exc}", flush=True)
            for label, how in ways:
                try:
                    m = measure(work, label, GridConfig(**base, **how), stores, verbose)
                    f = speed_figures(m)
                    print_speed(f)
                    speed.append(f)
                except Exception as exc:  # noqa: BLE001
                    print(f"[{label}] failed: {type(exc).__name__}: {exc}", flush=True)
                    traceback.print_exc()
        # ---- 2. GPU sharing
        if "gpu" in skip:
            print("\nGPU sharing: skipped (--skip gpu)", flush=True)
        elif not torch.cuda.is_available():
            print("\nGPU sharing: skipped, no GPU on this machine (torch.cuda.is_available() is False)", flush=True)
        elif speed_tasks:
            for share in (1.0, 0.5, 0.25):
                label = f"gpu-{int(round(1 / share))}per"
                n_seeds = max(1, math.ceil(args.gpu_trials / len(speed_tasks)))
                grid = GridConfig(tasks=tuple(speed_tasks), inits=("scratch",), seeds=tuple(range(n_seeds)),
                                  label_fractions=(1.0,), preset=args.gpu_preset, epochs=args.gpu_epochs,
                                  max_concurrent=int(round(1 / share)), cells_per_trial=1, gpus_per_trial=share)
                try:
                    m = measure(work, label, grid, stores, verbose)
                    f = speed_figures(m)
                    print_speed(f)
                    gpu.append(f)
                except Exception as exc:  # noqa: BLE001
                    print(f"[{label}] failed: {type(exc).__name__}: {exc}", flush=True)
                    traceback.print_exc()
        # ---- 3. science: pretrained vs scratch
        if "science" not in skip and tasks:
            print("\npretraining the init (tiny, sample LUNA16):", flush=True)
            weights, pretrained_what = pretrained_weights(work, args.data_seed, args.pretrain_epochs)
            print(f"  {weights}: {pretrained_what}", flush=True)
            grid = GridConfig(tasks=tuple(tasks), inits=("scratch", weights), seeds=tuple(seeds),
                              label_fractions=tuple(sorted(fractions)), preset="tiny", epochs=args.epochs,
                              max_concurrent=2)
            m = measure(work, "science", grid, stores, verbose)
            if len(m.result.failed):
                # not a speed figure: a fine-tuning that failed (e.g. a race between trials) is run once more by
                # rerunning the grid in the same place, which reuses the finished ones
                first_failed = len(m.result.failed)
                m = measure(work, "science", grid, stores, verbose, place=m.place)
                print(f"[science] rerun: {first_failed} failed fine-tunings run again, {m.result.reused} reused, "
                      f"{len(m.result.failed)} still failed", flush=True)
                science_rerun = first_failed
            science = science_figures(m, weights)
            print(m.result.markdown, flush=True)
    finally:
        ray.shutdown()

    figures.update(speed=speed, gpu=gpu, science=science, science_rerun=science_rerun, pretrained=pretrained_what,
                   missing=missing, seconds=time.perf_counter() - t_all)
    out = work / "transfer_figures.json"
    out.write_text(json.dumps(figures, indent=1, default=str))

    # ---- the table
    print()
    print(f"transfer grid benchmark, {machine}, {time.perf_counter() - t_all:.0f} s in all")
    if speed:
        print(f"\n1. CPU, {speed[0]['finetunings']} scratch fine-tunings ({','.join(speed_tasks)} x {args.speed_seeds} "
              f"seeds, full labels, tiny preset{'' if args.epochs is None else f', <= {args.epochs} epochs'})")
        _speed_table(speed)
        ref = next((f for f in speed if f["label"] == "sequential-1pt"), None)
        if ref:
            for f in speed:
                if f is not ref:
                    print(f"   {f['label']}: {f['per_hour'] / ref['per_hour']:.2f}x the sequential rate")
        one = next((f for f in speed if f["label"] == "concurrent2-1pt"), None)
        grp = next((f for f in speed if f["per_trial"] > 1), None)
        if one and grp:
            print(f"   grouping {grp['per_trial']} per trial: {grp['per_hour'] / one['per_hour']:.2f}x the rate of "
                  f"1 per trial at 2 concurrent; start-up per fine-tuning {one['startup_per_ft_s']:.1f} s -> "
                  f"{grp['startup_per_ft_s']:.1f} s")
    if gpu:
        print(f"\n2. GPU sharing, {gpu[0]['finetunings']} trials of one {args.gpu_preset} fine-tuning "
              f"(<= {args.gpu_epochs} epochs) per level")
        _speed_table(gpu)
        one = next((f for f in gpu if f["gpus_per_trial"] == 1.0), None)
        four = next((f for f in gpu if f["gpus_per_trial"] == 0.25), None)
        if one and four:
            r = four["trials_per_hour"] / one["trials_per_hour"]
            print(f"   4 per GPU / 1 per GPU: {r:.2f}x trials per hour (target >= 2.5) "
                  f"{'PASS' if r >= 2.5 else 'MISS'}")
    else:
        print("\n2. GPU sharing: skipped (" + ("--skip gpu" if "gpu" in skip else "no GPU on this machine") + ")")
    if science:
        low = min(fractions)
        print(f"\n3. pretrained (Models Genesis, {pretrained_what}) minus scratch, tiny fine-tuning preset"
              f"{'' if args.epochs is None else f' (<= {args.epochs} epochs)'}, seeds {','.join(map(str, seeds))}; "
              f"points of % of each task's metric, paired by seed (and by test fold for ECC: n counts seed x fold pairs), "
              f"mean [95% t-interval]")
        head = (f"{'task':<5}{'labels':>7}  {'metric':<21}{'n':>3}{'scratch':>9}{'pretrained':>11}{'diff':>8}  "
                f"{'95% CI':<18}{'failed':>7}  per pair")
        print(head)
        print("-" * len(head))
        for r in science:
            ci = f"[{r['lo']:+.1f}, {r['hi']:+.1f}]" if math.isfinite(r["lo"]) else "-"
            mark = " <- lowest" if math.isclose(r["label_fraction"], low) and len(fractions) > 1 else ""
            print(f"{r['task']:<5}{r['label_fraction'] * 100:>6g}%  {r['metric']:<21}{r['n']:>3}"
                  f"{_num(r['scratch'], 9, '.1f')}{_num(r['pretrained'], 11, '.1f')}{_num(r['diff'], 8, '+.1f')}  "
                  f"{ci:<18}{r['failed']:>7}  "
                  + " ".join(f"{d:+.1f}" for d in r["diffs"]) + mark)
        lows = [r for r in science if math.isclose(r["label_fraction"], low)]
        better = [r["task"] for r in lows if math.isfinite(r["lo"]) and r["lo"] > 0]
        worse = [r["task"] for r in lows if math.isfinite(r["hi"]) and r["hi"] < 0]
        print(f"   at {low * 100:g}% labels: interval above 0 for {', '.join(better) or 'no task'}; below 0 for "
              f"{', '.join(worse) or 'no task'}; the rest include 0 (or have < 2 seeds)")
        if science_rerun:
            print(f"   {science_rerun} fine-tunings failed in the first pass and were run once more (see [science] "
                  "above); 'failed' counts those that failed again")
    for task, why in missing.items():
        print(f"{task}: skipped, no task store: {why}")
    print("\nhow the timings are computed (from MLflow alone): trial wall = last child run end - first child run "
          "start; a fine-tuning = its run's end - its first epoch's start (first epoch_seconds record time - that "
          "epoch's training seconds - one validation pass, the median of the later record gaps minus their training "
          "seconds); start-up = trial wall - sum of its fine-tunings (Ray Train start-up = trial start -> first "
          "epoch of its first fine-tuning; the rest is set-up between a group's fine-tunings); share = start-up / "
          "trial wall; fine-tunings/h = fine-tunings / wall time of the transfer() call (driver checks, Tune, table "
          "included); each configuration ran with a fresh SQLite tracking database and Ray storage path")
    print(f"figures: {out}")


def _num(value: float, width: int, spec: str) -> str:
    return f"{value:{spec[0] if spec[0] == '+' else ''}{width}{spec.lstrip('+')}}" if math.isfinite(value) \
        else f"{'-':>{width}}"


def _speed_table(rows: list[dict]) -> None:
    head = (f"   {'configuration':<18}{'conc':>5}{'per':>4}{'gpu':>6}{'ft':>4}{'fail':>5}{'trials':>7}{'wall s':>8}"
            f"{'ft/h':>7}{'trials/h':>9}{'trial s':>8}{'RayT s':>7}{'betw s':>7}{'su/ft s':>8}{'su %':>6}{'ft s':>6}"
            f"{'train s':>8}{'use %':>6}")
    print(head)
    print("   " + "-" * (len(head) - 3))
    for f in rows:
        print(f"   {f['label']:<18}{f['max_concurrent']:>5}{f['per_trial']:>4}{f['gpus_per_trial']:>6g}"
              f"{f['finetunings']:>4}{f['failed']:>5}{f['trials']:>7}{f['seconds']:>8.1f}{f['per_hour']:>7.0f}"
              f"{f['trials_per_hour']:>9.0f}"
              f"{f['trial_wall_s']:>8.1f}{f['ray_startup_s']:>7.1f}{f['between_s']:>7.1f}{f['startup_per_ft_s']:>8.1f}"
              f"{100 * f['startup_share']:>5.0f}%{f['ft_s']:>6.1f}{f['train_s']:>8.1f}{100 * f['slot_use']:>5.0f}%")
    print("   conc = trials at once, per = fine-tunings per trial, ft = fine-tunings, trials = trials with timings, "
          "wall s = the transfer() call, trial s = mean trial wall, RayT s = Ray Train start-up per trial, betw s = "
          "set-up between a group's fine-tunings (each), su/ft s = start-up per fine-tuning, su % = start-up share "
          "of trial time, ft s = a fine-tuning's own time, train s = its training steps (sum of epoch_seconds), "
          "use % = trial slots (max_concurrent x the span from the first trial's start to the last one's end) "
          "spent inside trials")


if __name__ == "__main__":
    main()
