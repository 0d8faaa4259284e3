"""`genesis reproduce`: the papers' experiment end to end in one command.

    data (sample data, or the dataset roots under --data) -> volume stores -> the pretraining patch store and
    the task stores -> Models Genesis pretraining -> the transfer grid (scratch against the model this run
    pretrained) -> the table

Each step calls the stage that does it (`convert`, `extract_pretrain`, `extract_task`, `pretrain`, `transfer`)
and uses what it returns (store paths, the run id); it is printed first as the `genesis` command it equals, and
ends as that command would (its report, its exit status, an error's one line), so a run is also a walk-through of
the command line. This module sits below the command line and never runs it.
A step that fails stops the run, which exits with that step's status (1 the work failed, 2 bad input, 3 a busy
store); a second reproduce into an OUT that another one is writing exits 3 at once, naming it.
The grid's pretrained init is the exact registry version this run's pretraining registered
(`models:/genesis-pretrained/N`, found by the run id), never an alias another run may hold.

`make demo` is these steps on sample data with the demo's settings, plus previews (`pipeline.demo`).
"""

from __future__ import annotations

import json
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.console import EXIT_FAILED, EXIT_OK, ended
from pipeline.runtime.paths import output_dir, shared_path
from pipeline.storage.locks import FileLock
from pipeline.runtime.tracking import Tracker, entry_point

if TYPE_CHECKING:
    from pipeline.transfer.run import TransferResult

__all__ = ["ReproduceConfig", "ReproducePreset", "PRESETS", "SAMPLE_SCANS", "Walkthrough", "Step", "Stores",
           "StepFailed", "ReproduceResult", "reproduce", "dataset_roots", "build_stores", "pretrain_model", "transfer_grid",
           "registered_version"]

DATASETS = ("luna16", "lidc", "pe", "lits", "brats")
LOCK_FILE = ".reproduce.lock"
"""In OUT: held by the reproduce writing there (an flock: a killed run leaves no stale lock)."""
SAMPLE_SCANS = {"luna16": 4, "lidc": 3, "pe": 6, "lits": 6, "brats": 4}
"""Sample scans (cases) per dataset: enough patients for three splits each, small enough for a CPU."""


@dataclass(frozen=True, kw_only=True)
class ReproduceConfig:
    out: Path
    """Everything goes here: sample data, stores, checkpoints, the MLflow database (by default), results."""
    preset: str = "tiny"
    """tiny (width-4 U-Nets, a CPU, minutes) | paper (the papers' recipes: GPU work); see PRESETS."""
    data: Path | None = None
    """Folder of dataset roots (DATA/luna16, DATA/lidc, DATA/pe, DATA/lits, DATA/brats); None: sample data."""
    tasks: tuple[str, ...] | None = None
    """None: every registered task whose dataset is there."""
    seeds: tuple[int, ...] = (0, 1, 2)
    label_fractions: tuple[float, ...] = (1.0,)
    test_fold: int | None = None
    """Fold-based tasks (ECC): run this test fold only; None: every fold (the published ECC number pools its
    three folds). The ECC store is built once and holds every fold either way."""
    max_concurrent: int = 2
    """Transfer trials at once."""
    cells_per_trial: int | None = None
    """Fine-tunings of one task per transfer trial (`genesis transfer --per-trial`); None: the preset's default
    (8 for tiny: one trial per task, the slowest task then runs alone at the end)."""
    gpus_per_trial: float = 0.0
    pretrain_workers: int = 2
    gpus_per_worker: float = 0.0
    """GPUs per pretraining worker."""
    pretrain_epochs: int | None = None
    """Override the pretraining preset's epochs."""
    finetune_epochs: int | None = None
    """Cap each fine-tuning's epochs (None: the fine-tuning preset's)."""
    pretrain_border_z: int | None = None
    """Slices never cropped at each end of a scan for pretraining cubes (`genesis patches pretrain --border-z`);
    None: the reference's 30, under which a scan needs 96 slices."""
    pretrain_min_slices: int | None = None
    """Pretraining skips scans with fewer slices (`--min-slices`); None: the reference's 96."""
    workers: int = 2
    """Dask workers of the conversions and patch extractions."""
    sample_seed: int = 0
    sample_scans: dict[str, int] = field(default_factory=lambda: dict(SAMPLE_SCANS))
    sample_phantom: str | None = None
    """The LUNA16 sample's phantom preset (`genesis sample-data --phantom`); None: the default scan."""
    sample_lits_inplane: int | None = None
    """The small LiTS sample's in-plane voxels (`genesis sample-data --inplane`); None: its default (96)."""
    tracking_uri: str | None = None
    """None: sqlite:///OUT/mlflow.db, with the run artifacts under OUT/mlartifacts."""
    ray_address: str | None = None
    """A running Ray cluster (None: RAY_ADDRESS when set, as inside `ray job submit`; else a local Ray)."""
    worker_logs: bool = False
    """Print the Ray workers' logs (off: the steps' reports and the grid's progress only)."""

    def __post_init__(self) -> None:
        def check(cond, name, msg):
            if not cond:
                raise ValueError(f"ReproduceConfig.{name}: {msg}")

        check(self.preset in PRESETS, "preset", f"must be one of {sorted(PRESETS)}, got {self.preset!r}")
        check(self.data is None or Path(self.data).is_dir(), "data", f"{self.data}: no such folder")
        check(self.tasks is None or len(self.tasks) > 0, "tasks", "must not be empty (None: every task with data)")
        check(self.pretrain_workers >= 1, "pretrain_workers", f"must be >= 1, got {self.pretrain_workers}")
        check(self.workers >= 1, "workers", f"must be >= 1, got {self.workers}")
        check(self.gpus_per_worker >= 0, "gpus_per_worker", f"must be >= 0, got {self.gpus_per_worker}")
        for name in ("pretrain_epochs", "finetune_epochs"):
            value = getattr(self, name)
            check(value is None or value >= 1, name, f"must be >= 1, got {value}")
        self.pretrain_patches()  # its own checks, now
        unknown = sorted(set(self.sample_scans) - set(DATASETS))
        check(not unknown, "sample_scans", f"unknown datasets {unknown}; datasets: {list(DATASETS)}")
        # what the transfer grid would refuse is refused now, not after the data steps and the pretraining
        from pipeline.tasks.registry import get_task
        from pipeline.transfer.grid import GridConfig

        for task in self.tasks or ():
            get_task(task)
        GridConfig(tasks=self.tasks or ("ncc",), inits=("scratch", "pretrained"), seeds=tuple(self.seeds),
                   label_fractions=tuple(self.label_fractions), preset=self.finetune_preset,
                   epochs=self.finetune_epochs, max_concurrent=self.max_concurrent, gpus_per_trial=self.gpus_per_trial,
                   cells_per_trial=self.cells_per_trial, test_fold=self.test_fold)
        from pipeline.finetune.config import preset as finetune_preset
        from pipeline.training.config import preset as pretrain_preset

        width = pretrain_preset(self.pretrain_preset).base_channels
        for spec in map(get_task, self.tasks or ("ncc",)):
            fits = finetune_preset(self.finetune_preset, spec).base_channels
            check(fits == width, "preset", f"{self.preset!r} pretrains a U-Net {width} wide but fine-tunes "
                                           f"{spec.name} {fits} wide: the pretrained weights would not fit")

    def pretrain_patches(self):
        """The PretrainPatchConfig of the pretraining cubes: the reference's sampling, with the borders and
        minimum slices given here."""
        from pipeline.patches.config import PretrainPatchConfig

        return PretrainPatchConfig(**{k: v for k, v in (("border_z", self.pretrain_border_z),
                                                        ("min_slices", self.pretrain_min_slices)) if v is not None})

    def pretrain_patch_args(self) -> list[str]:
        """The `genesis patches pretrain` options that say so."""
        return [a for flag, v in (("--border-z", self.pretrain_border_z), ("--min-slices", self.pretrain_min_slices))
                if v is not None for a in (flag, str(v))]

    @property
    def pretrain_preset(self) -> str:
        return PRESETS[self.preset].pretrain

    @property
    def finetune_preset(self) -> str:
        return PRESETS[self.preset].finetune

    @property
    def uri(self) -> str:
        from pipeline.runtime.tracking import resolve_uri

        return resolve_uri(self.tracking_uri or f"sqlite:///{(Path(self.out) / 'mlflow.db').resolve()}")


@dataclass(frozen=True)
class ReproducePreset:
    pretrain: str
    """`genesis pretrain --preset`."""
    finetune: str
    """`genesis transfer --preset` (its fine-tunings' U-Net width must equal the pretrained one's)."""


PRESETS = {"tiny": ReproducePreset(pretrain="tiny", finetune="tiny"),
           "paper": ReproducePreset(pretrain="paper", finetune="paper")}


class StepFailed(RuntimeError):
    """A step ended with an exit status its command may not have; the message names the command, `code` is
    that status, which `genesis reproduce` exits with (1 the work failed, 2 bad input, 3 a busy store)."""

    def __init__(self, message: str, code: int = EXIT_FAILED):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Step:
    """How one step ended: the exit status its command would have, what the stage returned (None when it
    raised), and the exception it raised (its one line is printed already)."""
    code: int
    result: Any = None
    error: BaseException | None = None


class Walkthrough:
    """Runs stages in this process, each numbered and printed as the `genesis` command it equals, then its exit
    status and time."""

    def __init__(self) -> None:
        self.n = 0

    def title(self, text: str) -> str:
        self.n += 1
        return f"{self.n}. {text}"

    def note(self, text: str) -> None:
        print(f"\n=== {self.title(text)}", flush=True)

    def command(self, title: str, argv: list[str]) -> str:
        title = self.title(title)
        print(f"\n=== {title}\n$ genesis {shlex.join(argv)}", flush=True)
        return title

    def run(self, title: str, argv: list[str], stage: Callable[[], Any],
            status: Callable[[Any], int] = lambda _: EXIT_OK, allowed: tuple[int, ...] = (0,)) -> Step:
        """Run `stage()`, the work of `genesis ARGV`; `status(result)` is the exit status the command gives its
        result. An exception ends the step as it ends the command: its one line on stderr (the traceback too with
        GENESIS_DEBUG), and its exit status. A status outside `allowed` raises StepFailed."""
        title = self.command(title, argv)
        t0 = time.perf_counter()
        try:
            result = stage()
            step = Step(status(result), result)
        except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001 - one line and an exit status, as the command
            step = Step(ended(entry_point(["genesis", *argv]), exc), error=exc)
        print(f"--- {title}: exit {step.code} in {time.perf_counter() - t0:.1f} s", flush=True)
        if step.code not in allowed:
            raise StepFailed(f"genesis {shlex.join(argv)} exited {step.code}", step.code)
        return step


@dataclass
class Stores:
    """What the data steps made."""
    datasets: dict[str, Path]
    """dataset -> its root (sample data or --data)."""
    volumes: Path
    """The LUNA16 volume store (pretraining, NCC)."""
    task_volumes: Path | None
    """The volume store of the other task datasets (None when none is there)."""
    pretrain: Path
    """The pretraining patch store."""
    tasks: dict[str, Path]
    """task -> its task patch store."""
    patch_root: Path


@dataclass
class ReproduceResult:
    stores: Stores
    pretrain_run_id: str
    pretrained: str
    """models:/genesis-pretrained/N: the version this run registered."""
    transfer: TransferResult
    seconds: float

    @property
    def ok(self) -> bool:
        return self.transfer.ok

    def report(self) -> str:
        return "\n".join([self.transfer.report(),
                          f"  pretrained init: {self.pretrained} (MLflow run {self.pretrain_run_id})",
                          f"  reproduce finished in {self.seconds:.0f} s"])


# --------------------------------------------------------------------------- steps

def _tasks_wanted(config: ReproduceConfig):
    from pipeline.tasks.registry import all_tasks, get_task

    return [get_task(t) for t in config.tasks] if config.tasks else all_tasks(builtin_only=True)


def dataset_roots(config: ReproduceConfig, steps: Walkthrough) -> dict[str, Path]:
    """dataset -> root: the sample data written under OUT/sample_data (LUNA16 plus the datasets of the wanted
    tasks), or the roots under --data that exist (the missing ones are named; LUNA16 is required, and so is
    the dataset of every task asked for by name)."""
    wanted = ["luna16", *dict.fromkeys(s.dataset for s in _tasks_wanted(config) if s.dataset != "luna16")]
    if config.data is None:
        roots = {}
        for name in wanted:
            root = Path(config.out) / "sample_data" / name
            scans, small = config.sample_scans.get(name, SAMPLE_SCANS[name]), name != "luna16"
            phantom = config.sample_phantom if name == "luna16" else None
            inplane = config.sample_lits_inplane if name == "lits" else None
            argv = ["sample-data", str(root), "--dataset", name, "--seed", str(config.sample_seed),
                    "--scans", str(scans)] + (["--phantom", phantom] if phantom else []) + \
                (["--inplane", str(inplane)] if inplane else [])
            steps.run(f"sample {name} data in its real layout", argv + (["--small"] if small else []),
                      lambda: _write_sample(name, root, scans, config.sample_seed, small, phantom, inplane))
            if root.exists():  # LIDC and BraTS samples are skipped (with a message) when PyPI cannot be reached
                roots[name] = root
        return roots
    data = Path(config.data)
    roots = {name: data / name for name in wanted if (data / name).is_dir()}
    missing = [name for name in wanted if name not in roots]
    gone = f"; missing {', '.join(str(data / m) for m in missing)} (their tasks are left out)" if missing else ""
    steps.note(f"datasets under {data}: found {', '.join(roots) or 'none'}{gone}")
    if "luna16" in missing:
        raise ValueError(f"{data / 'luna16'}: no LUNA16 root (subsetK/ folders or subsetK.zip + candidates.csv); "
                         f"pretraining and NCC need it")
    if config.tasks:
        named = sorted({s.dataset for s in _tasks_wanted(config)} & set(missing))
        if named:
            raise ValueError(f"--tasks {','.join(config.tasks)}: no dataset root for {', '.join(named)} under {data} "
                             f"(expected {', '.join(str(data / n) for n in named)})")
    return roots


# each stage as its `genesis` command calls it (the paths checked first, the defaults of the command's options),
# printing what the command prints

def _write_sample(name: str, root: Path, scans: int, seed: int, small: bool, phantom: str | None = None,
                  inplane: int | None = None) -> None:
    """`genesis sample-data ROOT --dataset NAME [--phantom NAME] [--inplane N]`."""
    from pipeline.sample_data.datasets import write_sample

    print(write_sample(name, Path(output_dir(str(root), "DIR")), n_scans=scans, seed=seed, small=small,
                       phantom=phantom, inplane=inplane).describe())


def _convert(sources: list[Path], store: Path, workers: int):
    """`genesis convert SOURCE... --store STORE`: the ConversionSummary (exit 1 unless `.ok`)."""
    from pipeline.volume_store.convert import convert

    summary = convert([str(s) for s in sources], output_dir(str(store), "--store"), workers=workers)
    print(summary.report())
    print(f"store: {store}  (genesis stores show {store})")
    return summary


def _conversion_status(summary) -> int:
    return EXIT_OK if summary.ok else EXIT_FAILED


def _pretrain_patches(volumes: Path, patch_root: Path, workers: int, settings=None):
    """`genesis patches pretrain --store VOLUMES --out ROOT [--border-z N --min-slices N]`: the reference's sampling
    (the option defaults) unless `settings` (a PretrainPatchConfig) says otherwise."""
    from pipeline.patches.config import PretrainPatchConfig
    from pipeline.patches.extract import extract_pretrain

    result = extract_pretrain(shared_path(str(volumes), "--store"), settings or PretrainPatchConfig(),
                              out_root=output_dir(str(patch_root), "--out"), workers=workers)
    print(result.report())
    return result


def _task_patches(spec, volumes: Path, patch_root: Path, workers: int):
    """`genesis patches task TASK --store VOLUMES --out ROOT` with the task's own settings: the ExtractionResult
    (exit 1 when some candidates gave no cube)."""
    from pipeline.patches.task_extract import extract_task

    result = extract_task(shared_path(str(volumes), "--store"), spec, out_root=output_dir(str(patch_root), "--out"),
                          workers=workers)
    print(result.report())
    return result


def build_stores(config: ReproduceConfig, steps: Walkthrough, roots: dict[str, Path]) -> Stores:
    """Both volume stores, the pretraining patch store and the task stores (each content-addressed: a rerun
    finds them at once). Store paths are the folder under OUT that each stage returns (as given: relative when
    OUT is)."""
    from pipeline.volume_store.store import VolumeStore

    out, workers = Path(config.out), config.workers
    converted = (0, 1) if config.data else (0,)  # real archives may hold a bad scan: listed, the rest converted
    volumes, patch_root = out / "volume_store", out / "patch_stores"
    steps.run("convert LUNA16 to the OME-Zarr volume store (Dask)",
              ["convert", str(roots["luna16"]), "--store", str(volumes), "--workers", str(workers)],
              lambda: _convert([roots["luna16"]], volumes, workers), _conversion_status, allowed=converted)
    built = steps.run("Models Genesis pretraining cubes into a patch store (Dask)",
                      ["patches", "pretrain", "--store", str(volumes), "--out", str(patch_root), "--workers",
                       str(workers), *config.pretrain_patch_args()],
                      lambda: _pretrain_patches(volumes, patch_root, workers, config.pretrain_patches()))
    pretrain = patch_root / Path(built.result.path).name

    others = [name for name in roots if name != "luna16"]
    task_volumes = out / "task_volume_store" if others else None
    if others:
        steps.run("convert the task datasets (Dask)",
                  ["convert", *(str(roots[n]) for n in others), "--store", str(task_volumes), "--workers",
                   str(workers)],
                  lambda: _convert([roots[n] for n in others], task_volumes, workers), _conversion_status,
                  allowed=converted)
        catalog = VolumeStore(task_volumes).catalog()
        present = set(catalog.loc[catalog["status"] == "ok", "dataset"])
    else:
        present = set()
    tasks = {}
    for spec in _tasks_wanted(config):
        source = volumes if spec.dataset == "luna16" else task_volumes
        if spec.dataset != "luna16" and spec.dataset not in present:
            steps.note(f"task {spec.name.upper()}: left out, no {spec.dataset} scans converted")
            continue
        step = steps.run(f"the {spec.name.upper()} task patch store",
                         ["patches", "task", spec.name, "--store", str(source), "--out", str(patch_root),
                          "--workers", str(workers)],
                         lambda: _task_patches(spec, source, patch_root, workers),
                         lambda result: EXIT_FAILED if result.failed else EXIT_OK, allowed=(0, 1))
        if step.error is None:  # the store built (exit 1: some cases failed, listed above)
            tasks[spec.name] = patch_root / Path(step.result.path).name
        elif isinstance(step.error, RuntimeError):  # no usable case at all: its line said why
            steps.note(f"task {spec.name.upper()}: left out, no task store: {step.error}")
        else:
            raise step.error
    if config.tasks and set(config.tasks) - set(tasks):
        raise ValueError(f"--tasks: no task store for {sorted(set(config.tasks) - set(tasks))} (no scans converted)")
    return Stores(datasets=roots, volumes=volumes, task_volumes=task_volumes, pretrain=pretrain, tasks=tasks,
                  patch_root=patch_root)


def registered_version(tracking_uri: str, run_id: str, name: str | None = None) -> str:
    """`models:/NAME/N`: the version of `name` (default genesis-pretrained) that run `run_id` registered."""
    from pipeline.runtime.tracking import PRETRAINED_MODEL

    name = name or PRETRAINED_MODEL
    versions = Tracker.at(tracking_uri).search_model_versions(f"name = '{name}' and tags.run_id = '{run_id}'")
    if not versions:
        raise ValueError(f"run {run_id} registered no version of {name!r} at {tracking_uri}")
    return f"models:/{name}/{max(int(v.version) for v in versions)}"


def _finished_pretraining(config: ReproduceConfig, storage: Path, patches: Path) -> str | None:
    """The MLflow run id of a pretraining under `storage` that finished on the same patch store with the same
    settings (preset config, epochs, workers) and registered its model; None when there is none."""
    from pipeline.patches.store import PatchStore
    from pipeline.training.config import preset
    from pipeline.training.pretrain import RUN_FILE

    key = PatchStore(patches).key
    wanted = json.loads(json.dumps(preset(config.pretrain_preset).with_overrides(epochs=config.pretrain_epochs)
                                   .to_dict()))
    tracker = Tracker.at(config.uri)
    for run_file in sorted(storage.glob(f"*/{RUN_FILE}"), key=lambda p: p.stat().st_mtime, reverse=True):
        meta = json.loads(run_file.read_text())
        if (meta.get("patches_key"), meta.get("config"), meta.get("tracking_uri")) != (key, wanted, config.uri):
            continue
        try:
            run = tracker.run(meta["mlflow_run_id"])
        except Exception:  # noqa: BLE001 - a run of another (deleted) database: not reusable
            continue
        if run.info.status == "FINISHED" and run.data.params.get("ray.workers") == str(config.pretrain_workers):
            return run.info.run_id
    return None


def pretrain_model(config: ReproduceConfig, steps: Walkthrough, stores: Stores) -> tuple[str, str]:
    """Pretrain on the pretraining patch store; returns (MLflow run id, models:/genesis-pretrained/N). A pretraining
    this output folder already finished with the same store and settings is reused (so a rerun of an interrupted
    reproduce goes straight on to the grid, whose finished fine-tunings are reused in turn)."""
    storage = Path(config.out) / "ray_results"
    done = _finished_pretraining(config, storage, stores.pretrain)
    if done:
        pretrained = registered_version(config.uri, done)
        steps.note(f"Models Genesis pretraining: reused MLflow run {done} (finished earlier on the same patch store "
                   f"with the same settings): {pretrained}")
        return done, pretrained
    name = f"genesis-pretrain-{config.pretrain_preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    argv = ["pretrain", "--patches", str(stores.pretrain), "--preset", config.pretrain_preset, "--workers",
            str(config.pretrain_workers), "--tracking-uri", config.uri, "--storage-path", str(storage), "--name", name]
    if config.gpus_per_worker:
        argv += ["--gpus-per-worker", f"{config.gpus_per_worker:g}"]
    if config.pretrain_epochs:
        argv += ["--epochs", str(config.pretrain_epochs)]
    if config.ray_address:
        argv += ["--ray-address", config.ray_address]
    ran = steps.run(f"Models Genesis pretraining ({config.pretrain_preset}) on Ray Train, recorded in MLflow", argv,
                    lambda: _pretrain(config, stores.pretrain, storage, name),
                    lambda result: EXIT_FAILED if result.error else EXIT_OK)
    run_id = ran.result.mlflow_run_id
    return run_id, registered_version(config.uri, run_id)


def _pretrain(config: ReproduceConfig, patches: Path, storage: Path, name: str):
    """`genesis pretrain --patches PATCHES --preset P --name NAME ...` (the other options at their defaults): the
    PretrainResult (exit 1 when `.error`)."""
    from pipeline.training.config import preset
    from pipeline.training.pretrain import pretrain

    settings = preset(config.pretrain_preset).with_overrides(epochs=config.pretrain_epochs)
    result = pretrain(shared_path(str(patches), "--patches"), settings, workers=config.pretrain_workers,
                      gpus_per_worker=config.gpus_per_worker, ray_address=config.ray_address,
                      tracking_uri=config.uri, storage_path=str(storage), name=name,
                      resume_epochs=config.pretrain_epochs)
    print(result.report())
    return result


def _folds_note(stores: Stores, test_fold: int | None) -> str:
    """How many test folds the grid runs per fold-based task: ", ECC on its 3 folds (test fold 1, 2, 3)", or on
    one; "" when no task has folds."""
    from pipeline.patches.store import PatchStore

    parts = []
    for task, path in stores.tasks.items():
        folds = PatchStore(path).folds
        if not folds:
            continue
        if test_fold is None:
            parts.append(f"{task.upper()} on its {len(folds)} folds (test fold {', '.join(map(str, folds))} in "
                         f"turn; the table pools folds x seeds)")
        else:
            parts.append(f"{task.upper()} on ONE fold only (test fold {test_fold} of {len(folds)}: not the paper's "
                         f"protocol)")
    return "".join(f", {p}" for p in parts)


def transfer_grid(config: ReproduceConfig, steps: Walkthrough, stores: Stores, pretrained: str):
    """The grid over the task stores, inits scratch and `pretrained`; returns the TransferResult. A fold-based
    task (ECC) runs every fold of its one store, unless `config.test_fold` picks one."""
    from pipeline.transfer.grid import GridConfig
    from pipeline.transfer.run import transfer

    grid = GridConfig(tasks=tuple(stores.tasks), inits=("scratch", pretrained), seeds=tuple(config.seeds),
                      label_fractions=tuple(config.label_fractions), preset=config.finetune_preset,
                      epochs=config.finetune_epochs, max_concurrent=config.max_concurrent,
                      gpus_per_trial=config.gpus_per_trial, cells_per_trial=config.cells_per_trial,
                      test_fold=config.test_fold)
    storage, results = Path(config.out) / "ray_results", Path(config.out) / "transfer_results"
    argv = ["transfer", "--tasks", ",".join(grid.tasks), *(a for t, p in stores.tasks.items()
                                                          for a in ("--patches", f"{t}={p}")),
            "--inits", ",".join(grid.inits), "--seeds", ",".join(map(str, grid.seeds)),
            "--label-fractions", ",".join(f"{f:g}" for f in grid.label_fractions), "--preset", grid.preset,
            "--max-concurrent", str(grid.max_concurrent), "--tracking-uri", config.uri,
            "--storage-path", str(storage), "--results", str(results)]
    if grid.epochs:
        argv += ["--epochs", str(grid.epochs)]
    if grid.cells_per_trial:
        argv += ["--per-trial", str(grid.cells_per_trial)]
    if grid.gpus_per_trial:
        argv += ["--gpus-per-trial", f"{grid.gpus_per_trial:g}"]
    if grid.test_fold is not None:
        argv += ["--test-fold", str(grid.test_fold)]
    title = steps.command(f"the transfer grid: {len(grid.tasks)} tasks x scratch / the model pretrained above x "
                          f"{len(grid.label_fractions)} label fraction(s) x {len(grid.seeds)} seed(s)"
                          f"{_folds_note(stores, grid.test_fold)}, on Ray Tune", argv)
    t0 = time.perf_counter()
    result = transfer(grid, {t: str(p) for t, p in stores.tasks.items()}, tracking_uri=config.uri,
                      storage_path=str(storage), results_dir=str(results), ray_address=config.ray_address,
                      verbose=1)
    print(f"--- {title}: {len(result.failed)} of {len(result.cells)} fine-tunings failed, "
          f"{time.perf_counter() - t0:.1f} s", flush=True)
    return result


# --------------------------------------------------------------------------- the whole run

def _artifacts_under_out(config: ReproduceConfig) -> None:
    """With the default tracking URI (OUT/mlflow.db) the experiments keep their artifacts in OUT/mlartifacts,
    not in ./mlruns of whatever folder the command ran from."""
    if config.tracking_uri:
        return
    client = Tracker.at(config.uri).client
    for experiment in ("genesis-pretraining", "genesis-transfer"):
        if client.get_experiment_by_name(experiment) is None:
            where = (Path(config.out) / "mlartifacts" / experiment).resolve()
            client.create_experiment(experiment, artifact_location=str(where))


def _start_ray(config: ReproduceConfig) -> bool:
    """A local Ray that declares the transfer trials' resource (so trial drivers take no CPU), unless a cluster
    is named; returns whether this call started it."""
    import ray

    from pipeline.cluster import ensure_ray

    if ray.is_initialized():
        return False
    ensure_ray(config.ray_address, log_to_driver=config.worker_logs)
    return True


def reproduce(config: ReproduceConfig, *, steps: Walkthrough | None = None,
              after_stores: Callable[[Stores], None] | None = None) -> ReproduceResult:
    """Data -> stores -> pretraining -> transfer grid (see the module docstring). `after_stores` runs once the
    stores exist (the demo draws its previews there). Raises ValueError for bad settings or data, StepFailed
    when a step's command fails; failed fine-tunings are in the result's table, not raised. One reproduce at a
    time writes into an output folder: it holds OUT/.reproduce.lock while it runs, and a second one into the same
    OUT raises LockBusyError (exit 3) naming the first, before anything is done."""
    # the output folder, the tracking server and the resources, before hours of data steps depend on them
    output_dir(config.out, "--out")
    lock = FileLock(Path(config.out) / LOCK_FILE, f"genesis reproduce into {Path(config.out).resolve()}")
    lock.acquire()  # another reproduce writing here: LockBusyError (exit 3) naming it, before any work
    try:
        return _reproduce(config, steps, after_stores)
    finally:
        lock.release()


def _reproduce(config: ReproduceConfig, steps: Walkthrough | None,
               after_stores: Callable[[Stores], None] | None) -> ReproduceResult:
    from pipeline.cluster import ray_resources
    from pipeline.runtime.tracking import check_uri

    ray_resources(workers=config.pretrain_workers, gpus_per_worker=config.gpus_per_worker,
                  ray_address=config.ray_address, workers_option="--pretrain-workers")
    ray_resources(workers=1, gpus_per_worker=config.gpus_per_trial, ray_address=config.ray_address,
                  gpus_option="--gpus-per-trial")
    check_uri(config.uri)
    steps = steps or Walkthrough()
    t0 = time.perf_counter()
    Path(config.out).mkdir(parents=True, exist_ok=True)
    stores = build_stores(config, steps, dataset_roots(config, steps))
    if not stores.tasks:
        raise ValueError("no task store was built: nothing to fine-tune")
    if after_stores:
        after_stores(stores)
    _artifacts_under_out(config)
    started = _start_ray(config)
    try:
        run_id, pretrained = pretrain_model(config, steps, stores)
        print(f"    pretrained model: {pretrained} (the version of MLflow run {run_id})", flush=True)
        result = transfer_grid(config, steps, stores, pretrained)
    finally:
        if started:
            import ray

            ray.shutdown()
    return ReproduceResult(stores=stores, pretrain_run_id=run_id, pretrained=pretrained, transfer=result,
                           seconds=time.perf_counter() - t0)

