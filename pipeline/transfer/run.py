"""`transfer`: the transfer grid (tasks x inits x label fractions x test folds x seeds) as Ray Tune trials,
recorded as one MLflow parent run with one child run per fine-tuning, ending in the paper's table.

Order of work, and why:
0. The paths, the tracking server and the numbers are checked first (`pipeline.runtime`, `pipeline.cluster`), then
   the stores: a
   fold-based task runs every fold its store holds, or the one `--test-fold` names (a fold the store lacks is
   refused, naming the folds it has). Nothing starts when one is wrong.
1. Every fine-tuning is checked on the driver first (`pipeline.finetune.run.prepare`, the init read once per
   init and fitted to each task's model): what is wrong deterministically becomes a FAILED child run with
   its reason and never reaches Ray, so it is reported, not retried.
2. One grid at a time: before it touches its parent run, a grid takes the lease of its key in the tracking store
   (`pipeline.storage.leases.ExperimentLease`: an experiment tag per claimant, with host, pid, start and an expiry
   renewed every 2 minutes; it works alike for sqlite:/// and http(s):// stores). A second identical grid started
   while the first lives exits 3 (busy) naming the holder's pid, host and start, and changes nothing; it does not
   wait (a grid may run for days) - rerun it afterwards and it reuses every fine-tuning the first finished. A
   holder whose pid is gone from this host, or whose lease expired (10 minutes without renewal: a holder on
   another host), is dead: its lease is taken over and the grid says so.
   The parent run is found by the grid's key (same arguments, same stores -> same key), so a rerun after an
   interruption reuses it: FINISHED child runs are kept and not run again; runs left RUNNING by the
   interrupted attempt are closed as KILLED and run again from their start, and the model versions they
   registered are removed (`pipeline.finetune.leftovers.close_killed`).
3. The rest is grouped per task (`GridConfig.group_size`) into Tune trials; each trial fits one TorchTrainer
   that runs its group's fine-tunings one after the other (one Ray Train start-up per group). Trial drivers
   take no CPU (a 2-CPU machine would otherwise deadlock: two trial drivers holding both CPUs while their
   train workers wait) but one unit of the custom resource `genesis_trial`, when the cluster has it. The console
   shows one line per fine-tuning as it ends (`pipeline.transfer.progress`); Tune's status tables only with
   `--verbose` (`pipeline.cluster.verbose`).
4. The table (`pipeline.transfer.table`) is built from MLflow alone, logged into the parent run, and the best
   fine-tuned model of each task gets the alias `champion`.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from pipeline.cluster import TRIAL_RESOURCE, ensure_ray, ray_resources
from pipeline.cluster import verbose as ray_output_shown
from pipeline.runtime.tracking import Tracker
from pipeline.storage.leases import ExperimentLease
from pipeline.storage.objects import open_tree
from pipeline.tasks.registry import BUILTIN_SOURCE
from pipeline.transfer.grid import Cell, GridConfig, cells_of, folds_of, grid_key, group_cells, short_init

__all__ = ["transfer", "take_lease", "TransferResult", "find_task_stores", "TRIAL_RESOURCE", "set_champions", "show",
           "inspect_stores", "register_store_tasks", "task_files_of"]


@dataclass
class TransferResult:
    parent_run_id: str
    tracking_uri: str
    table: pd.DataFrame
    failed: pd.DataFrame
    cells: pd.DataFrame
    markdown: str
    results_dir: Path | str
    """Where the result files were written: a folder, or an s3:// prefix."""
    reused: int
    ran: int

    @property
    def ok(self) -> bool:
        return self.failed.empty

    def report(self) -> str:
        n = len(self.cells)
        return "\n".join([
            self.markdown, "",
            f"transfer grid: {n} fine-tunings, {n - len(self.failed)} finished ({self.reused} reused from an "
            f"earlier attempt, {self.ran} run now), {len(self.failed)} failed",
            f"  results: {self.results_dir} (results.md, .csv, .png; label_efficiency.png, .csv; cells.csv)",
            f"  show again: genesis transfer show {self.parent_run_id} --tracking-uri {self.tracking_uri}",
            f"  MLflow parent run: {Tracker.at(self.tracking_uri).ui_hint(self.parent_run_id)}"])


def find_task_stores(patches: str | dict[str, str], tasks: tuple[str, ...]) -> dict[str, str]:
    """task -> task patch store. `patches` is a mapping, or a folder holding `task-<task>-<key>` stores (one
    per task; several of one task is ambiguous and refused: name the one you mean with task=PATH)."""
    from pipeline.patches.store import PatchStore

    if isinstance(patches, dict):
        missing = [t for t in tasks if t not in patches]
        if missing:
            raise ValueError(f"no patch store given for task(s) {missing}")
        return {t: str(patches[t]) for t in tasks}
    root = open_tree(patches)  # a folder, or a prefix in a bucket (s3://BUCKET/PREFIX)
    names = root.listdir()
    if not names and (root.local is None or not root.local.is_dir()):
        raise ValueError(f"{root}: no such folder of patch stores")
    found: dict[str, str] = {}
    for task in tasks:
        candidates = []
        for name in (n for n in names if fnmatch.fnmatchcase(n, f"task-{task}-*")):
            p = root.child(name)
            try:
                if PatchStore(p.url).attrs.get("task") == task:
                    candidates.append(p)
            except (ValueError, OSError):
                continue  # still being built, or not a store: not a candidate
        if not candidates:
            raise ValueError(f"{root}: no finished {task} task store (task-{task}-*); build it with "
                             f"`genesis patches task {task} --store VOLUMES --out {root}`")
        if len(candidates) > 1:
            raise ValueError(f"{root}: {len(candidates)} {task} task stores ({', '.join(p.name for p in candidates)}); "
                             f"choose one with --patches {task}=PATH")
        found[task] = candidates[0].url
    return found


def _experiment_id(tracker: Tracker, experiment: str) -> str:
    """The experiment's id, created when missing (two grids creating it at once: the second finds the first's)
    and marked as model training (`Tracker.ensure_experiment`)."""
    return tracker.ensure_experiment(experiment)


def take_lease(tracker: Tracker, experiment: str, key: str) -> ExperimentLease:
    """The grid's lease (`pipeline.storage.leases`), or LeaseBusyError (exit 3) naming the live holder; the dead
    holders it took over are printed."""
    from pipeline.transfer.trial import COMMAND

    lease = ExperimentLease(tracker.client, _experiment_id(tracker, experiment), f"grid.{key}", COMMAND,
                            what=f"transfer grid {key} (experiment {experiment!r} at {tracker.uri})")
    for holder, why in lease.acquire():
        print(f"genesis transfer: took over the grid's lease from {holder.describe()}: {why}", flush=True)
    return lease


def _parent_run(tracking: Tracker | str, experiment: str, key: str, grid: GridConfig,
                name: str | None) -> tuple[str, int]:
    """The grid's parent run (reopened on a rerun) and this attempt's number. Called under the grid's lease."""
    from pipeline.transfer.trial import COMMAND

    tracker = Tracker.at(tracking)
    client = tracker.client
    exp_id = tracker.experiment_id(experiment)
    if exp_id is not None:
        runs = client.search_runs([exp_id], filter_string=f"tags.`genesis.grid_parent` = '{key}'",
                                  order_by=["attributes.start_time DESC"], max_results=1)
        if runs:
            run = runs[0]
            attempt = int(run.data.tags.get("genesis.attempts", "1")) + 1
            client.set_tag(run.info.run_id, "genesis.attempts", str(attempt))
            client.update_run(run.info.run_id, status="RUNNING")
            return run.info.run_id, attempt
    run_id = tracker.create_run(experiment, name or f"transfer-{grid.preset}-{time.strftime('%Y%m%d-%H%M%S')}",
                                tags={"genesis.grid_parent": key, "genesis.grid": key, "genesis.attempts": "1",
                                      "preset": grid.preset, "tasks": ",".join(grid.tasks)}, command=COMMAND)
    params = {f"grid.{k}": (",".join(map(str, v)) if isinstance(v, tuple) else str(v))
              for k, v in grid.to_dict().items()}
    tracker.log_params(run_id, {k: v[:6000] for k, v in params.items()})
    return run_id, 1


def _log_task_files(tracker: Tracker, parent: str, task_files: dict[str, dict[str, str]]) -> None:
    """The parent run keeps every task file of the grid (`task/<name>.yaml`) and, per task, tags
    `task_file_sha256.<task>` and `task_source.<task>` (tags: a rerun reopens the parent)."""
    for task, f in task_files.items():
        tracker.client.set_tag(parent, f"task_file_sha256.{task}", f["sha256"])
        tracker.client.set_tag(parent, f"task_source.{task}", f["source"][:5000])
        tracker.log_text(parent, f["text"], f"task/{f['name']}.yaml")


def _close_interrupted(tracker: Tracker, parent: str) -> int:
    """Child runs still RUNNING belong to an attempt that was stopped (this process holds the grid's lease, so no
    live grid is running them): close them as KILLED and remove the model versions they registered, saying so."""
    from pipeline.finetune.leftovers import close_killed

    exp_id = tracker.run(parent).info.experiment_id
    runs = tracker.search_runs([exp_id], f"tags.mlflow.parentRunId = '{parent}' and attributes.status = 'RUNNING'")
    for r in runs:
        for line in close_killed(tracker, r, "interrupted: the grid was stopped; run again by the rerun"):
            print(f"genesis transfer: {line}", flush=True)
    return len(runs)


def register_store_tasks(stores: dict[str, str]) -> None:
    """A user's task named by its name alone (no task file given in this process) is read from its store's
    recorded task file and registered, so every step of the grid (the protocol, the table) finds it by name."""
    from pipeline.patches.store import PatchStore
    from pipeline.tasks.registry import register, task_names

    for task, path in stores.items():
        if task not in task_names():
            spec = PatchStore(path).task_spec()
            if spec is None:
                raise ValueError(f"unknown task {task!r}: not a built-in task, and {path} records no task file; "
                                 f"give the task file's path in --tasks")
            register(spec, replace=True, source=f"patch store {path}")


def task_files_of(stores: dict[str, str]) -> dict[str, dict[str, str]]:
    """task -> the task file its fine-tunings use (`pipeline.finetune.run.task_of_store`: the task with its store's
    data fields): {"name", "text", "sha256", "source"}, recorded on the parent run and on every child run."""
    from dataclasses import asdict

    from pipeline.finetune.run import task_of_store
    from pipeline.patches.store import PatchStore
    from pipeline.tasks.task_file import task_record

    return {t: asdict(task_record(*task_of_store(t, PatchStore(p)))) for t, p in stores.items()}


def inspect_stores(grid: GridConfig, stores: dict[str, str]) -> tuple[dict[str, str], dict, dict[str, dict]]:
    """Each task store opened once: (task -> content key, task -> test folds to run (`folds_of`: a ValueError
    for a fold the store lacks), task -> what its runs record about it: `store_folds` (the folds it holds),
    `store_cases`, `store_protocol` (how it differs from the reference's data, `protocol.store_differences`))."""
    from pipeline.patches.store import PatchStore
    from pipeline.transfer.protocol import store_cases, store_differences

    opened = {t: PatchStore(p) for t, p in stores.items()}
    held = {t: s.folds for t, s in opened.items()}
    folds = folds_of(grid, held, stores)
    facts = {t: {"store_folds": ",".join(map(str, held[t])), "store_cases": store_cases(s, t) or "",
                 "store_protocol": "; ".join(store_differences(s, t))} for t, s in opened.items()}
    return {t: s.key for t, s in opened.items()}, folds, facts


def _trial_resources(grid: GridConfig) -> dict:
    import ray

    if ray.cluster_resources().get(TRIAL_RESOURCE, 0) >= 1:
        return {"CPU": 0, TRIAL_RESOURCE: 1}
    # A cluster without the custom resource: a sliver of CPU per trial driver (max_concurrent caps trials).
    print(f"genesis transfer: the Ray cluster declares no {TRIAL_RESOURCE!r} resource; trial drivers take "
          f"0.01 CPU each (declare `resources: {{\"{TRIAL_RESOURCE}\": 100}}` on the head node to avoid it)")
    return {"CPU": 0.01}


def transfer(grid: GridConfig, patches: str | dict[str, str], *, tracking_uri: str | None = None,
             experiment: str = "genesis-transfer", storage_path: str | None = None, ray_address: str | None = None,
             name: str | None = None, results_dir: str | None = None, verbose: int | None = None,
             fault_injection: dict | None = None) -> TransferResult:
    """Run the grid (see the module docstring). `verbose`: Ray Tune's verbosity (its tables) when Ray's output
    is shown at all (`--verbose`, `pipeline.cluster.verbose()`): 1 when None; without `--verbose` Tune is silent
    and the progress lines are the grid's output."""
    from pipeline.runtime.hooks import stop_point
    from pipeline.runtime.paths import output_dir
    from pipeline.runtime.tracking import check_experiment, check_uri

    ray_resources(workers=grid.workers_per_trial, gpus_per_worker=grid.gpus_per_trial, ray_address=ray_address,
                  failures=grid.max_failures, workers_option="--workers-per-trial", gpus_option="--gpus-per-trial")
    check_experiment(experiment)
    storage = output_dir(storage_path, "--storage-path", default="ray_results")
    results_dir = output_dir(results_dir, "--results")
    uri = check_uri(tracking_uri)
    stores = find_task_stores(patches, grid.tasks)
    register_store_tasks(stores)
    store_keys, folds, facts = inspect_stores(grid, stores)
    task_files = task_files_of(stores)
    tracker = Tracker(uri)  # the store is opened once the task stores are known to be right
    cells = cells_of(grid, store_keys, folds,
                     {t: f["sha256"] for t, f in task_files.items() if f["source"] != BUILTIN_SOURCE})
    key = grid_key(cells)
    lease = take_lease(tracker, experiment, key)
    try:
        stop_point("transfer:leased")
        return _run_grid(tracker, grid, key, cells, stores, folds, facts, task_files, uri=uri, experiment=experiment,
                         storage=storage, ray_address=ray_address, name=name, results_dir=results_dir,
                         verbose=verbose, fault_injection=fault_injection)
    finally:
        lease.release()


@contextlib.contextmanager
def _tune_output(shown: bool):
    """Ray Tune's console output: its own with `--verbose`, else none. Tune's default output engine prints its
    configuration table, "View detailed results here" and a TensorBoard hint into /tmp/ray whatever the verbosity;
    its documented switch back to the legacy engine (RAY_AIR_NEW_OUTPUT=0), which says nothing at verbosity 0,
    is set while the grid runs."""
    if shown:
        yield
        return
    before = os.environ.get("RAY_AIR_NEW_OUTPUT")
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("RAY_AIR_NEW_OUTPUT", None)
        else:
            os.environ["RAY_AIR_NEW_OUTPUT"] = before


def _run_grid(tracker: Tracker, grid: GridConfig, key: str, cells: list[Cell], stores: dict[str, str], folds: dict,
              facts: dict, task_files: dict, *, uri: str, experiment: str, storage: str, ray_address: str | None,
              name: str | None, results_dir: str | None, verbose: int | None, fault_injection: dict | None
              ) -> TransferResult:
    """The grid, under its lease: the parent run, the leftovers of an interrupted attempt, the pending cells on
    Ray Tune, the table."""
    import ray
    from ray import tune

    from pipeline.finetune.init import check_init, read_init
    from pipeline.finetune.run import prepare
    from pipeline.runtime.driver import run_config_storage
    from pipeline.runtime.tracking import entry_point
    from pipeline.transfer.progress import GridCounts, GridProgress, cell_line
    from pipeline.transfer.table import cells_from_mlflow
    from pipeline.transfer.trial import create_child_run, run_trial

    parent, attempt = _parent_run(tracker, experiment, key, grid, name)
    _log_task_files(tracker, parent, task_files)
    _close_interrupted(tracker, parent)
    done = cells_from_mlflow(tracker, parent)
    finished_keys = set(done.loc[done["status"] == "FINISHED", "cell"]) if len(done) else set()
    pending = [c for c in cells if c.key not in finished_keys]
    settings = {"tracking_uri": uri, "parent_run_id": parent, "grid_key": key, "experiment": experiment,
                "preset": grid.preset, "freeze_encoder": grid.freeze_encoder, "gpus_per_trial": grid.gpus_per_trial,
                "workers_per_trial": grid.workers_per_trial, "max_failures": grid.max_failures,
                "name": f"transfer-{parent[:8]}-a{attempt}", "fault_injection": fault_injection,
                "storage": storage, "epochs": grid.epochs, "stores": facts, "launched_by": entry_point(),
                "task_files": task_files}
    print(f"genesis transfer: {len(cells)} fine-tunings, {len(cells) - len(pending)} already finished "
          f"(parent run {parent}, attempt {attempt})", flush=True)
    for task, task_folds in folds.items():
        if task_folds != (None,):
            print(f"genesis transfer: {task} runs test fold(s) {', '.join(map(str, task_folds))} (its store holds "
                  f"folds {facts[task]['store_folds'].replace(',', ', ')})", flush=True)

    counts = GridCounts(total=len(cells), done=len(cells) - len(pending),
                        widths={"task": max(map(len, grid.tasks)), "init": max(len(short_init(i)) for i in grid.inits)})
    runnable: list[tuple[Cell, object]] = []
    init_states: dict[str, object] = {}
    init_errors: dict[str, str] = {}
    for init in dict.fromkeys(c.init for c in pending):
        try:
            init_states[init] = read_init(init, tracker)
        except ValueError as err:
            init_errors[init] = str(err)
    for cell in pending:
        try:
            if cell.init in init_errors:
                raise ValueError(init_errors[cell.init])
            prep = prepare(stores[cell.task], cell.task, preset=grid.preset, freeze_encoder=grid.freeze_encoder,
                           label_fraction=cell.label_fraction, seed=cell.seed, workers=grid.workers_per_trial,
                           epochs=grid.epochs, fold=cell.fold)
            check_init(prep.config, init_states[cell.init], cell.init)
            runnable.append((cell, prep))
        except ValueError as err:  # deterministic: reported, never sent to Ray
            run_id = create_child_run(cell, settings, {"error": str(err)})
            tracker.mark_failed(run_id, reason=str(err))
            counts.failed += 1
            print(cell_line(counts, task=cell.task, init=cell.init, label_fraction=cell.label_fraction, seed=cell.seed,
                            fold=cell.fold, outcome=f"FAILED before training: {err}"), flush=True)

    ran = len(runnable)
    if runnable:
        groups = group_cells([c for c, _ in runnable], grid.group_size)
        prepared = {c.key: p for c, p in runnable}
        trial_groups = [[(c, prepared[c.key]) for c in g] for g in groups]
        ensure_ray(ray_address)
        refs = {k: (ray.put(v) if v is not None else None) for k, v in init_states.items()}
        trainable = tune.with_resources(
            tune.with_parameters(run_trial, groups=trial_groups, init_refs=refs, settings=settings),
            _trial_resources(grid))
        print(f"genesis transfer: {ran} fine-tunings in {len(trial_groups)} trials, at most {grid.max_concurrent} "
              f"at once", flush=True)
        progress = GridProgress(uri, parent, {c.key for c, _ in runnable}, counts)
        shown = ray_output_shown()  # Tune's tables, its TensorBoard hint: only with --verbose
        tuner = tune.Tuner(
            trainable, param_space={"group": tune.grid_search(list(range(len(trial_groups))))},
            tune_config=tune.TuneConfig(max_concurrent_trials=grid.max_concurrent,
                                        trial_name_creator=lambda t: f"g{t.config['group']}",
                                        trial_dirname_creator=lambda t: f"g{t.config['group']}-{t.trial_id}"),
            run_config=tune.RunConfig(name=settings["name"], **run_config_storage(settings["storage"]),
                                      verbose=(1 if verbose is None else verbose) if shown else 0,
                                      callbacks=[progress]),
        )
        with _tune_output(shown):
            tuner.fit()
    return _finish(tracker, parent, settings, results_dir, reused=len(cells) - len(pending), ran=ran)


@contextlib.contextmanager
def _results_folder(dest: str):
    """A folder to write the grid's result files into: `dest` itself on disk; for a bucket (s3://...) a
    temporary folder whose files are uploaded under `dest` when the block ends (the table's writers and
    MLflow's artifact logging take local files)."""
    if "://" not in dest:
        out = Path(dest)
        out.mkdir(parents=True, exist_ok=True)
        yield out
        return
    import tempfile

    with tempfile.TemporaryDirectory(prefix="genesis-results-") as tmp:
        yield Path(tmp)
        tree = open_tree(dest)
        for f in sorted(Path(tmp).rglob("*")):
            if f.is_file():
                tree.write(f.relative_to(tmp).as_posix(), f.read_bytes())


def _finish(tracker: Tracker, parent: str, settings: dict, results_dir: str | None, reused: int,
            ran: int) -> TransferResult:
    from pipeline.transfer import table as T
    from pipeline.transfer.summary import summarise_parent_run

    cells = T.cells_from_mlflow(tracker, parent)
    table, failed = T.results_table(cells), T.failures(cells)
    dest = results_dir or f"{settings['storage'].rstrip('/')}/{settings['name']}/results"
    markdown = T.to_markdown(table, failed)
    with _results_folder(dest) as out:
        T.write_results(table, failed, cells, out)
        T.log_results(tracker, parent, out)
        summarise_parent_run(tracker, parent, table, markdown, out)  # the table where a user looks in the UI
    champions = set_champions(tracker, cells)
    for task, version in champions.items():
        tracker.client.set_tag(parent, f"champion.{task}", version)
    tracker.client.set_terminated(parent, status="FINISHED")
    return TransferResult(parent_run_id=parent, tracking_uri=tracker.uri, table=table, failed=failed, cells=cells,
                          markdown=markdown, results_dir=Path(dest) if "://" not in dest else dest, reused=reused,
                          ran=ran)


def set_champions(tracking: Tracker | str, cells: pd.DataFrame) -> dict[str, str]:
    """Per task, the grid's best FINISHED fine-tuning (the paper's metric, higher is better) -> alias `champion`
    of its version in genesis-<task>. An existing champion evaluated on the same patch store and test fold (so
    the same test cases) with a better value keeps the alias; one measured on other data is replaced."""
    from pipeline.runtime.tracking import finetuned_model_name

    tracker = Tracker.at(tracking)
    client = tracker.client
    out = {}
    ok = cells[(cells["status"] == "FINISHED") & cells["value"].notna()]
    for task, rows in ok.groupby("task", sort=False):
        if "degenerate" in rows.columns:  # a model that learned beats a degenerate one (pipeline.degenerate)
            learned = rows[rows["degenerate"].fillna("").astype(str).str.strip().isin(("", "nan"))]
            rows = learned if len(learned) else rows
        best = rows.loc[rows["value"].idxmax()]
        name = finetuned_model_name(task)
        versions = tracker.search_model_versions(f"name = '{name}' and tags.run_id = '{best['run_id']}'")
        if not versions:
            continue
        version = max(versions, key=lambda v: int(v.version))
        metric = best["metric"]  # the version tags hold the test metrics under their logged names
        try:
            current = client.get_model_version_by_alias(name, "champion")
            same_data = all(current.tags.get(k) == version.tags.get(k) for k in ("patch_store", "fold"))
            current_value = float(current.tags.get(metric, "nan"))
            if same_data and current_value == current_value and current_value > float(best["value"]):
                out[task] = current.version
                continue
        except Exception:  # noqa: BLE001 - no champion yet
            pass
        client.set_registered_model_alias(name, "champion", version.version)
        out[task] = version.version
    return out


def show(run_id: str, tracking_uri: str | None = None) -> str:
    """The table of a transfer grid's parent run, rebuilt from MLflow alone."""
    from pipeline.runtime.tracking import check_uri
    from pipeline.transfer import table as T

    if not re.fullmatch(r"[0-9a-f]{32}", run_id):
        raise ValueError(f"{run_id!r} is not an MLflow run id (32 hex digits)")
    uri = check_uri(tracking_uri)
    cells = T.cells_from_mlflow(uri, run_id)
    if cells.empty:
        raise ValueError(f"run {run_id} at {uri} has no child fine-tuning runs (not a transfer grid's parent run?)")
    return T.to_markdown(T.results_table(cells), T.failures(cells))
