"""The transfer grid: which fine-tunings (task x init x label fraction x test fold x seed) one `genesis transfer`
runs, their stable keys, and how they are grouped into Ray Tune trials.

A cell's key depends only on what decides its result (task, the patch store's content key, init, label
fraction, test fold, seed, encoder freezing, preset, epochs), so a rerun of the same grid finds the fine-tunings
it already finished in MLflow and does not run them again. The grid's key (the parent run's) is the same
hash over all cells.

Folds: a fold-based task (ECC: 3-fold cross-validation by patient, as the reference) is scored on every fold,
as the paper's number is; its store holds every fold (`PatchStore.folds`), so the fold is a dimension of the grid
for that task only. `GridConfig.test_fold` picks one fold instead.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field

__all__ = ["GridConfig", "Cell", "cells_of", "grid_key", "group_cells", "DEFAULT_GROUP", "short_init",
           "DEFAULT_SEEDS", "folds_of"]

DEFAULT_SEEDS = (0, 1, 2)
"""Three seeds a side by default: the table's t-test against scratch needs at least two values a side."""

DEFAULT_GROUP = {"tiny": 8, "paper": 1}
"""Fine-tunings per trial when not given: a tiny fine-tuning trains for seconds, less than a Ray Train run's
start-up (~25 s on 2 CPUs), so a tiny trial runs up to 8 of one task in one worker group; a paper fine-tuning
trains for hours, so each is its own trial (and can take its own GPU share)."""


@dataclass(frozen=True, kw_only=True)
class GridConfig:
    tasks: tuple[str, ...]
    inits: tuple[str, ...] = ("scratch",)
    seeds: tuple[int, ...] = DEFAULT_SEEDS
    label_fractions: tuple[float, ...] = (1.0,)
    freeze_encoder: bool = False
    preset: str = "tiny"
    epochs: int | None = None
    """Override the preset's maximum epochs (None: the preset's)."""
    max_concurrent: int = 2
    """Trials at once (each a Ray Train run)."""
    workers_per_trial: int = 1
    gpus_per_trial: float = 0.0
    """GPU share of each trial's worker(s), e.g. 0.25: four trials share one GPU."""
    cells_per_trial: int | None = None
    """Fine-tunings of one task run one after the other in one trial; None: DEFAULT_GROUP[preset]."""
    max_failures: int = 1
    """Worker failures a trial survives (restart from the last epoch's checkpoint)."""
    test_fold: int | None = None
    """Fold-based tasks (ECC): score this test fold only; None: every fold the task's store holds. Tasks
    without folds ignore it."""

    def __post_init__(self) -> None:
        def check(cond, name, msg):
            if not cond:
                raise ValueError(f"GridConfig.{name}: {msg}")

        for name in ("tasks", "inits", "seeds", "label_fractions"):
            values = getattr(self, name)
            check(len(values) > 0, name, "must not be empty")
            check(len(set(values)) == len(values), name, f"has duplicates: {list(values)}")
        check(all(0 < f <= 1 for f in self.label_fractions), "label_fractions",
              f"must be in (0, 1], got {list(self.label_fractions)}")
        check(self.max_concurrent >= 1, "max_concurrent", f"must be >= 1, got {self.max_concurrent}")
        check(self.workers_per_trial >= 1, "workers_per_trial", f"must be >= 1, got {self.workers_per_trial}")
        check(self.gpus_per_trial >= 0, "gpus_per_trial", f"must be >= 0, got {self.gpus_per_trial}")
        check(self.cells_per_trial is None or self.cells_per_trial >= 1, "cells_per_trial",
              f"must be >= 1, got {self.cells_per_trial}")
        check(self.epochs is None or self.epochs >= 1, "epochs", f"must be >= 1, got {self.epochs}")
        check(self.test_fold is None or self.test_fold >= 1, "test_fold", f"must be >= 1, got {self.test_fold}")

    @property
    def group_size(self) -> int:
        return self.cells_per_trial or DEFAULT_GROUP.get(self.preset, 1)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Cell:
    """One fine-tuning of the grid."""

    task: str
    init: str
    label_fraction: float
    seed: int
    store_key: str = field(default="", compare=False)
    key: str = field(default="", compare=False)
    fold: int | None = None
    """The test fold of a fold-based task (its training uses the other folds); None for other tasks."""

    @property
    def name(self) -> str:
        """A short run name: ncc-scratch-f0.5-s0, lcs-genesis-pretrained@best-f1-s2, ecc-scratch-f1-s0-k2 (k: the
        test fold)."""
        fold = "" if self.fold is None else f"-k{self.fold}"
        return f"{self.task}-{short_init(self.init)}-f{self.label_fraction:g}-s{self.seed}{fold}"


def short_init(init: str) -> str:
    """models:/genesis-pretrained@best -> genesis-pretrained@best, models:/x/3 -> x-v3, official:a/b.pt -> official,
    /path/w.pt -> w."""
    from pathlib import PurePath

    if init.startswith("models:/"):
        return init[len("models:/"):].replace("/", "-v")
    if init.startswith("official:"):
        return "official"
    return init if init == "scratch" else PurePath(init).stem


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def folds_of(grid: GridConfig, store_folds: dict[str, tuple[int, ...]],
             stores: dict[str, str] | None = None) -> dict[str, tuple[int | None, ...]]:
    """task -> the test folds its cells run: every fold its store holds, or `grid.test_fold` alone; (None,) for a
    task whose store has no folds. A test fold that a fold-based store lacks is a ValueError naming the folds it
    has; so is a test fold asked of a grid none of whose tasks has folds."""
    out: dict[str, tuple[int | None, ...]] = {}
    for task in grid.tasks:
        folds = tuple(int(k) for k in store_folds.get(task, ()) or ())
        if not folds:
            out[task] = (None,)
        elif grid.test_fold is None:
            out[task] = folds
        elif grid.test_fold in folds:
            out[task] = (grid.test_fold,)
        else:
            where = f"{stores[task]}: " if stores and task in stores else ""
            raise ValueError(f"--test-fold {grid.test_fold}: {where}the {task} store holds folds "
                             f"{', '.join(map(str, folds))}, not fold {grid.test_fold}")
    if grid.test_fold is not None and all(f == (None,) for f in out.values()):
        raise ValueError(f"--test-fold {grid.test_fold}: no task of the grid ({', '.join(grid.tasks)}) has folds")
    return out


def cells_of(grid: GridConfig, store_keys: dict[str, str],
             folds: dict[str, tuple[int | None, ...]] | None = None,
             task_files: dict[str, str] | None = None) -> list[Cell]:
    """Every cell in a fixed order (task, init, fraction, fold, seed), each with its key. `folds`: task -> its
    test folds (`folds_of`); a task not in it has none. `task_files`: task -> its task file's sha256, for the
    tasks whose training fields may change without changing their store (a user's task file: its lr or patience
    changes the result, so the cell); built-in tasks are not in it and keep their keys."""
    cells = []
    for task in grid.tasks:
        for init in grid.inits:
            for fraction in grid.label_fractions:
                for fold in (folds or {}).get(task, (None,)):
                    for seed in grid.seeds:
                        ident = {"task": task, "store": store_keys[task], "init": init,
                                 "label_fraction": float(fraction), "seed": int(seed),
                                 "freeze_encoder": grid.freeze_encoder, "preset": grid.preset, "epochs": grid.epochs}
                        if fold is not None:  # only fold cells carry it: other tasks keep their keys
                            ident["fold"] = int(fold)
                        if task in (task_files or {}):
                            ident["task_file"] = task_files[task]
                        cells.append(Cell(task, init, float(fraction), int(seed), store_keys[task], _hash(ident),
                                          None if fold is None else int(fold)))
    return cells


def grid_key(cells: list[Cell]) -> str:
    return _hash(sorted(c.key for c in cells))


def group_cells(cells: list[Cell], size: int) -> list[list[Cell]]:
    """Cells of one task in runs of at most `size`, spread evenly (7 cells at size 4 -> 4 + 3, not 4 + 3 of
    unequal tasks), tasks in the grid's order."""
    groups: list[list[Cell]] = []
    by_task: dict[str, list[Cell]] = {}
    for c in cells:
        by_task.setdefault(c.task, []).append(c)
    for task_cells in by_task.values():
        n = math.ceil(len(task_cells) / size)
        per = math.ceil(len(task_cells) / n)
        groups.extend(task_cells[i:i + per] for i in range(0, len(task_cells), per))
    return groups
