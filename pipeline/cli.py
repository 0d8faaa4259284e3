"""`genesis`: the one command line of the pipeline. Thin: parse, check, call the stage, report, exit.

Exit status: 0 success; 1 some items failed (the rest done), or the work failed; 2 bad usage or input (a path
that cannot be written, an unreachable tracking server, an option out of range, a store too small: checked before
anything expensive starts); 3 the store is busy (another conversion holds its lock).

Errors are one line on stderr, never a traceback: `main` turns a user error (ValueError and its kin, an
unwritable path) into exit 2, a failure of the work (RuntimeError, OSError, MLflow, Ray) into exit 1, and anything
else into exit 1 naming the exception and asking for a rerun with `--debug`, which prints the traceback too
(`pipeline.console`, which `genesis reproduce` and the demo share).

This module is the top of the package: nothing in `pipeline` imports it.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import textwrap

from pipeline.console import (EXIT_FAILED, EXIT_OK, EXIT_USAGE, classify, ended, set_verbose, tolerant_streams,
                              verbose)
from pipeline.runtime.errors import UsageError
from pipeline.runtime.help_format import Parser, examples
from pipeline.runtime.net import non_negative_int, positive_int
from pipeline.runtime.paths import output_dir, output_file, shared_path

__all__ = ["main", "build_parser", "parse_args", "transfer_show_parser", "classify"]

_WIDTH = 100
"""Descriptions are wrapped here, at most this wide: the help formatter keeps them as written (for the examples)."""
SAMPLE_DATASETS = ("luna16", "lidc", "pe", "lits", "brats", "nnunet", "msd", "nnunet-ct")
PHANTOM_PRESETS = ("default", "tiny", "demo")
"""pipeline.sample_data.phantom.PRESETS, named here so that parsing imports no numpy (a test keeps them equal)."""
_FAILURES_HELP = ("worker-group restarts{per} after a worker or node failure; -1 retries forever (a deterministic "
                  "error such as bad data ends the run at once either way)")


def _numbers(text: str, expected: str) -> tuple[float, ...]:
    """Comma-separated finite floats ("inf" and "nan" parse as floats but set nothing here); else one line
    saying what was `expected`."""
    try:
        vals = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if not all(math.isfinite(v) for v in vals):
        raise argparse.ArgumentTypeError(f"expected {expected} (finite), got {text!r}")
    return vals


def _number(text: str, expected: str) -> float:
    vals = _numbers(text, expected)
    if len(vals) != 1:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return vals[0]


def _triple(text: str) -> tuple[float, float, float]:
    vals = _numbers(text, "three positive numbers Z,Y,X")
    if len(vals) != 3 or any(v <= 0 for v in vals):
        raise argparse.ArgumentTypeError(f"expected three positive numbers Z,Y,X, got {text!r}")
    return vals  # type: ignore[return-value]


def _ints3(text: str) -> tuple[int, int, int]:
    try:
        vals = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected three integers D,H,W, got {text!r}") from None
    if len(vals) != 3 or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"expected three positive integers D,H,W, got {text!r}")
    return vals  # type: ignore[return-value]


def _gpus(text: str) -> float:
    v = _number(text, "a number of GPUs")
    if not v >= 0 or (v > 1 and v != int(v)):
        raise argparse.ArgumentTypeError(f"expected a GPU share in [0, 1] or a whole number of GPUs, got {text!r}")
    return v


def _failures(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if v < -1:
        raise argparse.ArgumentTypeError(f"expected restarts >= 0, or -1 to retry forever, got {text!r}")
    return v


def _fraction(text: str) -> float:
    v = _number(text, "a number in (0, 1]")
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}")
    return v


def _share(text: str) -> float:
    v = _number(text, "a number in [0, 1]")
    if not 0 <= v <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}")
    return v


def _fractions(text: str) -> tuple[float, ...]:
    """Comma-separated label fractions, each in (0, 1]."""
    vals = tuple(_fraction(v.strip()) for v in text.split(",") if v.strip())
    if not vals:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers in (0, 1], got {text!r}")
    return vals


def _seeds(text: str) -> tuple[int, ...]:
    """Comma-separated seeds, each an integer >= 0 (NumPy's generators take no negative seed)."""
    vals = tuple(non_negative_int(v.strip()) for v in text.split(",") if v.strip())
    if not vals:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 0, got {text!r}")
    return vals


_SIZE_SUFFIXES = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def _bytes(text: str) -> int:
    """A byte count: 4096, 512M, 4G, 1.5T (binary multiples; a trailing B or iB is allowed)."""
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    unit = t[-1:] if t[-1:] in _SIZE_SUFFIXES else ""
    try:
        v = float(t[:len(t) - len(unit)]) * _SIZE_SUFFIXES[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size in bytes such as 4G, 512M or 1000000, "
                                         f"got {text!r}") from None
    if not (v >= 1 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"expected a positive, finite size in bytes, got {text!r}")
    return int(v)


def _floats(text: str) -> tuple[float, ...]:
    return _numbers(text, "comma-separated numbers")


class _Parser(Parser):
    """argparse with one-line errors: the problem and where the help is, not the whole usage block; and help a
    person can use in every subcommand: each option's default, the subcommand's one-line help as its description,
    and its examples (an epilog) as written."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")

    def add_subparsers(self, **kwargs):
        action = super().add_subparsers(**kwargs)
        add = action.add_parser

        def add_parser(name, **kw):  # every subcommand takes --debug too, wherever it is written
            if kw.get("help"):  # `genesis X --help` says first what X does, as `genesis --help` lists it
                kw.setdefault("description", textwrap.fill(kw["help"], _WIDTH))
            sub = add(name, **kw)
            sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help="on an error, print the Python traceback too")
            return sub

        action.add_parser = add_parser
        return action


# --------------------------------------------------------------------------- options several commands share
# Each is a parent parser (argparse copies its options into the subcommand), built afresh per subcommand: a
# parent's actions are shared objects, so one subcommand's default must never be set on another's.

def _options() -> argparse.ArgumentParser:
    return argparse.ArgumentParser(add_help=False)


def _dask() -> argparse.ArgumentParser:
    """Every Dask step: local workers, or a running scheduler; a progress bar."""
    p = _options()
    p.add_argument("--workers", type=positive_int, default=2, metavar="N", help="local Dask worker processes")
    p.add_argument("--dask-scheduler", metavar="ADDRESS",
                   help="use a running Dask scheduler, e.g. tls://HEAD:8786 (default: a local Dask cluster of "
                        "--workers processes)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _patch_source() -> argparse.ArgumentParser:
    """The volume store a patch store is cut from, and where patch stores go."""
    p = _options()
    p.add_argument("--store", required=True, metavar="STORE", help="volume store (genesis convert)")
    p.add_argument("--out", metavar="ROOT",
                   help="root folder of patch stores (default: patch_stores beside the volume store)")
    return p


def _tracking() -> argparse.ArgumentParser:
    p = _options()
    p.add_argument("--tracking-uri", metavar="URI", help="MLflow tracking URI (default: sqlite:///mlflow.db here)")
    return p


VERBOSE_HELP = ("show Ray's and MLflow's own console output (Tune's status tables, their warnings); without it they "
                "go to the Ray worker logs only")


def _verbose() -> argparse.ArgumentParser:
    """Every command that starts Ray: its own console output, or only ours (`pipeline.console.verbose`)."""
    p = _options()
    p.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    return p


def _ray_run(*, experiment: str, failures: int, storage_help: str, name_help: str,
             failures_per: str = "") -> argparse.ArgumentParser:
    """A run on Ray recorded in MLflow: where Ray is, where the run is recorded and checkpointed, its name, and
    the restarts it may take (`failures_per`: " per trial" where each trial restarts on its own)."""
    p = argparse.ArgumentParser(add_help=False, parents=[_tracking(), _verbose()])
    p.add_argument("--ray-address", metavar="ADDR",
                   help="running Ray cluster, e.g. HEAD:6379 or auto (default: RAY_ADDRESS, as inside a Ray job; else "
                        "start a local one)")
    p.add_argument("--experiment", metavar="NAME", default=experiment, help="MLflow experiment of the run")
    p.add_argument("--storage-path", metavar="DIR", help=storage_help)
    p.add_argument("--name", metavar="NAME", help=name_help)
    p.add_argument("--max-failures", type=_failures, default=failures,  # metavar MAX_FAILURES: tests name it
                   help=_FAILURES_HELP.format(per=failures_per))
    return p


def _ray_workers(workers: int) -> argparse.ArgumentParser:
    """The Ray Train workers of one run."""
    p = _options()
    p.add_argument("--workers", type=positive_int, default=workers, metavar="N",
                   help="Ray Train workers (data-parallel training processes)")
    p.add_argument("--gpus-per-worker", type=_gpus, default=0.0, metavar="G",
                   help="GPUs per Ray Train worker: a share in [0, 1] or a whole number; 0 trains on CPUs")
    return p


def _recipe() -> argparse.ArgumentParser:
    """How each fine-tuning trains (`genesis finetune`, and every cell of `genesis transfer`)."""
    p = _options()
    p.add_argument("--freeze-encoder", action="store_true",
                   help="freeze the encoder (its weights and norm statistics stay as the init gives them); train the "
                        "rest")
    p.add_argument("--preset", choices=("tiny", "paper"), default="tiny",
                   help="tiny: width-4 U-Nets and short schedules for a CPU; paper: the papers' fine-tuning recipes "
                        "(GPU)")
    p.add_argument("--epochs", type=positive_int, metavar="E",
                   help="cap the preset's maximum epochs (default: the preset's; early stopping may end sooner)")
    return p


# --------------------------------------------------------------------------- the subcommands

def _add_convert(sub) -> None:
    c = sub.add_parser("convert", parents=[_dask()], help="convert CT/MRI archives into a volume store (Dask)",
                       epilog=examples("genesis convert demo_output/sample_data/luna16 --store my_volumes",
                                       "genesis convert own/data/Dataset501_Phantom --store own/volumes --workers 4"))
    c.add_argument("sources", nargs="+", metavar="SOURCE",
                   help="folders, files or zip archives (LUNA16, DICOM, NIfTI, NRRD, MetaImage, nnU-Net, MSD)")
    c.add_argument("--store", required=True, metavar="STORE", help="volume store folder (created if missing)")
    c.add_argument("--spacing", type=_triple, metavar="Z,Y,X",
                   help="resample to this spacing in mm (default: keep each scan's own spacing)")
    c.add_argument("--modality", metavar="NAME",
                   help="force the modality (e.g. CT) for sources without one (default: what each source records)")
    c.add_argument("--min-side", type=positive_int, default=8, metavar="N",
                   help="refuse volumes with a side under this (voxels)")
    c.add_argument("--max-scan-bytes", type=_bytes, metavar="N",
                   help="refuse a scan whose decoded voxels would exceed N bytes, e.g. 4G, 512M (default: 4G)")


def _add_stores(sub) -> None:
    s = sub.add_parser("stores", help="list and inspect stores",
                       epilog=examples("genesis stores list demo_output",
                                       "genesis stores show demo_output/volume_store"))
    ssub = s.add_subparsers(dest="stores_command", required=True)
    sh = ssub.add_parser("show", help="print a store's catalog / index as a table",
                         epilog=examples("genesis stores show demo_output/volume_store",
                                         "genesis stores show demo_output/task_volume_store --all-columns"))
    sh.add_argument("store", metavar="STORE", help="a volume store or a patch store")
    sh.add_argument("--all-columns", action="store_true",
                    help="every column of a volume store's catalog, not the usual nine")
    pv = ssub.add_parser("preview", help="PNG of a scan's three orthogonal middle slices",
                         epilog=examples("genesis stores preview demo_output/task_volume_store "
                                         "Brats18_2013_102_1_flair --out flair.png",
                                         "genesis stores show demo_output/volume_store    # its SCAN_IDs"))
    pv.add_argument("store", metavar="STORE", help="a volume store")
    pv.add_argument("scan_id", metavar="SCAN_ID", help="one of its scans (genesis stores show STORE lists them)")
    pv.add_argument("--out", required=True, metavar="FILE.png", help="the PNG to write")
    pv.add_argument("--window", default="lung", help="CT window: lung | mediastinum | bone")
    ls = ssub.add_parser("list", help="every volume and patch store under ROOT",
                         epilog=examples("genesis stores list demo_output", "genesis stores list"))
    ls.add_argument("root", nargs="?", default=".", metavar="ROOT", help="the folder searched")
    vf = ssub.add_parser("verify", help="check every array and table of a store (--repair: fix what can be fixed)",
                         epilog=examples("genesis stores verify demo_output/volume_store",
                                         "genesis stores verify demo_output/volume_store --repair"))
    vf.add_argument("store", metavar="STORE", help="a volume store or a patch store")
    vf.add_argument("--repair", action="store_true",
                    help="volume stores: reconvert a damaged or missing scan from its source where that is "
                         "unchanged, else mark it failed; then rebuild the catalog (patch stores are rebuilt, never "
                         "repaired)")
    vf.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_patches(sub) -> None:
    pt = sub.add_parser("patches", help="build and inspect patch stores",
                        epilog=examples("genesis patches pretrain --store demo_output/volume_store --out my_patches",
                                        "genesis patches task ncc --store demo_output/volume_store --out my_patches"))
    psub = pt.add_subparsers(dest="patches_command", required=True)
    _add_patches_pretrain(psub)
    _add_patches_task(psub)
    pv = psub.add_parser("preview", help="PNG of sample cubes and of each corruption",
                         epilog=examples("genesis patches preview demo_output/patch_stores/pretrain-* "
                                         "--out patches.png",
                                         "genesis patches preview demo_output/patch_stores/task-lcs-* --out lcs.png"))
    pv.add_argument("patch_store", metavar="PATCHSTORE", help="a pretraining or task patch store")
    pv.add_argument("--out", required=True, metavar="FILE.png", help="the PNG to write")
    pv.add_argument("--seed", type=non_negative_int, default=0, metavar="S", help="which cubes and corruptions")


def _add_patches_pretrain(psub) -> None:
    pp = psub.add_parser("pretrain", parents=[_patch_source(), _dask()],
                         help="Models Genesis pretraining cubes from a volume store",
                         epilog=examples("genesis patches pretrain --store demo_output/volume_store --out my_patches",
                                         "genesis patches pretrain --store own/volumes --modality T2 --size 16,32,32"))
    pp.add_argument("--size", type=_ints3, default=(32, 64, 64), metavar="D,H,W",
                    help="cube (slices, rows, columns); default 32,64,64 = the reference's 64x64x32 (x,y,z)")
    pp.add_argument("--per-scan", type=positive_int, default=32, metavar="N",
                    help="cubes per scan (the reference's `scale`)")
    pp.add_argument("--scales", type=_floats, default=(1.0,), metavar="S1,S2,...",
                    help="crop side multipliers >= 1 (larger crops are resized to the cube)")
    pp.add_argument("--scale-axes", choices=("yx", "zyx"), default="yx",
                    help="yx: larger in-plane crops, depth never resized (the reference's crop_rows/crop_cols); "
                         "zyx: 3D crops")
    pp.add_argument("--cube-encoding", choices=("auto", "float32"), default="auto",
                    help="auto: clipped HU as int16 when exact (bit-identical floats on read), else float32")
    pp.add_argument("--seed", type=non_negative_int, default=0, metavar="S",
                    help="seed of the sampling (the same seed and settings give the same cubes)")
    pp.add_argument("--border-yx", type=non_negative_int, default=100, metavar="N",
                    help="in-plane voxels never cropped at each edge (the reference's len_border)")
    pp.add_argument("--border-z", type=non_negative_int, default=30, metavar="N",
                    help="slices never cropped at each end (the reference's len_border_z)")
    pp.add_argument("--min-slices", type=non_negative_int, default=96, metavar="N",
                    help="ct recipe: scans with fewer slices are skipped (default 96, the reference's)")
    pp.add_argument("--recipe", choices=("auto", "ct", "mr"), default="auto",
                    help="auto (default): from the store's modality, CT -> ct, any other -> mr; ct: the reference's "
                         "(HU window, -150 HU look-ahead, fixed borders, --min-slices); mr: ours (per-scan "
                         "percentiles, foreground acceptance, borders scaled to the volume)")
    pp.add_argument("--modality", metavar="NAME",
                    help="only the scans of this modality (catalog column modality, e.g. CT, T2; default: the store's "
                         "one modality; a store that mixes modalities needs it)")
    pp.add_argument("--percentiles", type=_floats, default=(0.5, 99.5), metavar="LO,HI",
                    help="mr recipe: these percentiles of each scan's non-zero voxels map to 0 and 1 (default 0.5,99.5)")
    pp.add_argument("--min-foreground", type=_share, default=0.5, metavar="F",
                    help="mr recipe: a crop is kept when at least this share of its voxels is foreground (default 0.5)")
    pp.add_argument("--border-fraction", type=_share, default=0.1, metavar="F",
                    help="mr recipe: each border is min(--border-yx or --border-z, this share of the axis) (default 0.1)")
    pp.add_argument("--max-dense-fraction", type=_share, default=0.15, metavar="F",
                    help="ct recipe: a crop is rejected when its look-ahead density score exceeds this share of its "
                         "voxels (default 0.15, the reference's lung_max)")


def _add_patches_task(psub) -> None:
    pk = psub.add_parser("task", parents=[_patch_source(), _dask()],
                         help="a target task's patch store (cubes, masks/labels, patient splits)",
                         epilog=examples("genesis patches task ncc --store demo_output/volume_store --out my_patches",
                                         "genesis patches task own/phantom.yaml --store own/volumes --size 16,32,32"))
    pk.add_argument("task", metavar="TASK",
                    help="a built-in task (genesis tasks list: ncc, ncs, ecc, lcs, bms) or a task file (FILE.yaml; "
                         "genesis tasks init drafts one)")
    pk.add_argument("--seed", type=non_negative_int, default=0, metavar="S",
                    help="sampling seed (negatives, jitter, crops, fraction order)")
    pk.add_argument("--size", type=_ints3, metavar="D,H,W", help="cube size (default: the task's)")
    pk.add_argument("--negative-ratio", metavar="R",
                    help="classification: negatives kept per positive and split, or 'all' (default: the task's)")
    pk.add_argument("--per-scan", type=positive_int, metavar="N",
                    help="segmentation (pos/neg tasks): cubes per scan (default: the task's)")
    pk.add_argument("--split-seed", type=non_negative_int, metavar="S",
                    help="seed of the patient-level split (default: the task's)")
    pk.add_argument("--test-fold", type=positive_int, metavar="K",
                    help="fold-split tasks (ECC): checked against the data's folds only. The store holds every fold "
                         "(its `split` column shows fold 1's run) and its key does not depend on K; fine-tuning "
                         "picks its fold with `genesis finetune/transfer --test-fold K` (default: no check)")
    pk.add_argument("--splits", metavar="FILE",
                    help="train/validation/test by case from FILE: a CSV of case_id,split (split: train, validation "
                         "or test) or nnU-Net's splits_final.json; the file's content is part of the store's key "
                         "(default: the task's split rule)")
    pk.add_argument("--channels", metavar="SEQ,...",
                    help="multi-channel tasks (BMS): sequences, e.g. flair,t1ce (default: the task's channels)")


_DEMO_DB = "--tracking-uri sqlite:///demo_output/mlflow.db"
"""The demo's MLflow store: the examples below run on what `make demo` leaves in demo_output/."""


def _add_pretrain(sub) -> None:
    ray = _ray_run(experiment="genesis-pretraining", failures=3,
                   storage_help="where Ray Train keeps checkpoints (default: ./ray_results)",
                   name_help="run name (default: genesis-pretrain-PRESET-TIME)")
    tr = sub.add_parser("pretrain", parents=[_ray_workers(2), ray],
                        help="Models Genesis pretraining on Ray Train, recorded in MLflow",
                        epilog=examples(f"genesis pretrain --patches demo_output/patch_stores/pretrain-* --epochs 2 "
                                        f"{_DEMO_DB}",
                                        "genesis pretrain --patches /shared/patch_stores/pretrain-KEY --preset paper "
                                        "--workers 2 --gpus-per-worker 1"))
    tr.add_argument("--patches", required=True, metavar="PATCHSTORE",
                    help="pretraining patch store (genesis patches pretrain)")
    tr.add_argument("--preset", default="tiny", choices=["tiny", "stable", "paper"],
                    help="tiny: a 4-channel U-Net for a few CPU minutes; stable: Adam with clipping and a plateau "
                         "schedule (GPU); paper: the reference's SGD recipe (GPU)")
    tr.add_argument("--epochs", type=positive_int, metavar="E",
                    help="epochs (default: the preset's; with --resume, the new total)")
    tr.add_argument("--batch-size", type=positive_int, metavar="N",
                    help="global batch: cubes per step over all workers, split evenly (default: the preset's)")
    tr.add_argument("--resume", action="store_true",
                    help="continue the run --name (default: the latest run) with its own settings; --epochs extends it")


def _add_finetune(sub) -> None:
    ray = _ray_run(experiment="genesis-finetune", failures=1,
                   storage_help="where Ray Train keeps checkpoints (default: ./ray_results)",
                   name_help="run name (default: genesis-finetune-TASK-PRESET-TIME)")
    ft = sub.add_parser("finetune", parents=[_recipe(), _ray_workers(1), ray],
                        help="fine-tune on a target task (Ray Train), evaluated on its test split",
                        epilog=examples(f"genesis finetune --task ncc --patches demo_output/patch_stores/task-ncc-* "
                                        f"--init models:/genesis-pretrained@best {_DEMO_DB}",
                                        "genesis finetune --task lcs --patches demo_output/patch_stores/task-lcs-* "
                                        f"--label-fraction 0.5 --seed 1 {_DEMO_DB}"))
    ft.add_argument("--task", required=True, metavar="TASK",
                    help="a built-in task (ncc, ncs, ecc, lcs, bms), a task file (FILE.yaml), or the name of a task "
                         "file's task whose store --patches is (the store records its task file)")
    ft.add_argument("--patches", required=True, metavar="TASKSTORE",
                    help="the task's patch store (genesis patches task TASK)")
    ft.add_argument("--init", default="scratch", metavar="INIT",
                    help="scratch | models:/NAME/VERSION | models:/NAME@ALIAS | official:FILE.pt | FILE.pt")
    ft.add_argument("--label-fraction", type=_fraction, default=1.0, metavar="F",
                    help="nested, stratified share of training cubes, in (0, 1]")
    ft.add_argument("--seed", type=non_negative_int, default=0, metavar="S",
                    help="seed of the initial weights (what the init does not cover) and of the batch order")
    ft.add_argument("--test-fold", type=positive_int, metavar="K",
                    help="fold-based tasks (ECC): the test fold; training uses the other folds (default: the store's "
                         "first fold, 1; `genesis transfer` runs every fold)")


_TRANSFER_SHOW = "genesis transfer show RUN_ID"


def _add_transfer(sub) -> None:
    ray = _ray_run(experiment="genesis-transfer", failures=1, failures_per=" per trial",
                   storage_help="where Ray keeps trials and checkpoints (default: ./ray_results)",
                   name_help="parent run name (default: transfer-PRESET-TIME)")
    tf = sub.add_parser("transfer", parents=[_recipe(), ray],
                        help="the transfer grid: tasks x inits x label fractions x seeds on Ray Tune, one MLflow "
                             "parent run, the paper's table; `transfer show RUN_ID` prints it again",
                        usage="%(prog)s --patches ROOT|TASK=PATH [options]\n"
                              "       %(prog)s show RUN_ID [--tracking-uri URI]",
                        epilog=f"`{_TRANSFER_SHOW} [--tracking-uri URI]` prints a finished grid's table again\n"
                               f"(its own options: genesis transfer show --help).\n\n"
                               + examples(f"genesis transfer --patches demo_output/patch_stores --tasks ncc,lcs "
                                          f"--seeds 0,1 --epochs 3 {_DEMO_DB}",
                                          f"genesis transfer show RUN_ID {_DEMO_DB}"))
    # `transfer show RUN_ID` is parsed by its own parser (`transfer_show_parser`, chosen in `parse_args`); this
    # hidden positional keeps the older spelling with options first (`transfer --tracking-uri URI show RUN_ID`)
    tf.add_argument("show", nargs="*", help=argparse.SUPPRESS)
    tf.add_argument("--tasks", default="ncc,ncs,ecc,lcs,bms", metavar="T,...",
                    help="comma-separated tasks: built-in names, task files (FILE.yaml) or the names of task files' "
                         "tasks whose stores are in --patches (default: ncc,ncs,ecc,lcs,bms, the five built-in "
                         "tasks)")
    tf.add_argument("--patches", action="append", metavar="ROOT|TASK=PATH",
                    help="folder of task stores (task-<task>-<key>), or TASK=PATH (repeatable; required, no default)")
    tf.add_argument("--inits", default="scratch,models:/genesis-pretrained@best", metavar="INIT,...",
                    help="comma-separated inits: scratch, models:/NAME/VERSION, models:/NAME@ALIAS, official:FILE, "
                         "FILE.pt")
    tf.add_argument("--seeds", type=_seeds, default="0,1,2", metavar="S,...",
                    help="comma-separated seeds (default 0,1,2: the t-test against scratch needs two a side)")
    tf.add_argument("--test-fold", type=positive_int, metavar="K",
                    help="fold-based tasks (ECC): run test fold K only (default: every fold the task's store holds; "
                         "the table pools folds x seeds)")
    tf.add_argument("--label-fractions", type=_fractions, default="1.0", metavar="F,...",
                    help="comma-separated label fractions in (0, 1]")
    tf.add_argument("--max-concurrent", type=positive_int, default=2, metavar="K", help="trials at once")
    tf.add_argument("--gpus-per-trial", type=_gpus, default=0.0, metavar="G",
                    help="GPU share per trial worker (e.g. 0.25); 0 fine-tunes on CPUs")
    tf.add_argument("--workers-per-trial", type=positive_int, default=1, metavar="N",
                    help="Ray Train workers of each fine-tuning")
    tf.add_argument("--per-trial", type=positive_int, metavar="N",
                    help="fine-tunings of one task per trial (default: 8 for tiny, 1 for paper)")
    tf.add_argument("--results", metavar="DIR",
                    help="folder for results.md/.csv/.png (default: under --storage-path)")


def transfer_show_parser() -> argparse.ArgumentParser:
    """`genesis transfer show RUN_ID`: its own parser and help. Not a subparser of `transfer`, whose bare form
    (`genesis transfer --patches ...`) runs the grid; `parse_args` picks this one when `show` follows `transfer`."""
    p = _Parser(prog="genesis transfer show", usage="%(prog)s RUN_ID [--tracking-uri URI]", parents=[_tracking()],
                description="print a finished transfer grid's table again, from its MLflow parent run",
                epilog=examples(f"genesis transfer show RUN_ID {_DEMO_DB}",
                                "genesis transfer show RUN_ID --tracking-uri http://HEAD:5000"))
    p.add_argument("run_id", metavar="RUN_ID",
                   help="the grid's parent run (printed at the end of `genesis transfer`; the MLflow UI shows it)")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="on an error, print the Python traceback too")
    return p


def _add_reproduce(sub) -> None:
    rp = sub.add_parser("reproduce", parents=[_verbose()],
                        help="end to end: data -> stores -> pretraining -> transfer grid (scratch vs the model "
                             "pretrained here) -> the table",
                        epilog=examples("genesis reproduce --out reproduce_output --tasks ncc,lcs --seeds 0",
                                        "genesis reproduce --preset paper --data /shared/datasets --out "
                                        "/shared/reproduce --gpus-per-trial 0.25 --gpus-per-worker 1"))
    rp.add_argument("--preset", choices=("tiny", "paper"), default="tiny",
                    help="tiny: width-4 U-Nets on a CPU; paper: the papers' pretraining and fine-tuning recipes (GPU)")
    rp.add_argument("--data", metavar="DIR",
                    help="folder of dataset roots DATA/luna16, DATA/lidc, DATA/pe, DATA/lits, DATA/brats "
                         "(default: sample data written under --out)")
    rp.add_argument("--out", default="reproduce_output", metavar="DIR", help="where everything goes")
    rp.add_argument("--tasks", metavar="T,...",
                    help="comma-separated tasks (default: every task whose dataset is there)")
    rp.add_argument("--seeds", type=_seeds, default="0,1,2", metavar="S,...", help="comma-separated fine-tuning seeds")
    rp.add_argument("--label-fractions", type=_fractions, default="1.0", metavar="F,...",
                    help="comma-separated label fractions in (0, 1]")
    rp.add_argument("--test-fold", type=positive_int, metavar="K",
                    help="fold-based tasks (ECC): fine-tune on test fold K only (default: every fold)")
    rp.add_argument("--max-concurrent", type=positive_int, default=2, metavar="K", help="transfer trials at once")
    rp.add_argument("--gpus-per-trial", type=_gpus, default=0.0, metavar="G", help="GPU share per fine-tuning trial")
    rp.add_argument("--pretrain-workers", type=positive_int, default=2, metavar="N",
                    help="Ray Train workers of the pretraining")
    rp.add_argument("--gpus-per-worker", type=_gpus, default=0.0, metavar="G", help="GPUs per pretraining worker")
    rp.add_argument("--pretrain-epochs", type=positive_int, metavar="E",
                    help="override the pretraining preset's epochs (default: the preset's)")
    rp.add_argument("--epochs", type=positive_int, metavar="E",
                    help="cap each fine-tuning's epochs (default: the preset's)")
    rp.add_argument("--workers", type=positive_int, default=2, metavar="N",
                    help="Dask workers of conversion and extraction")
    rp.add_argument("--tracking-uri", metavar="URI", help="MLflow tracking URI (default: sqlite:///OUT/mlflow.db)")
    rp.add_argument("--ray-address", metavar="ADDR",
                    help="running Ray cluster (default: RAY_ADDRESS, else a local one)")
    rp.add_argument("--worker-logs", action="store_true", help="print the Ray workers' logs")


def _add_tasks(sub) -> None:
    tk = sub.add_parser("tasks", help="the target tasks (task registry)",
                        epilog=examples("genesis tasks list", "genesis tasks show ncs --yaml"))
    tksub = tk.add_subparsers(dest="tasks_command", required=True)
    tl = tksub.add_parser("list", help="print the task table",
                          epilog=examples("genesis tasks list", "genesis tasks list --markdown"))
    tl.add_argument("--markdown", action="store_true", help="as a Markdown table (for a README or a report)")
    ts = tksub.add_parser("show", help="print one task's full spec as JSON",
                          epilog=examples("genesis tasks show ncc", "genesis tasks show own/phantom.yaml --yaml"))
    ts.add_argument("task", metavar="TASK", help="a built-in task's name or a task file (FILE.yaml)")
    ts.add_argument("--yaml", action="store_true", help="print it as its canonical task file instead")
    ti = tksub.add_parser("init", help="draft a task file from an nnU-Net v2 or MSD dataset folder (dataset.json)",
                          epilog=examples("genesis sample-data own/data --dataset nnunet --small",
                                          "genesis tasks init own/data/Dataset501_Phantom --out own/phantom.yaml"))
    ti.add_argument("dataset", metavar="DATASET_DIR", help="the dataset folder (dataset.json, imagesTr, labelsTr)")
    ti.add_argument("--out", required=True, metavar="FILE.yaml", help="the task file to write")
    ti.add_argument("--candidates", metavar="FILE.csv",
                    help="a classification task over these candidates (columns case_id,x,y,z,label; world mm; "
                         "default: a segmentation task)")
    ti.add_argument("--name", metavar="NAME",
                    help="the task's name (default: from the folder: Dataset501_Phantom -> phantom)")
    ti.add_argument("--label", metavar="NAME|all",
                    help="segmentation target: one label of dataset.json, or all labels > 0 (default: all)")
    ti.add_argument("--force", action="store_true", help="overwrite --out if it exists")


def _add_weights(sub) -> None:
    wt = sub.add_parser("weights", help="model weights in the MLflow registry",
                        epilog=examples("genesis weights import Genesis_Chest_CT.pt --name genesis-official "
                                        f"{_DEMO_DB}"))
    wsub = wt.add_subparsers(dest="weights_command", required=True)
    wi = wsub.add_parser("import", parents=[_tracking()],
                         help="register an external checkpoint (e.g. Genesis_Chest_CT.pt)",
                         epilog=examples(f"genesis weights import Genesis_Chest_CT.pt --name genesis-official "
                                         f"{_DEMO_DB}",
                                         "genesis weights import my_unet.pt --name my-unet --alias v1 --axes zyx"))
    wi.add_argument("file", metavar="FILE", help="the checkpoint (.pt) to register")
    wi.add_argument("--name", required=True, metavar="NAME", help="registered model name")
    wi.add_argument("--alias", default="imported", metavar="ALIAS",
                    help="alias set on the new version (models:/NAME@ALIAS)")
    wi.add_argument("--axes", choices=["xyz", "zyx"], default="xyz",
                    help="kernel axis order in FILE: xyz = the published Genesis weights (permuted to our z,y,x), "
                         "zyx = already ours")


def _add_sample_data(sub) -> None:
    sd = sub.add_parser("sample-data", help="write offline sample data in the real layouts of the task datasets",
                        epilog=examples("genesis sample-data data/luna16 --scans 4",
                                        "genesis sample-data data --dataset all --small --no-real"))
    sd.add_argument("dir", metavar="DIR", help="the folder to write (created if missing)")
    sd.add_argument("--dataset", default="luna16", choices=list(SAMPLE_DATASETS) + ["all"],
                    help="which dataset (default luna16; 'all' writes DIR/<dataset>/ for each)")
    sd.add_argument("--scans", type=positive_int, metavar="N",
                    help="scans (cases) per dataset (default: the dataset's)")
    sd.add_argument("--seed", type=non_negative_int, default=0, metavar="S", help="seed of the phantoms")
    sd.add_argument("--no-real", action="store_true", help="skip fetching the two real lung CT cases")
    sd.add_argument("--small", action="store_true", help="small phantoms (for tests)")
    sd.add_argument("--inplane", type=positive_int, metavar="N",
                    help="the small LiTS sample's in-plane voxels over the same field of view (default: 96; 64: what "
                         "`make demo` uses, so that LCS's tiny fine-tuning sees whole slices)")
    sd.add_argument("--phantom", metavar="NAME", choices=PHANTOM_PRESETS,
                    help="LUNA16 phantom preset (default: the default scan, 'tiny' with --small; 'demo': 8-10 nodules "
                         "of 8-20 mm and 20 false candidates per scan, what `make demo` uses for NCC)")


def _add_predict(sub) -> None:
    from pipeline.predict_cli import add_predict_parser

    add_predict_parser(sub, [_tracking()])


_SUBCOMMANDS = (_add_convert, _add_stores, _add_patches, _add_pretrain, _add_finetune, _add_transfer, _add_predict,
                _add_reproduce, _add_tasks, _add_weights, _add_sample_data)
"""In the order `genesis --help` lists them."""


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="genesis", description="Models Genesis pipeline: archives -> stores -> models",
                epilog="Each command's options, their defaults and examples: genesis COMMAND --help\n"
                       "(and genesis transfer show --help).\n\n"
                       + examples("make demo    # sample data -> stores -> pretraining -> the transfer table",
                                  "genesis stores list demo_output",
                                  f"genesis transfer show RUN_ID {_DEMO_DB}"))
    p.add_argument("--debug", action="store_true", help="on an error, print the Python traceback too")
    sub = p.add_subparsers(dest="command", required=True)
    for add in _SUBCOMMANDS:
        add(sub)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, parsed: `genesis transfer show RUN_ID` by its own parser (so that its --help is its own,
    and a missing RUN_ID is a one-line usage error), everything else by `build_parser`. The namespace of `show`
    is the one the older spelling gave (`show == ["show", RUN_ID]`), so `_transfer` handles both."""
    argv = list(sys.argv[1:] if argv is None else argv)
    first = 0
    while first < len(argv) and argv[first] == "--debug":  # genesis's own option, before the command
        first += 1
    if argv[first:first + 2] != ["transfer", "show"]:
        return build_parser().parse_args(argv)
    shown = transfer_show_parser().parse_args(argv[first + 2:])
    return argparse.Namespace(command="transfer", show=["show", shown.run_id], tracking_uri=shown.tracking_uri,
                              debug=first > 0 or getattr(shown, "debug", False), verbose=False)


def main(argv: list[str] | None = None) -> int:
    from pipeline.runtime.tracking import ENTRY_POINT_ENV

    tolerant_streams()
    args = parse_args(argv)
    # run tags; Ray workers started below inherit it. Restored on return: a process that runs several commands
    # (tests, scripts) must not leave one command's name on the next one's runs; nor its --verbose
    outer, outer_verbose = os.environ.get(ENTRY_POINT_ENV), verbose()
    os.environ[ENTRY_POINT_ENV] = _command(args)
    if getattr(args, "verbose", False):
        set_verbose(True)
    try:
        check_locations(args)
    except Exception as exc:  # noqa: BLE001 - a bad store location is one line and exit 2, before any work
        return ended(_command(args), exc, debug=getattr(args, "debug", False))
    handler = {"convert": _convert, "stores": _stores, "sample-data": _sample_data,
               "patches": _patches, "pretrain": _pretrain, "weights": _weights, "tasks": _tasks, "predict": _predict,
               "finetune": _finetune, "transfer": _transfer, "reproduce": _reproduce}[args.command]
    try:
        code = handler(args)
        if sys.stdout is not None:  # None when the shell closed it (`>&-`): nothing to flush
            sys.stdout.flush()  # a reader gone (`| head`) shows here, not as a message at interpreter exit
        return code
    except BrokenPipeError as exc:
        if not _stdout_closed():  # a socket's broken pipe: a failure of the work like any other
            return ended(_command(args), exc, debug=getattr(args, "debug", False))
        return _closed_stdout()
    except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001 - every error is one line and an exit status
        return ended(_command(args), exc, debug=getattr(args, "debug", False))
    finally:
        set_verbose(outer_verbose)
        if outer is None:
            os.environ.pop(ENTRY_POINT_ENV, None)
        else:
            os.environ[ENTRY_POINT_ENV] = outer


LOCATION_OPTIONS = ("store", "root", "patch_store", "patches", "out", "storage_path")
"""Arguments that may name a store or folder in a bucket (s3://...): checked before any work starts."""


def check_locations(args) -> None:
    """Every store location given as a URL is usable before anything starts: a known scheme, a bucket, credentials
    the server accepts, an endpoint that answers, a bucket that exists (`Tree.check`, seconds); StorageError
    (exit 2, one line) otherwise. Local paths are checked where they are used."""
    from pipeline.storage.objects import open_tree

    seen = set()
    for name in LOCATION_OPTIONS:
        value = getattr(args, name, None)
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if not isinstance(item, str) or "://" not in item:
                continue
            if "=" in item and item.index("=") < item.index("://"):  # transfer's --patches TASK=URL
                item = item.split("=", 1)[1]
            url = item
            if url.split("://", 1)[0].lower() in ("http", "https", "file", "mlflow-artifacts") or url in seen:
                continue
            seen.add(url)
            open_tree(url).check()


EXIT_CLOSED_PIPE = 141
"""128 + SIGPIPE: what a shell reports for a command whose reader went away (`genesis stores show S | head`)."""


def _stdout_closed() -> bool:
    """Whether stdout is a pipe whose reading end is closed (poll reports an error on it)."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(event & select.POLLERR for _, event in poller.poll(0))
    except (AttributeError, OSError, ValueError):
        return False


def _closed_stdout() -> int:
    """The reader of stdout is gone: a quiet exit, as `cat` or `ls` end in a pipe. Nothing more can be shown, and
    stdout is pointed at /dev/null so that the interpreter's last flush of it raises nothing either."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        os.close(devnull)
    return EXIT_CLOSED_PIPE


def _command(args) -> str:
    sub = next((getattr(args, a) for a in ("stores_command", "patches_command", "tasks_command", "weights_command")
                if getattr(args, a, None)), None)
    return f"genesis {args.command}" + (f" {sub}" if sub else "")


def _convert(args) -> int:
    from pipeline.cluster import dask_scheduler
    from pipeline.volume_store.convert import convert
    from pipeline.volume_store.settings import ConvertSettings

    store = output_dir(args.store, "--store")  # before Dask starts
    dask_scheduler(args.dask_scheduler)  # and before the store is made
    limit = {} if args.max_scan_bytes is None else {"max_scan_bytes": args.max_scan_bytes}
    settings = ConvertSettings(spacing=args.spacing, modality=args.modality, min_side=args.min_side, **limit)
    summary = convert(args.sources, store, settings, workers=args.workers, scheduler=args.dask_scheduler,
                      progress=not args.no_progress)
    print(summary.report())
    print(f"store: {args.store}  (genesis stores show {args.store})")
    return EXIT_OK if summary.ok else EXIT_FAILED


def _stores(args) -> int:
    from pipeline import stores_cli

    if args.stores_command == "verify":
        return stores_cli.verify_command(shared_path(args.store, "STORE"), args.repair, not args.no_progress)
    if args.stores_command == "show":
        print(stores_cli.show_store(args.store, all_columns=args.all_columns))
    elif args.stores_command == "list":
        root = shared_path(args.root, "ROOT")
        if "://" not in root and not os.path.isdir(root):
            raise UsageError(f"ROOT {args.root}: " + ("is a file, not a folder" if os.path.exists(root)
                                                      else "no such folder"))
        print(stores_cli.list_stores(args.root))
    else:
        from pipeline.volume_store.preview import render_preview

        out = output_file(args.out, "--out")
        try:
            print(render_preview(args.store, args.scan_id, out, window=args.window))
        except KeyError as exc:  # a scan id the store does not hold: bad input
            raise UsageError(exc.args[0] if exc.args else f"no scan {args.scan_id!r}") from exc
    return EXIT_OK


def _patch_out(args) -> str:
    """--out (default: patch_stores beside the volume store), checked before Dask starts."""
    from pathlib import Path

    args.store = shared_path(args.store, "--store")
    if args.out:
        return output_dir(args.out, "--out")
    if "://" in args.store:  # s3://bucket/a/vol -> s3://bucket/a/patch_stores
        scheme, rest = args.store.rstrip("/").split("://", 1)
        parent = rest.rsplit("/", 1)[0] if "/" in rest else rest
        return output_dir(f"{scheme}://{parent}/patch_stores", "--out (default: patch_stores beside the volume store)")
    return output_dir(str(Path(args.store).resolve().parent / "patch_stores"),
                      "--out (default: patch_stores beside the volume store)")


def _patches(args) -> int:
    from pipeline.cluster import dask_scheduler

    if args.patches_command == "preview":
        from pipeline.patches.preview import render_patch_preview

        out = output_file(args.out, "--out")
        print(render_patch_preview(shared_path(args.patch_store, "PATCHSTORE"), out, seed=args.seed))
        return EXIT_OK
    args.out = _patch_out(args)
    dask_scheduler(args.dask_scheduler)
    if args.patches_command == "task":
        return _task_patches(args)
    return _pretrain_patches(args)


def _pretrain_patches(args) -> int:
    from pipeline.patches.config import PretrainPatchConfig
    from pipeline.patches.extract import extract_pretrain

    config = PretrainPatchConfig(cube_size=args.size, per_scan=args.per_scan, scales=args.scales, seed=args.seed,
                                 scale_axes=args.scale_axes, cube_encoding=args.cube_encoding,
                                 border_yx=args.border_yx, border_z=args.border_z, min_slices=args.min_slices,
                                 recipe=args.recipe, modality=args.modality, percentiles=args.percentiles,
                                 min_foreground=args.min_foreground, border_fraction=args.border_fraction,
                                 max_dense_fraction=args.max_dense_fraction)
    result = extract_pretrain(args.store, config, out_root=args.out, workers=args.workers,
                              scheduler=args.dask_scheduler, progress=not args.no_progress)
    print(result.report())
    return EXIT_OK


def _task_spec(args):
    """The task's spec with the command line's overrides (None leaves a field as the task has it)."""
    import dataclasses

    from pipeline.tasks.registry import resolve_task

    spec = resolve_task(args.task)
    if args.negative_ratio is not None:
        if spec.kind != "classification":
            raise ValueError(f"--negative-ratio applies to classification tasks; {spec.name} is {spec.kind}")
        try:
            ratio = None if args.negative_ratio == "all" else float(args.negative_ratio)
        except ValueError:
            ratio = -1.0
        if ratio is not None and not (ratio >= 0 and math.isfinite(ratio)):
            raise ValueError(f"--negative-ratio must be a finite number >= 0 or 'all', got {args.negative_ratio!r}")
        spec = dataclasses.replace(spec, sampling=dataclasses.replace(spec.sampling, negatives_per_positive=ratio))
    channels = _channel_list(args.channels) if args.channels is not None else None
    spec = spec.with_overrides(cube_size=args.size, channels=channels, **{
        "sampling.per_scan": args.per_scan, "split.seed": args.split_seed, "split.test_fold": args.test_fold})
    if getattr(args, "splits", None):
        from pipeline.tasks.splits import with_splits_file

        spec = with_splits_file(spec, shared_path(args.splits, "--splits"))
    return spec


def _channel_list(text: str) -> tuple[str, ...]:
    """--channels: sequence names, lower-cased; an empty name (`--channels ,`, `flair,,t2`) or one named twice is
    a usage error."""
    names = tuple(c.strip().lower() for c in text.split(","))
    if not text.strip() or any(not c for c in names):
        raise UsageError(f"--channels {text!r}: an empty sequence name; give sequences such as flair,t1ce")
    twice = sorted({c for c in names if names.count(c) > 1})
    if twice:
        raise UsageError(f"--channels {text!r}: {', '.join(twice)} named twice")
    return names


def _store_sequences(store: str, dataset: str) -> set[str]:
    """The sequences (source identifier `sequence`, lower-cased) of the volume store's ok scans of `dataset`, read
    from each scan's attributes (zarr.json) only: no voxels."""
    import json

    from pipeline.volume_store.store import VolumeStore

    vstore = VolumeStore(store)
    cat = vstore.catalog()
    found = set()
    ok = cat[(cat["status"] == "ok") & (cat["dataset"] == dataset)]
    for sid, path in zip(ok["scan_id"], ok["path"]):
        try:  # the catalog names each scan's committed version: no record read per scan
            meta = json.loads(vstore.tree.read(f"{vstore.scan_rel(sid, {'path': path})}/zarr.json"))
        except (OSError, ValueError):  # FileNotFoundError included
            continue  # a damaged scan: the build names it
        ids = ((meta.get("attributes") or {}).get("genesis") or {}).get("source", {}).get("identifiers") or {}
        if ids.get("sequence"):
            found.add(str(ids["sequence"]).lower())
    return found


def _check_channels(spec, store: str, given: str) -> None:
    """--channels names sequences the store holds for the task's dataset; else exit 2 naming the unknown ones and
    the known ones, before any work (otherwise every case would be skipped and the build fail after reading)."""
    known = _store_sequences(store, spec.dataset)
    unknown = [c for c in spec.channels if c not in known]
    if unknown:
        have = ", ".join(sorted(known)) if known else "none (its scans carry no sequence name)"
        raise UsageError(f"--channels {given!r}: {', '.join(unknown)} {'is' if len(unknown) == 1 else 'are'} not a "
                         f"sequence of the {spec.dataset} scans in {store} (known: {have})")


def _task_patches(args) -> int:
    from pipeline.patches.task_extract import extract_task

    spec = _task_spec(args)
    if args.channels is not None:
        _check_channels(spec, args.store, args.channels)
    result = extract_task(args.store, spec, seed=args.seed, out_root=args.out, workers=args.workers,
                          scheduler=args.dask_scheduler, progress=not args.no_progress)
    print(result.report())
    return EXIT_FAILED if result.failed else EXIT_OK


def _finetune(args) -> int:
    from pipeline.finetune.run import finetune

    result = finetune(shared_path(args.patches, "--patches"), args.task, args.init, preset=args.preset,
                      freeze_encoder=args.freeze_encoder, label_fraction=args.label_fraction, seed=args.seed,
                      workers=args.workers, gpus_per_worker=args.gpus_per_worker, tracking_uri=args.tracking_uri,
                      experiment=args.experiment, storage_path=args.storage_path, name=args.name,
                      max_failures=args.max_failures, epochs=args.epochs, ray_address=args.ray_address,
                      test_fold=args.test_fold)
    print(result.report())
    return EXIT_FAILED if result.error else EXIT_OK


def _split(text: str, cast=str) -> tuple:
    return tuple(cast(v.strip()) for v in text.split(",") if v.strip())


def _task_list(text: str, option: str = "--tasks") -> tuple[str, ...]:
    """The comma-separated entries of a task list; an option given but naming no task (`--tasks ""`, `--tasks ,`)
    is a usage error, never "every task"."""
    names = _split(text)
    if not names:
        raise UsageError(f"{option} {text!r}: names no task; give comma-separated tasks (genesis tasks list), or "
                         f"leave {option} out for the default")
    return names


def _task_names(text: str) -> tuple[str, ...]:
    """--tasks: built-in names (any case) and task files (registered for this process, named by their task)."""
    from pipeline.tasks.registry import resolve_task
    from pipeline.tasks.task_file import is_task_file

    return tuple(resolve_task(t).name if is_task_file(t) else t.lower() for t in _task_list(text))


def _transfer(args) -> int:
    from pipeline.transfer.grid import GridConfig
    from pipeline.transfer.run import show, transfer

    if args.show:
        if len(args.show) != 2 or args.show[0] != "show":
            raise UsageError(f"unexpected arguments {args.show}; use `genesis transfer show RUN_ID`")
        print(show(args.show[1], args.tracking_uri))
        return EXIT_OK
    if not args.patches:
        raise UsageError("--patches is required (a folder of task stores, or TASK=PATH)")
    if len(args.patches) == 1 and "=" not in args.patches[0]:
        patches = shared_path(args.patches[0], "--patches")
    else:
        if any("=" not in p for p in args.patches):
            raise UsageError(f"--patches {args.patches}: give one folder of task stores, or TASK=PATH for each task")
        patches = {t.strip().lower(): shared_path(v, f"--patches {t}")
                   for t, v in (p.split("=", 1) for p in args.patches)}
    grid = GridConfig(tasks=_task_names(args.tasks), inits=_split(args.inits), seeds=args.seeds,
                      label_fractions=args.label_fractions, freeze_encoder=args.freeze_encoder,
                      preset=args.preset, epochs=args.epochs, max_concurrent=args.max_concurrent,
                      workers_per_trial=args.workers_per_trial, gpus_per_trial=args.gpus_per_trial,
                      cells_per_trial=args.per_trial, max_failures=args.max_failures, test_fold=args.test_fold)
    result = transfer(grid, patches, tracking_uri=args.tracking_uri, experiment=args.experiment,
                      storage_path=args.storage_path, ray_address=args.ray_address, name=args.name,
                      results_dir=args.results)
    print(result.report())
    return EXIT_OK if result.ok else EXIT_FAILED


def _reproduce(args) -> int:
    from pathlib import Path

    from pipeline.reproduce import ReproduceConfig, StepFailed, reproduce

    for option, value in (("--out", args.out), ("--data", args.data)):
        if value and "://" in str(value):  # its sample data, stores and report live in one local folder
            raise UsageError(f"{option} {value}: `genesis reproduce` works in a local folder; to keep stores in a "
                             "bucket run the stages one by one (README: Stores in a bucket)")
    config = ReproduceConfig(
        out=Path(shared_path(args.out, "--out")), preset=args.preset,
        data=Path(shared_path(args.data, "--data")) if args.data else None,
        tasks=_task_list(args.tasks.lower()) if args.tasks is not None else None, seeds=args.seeds,
        label_fractions=args.label_fractions, test_fold=args.test_fold, max_concurrent=args.max_concurrent,
        gpus_per_trial=args.gpus_per_trial, pretrain_workers=args.pretrain_workers,
        gpus_per_worker=args.gpus_per_worker, pretrain_epochs=args.pretrain_epochs, finetune_epochs=args.epochs,
        workers=args.workers, tracking_uri=args.tracking_uri, ray_address=args.ray_address,
        worker_logs=args.worker_logs)
    try:
        result = reproduce(config)  # a second reproduce into OUT: LockBusyError, exit 3 (main)
    except StepFailed as exc:  # its one line is printed already: reproduce ends with the step's own status
        print(f"genesis reproduce: stopped: {exc}", file=sys.stderr)
        return exc.code
    print(result.report())
    return EXIT_OK if result.ok else EXIT_FAILED


def _tasks(args) -> int:
    import json

    from pipeline.tasks.registry import resolve_task, tasks_table

    if args.tasks_command == "list":
        print(tasks_table(markdown=args.markdown))
    elif args.tasks_command == "init":
        from pipeline.tasks.task_init import init_task

        result = init_task(shared_path(args.dataset, "DATASET_DIR"), output_file(args.out, "--out"), name=args.name,
                           label=args.label, force=args.force,
                           candidates=shared_path(args.candidates, "--candidates") if args.candidates else None)
        print(result.report())
    else:
        from pipeline.tasks.task_file import task_file_text

        spec = resolve_task(args.task)
        print(task_file_text(spec).rstrip("\n") if args.yaml else json.dumps(spec.to_dict(), indent=2))
    return EXIT_OK


def _predict(args) -> int:
    from pipeline.predict_cli import run_predict

    return run_predict(args)


def _pretrain(args) -> int:
    from pipeline.training.config import preset
    from pipeline.training.pretrain import pretrain

    config = preset(args.preset).with_overrides(epochs=args.epochs, batch_size=args.batch_size)
    result = pretrain(shared_path(args.patches, "--patches"), config, workers=args.workers,
                      gpus_per_worker=args.gpus_per_worker, ray_address=args.ray_address,
                      tracking_uri=args.tracking_uri, experiment=args.experiment, storage_path=args.storage_path,
                      name=args.name, resume=args.resume, max_failures=args.max_failures, resume_epochs=args.epochs)
    print(result.report())
    return EXIT_FAILED if result.error else EXIT_OK


def _weights(args) -> int:
    from pipeline.model_io.weights import import_weights
    from pipeline.runtime.tracking import check_uri

    tracking = check_uri(args.tracking_uri)
    uri = import_weights(args.file, args.name, alias=args.alias, tracking_uri=tracking, axes=args.axes)
    print(f"registered {args.file} as {uri}")
    return EXIT_OK


def _sample_data(args) -> int:
    from pathlib import Path

    from pipeline.sample_data.datasets import write_sample

    args.dir = output_dir(args.dir, "DIR")
    datasets = SAMPLE_DATASETS if args.dataset == "all" else (args.dataset,)
    for name in datasets:
        out = Path(args.dir) / name if args.dataset == "all" else Path(args.dir)
        summary = write_sample(name, out, n_scans=args.scans, seed=args.seed, small=args.small,
                               include_real=not args.no_real, phantom=args.phantom if name == "luna16" else None,
                               inplane=args.inplane if name == "lits" else None)
        print(summary.describe())
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
