"""The I/O layer of `genesis predict`: the model and its card, the inputs as cases, a label map (or scores) per
case in the input's own geometry, and `predictions.json`, written last.

Exit status: 0 when every input was predicted; 1 when some input could not be read (one line each on stderr, the
others still done; candidates of such an input are left out of predictions.csv and counted in predictions.json);
a `UsageError` (exit 2) before any work for a model that carries no task file, a model of another task than
`--task`, inputs whose channels do not fit the task, an input whose declared modality (a store's, a DICOM
series') is CT for a non-CT task or the reverse, an output that would overwrite an input, an `--out` in a bucket
(outputs are local files; a volume store in a bucket is a valid input), and a bucket input that cannot be reached.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from pipeline.predict import apply as A
from pipeline.predict.inputs import (Case, Loaded, declared_modality, expand_inputs, group_cases, item_checksum,
                                     one_channel_case, output_suffix, read_items, source_files, stem)
from pipeline.predict.model_card import ModelCard, card_of_model
from pipeline.runtime.errors import UsageError, one_line
from pipeline.runtime.paths import files_sha256

__all__ = ["PredictRequest", "predict", "NO_TASK", "to_lps_image", "from_lps_array"]

NO_TASK = "cannot apply: the model carries no task file; log it with this version"


@dataclass(frozen=True)
class PredictRequest:
    model: str
    inputs: tuple[str, ...]
    out: str
    tracking_uri: str | None = None
    probabilities: bool = False
    device: str = "auto"
    candidates: str | None = None
    task: str | None = None
    progress: bool = True


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available (use --device cpu or auto)")
    return torch.device(name)


def _check_task(card: ModelCard, ref: str | None) -> None:
    from pipeline.tasks.registry import resolve_task
    from pipeline.tasks.task_file import TaskFileError, task_file_sha256

    if card.task is None:
        raise UsageError(f"{card.uri}: {NO_TASK}")
    if ref is None:
        return
    try:
        wanted = resolve_task(ref)
    except (TaskFileError, KeyError, ValueError) as exc:
        raise UsageError(f"--task {ref}: {one_line(exc)}") from None
    if wanted.name != card.task.name or wanted.data_dict() != card.task.data_dict():
        what = (f"task {card.task.name!r}" if wanted.name != card.task.name
                else f"another version of task {card.task.name!r} (task file sha256 {task_file_sha256(card.task)[:12]} "
                     f"vs {task_file_sha256(wanted)[:12]})")
        raise UsageError(f"--task {ref}: the model {card.uri} is a model of {what}, not of task {wanted.name!r}; "
                         f"predict with a model of task {wanted.name!r}")


def to_lps_image(image: sitk.Image) -> sitk.Image:
    from pipeline.ingest.volume import to_lps

    return to_lps(image)


def from_lps_array(arr: np.ndarray, lps: sitk.Image, original: sitk.Image) -> sitk.Image:
    """`arr` (Z, Y, X) on the grid of `lps` (the input reoriented to LPS) as an image in the input's own
    geometry: reoriented back to the input's orientation code, then given its exact size, spacing, origin and
    direction (the permutation and flips are exact, so only rounding of the geometry is copied over)."""
    image = sitk.GetImageFromArray(arr)
    image.CopyInformation(lps)
    code = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(original.GetDirection())
    if code != "LPS" or not np.allclose(lps.GetDirection(), original.GetDirection()):
        image = sitk.DICOMOrient(image, code)
    if image.GetSize() != original.GetSize():
        raise ValueError(f"internal: label map size {image.GetSize()} back from LPS differs from the input's "
                         f"{original.GetSize()}")
    image.CopyInformation(original)
    return image


def _is_ct(modality: str) -> bool:
    """CT against every other modality (MR, T2, ADC, FLAIR, ...), as the patch recipes tell them apart
    (`pipeline.patches.config.recipe_of_modality`): the intensity rules differ only between the two."""
    return str(modality).strip().upper() == "CT"


def _modality_problem(modality: str | None, spec, label: str) -> str | None:
    if modality is None or not str(modality).strip() or _is_ct(modality) == _is_ct(spec.modality):
        return None
    return (f"{label}: modality {modality} but the model's task {spec.name!r} is {spec.modality}; this model "
            f"cannot be applied to it")


def _same_grid(a: sitk.Image, b: sitk.Image) -> bool:
    return (a.GetSize() == b.GetSize() and np.allclose(a.GetSpacing(), b.GetSpacing(), rtol=1e-4, atol=1e-3)
            and np.allclose(a.GetOrigin(), b.GetOrigin(), rtol=1e-4, atol=1e-3)
            and np.allclose(a.GetDirection(), b.GetDirection(), atol=1e-3))


def _read_case(case: Case, spec) -> tuple[list[Loaded], np.ndarray, sitk.Image]:
    """The case's channels read, (C, Z, Y, X) float32 in LPS, and channel 0's LPS image (the geometry). A modality
    found only on reading (checked before any work where the input declares it) fails this case alone."""
    loaded = read_items(case.channels)
    for item, one in zip(case.channels, loaded):
        problem = _modality_problem(one.modality, spec, item.label)
        if problem:
            raise ValueError(problem)
        if one.image.GetDimension() != 3 or one.image.GetNumberOfComponentsPerPixel() != 1:
            raise ValueError(f"{item.label}: expected a 3-D image of one value per voxel, got "
                             f"{one.image.GetDimension()}-D with {one.image.GetNumberOfComponentsPerPixel()} "
                             f"component(s)")
        if not _same_grid(one.image, loaded[0].image):
            raise ValueError(f"{item.label}: channel not on the grid of {case.channels[0].label} (size, spacing, "
                             f"origin or direction differ)")
    lps = [to_lps_image(one.image) for one in loaded]
    arr = np.stack([sitk.GetArrayFromImage(img).astype(np.float32) for img in lps])
    return loaded, arr, lps[0]


def _resampled(lps: sitk.Image, arr: np.ndarray, spacing_zyx) -> tuple[sitk.Image, np.ndarray]:
    """The channels resampled (linear) to the spacing the volume store resampled scans to, the edges padded with
    each channel's minimum as the store pads them (`pipeline.volume_store.checks.resample`)."""
    spacing_xyz = tuple(float(v) for v in reversed(spacing_zyx))
    size = [max(1, int(round(n * s / t))) for n, s, t in zip(lps.GetSize(), lps.GetSpacing(), spacing_xyz)]
    ref = sitk.Image(size, sitk.sitkFloat32)
    ref.SetSpacing(spacing_xyz)
    ref.SetOrigin(lps.GetOrigin())
    ref.SetDirection(lps.GetDirection())
    out = []
    for ch in arr:
        img = sitk.GetImageFromArray(ch)
        img.CopyInformation(lps)
        out.append(sitk.GetArrayFromImage(sitk.Resample(img, ref, sitk.Transform(), sitk.sitkLinear,
                                                        float(ch.min()))))
    return ref, np.stack(out).astype(np.float32)


def _label_name(case: Case) -> str:
    """The label map's file name: the case and the format of its first channel (MetaImage, NRRD, else NIfTI)."""
    first = case.channels[0]
    return f"{case.case_id}{output_suffix(first.path) if first.kind == 'image' else '.nii.gz'}"


def _probabilities_name(case: Case) -> str:
    return f"{case.case_id}_probabilities.nii.gz"


def _check_outputs(cases: list[Case], out: Path, probabilities: bool, classification: bool) -> None:
    """Exit 2 before any work when an output would overwrite an input (`--out` is the inputs' folder and a name
    is the same) or another output."""
    inputs = {p.resolve(): item.label for case in cases for item in case.channels for p in source_files(item)}
    planned: dict[Path, str] = {}
    names = ["predictions.json"] + (["predictions.csv"] if classification else [])
    for case in cases:
        if not classification:
            names.append(_label_name(case))
            if names[-1].endswith(".mhd"):  # and its data file, which ITK names after it
                names += [f"{case.case_id}.zraw", f"{case.case_id}.raw"]
            if probabilities:
                names.append(_probabilities_name(case))
    for name in names:
        path = (out / name).resolve()
        if path in inputs:
            raise UsageError(f"--out {out}: the output {path} would overwrite the input {inputs[path]}; give "
                             f"another --out folder")
        if path in planned:
            raise UsageError(f"--out {out}: two outputs would be written to {path}; rename the input of case "
                             f"{stem(name)!r} or predict it apart")
        planned[path] = name


def _segment_case(model, case: Case, spec, pre: dict, device, out: Path, probabilities: bool) -> dict:
    loaded, arr, lps = _read_case(case, spec)
    grid, data = lps, arr
    resampled_to = (pre.get("spacing") or {}).get("resampled_to")
    if resampled_to:
        grid, data = _resampled(lps, arr, resampled_to)
    spacing_zyx = tuple(reversed(grid.GetSpacing()))
    prob = A.segment(model, data, spacing_zyx, spec, pre, device)
    if grid is not lps:
        img = sitk.GetImageFromArray(prob.astype(np.float32))
        img.CopyInformation(grid)
        prob = sitk.GetArrayFromImage(sitk.Resample(img, lps, sitk.Transform(), sitk.sitkLinear, 0.0))
    threshold = float(pre.get("threshold", 0.5))
    value = int((pre.get("labels") or {}).get("output_value", 1))
    mask = (prob > threshold).astype(np.uint8) * np.uint8(value)
    original = loaded[0].image
    label_path = out / _label_name(case)
    sitk.WriteImage(from_lps_array(mask, lps, original), str(label_path), useCompression=True)
    outputs = [label_path.name]
    if probabilities:
        prob_path = out / _probabilities_name(case)
        sitk.WriteImage(from_lps_array(prob.astype(np.float32), lps, original), str(prob_path), useCompression=True)
        outputs.append(prob_path.name)
    return {"outputs": outputs, "foreground_voxels": int(np.count_nonzero(mask)), "label_value": value}


def _read_candidates(path: str) -> "dict[str, list[dict]]":
    import pandas as pd

    try:
        # case ids are names ("001" stays "001"); other columns keep their own types (a label stays an int)
        table = pd.read_csv(path, dtype={"case_id": str}, keep_default_na=False,
                            na_values={"x": [""], "y": [""], "z": [""]})
    except (OSError, ValueError) as exc:
        raise UsageError(f"--candidates {path}: cannot read it as CSV ({one_line(exc)})") from None
    missing = [c for c in ("case_id", "x", "y", "z") if c not in table.columns]
    if missing:
        raise UsageError(f"--candidates {path}: missing column(s) {', '.join(missing)} (needs case_id,x,y,z in "
                         f"world mm, LPS)")
    out: dict[str, list[dict]] = {}
    for i, row in enumerate(table.to_dict("records")):
        try:
            xyz = [float(row["x"]), float(row["y"]), float(row["z"])]
        except (TypeError, ValueError):
            raise UsageError(f"--candidates {path}: row {i + 2}: x, y, z must be numbers, got "
                             f"{row['x']!r}, {row['y']!r}, {row['z']!r}") from None
        out.setdefault(row["case_id"], []).append({"row": int(i), "xyz": xyz, **{
            k: row[k] for k in table.columns if k not in ("case_id", "x", "y", "z")}})
    return out


def _classify_case(model, case: Case, spec, pre: dict, device, candidates: list[dict]) -> list[dict]:
    _, arr, lps = _read_case(case, spec)
    attrs = {"spacing": list(reversed(lps.GetSpacing())), "origin": list(reversed(lps.GetOrigin())),
             "direction": list(lps.GetDirection())}
    scores = A.classify(model, arr, attrs, np.array([c["xyz"] for c in candidates]), spec, pre, device)
    return [{"case_id": case.case_id, "x": c["xyz"][0], "y": c["xyz"][1], "z": c["xyz"][2],
             **{k: v for k, v in c.items() if k not in ("row", "xyz")}, "score": float(s), "row": c["row"]}
            for c, s in zip(candidates, scores)]




def _spacing_warnings(pre: dict, from_model: bool) -> list[str]:
    """What predictions.json and stderr say about the spacing inputs are used at, when the model cannot say it."""
    spacing = pre.get("spacing") or {}
    if spacing.get("resampled_to"):
        return []
    why = spacing.get("resampled_to_unknown") or (None if from_model else "the model carries no preprocessing.json")
    if not why:
        return []
    return [f"spacing: inputs are used at their own voxel spacing; the model cannot say which spacing its volume "
            f"store resampled scans to ({why}), so a model trained on resampled scans sees other voxel sizes"]


def _modality_problems(cases: list[Case], spec) -> list[str]:
    """The pre-pass: every input that declares a modality (store scans, DICOM series) checked against the task's,
    before any work."""
    problems = []
    for case in cases:
        for item in filter(None, case.channels):
            problem = _modality_problem(declared_modality(item), spec, item.label)
            if problem:
                problems.append(problem)
    return problems


def _usage(problems: list[str]) -> UsageError:
    return UsageError(problems[0] + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))


def predict(req: PredictRequest) -> int:
    """Apply the model `req.model` to `req.inputs`, writing into `req.out`; the exit status (see the module
    docstring)."""
    from tqdm import tqdm

    from pipeline.model_io.load import load_model
    from pipeline.runtime.paths import output_dir
    from pipeline.tasks.task_file import task_file_sha256

    from pipeline.storage.objects import is_remote

    if is_remote(req.out):
        raise UsageError(f"--out {req.out}: predictions are written as local files (label maps, predictions.json); "
                         f"give a folder on disk (inputs may be in a bucket)")
    out = Path(output_dir(req.out, "--out"))
    device = _device(req.device)
    try:
        model = load_model(req.model, tracking_uri=req.tracking_uri, device=str(device))
        card = card_of_model(model, req.model, req.tracking_uri)
    except ValueError as exc:
        raise UsageError(f"--model {req.model}: {one_line(exc) if not str(exc).startswith('load_model') else exc}"
                         ) from None
    _check_task(card, req.task)
    spec = card.task
    pre = card.preprocessing or A.default_preprocessing(spec)
    classification = spec.kind == "classification"
    if classification and not req.candidates:
        raise UsageError(f"the model's task {spec.name!r} is a classification task: give --candidates CSV "
                         f"(case_id,x,y,z in world mm, LPS)")
    if req.candidates and not classification:
        raise UsageError(f"--candidates: the model's task {spec.name!r} is a segmentation task; leave it out")
    items, unreadable = expand_inputs(list(req.inputs))
    cases, problems = group_cases(items, tuple(spec.channels))
    problems += _modality_problems(cases, spec)
    if problems:
        raise _usage(problems)
    candidates = _read_candidates(req.candidates) if classification else {}
    lost: dict[str, str] = {}  # case id -> the line of the unreadable input it names
    if classification:
        for arg, line in unreadable:
            lost.setdefault(one_channel_case(stem(arg)), line)
        unknown = sorted(set(candidates) - {c.case_id for c in cases} - set(lost))
        if unknown:
            raise UsageError(f"--candidates {req.candidates}: case(s) {', '.join(unknown[:5])} have no input "
                             f"(inputs: {', '.join(c.case_id for c in cases[:5]) or 'none'})")
    _check_outputs(cases, out, req.probabilities, classification)
    out.mkdir(parents=True, exist_ok=True)
    warnings = _spacing_warnings(pre, card.preprocessing is not None)
    for line in warnings + [line for _, line in unreadable]:
        print(line, file=sys.stderr)
    records, rows = [], []
    for case in tqdm(cases, desc="predict", unit="case", file=sys.stderr, disable=not req.progress):
        record = {"case_id": case.case_id,
                  "inputs": [{"path": item.label, "kind": item.kind} for item in case.channels]}
        if case.name != case.case_id:
            record["name"] = case.name
        try:
            for entry, item in zip(record["inputs"], case.channels):
                key, value = item_checksum(item)
                entry[key] = value
            if classification:
                got = _classify_case(model, case, spec, pre, device, candidates.get(case.case_id, []))
                rows += got
                record.update(candidates=len(got), scores_file="predictions.csv")
            else:
                record.update(_segment_case(model, case, spec, pre, device, out, req.probabilities))
            record["status"] = "ok"
        except (ValueError, RuntimeError, OSError) as exc:
            line = f"{', '.join(i.label for i in case.channels)}: cannot predict: {one_line(exc)}"
            print(line, file=sys.stderr)
            record.update(status="failed", error=one_line(exc))
            if classification:
                record["candidates"] = len(candidates.get(case.case_id, []))
        records.append(record)
    for case_id, line in lost.items():
        if case_id in candidates:
            records.append({"case_id": case_id, "inputs": [], "status": "failed", "error": line,
                            "candidates": len(candidates[case_id])})
    if classification:
        import pandas as pd

        table = pd.DataFrame(rows).sort_values("row").drop(columns="row") if rows else pd.DataFrame(
            columns=["case_id", "x", "y", "z", "score"])
        table.to_csv(out / "predictions.csv", index=False)
    summary = {
        "model": {"uri": req.model, "name": card.name, "version": card.version, "run_id": card.run_id,
                  "tracking_uri": req.tracking_uri},
        "task": {"name": spec.name, "kind": spec.kind, "task_file_sha256": task_file_sha256(spec),
                 "source": card.task_source},
        "preprocessing": pre, "preprocessing_source": "model" if card.preprocessing else "defaults of the task",
        "device": str(device), "probabilities": bool(req.probabilities),
        "candidates": None if not req.candidates else {"path": req.candidates, "sha256": files_sha256(req.candidates)},
        "cases": records,
        "unreadable": [line for _, line in unreadable],
        "warnings": warnings,
    }
    (out / "predictions.json").write_text(json.dumps(summary, indent=1, default=str) + "\n", encoding="utf-8")
    failed = bool(unreadable) or any(r["status"] != "ok" for r in records)
    return 1 if failed else 0
