"""`genesis predict`: its parser and handler (the CLI wires them in: `add_predict_parser`, `run_predict`)."""

from __future__ import annotations

import argparse
import textwrap

from pipeline.runtime.help_format import examples

__all__ = ["add_predict_parser", "run_predict"]


def add_predict_parser(subparsers, parents: list[argparse.ArgumentParser] | None = None) -> argparse.ArgumentParser:
    """`genesis predict` under `subparsers`; `parents`: the shared option parsers (e.g. --tracking-uri). The
    subparsers' parser class gives it the help format (defaults shown, the epilog's examples kept as written)."""
    p = subparsers.add_parser(
        "predict", parents=list(parents or []),
        help="apply a fine-tuned model to new scans: a label map per case (or a score per candidate)",
        description=textwrap.fill(
            "Apply a fine-tuned model with the task file and preprocessing it carries. Inputs: image files (NIfTI, "
            "NRRD, MetaImage), DICOM series folders or zips, folders of them (nnU-Net channels <case>_0000...), a "
            "volume store on disk or in a bucket (s3://BUCKET/PREFIX: all scans) or STORE::SCAN_ID. Outputs are local "
            "files.", 100),
        epilog=examples("genesis predict --model models:/genesis-lcs@champion --input "
                        "demo_output/sample_data/lits/volume-1.nii --out predictions --tracking-uri "
                        "sqlite:///demo_output/mlflow.db",
                        "genesis predict --model models:/genesis-phantom@champion --input "
                        "own/data/Dataset501_Phantom/imagesTs --out own/predictions --tracking-uri "
                        "sqlite:///own/mlflow.db"))
    p.add_argument("--model", required=True, metavar="URI",
                   help="models:/NAME/VERSION, models:/NAME@ALIAS, runs:/RUN_ID/model or an MLflow model folder")
    p.add_argument("--input", required=True, nargs="+", metavar="PATH", help="scans to predict (files, folders, STORE or STORE::SCAN_ID, a store on disk or s3://...)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (label maps, predictions.json)")
    if not any(a.dest == "tracking_uri" for parent in (parents or []) for a in parent._actions):
        p.add_argument("--tracking-uri", metavar="URI", help="MLflow tracking URI (default: sqlite:///mlflow.db here)")
    p.add_argument("--probabilities", action="store_true", help="also write <case>_probabilities.nii.gz (float32)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where the model runs; auto: a GPU when there is one, else the CPU")
    p.add_argument("--candidates", metavar="CSV",
                   help="classification models (required for them): case_id,x,y,z (world mm, LPS) per candidate "
                        "(default: none; a segmentation model takes none)")
    p.add_argument("--task", metavar="TASK",
                   help="the task the model must be of (a built-in name or a task file); else exit 2 (default: "
                        "any task; the model's own is used)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def run_predict(args) -> int:
    from pipeline.predict.run import PredictRequest, predict

    return predict(PredictRequest(model=args.model, inputs=tuple(args.input), out=args.out,
                                  tracking_uri=args.tracking_uri, probabilities=args.probabilities,
                                  device=args.device, candidates=args.candidates, task=args.task,
                                  progress=not getattr(args, "no_progress", False)))
