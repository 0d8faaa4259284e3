"""`genesis`: the one command line of the pipeline. Thin: parse, check, call the stage, report, exit.

Exit status: 0 success; 1 some items failed (the rest done), or the work failed; 2 bad usage or input (a path
that cannot be written, an unreachable tracking server, an option out of range, a store too small: checked by
`pipeline.preflight` before anything expensive starts); 3 the store is busy (another conversion holds its lock).

Errors are one line on stderr, never a traceback: `main` turns a user error (ValueError and its kin, an
unwritable path) into exit 2, a failure of the work (RuntimeError, OSError, MLflow, Ray) into exit 1, and anything
else into exit 1 naming the exception and asking for a rerun with `--debug`, which prints the traceback too.
"""

from __future__ import annotations

import argparse
import errno
import math
import os
import sys

__all__ = ["main", "build_parser"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_BUSY = 0, 1, 2, 3
SAMPLE_DATASETS = ("luna16", "lidc", "pe", "lits", "brats")
_FAILURES_HELP = ("worker-group restarts after a worker or node failure; -1 retries forever (a deterministic error "
                  "such as bad data ends the run at once either way)")


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


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def _non_negative(text: str) -> int:
    """An integer >= 0: a margin, a count, or a seed (NumPy's generators take no negative seed)."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return v


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


def _fractions(text: str) -> tuple[float, ...]:
    """Comma-separated label fractions, each in (0, 1]."""
    vals = tuple(_fraction(v.strip()) for v in text.split(",") if v.strip())
    if not vals:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers in (0, 1], got {text!r}")
    return vals


def _seeds(text: str) -> tuple[int, ...]:
    """Comma-separated seeds, each an integer >= 0."""
    vals = tuple(_non_negative(v.strip()) for v in text.split(",") if v.strip())
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


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: the problem and where the help is, not the whole usage block."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")

    def add_subparsers(self, **kwargs):
        action = super().add_subparsers(**kwargs)
        add = action.add_parser

        def add_parser(name, **kw):  # every subcommand takes --debug too, wherever it is written
            sub = add(name, **kw)
            sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help="on an error, print the Python traceback too")
            return sub

        action.add_parser = add_parser
        return action


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="genesis", description="Models Genesis pipeline: archives -> stores -> models")
    p.add_argument("--debug", action="store_true", help="on an error, print the Python traceback too")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("convert", help="convert CT/MRI archives into a volume store (Dask)")
    c.add_argument("sources", nargs="+", metavar="SOURCE", help="folders, files or zip archives")
    c.add_argument("--store", required=True, help="volume store folder (created if missing)")
    c.add_argument("--workers", type=_positive, default=2, help="local Dask worker processes (default 2)")
    c.add_argument("--dask-scheduler", metavar="ADDRESS", help="use a running Dask scheduler instead")
    c.add_argument("--spacing", type=_triple, metavar="Z,Y,X", help="resample to this spacing in mm")
    c.add_argument("--modality", help="force the modality (e.g. CT) for sources without one")
    c.add_argument("--min-side", type=_positive, default=8, help="refuse volumes with a side under this (voxels)")
    c.add_argument("--max-scan-bytes", type=_bytes, metavar="N",
                   help="refuse a scan whose decoded voxels would exceed N bytes (e.g. 4G, 512M)")
    c.add_argument("--no-progress", action="store_true", help="no progress bar")

    s = sub.add_parser("stores", help="list and inspect stores")
    ssub = s.add_subparsers(dest="stores_command", required=True)
    sh = ssub.add_parser("show", help="print a store's catalog / index as a table")
    sh.add_argument("store")
    sh.add_argument("--all-columns", action="store_true")
    pv = ssub.add_parser("preview", help="PNG of a scan's three orthogonal middle slices")
    pv.add_argument("store")
    pv.add_argument("scan_id")
    pv.add_argument("--out", required=True)
    pv.add_argument("--window", default="lung", help="CT window: lung | mediastinum | bone")
    ls = ssub.add_parser("list", help="every volume and patch store under ROOT")
    ls.add_argument("root", nargs="?", default=".")
    vf = ssub.add_parser("verify", help="check every array and table of a store (--repair: fix what can be fixed)")
    vf.add_argument("store")
    vf.add_argument("--repair", action="store_true")
    vf.add_argument("--no-progress", action="store_true")

    pt = sub.add_parser("patches", help="build and inspect patch stores")
    psub = pt.add_subparsers(dest="patches_command", required=True)
    pp = psub.add_parser("pretrain", help="Models Genesis pretraining cubes from a volume store")
    pp.add_argument("--store", required=True, help="volume store")
    pp.add_argument("--size", type=_ints3, default=(32, 64, 64), metavar="D,H,W",
                    help="cube (slices, rows, columns); default 32,64,64 = the reference's 64x64x32 (x,y,z)")
    pp.add_argument("--per-scan", type=_positive, default=32)
    pp.add_argument("--scales", type=_floats, default=(1.0,), metavar="S1,S2,...",
                    help="crop side multipliers >= 1 (larger crops are resized to the cube)")
    pp.add_argument("--scale-axes", choices=("yx", "zyx"), default="yx",
                    help="yx: larger in-plane crops, depth never resized (the reference's crop_rows/crop_cols); "
                         "zyx: 3D crops")
    pp.add_argument("--cube-encoding", choices=("auto", "float32"), default="auto",
                    help="auto: clipped HU as int16 when exact (bit-identical floats on read), else float32")
    pp.add_argument("--seed", type=_non_negative, default=0)
    pp.add_argument("--out", help="root folder of patch stores (default: patch_stores beside the volume store)")
    pp.add_argument("--workers", type=_positive, default=2)
    pp.add_argument("--dask-scheduler", metavar="ADDRESS")
    pp.add_argument("--border-yx", type=_non_negative, default=100)
    pp.add_argument("--border-z", type=_non_negative, default=30)
    pp.add_argument("--min-slices", type=_non_negative, default=96)
    pp.add_argument("--no-progress", action="store_true")
    pk = psub.add_parser("task", help="a target task's patch store (cubes, masks/labels, patient splits)")
    pk.add_argument("task", help="task name (genesis tasks list): ncc, ncs, ecc, lcs, bms")
    pk.add_argument("--store", required=True, help="volume store")
    pk.add_argument("--out", help="root folder of patch stores (default: patch_stores beside the volume store)")
    pk.add_argument("--workers", type=_positive, default=2)
    pk.add_argument("--dask-scheduler", metavar="ADDRESS")
    pk.add_argument("--seed", type=_non_negative, default=0,
                    help="sampling seed (negatives, jitter, crops, fraction order)")
    pk.add_argument("--size", type=_ints3, metavar="D,H,W", help="cube size (default: the task's)")
    pk.add_argument("--negative-ratio", metavar="R",
                    help="classification: negatives kept per positive and split, or 'all' (default: the task's)")
    pk.add_argument("--per-scan", type=_positive, help="segmentation (pos/neg tasks): cubes per scan")
    pk.add_argument("--split-seed", type=_non_negative, help="seed of the patient-level split (default: the task's)")
    pk.add_argument("--test-fold", type=_positive, metavar="K",
                    help="fold-split tasks (ECC): checked against the data's folds only. The store holds every fold "
                         "(its `split` column shows fold 1's run) and its key does not depend on K; fine-tuning "
                         "picks its fold with `genesis finetune/transfer --test-fold K`")
    pk.add_argument("--splits", metavar="FILE",
                    help="train/validation/test by case from FILE: a CSV of case_id,split (split: train, validation "
                         "or test) or nnU-Net's splits_final.json; the file's content is part of the store's key "
                         "(default: the task's split rule)")
    pk.add_argument("--channels", help="multi-channel tasks (BMS): sequences, e.g. flair,t1ce")
    pk.add_argument("--no-progress", action="store_true")
    pv2 = psub.add_parser("preview", help="PNG of sample cubes and of each corruption")
    pv2.add_argument("patch_store")
    pv2.add_argument("--out", required=True)
    pv2.add_argument("--seed", type=_non_negative, default=0)

    tr = sub.add_parser("pretrain", help="Models Genesis pretraining on Ray Train, recorded in MLflow")
    tr.add_argument("--patches", required=True, help="pretraining patch store")
    tr.add_argument("--preset", default="tiny", choices=["tiny", "stable", "paper"])
    tr.add_argument("--workers", type=_positive, default=2)
    tr.add_argument("--gpus-per-worker", type=_gpus, default=0.0)
    tr.add_argument("--epochs", type=_positive)
    tr.add_argument("--batch-size", type=_positive, help="global batch: cubes per step over all workers, split evenly (preset's by default)")
    tr.add_argument("--ray-address", help="running Ray cluster (default: start a local one)")
    tr.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite:///mlflow.db here)")
    tr.add_argument("--experiment", default="genesis-pretraining")
    tr.add_argument("--storage-path", help="where Ray Train keeps checkpoints (default ./ray_results)")
    tr.add_argument("--name", help="run name (default: genesis-pretrain-PRESET-TIME)")
    tr.add_argument("--resume", action="store_true",
                    help="continue the run --name (default: the latest run) with its own settings; --epochs extends it")
    tr.add_argument("--max-failures", type=_failures, default=3, help=_FAILURES_HELP + " (default 3)")

    ft = sub.add_parser("finetune", help="fine-tune on a target task (Ray Train), evaluated on its test split")
    ft.add_argument("--task", required=True, help="ncc, ncs, ecc, lcs or bms (genesis tasks list)")
    ft.add_argument("--patches", required=True, help="the task's patch store (genesis patches task T)")
    ft.add_argument("--init", default="scratch",
                    help="scratch | models:/NAME/VERSION | models:/NAME@ALIAS | official:FILE.pt | FILE.pt")
    ft.add_argument("--freeze-encoder", action="store_true")
    ft.add_argument("--label-fraction", type=_fraction, default=1.0, help="nested, stratified share of training cubes")
    ft.add_argument("--seed", type=_non_negative, default=0)
    ft.add_argument("--preset", choices=("tiny", "paper"), default="tiny")
    ft.add_argument("--epochs", type=_positive, help="cap the preset's maximum epochs")
    ft.add_argument("--workers", type=_positive, default=1)
    ft.add_argument("--gpus-per-worker", type=_gpus, default=0.0)
    ft.add_argument("--ray-address", help="running Ray cluster (default: start a local one)")
    ft.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite:///mlflow.db here)")
    ft.add_argument("--experiment", default="genesis-finetune")
    ft.add_argument("--storage-path", help="where Ray Train keeps checkpoints (default ./ray_results)")
    ft.add_argument("--name", help="run name")
    ft.add_argument("--max-failures", type=_failures, default=1, help=_FAILURES_HELP + " (default 1)")
    ft.add_argument("--test-fold", type=_positive, metavar="K",
                    help="fold-based tasks (ECC): the test fold; training uses the other folds (default: the store's "
                         "first fold, 1; `genesis transfer` runs every fold)")

    tf = sub.add_parser("transfer", help="the transfer grid: tasks x inits x label fractions x seeds on Ray Tune, "
                                         "one MLflow parent run, the paper's table; `transfer show RUN_ID` prints it "
                                         "again")
    tf.add_argument("show", nargs="*", metavar="show RUN_ID", help="print a finished grid's table from MLflow")
    tf.add_argument("--tasks", default="ncc,ncs,ecc,lcs,bms", help="comma-separated tasks (default: all five)")
    tf.add_argument("--patches", action="append",
                    help="folder of task stores (task-<task>-<key>), or TASK=PATH (repeatable)")
    tf.add_argument("--inits", default="scratch,models:/genesis-pretrained@best",
                    help="comma-separated inits: scratch, models:/NAME/VERSION, models:/NAME@ALIAS, official:FILE, FILE.pt")
    tf.add_argument("--seeds", type=_seeds, default="0,1,2",
                    help="comma-separated seeds (default 0,1,2: the t-test against scratch needs two a side)")
    tf.add_argument("--test-fold", type=_positive, metavar="K",
                    help="fold-based tasks (ECC): run test fold K only (default: every fold the task's store holds; "
                         "the table pools folds x seeds)")
    tf.add_argument("--label-fractions", type=_fractions, default="1.0",
                    help="comma-separated label fractions in (0, 1]")
    tf.add_argument("--freeze-encoder", action="store_true")
    tf.add_argument("--preset", choices=("tiny", "paper"), default="tiny")
    tf.add_argument("--epochs", type=_positive, help="cap the preset's maximum epochs")
    tf.add_argument("--max-concurrent", type=_positive, default=2, help="trials at once")
    tf.add_argument("--gpus-per-trial", type=_gpus, default=0.0, help="GPU share per trial worker (e.g. 0.25)")
    tf.add_argument("--workers-per-trial", type=_positive, default=1)
    tf.add_argument("--per-trial", type=_positive,
                    help="fine-tunings of one task per trial (default: 8 for tiny, 1 for paper)")
    tf.add_argument("--max-failures", type=_failures, default=1, help=_FAILURES_HELP + " per trial (default 1)")
    tf.add_argument("--ray-address", help="running Ray cluster (default: start a local one)")
    tf.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite:///mlflow.db here)")
    tf.add_argument("--experiment", default="genesis-transfer")
    tf.add_argument("--storage-path", help="where Ray keeps trials and checkpoints (default ./ray_results)")
    tf.add_argument("--results", help="folder for results.md/.csv/.png (default: under --storage-path)")
    tf.add_argument("--name", help="parent run name")

    rp = sub.add_parser("reproduce", help="end to end: data -> stores -> pretraining -> transfer grid (scratch vs the "
                                          "model pretrained here) -> the table")
    rp.add_argument("--preset", choices=("tiny", "paper"), default="tiny",
                    help="tiny: width-4 U-Nets on a CPU; paper: the papers' pretraining and fine-tuning recipes (GPU)")
    rp.add_argument("--data", help="folder of dataset roots DATA/luna16, DATA/lidc, DATA/pe, DATA/lits, DATA/brats "
                                   "(default: sample data written under --out)")
    rp.add_argument("--out", default="reproduce_output", help="where everything goes (default reproduce_output)")
    rp.add_argument("--tasks", help="comma-separated tasks (default: every task whose dataset is there)")
    rp.add_argument("--seeds", type=_seeds, default="0,1,2", help="comma-separated fine-tuning seeds (default 0,1,2)")
    rp.add_argument("--label-fractions", type=_fractions, default="1.0",
                    help="comma-separated label fractions in (0, 1] (default 1.0)")
    rp.add_argument("--test-fold", type=_positive, metavar="K",
                    help="fold-based tasks (ECC): fine-tune on test fold K only (default: every fold)")
    rp.add_argument("--max-concurrent", type=_positive, default=2, help="transfer trials at once")
    rp.add_argument("--gpus-per-trial", type=_gpus, default=0.0, help="GPU share per fine-tuning trial")
    rp.add_argument("--pretrain-workers", type=_positive, default=2, help="Ray Train workers of the pretraining")
    rp.add_argument("--gpus-per-worker", type=_gpus, default=0.0, help="GPUs per pretraining worker")
    rp.add_argument("--pretrain-epochs", type=_positive, help="override the pretraining preset's epochs")
    rp.add_argument("--epochs", type=_positive, help="cap each fine-tuning's epochs")
    rp.add_argument("--workers", type=_positive, default=2, help="Dask workers of conversion and extraction")
    rp.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite:///OUT/mlflow.db)")
    rp.add_argument("--ray-address", help="running Ray cluster (default: RAY_ADDRESS, else a local one)")
    rp.add_argument("--worker-logs", action="store_true", help="print the Ray workers' logs")

    tk = sub.add_parser("tasks", help="the target tasks (task registry)")
    tksub = tk.add_subparsers(dest="tasks_command", required=True)
    tl = tksub.add_parser("list", help="print the task table")
    tl.add_argument("--markdown", action="store_true")
    ts = tksub.add_parser("show", help="print one task's full spec as JSON")
    ts.add_argument("task")

    wt = sub.add_parser("weights", help="model weights in the MLflow registry")
    wsub = wt.add_subparsers(dest="weights_command", required=True)
    wi = wsub.add_parser("import", help="register an external checkpoint (e.g. Genesis_Chest_CT.pt)")
    wi.add_argument("file")
    wi.add_argument("--name", required=True, help="registered model name")
    wi.add_argument("--alias", default="imported")
    wi.add_argument("--axes", choices=["xyz", "zyx"], default="xyz",
                    help="kernel axis order in FILE: xyz = the published Genesis weights (permuted to our z,y,x), "
                         "zyx = already ours")
    wi.add_argument("--tracking-uri")

    sd = sub.add_parser("sample-data", help="write offline sample data in the real layouts of the task datasets")
    sd.add_argument("dir")
    sd.add_argument("--dataset", default="luna16", choices=list(SAMPLE_DATASETS) + ["all"],
                    help="which dataset (default luna16; 'all' writes DIR/<dataset>/ for each)")
    sd.add_argument("--scans", type=_positive, help="scans (cases) per dataset (default: the dataset's)")
    sd.add_argument("--seed", type=_non_negative, default=0)
    sd.add_argument("--no-real", action="store_true", help="skip fetching the two real lung CT cases")
    sd.add_argument("--small", action="store_true", help="small phantoms (for tests)")
    return p


def main(argv: list[str] | None = None) -> int:
    for stream in (sys.stdout, sys.stderr):  # tables print "±": never crash on an ASCII-only terminal or log
        if hasattr(stream, "reconfigure") and (stream.encoding or "").lower().replace("-", "") != "utf8":
            stream.reconfigure(errors="replace")
    args = build_parser().parse_args(argv)
    # run tags; Ray workers started below inherit it. Restored on return: `genesis reproduce` and the demo run
    # several commands in one process, and one command's name must not stay on the next stage's runs
    outer = os.environ.get("GENESIS_ENTRY_POINT")
    os.environ["GENESIS_ENTRY_POINT"] = _command(args)
    handler = {"convert": _convert, "stores": _stores, "sample-data": _sample_data,
               "patches": _patches, "pretrain": _pretrain, "weights": _weights, "tasks": _tasks,
               "finetune": _finetune, "transfer": _transfer, "reproduce": _reproduce}[args.command]
    try:
        return _handle(handler, args)
    finally:
        if outer is None:
            os.environ.pop("GENESIS_ENTRY_POINT", None)
        else:
            os.environ["GENESIS_ENTRY_POINT"] = outer


def _handle(handler, args) -> int:
    try:
        return handler(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - every error is one line and an exit status (--debug: a traceback)
        if getattr(args, "debug", False) or os.environ.get("GENESIS_DEBUG"):
            import traceback

            traceback.print_exc()
        code, line = classify(exc)
        print(f"{_command(args)}: {line}", file=sys.stderr)
        return code


def _command(args) -> str:
    sub = next((getattr(args, a) for a in ("stores_command", "patches_command", "tasks_command", "weights_command")
                if getattr(args, a, None)), None)
    return f"genesis {args.command}" + (f" {sub}" if sub else "")


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, KeyError) and exc.args:
        text = str(exc.args[0])
    else:
        text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _work_failure_types() -> tuple[type[BaseException], ...]:
    """Failures of the work (exit 1), as opposed to bad input: runtime errors, the filesystem, MLflow, Ray."""
    kinds: list[type[BaseException]] = [RuntimeError, OSError]
    for module, name in (("mlflow.exceptions", "MlflowException"), ("ray.exceptions", "RayError"),
                         ("ray.train", "TrainingFailedError")):
        mod = sys.modules.get(module)
        if mod is not None and isinstance(getattr(mod, name, None), type):
            kinds.append(getattr(mod, name))
    return tuple(kinds)


def classify(exc: BaseException) -> tuple[int, str]:
    """(exit status, the one line to print) for an exception that reached `main`."""
    from pipeline.preflight import UsageError

    locked = [getattr(sys.modules.get(m), n, None) for m, n in (("pipeline.volume_store.store", "StoreLockedError"),
                                                                 ("pipeline.storage.locks", "LockBusyError"))]
    if any(isinstance(t, type) and isinstance(exc, t) for t in locked):
        return EXIT_BUSY, _one_line(exc)
    user_os = (FileNotFoundError, NotADirectoryError, IsADirectoryError, FileExistsError, PermissionError)
    if isinstance(exc, (UsageError, ValueError, *user_os)) or \
            (isinstance(exc, OSError) and exc.errno in (errno.EROFS, errno.ENOTDIR, errno.EISDIR, errno.EACCES)):
        return EXIT_USAGE, f"error: {_one_line(exc)}"
    if isinstance(exc, _work_failure_types()):
        return EXIT_FAILED, f"failed: {type(exc).__name__}: {_one_line(exc)}"
    return EXIT_FAILED, (f"unexpected error {type(exc).__name__}: {_one_line(exc)} (rerun with --debug for the "
                         f"traceback)")


def _convert(args) -> int:
    import dataclasses

    from pipeline import preflight
    from pipeline.volume_store import ConvertSettings, convert

    store = preflight.output_dir(args.store, "--store")  # before Dask starts
    preflight.dask_scheduler(args.dask_scheduler)  # and before the store is made
    extra = {}
    if args.max_scan_bytes is not None:
        if "max_scan_bytes" not in {f.name for f in dataclasses.fields(ConvertSettings)}:
            raise preflight.UsageError("--max-scan-bytes: this version's conversion has no scan size limit")
        extra["max_scan_bytes"] = args.max_scan_bytes
    settings = ConvertSettings(spacing=args.spacing, modality=args.modality, min_side=args.min_side, **extra)
    summary = convert(args.sources, store, settings, workers=args.workers, scheduler=args.dask_scheduler,
                      progress=not args.no_progress)
    print(summary.report())
    print(f"store: {args.store}  (genesis stores show {args.store})")
    return EXIT_OK if summary.ok else EXIT_FAILED


def _stores(args) -> int:
    from pipeline import preflight, stores_cli

    if args.stores_command == "verify":
        verify = getattr(stores_cli, "verify_command", None)  # written by another change; absent before it lands
        if verify is None:
            raise preflight.UsageError("this version has no store verification")
        return verify(preflight.shared_path(args.store, "STORE"), args.repair, not args.no_progress)
    if args.stores_command == "show":
        print(stores_cli.show_store(args.store, all_columns=args.all_columns))
    elif args.stores_command == "list":
        root = preflight.shared_path(args.root, "ROOT")
        if not os.path.isdir(root):
            raise preflight.UsageError(f"ROOT {args.root}: " + ("is a file, not a folder" if os.path.exists(root)
                                                                else "no such folder"))
        print(stores_cli.list_stores(args.root))
    else:
        from pipeline.volume_store.preview import render_preview

        out = preflight.output_file(args.out, "--out")
        try:
            print(render_preview(args.store, args.scan_id, out, window=args.window))
        except KeyError as exc:  # a scan id the store does not hold: bad input
            raise preflight.UsageError(exc.args[0] if exc.args else f"no scan {args.scan_id!r}") from exc
    return EXIT_OK


def _patch_out(args) -> str:
    """--out (default: patch_stores beside the volume store), checked before Dask starts."""
    from pathlib import Path

    from pipeline import preflight

    args.store = preflight.shared_path(args.store, "--store")
    if args.out:
        return preflight.output_dir(args.out, "--out")
    return preflight.output_dir(str(Path(args.store).resolve().parent / "patch_stores"),
                                "--out (default: patch_stores beside the volume store)")


def _patches(args) -> int:
    from pipeline import preflight
    from pipeline.patches import PretrainPatchConfig, extract_pretrain

    if args.patches_command == "preview":
        from pipeline.patches.preview import render_patch_preview

        out = preflight.output_file(args.out, "--out")
        print(render_patch_preview(preflight.shared_path(args.patch_store, "PATCHSTORE"), out, seed=args.seed))
        return EXIT_OK
    args.out = _patch_out(args)
    preflight.dask_scheduler(args.dask_scheduler)
    if args.patches_command == "task":
        return _task_patches(args)
    config = PretrainPatchConfig(cube_size=args.size, per_scan=args.per_scan, scales=args.scales, seed=args.seed,
                                 scale_axes=args.scale_axes, cube_encoding=args.cube_encoding,
                                 border_yx=args.border_yx, border_z=args.border_z, min_slices=args.min_slices)
    result = extract_pretrain(args.store, config, out_root=args.out, workers=args.workers,
                              scheduler=args.dask_scheduler, progress=not args.no_progress)
    print(result.report())
    return EXIT_OK


def _task_spec(args):
    """The task's spec with the command line's overrides (None leaves a field as the task has it)."""
    import dataclasses

    from pipeline.tasks import get_task

    spec = get_task(args.task)
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
    channels = tuple(c.strip().lower() for c in args.channels.split(",")) if args.channels else None
    spec = spec.with_overrides(cube_size=args.size, channels=channels, **{
        "sampling.per_scan": args.per_scan, "split.seed": args.split_seed, "split.test_fold": args.test_fold})
    if getattr(args, "splits", None):
        from pipeline import preflight
        from pipeline.tasks.splits import with_splits_file

        spec = with_splits_file(spec, preflight.shared_path(args.splits, "--splits"))
    return spec


def _task_patches(args) -> int:
    from pipeline.patches.task_extract import extract_task

    spec = _task_spec(args)
    result = extract_task(args.store, spec, seed=args.seed, out_root=args.out, workers=args.workers,
                          scheduler=args.dask_scheduler, progress=not args.no_progress)
    print(result.report())
    return EXIT_FAILED if result.failed else EXIT_OK


def _finetune(args) -> int:
    from pipeline import preflight
    from pipeline.finetune import finetune

    result = finetune(preflight.shared_path(args.patches, "--patches"), args.task, args.init, preset=args.preset,
                      freeze_encoder=args.freeze_encoder, label_fraction=args.label_fraction, seed=args.seed,
                      workers=args.workers, gpus_per_worker=args.gpus_per_worker, tracking_uri=args.tracking_uri,
                      experiment=args.experiment, storage_path=args.storage_path, name=args.name,
                      max_failures=args.max_failures, epochs=args.epochs, ray_address=args.ray_address,
                      test_fold=args.test_fold)
    print(result.report())
    return EXIT_FAILED if result.error else EXIT_OK


def _split(text: str, cast=str) -> tuple:
    return tuple(cast(v.strip()) for v in text.split(",") if v.strip())


def _transfer(args) -> int:
    from pipeline import preflight
    from pipeline.tasks import get_task
    from pipeline.transfer import GridConfig, show, transfer

    if args.show:
        if len(args.show) != 2 or args.show[0] != "show":
            raise preflight.UsageError(f"unexpected arguments {args.show}; use `genesis transfer show RUN_ID`")
        print(show(args.show[1], args.tracking_uri))
        return EXIT_OK
    if not args.patches:
        raise preflight.UsageError("--patches is required (a folder of task stores, or TASK=PATH)")
    if len(args.patches) == 1 and "=" not in args.patches[0]:
        patches = preflight.shared_path(args.patches[0], "--patches")
    else:
        if any("=" not in p for p in args.patches):
            raise preflight.UsageError(f"--patches {args.patches}: give one folder of task stores, or TASK=PATH for "
                                       f"each task")
        patches = {t.strip().lower(): preflight.shared_path(v, f"--patches {t}")
                   for t, v in (p.split("=", 1) for p in args.patches)}
    grid = GridConfig(tasks=_split(args.tasks.lower()), inits=_split(args.inits), seeds=args.seeds,
                      label_fractions=args.label_fractions, freeze_encoder=args.freeze_encoder,
                      preset=args.preset, epochs=args.epochs, max_concurrent=args.max_concurrent,
                      workers_per_trial=args.workers_per_trial, gpus_per_trial=args.gpus_per_trial,
                      cells_per_trial=args.per_trial, max_failures=args.max_failures, test_fold=args.test_fold)
    for t in grid.tasks:
        get_task(t)
    result = transfer(grid, patches, tracking_uri=args.tracking_uri, experiment=args.experiment,
                      storage_path=args.storage_path, ray_address=args.ray_address, name=args.name,
                      results_dir=args.results)
    print(result.report())
    return EXIT_OK if result.ok else EXIT_FAILED


def _reproduce(args) -> int:
    from pathlib import Path

    from pipeline import preflight
    from pipeline.reproduce import ReproduceConfig, reproduce

    config = ReproduceConfig(
        out=Path(preflight.shared_path(args.out, "--out")), preset=args.preset,
        data=Path(preflight.shared_path(args.data, "--data")) if args.data else None,
        tasks=_split(args.tasks.lower()) if args.tasks else None, seeds=args.seeds,
        label_fractions=args.label_fractions, test_fold=args.test_fold, max_concurrent=args.max_concurrent,
        gpus_per_trial=args.gpus_per_trial, pretrain_workers=args.pretrain_workers,
        gpus_per_worker=args.gpus_per_worker, pretrain_epochs=args.pretrain_epochs, finetune_epochs=args.epochs,
        workers=args.workers, tracking_uri=args.tracking_uri, ray_address=args.ray_address,
        worker_logs=args.worker_logs)
    result = reproduce(config)  # a step that fails raises StepFailed (a RuntimeError: exit 1, named by main)
    print(result.report())
    return EXIT_OK if result.ok else EXIT_FAILED


def _tasks(args) -> int:
    import json

    from pipeline.tasks import get_task, tasks_table

    if args.tasks_command == "list":
        print(tasks_table(markdown=args.markdown))
    else:
        print(json.dumps(get_task(args.task).to_dict(), indent=2))
    return EXIT_OK


def _pretrain(args) -> int:
    from pipeline import preflight
    from pipeline.training import preset
    from pipeline.training.pretrain import pretrain

    config = preset(args.preset).with_overrides(epochs=args.epochs, batch_size=args.batch_size)
    result = pretrain(preflight.shared_path(args.patches, "--patches"), config, workers=args.workers,
                      gpus_per_worker=args.gpus_per_worker, ray_address=args.ray_address,
                      tracking_uri=args.tracking_uri, experiment=args.experiment, storage_path=args.storage_path,
                      name=args.name, resume=args.resume, max_failures=args.max_failures, resume_epochs=args.epochs)
    print(result.report())
    return EXIT_FAILED if result.error else EXIT_OK


def _weights(args) -> int:
    from pipeline import preflight
    from pipeline.weights import import_weights

    tracking = preflight.tracking_uri(args.tracking_uri)
    uri = import_weights(args.file, args.name, alias=args.alias, tracking_uri=tracking, axes=args.axes)
    print(f"registered {args.file} as {uri}")
    return EXIT_OK


def _sample_data(args) -> int:
    from pathlib import Path

    from pipeline import preflight
    from pipeline.sample_data.datasets import write_sample

    args.dir = preflight.output_dir(args.dir, "DIR")
    datasets = SAMPLE_DATASETS if args.dataset == "all" else (args.dataset,)
    for name in datasets:
        out = Path(args.dir) / name if args.dataset == "all" else Path(args.dir)
        summary = write_sample(name, out, n_scans=args.scans, seed=args.seed, small=args.small,
                               include_real=not args.no_real)
        print(summary.describe())
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
