"""`genesis tasks init DATASET_DIR --out FILE.yaml`: a task file drafted from an nnU-Net v2 (or MSD) dataset.

What a lab has on disk is nnU-Net's raw layout: `dataset.json` (channel names, labels, file ending, numTraining),
`imagesTr/<case>_<XXXX><ending>`, `labelsTr/<case><ending>`; an MSD dataset has `modality` instead of
`channel_names`, labels as "value" -> name and one 4D file per case. `dataset.json` says which channels there are,
what modality each is and what the labels mean; everything else a task needs (cube size, batch size, patience,
learning rate) is taken from the closest built-in task, and every value a person should check carries a comment
saying so. With `--candidates FILE.csv` (case_id, world x/y/z in mm, label 0/1) the draft is a classification
task over those candidates instead (as NCC), the CSV checked row by row.

The draft is read back (`task_file.task_from_text`) and validated against `storage_schemas/task_spec.schema.json`
before it is written, so what `init` writes is a task file every command accepts.
"""

from __future__ import annotations

import csv
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import storage_schemas
from pipeline.ingest.sources import CASE_CANDIDATE_COLUMNS
from pipeline.tasks.registry import builtin_names, get_task
from pipeline.tasks.spec import Intensity, Sampling, SplitRule, TaskSpec
from pipeline.tasks.task_file import task_from_text, task_to_dict, task_to_yaml

__all__ = ["DatasetJson", "DatasetJsonError", "read_dataset_json", "task_name_of", "draft_task", "init_task",
           "check_candidates", "InitResult", "CANDIDATE_COLUMNS"]

CANDIDATE_COLUMNS = CASE_CANDIDATE_COLUMNS
"""The columns `genesis convert` reads a user's candidates CSV by (one definition, in ingest)."""
CT_WINDOW = (-1000.0, 1000.0)
MR_PERCENTILES = (0.5, 99.5)
SPLIT_FRACTIONS = (0.6, 0.1, 0.3)
LABEL_MAP = "label"
"""The label map's name in the volume store (`genesis convert` of an nnU-Net dataset attaches labelsTr/<case> as
`label` to the case's first channel)."""
CANDIDATES_TABLE = "candidates"


class DatasetJsonError(ValueError):
    """dataset.json missing, unreadable or lacking what a task needs; the message names the file."""


@dataclass(frozen=True)
class DatasetJson:
    """A typed view of dataset.json (nnU-Net v2 or MSD)."""

    path: Path
    form: str
    """nnunet_v2 (channel_names) | msd (modality)."""
    channels: tuple[str, ...]
    """Channel names in channel order (index 0, 1, ...), as dataset.json writes them ("CT", "T2", "ADC")."""
    labels: dict[str, int | tuple[int, ...]]
    """name -> value, or values for a region-based label (nnU-Net v2), as dataset.json writes them."""
    file_ending: str
    num_training: int | None
    name: str
    sequences: tuple[str, ...] = ()
    """Each channel's sequence identifier as `genesis convert` stores it (the name lower-cased; made unique with the
    channel index when two channels share a name): what a task's `channels` name."""

    @property
    def folder(self) -> Path:
        return self.path.parent

    @property
    def is_ct(self) -> bool:
        return all(c.strip().upper() == "CT" for c in self.channels)

    def case_ids(self) -> set[str]:
        """The cases of imagesTr and imagesTs (`<case>_<XXXX><ending>`; MSD: `<case><ending>`; an nnU-Net v1 folder
        has an MSD dataset.json with v2's file names, so a `_XXXX` suffix also names its case there)."""
        out = set()
        for part in ("imagesTr", "imagesTs"):
            folder = self.folder / part
            if not folder.is_dir():
                continue
            for f in folder.iterdir():
                if f.name.startswith(".") or not f.name.endswith(self.file_ending):
                    continue
                stem = f.name[: -len(self.file_ending)]
                m = re.fullmatch(r"(.+)_(\d{4})", stem)
                if self.form != "nnunet_v2" or not m:
                    out.add(stem)
                if m:
                    out.add(m.group(1))
        return out


def read_dataset_json(folder: str | Path) -> DatasetJson:
    """dataset.json of an nnU-Net v2 or MSD dataset folder, parsed by the reader `genesis convert` uses (one parser,
    so a task names channels and labels exactly as the store has them); DatasetJsonError naming the file when it
    is missing, not JSON, or lacks channel_names (MSD: modality) or labels."""
    from pipeline.ingest.nnunet import read_dataset_json as read_meta

    path = Path(folder) / "dataset.json"
    if not Path(folder).is_dir():
        raise DatasetJsonError(f"{folder}: no such dataset folder")
    if not path.is_file():
        raise DatasetJsonError(f"{path}: missing (an nnU-Net or MSD dataset folder has a dataset.json)")
    try:
        meta = read_meta(str(path), where=str(path))
        name = json.loads(path.read_text(encoding="utf-8-sig")).get("name")
    except ValueError as exc:
        raise DatasetJsonError(str(exc)) from None
    return DatasetJson(path=path, form="nnunet_v2" if meta.layout == "nnunet" else "msd",
                       channels=tuple(n.strip() for _, n in meta.channels), labels=dict(meta.labels),
                       file_ending=meta.file_ending or ".nii.gz", num_training=meta.num_training,
                       name=str(name or Path(folder).resolve().name), sequences=tuple(meta.sequences().values()))


def task_name_of(folder: str | Path) -> str:
    """The task name a dataset folder suggests: Dataset501_Phantom -> phantom, Task01_BrainTumour -> braintumour;
    a lower-case identifier, never a built-in task's name."""
    base = Path(folder).resolve().name
    base = re.sub(r"^(Dataset\d+|Task\d+)_", "", base, flags=re.IGNORECASE)
    name = re.sub(r"[^0-9a-z_]+", "_", base.lower()).strip("_") or "task"
    if not name[0].isalpha():
        name = f"t_{name}"
    return f"{name}_own" if name in builtin_names() else name


def _check_name(name: str) -> str:
    if not (name.isidentifier() and name == name.lower()):
        raise ValueError(f"--name {name!r}: a task name is a lower-case identifier (it names stores and models)")
    if name in builtin_names():
        raise ValueError(f"--name {name!r} is a built-in task's name; give your task its own name")
    return name


def _target(ds: DatasetJson, label: str | None) -> tuple[tuple[int, ...] | None, str]:
    """(sampling.target_values, what the target is): one label's value(s), or None for every value > 0."""
    listed = ", ".join(f"{k}={list(v) if isinstance(v, tuple) else v}" for k, v in ds.labels.items())
    if label is None or label == "all":
        if "ignore" in ds.labels:  # nnU-Net v2's "ignore" label marks unannotated voxels: never a target
            ignored = ds.labels["ignore"]
            ignored = set(ignored) if isinstance(ignored, tuple) else {ignored}
            values = sorted({v for name, value in ds.labels.items() if name != "ignore"
                             for v in (value if isinstance(value, tuple) else (value,)) if v > 0} - ignored)
            return tuple(values), f"every label > 0 but 'ignore' (dataset.json labels: {listed})"
        return None, f"every label > 0 (dataset.json labels: {listed})"
    if label not in ds.labels:
        raise DatasetJsonError(f"{ds.path}: --label {label!r} is not one of its labels ({listed})")
    value = ds.labels[label]
    values = tuple(value) if isinstance(value, tuple) else (value,)
    if values == (0,):
        raise ValueError(f"--label {label!r} is the background (value 0); name a foreground label or 'all'")
    return values, f"label {label!r} = {list(values) if len(values) > 1 else values[0]} (dataset.json labels: {listed})"


def check_candidates(path: str | Path, case_ids: set[str]) -> dict[str, int]:
    """Check a candidates CSV (case_id, x, y, z in world mm, label 0/1): its header, numbers, labels, that each
    case is in imagesTr or imagesTs and that there is a positive. Errors name the file and the row; returns the counts."""
    p = Path(path)
    try:
        handle = p.open(newline="", encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{p}: no such candidates file") from None
    with handle:
        reader = csv.reader(handle)
        header = [h.strip() for h in next(reader, [])]
        if sorted(header) != sorted(CANDIDATE_COLUMNS) or len(header) != len(CANDIDATE_COLUMNS):
            raise ValueError(f"{p}: header {header} must be the columns {','.join(CANDIDATE_COLUMNS)}")
        col = {h: i for i, h in enumerate(header)}
        counts = {"rows": 0, "positives": 0, "negatives": 0}
        for line, row in enumerate(reader, start=2):
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                raise ValueError(f"{p}: line {line}: {len(row)} values, the header has {len(header)}")
            case = row[col["case_id"]].strip()
            for axis in ("x", "y", "z"):
                try:
                    v = float(row[col[axis]])
                except ValueError:
                    v = math.nan
                if not math.isfinite(v):
                    raise ValueError(f"{p}: line {line}: {axis} = {row[col[axis]]!r} is not a finite number (mm)")
            label = row[col["label"]].strip()
            if label not in ("0", "1"):
                raise ValueError(f"{p}: line {line}: label = {label!r} must be 0 or 1")
            if case not in case_ids:
                raise ValueError(f"{p}: line {line}: case_id {case!r} is not a case of imagesTr or imagesTs "
                                 f"({len(case_ids)} cases)")
            counts["rows"] += 1
            counts["positives" if label == "1" else "negatives"] += 1
    if not counts["positives"]:
        raise ValueError(f"{p}: no candidate has label 1 ({counts['rows']} rows); a classification task needs "
                         "positives")
    return counts


def draft_task(folder: str | Path, *, name: str | None = None, label: str | None = None,
               candidates: str | Path | None = None) -> tuple[TaskSpec, dict[str, str], str]:
    """(TaskSpec, comments per key, header) drafted from the dataset folder's dataset.json."""
    ds = read_dataset_json(folder)
    folder = Path(folder)
    name = _check_name(name) if name else task_name_of(folder)
    dataset = folder.resolve().name
    ct = ds.is_ct
    channels = ds.sequences
    channel_list = ", ".join(f"{i:04d}={c}" for i, c in enumerate(ds.channels))
    classification = candidates is not None
    closest = get_task("ncc" if classification else ("lcs" if ct else "bms"))
    kind_text = f"{'CT' if ct else 'MR'} {'classification' if classification else 'segmentation'}"
    target_values, target_text = _target(ds, label)
    comments = {
        "name": "names the task's stores (task-<name>-<key>) and its models (genesis-<name>); check",
        "dataset": "the catalog's dataset of the converted scans: the dataset folder's name, as `genesis convert` "
                   "records it",
        "channels": f"dataset.json channels {channel_list}, lower-cased as `genesis convert` stores them "
                    "(identifier sequence); one input channel each",
        "labels": "dataset.json labels: name -> value (a region-based label: its values)",
        "optimisation": f"cube size, batch size, patience and lr from the closest built-in task, "
                        f"{closest.name.upper()} ({kind_text}); check",
    }
    if ct:
        intensity = Intensity(kind="window", low=CT_WINDOW[0], high=CT_WINDOW[1])
        comments["intensity"] = "every channel is CT: the HU window [-1000, 1000] of the built-in CT tasks"
        modality = "CT"
    else:
        intensity = Intensity(kind="percentile", low=MR_PERCENTILES[0], high=MR_PERCENTILES[1])
        comments["intensity"] = (f"channels {', '.join(ds.channels)} are not CT: per-volume percentiles 0.5-99.5 of "
                                 "the foreground (as BMS); check (a fixed window fits only data with absolute units)")
        modality = "MR"
        comments["modality"] = f"channels {', '.join(ds.channels)}: assumed MR; check"
    comments["cube_size"] = f"(z, y, x) voxels, from {closest.name.upper()}; check against your volumes' sizes"
    splits = ds.folder / "splits_final.json"
    split_comment = "a seeded draw by patient, 60% train / 10% validation / 30% test; check"
    if splits.is_file():
        split_comment += (f". {splits.name} lies beside dataset.json: `genesis patches task FILE.yaml --splits "
                          f"{splits}` uses nnU-Net's folds instead")
    comments["split"] = split_comment
    layout = (f"nnU-Net v2 raw dataset {dataset}: imagesTr/<case>_<XXXX>{ds.file_ending}, labelsTr/<case>"
              f"{ds.file_ending}, dataset.json" if ds.form == "nnunet_v2" else
              f"MSD dataset {dataset}: imagesTr/<case>{ds.file_ending} (4D, channels last), labelsTr/<case>"
              f"{ds.file_ending}, dataset.json")
    base = dict(name=name, dataset=dataset, modality=modality, intensity=intensity, cube_size=closest.cube_size,
                split=SplitRule(kind="patient_seeded", fractions=SPLIT_FRACTIONS),
                optimisation=closest.optimisation, labels=dict(ds.labels))
    n = f"{ds.num_training} training cases" if ds.num_training is not None else "training cases"
    if classification:
        counts = check_candidates(candidates, ds.case_ids())
        spec = TaskSpec(
            **base, title=f"{ds.name}: candidate classification", kind="classification",
            data_layout=layout + f" + candidates CSV {Path(candidates).name} (case_id, x, y, z mm, label)",
            sampling=Sampling(kind="candidates", table=CANDIDATES_TABLE,
                              negatives_per_positive=closest.sampling.negatives_per_positive),
            channels=(), head="encoder-gap-dense", loss="bce",
            metrics=closest.metrics, evaluation="cubes",
            notes=f"Drafted by `genesis tasks init` from {ds.path} ({n}) and {Path(candidates).resolve()} "
                  f"({counts['positives']} positive and {counts['negatives']} negative candidates).")
        comments["channels"] = (f"dataset.json channels {channel_list}: a classification task reads one scan per "
                                "case, the one its candidates name (one input channel)")
        comments["sampling"] = (f"one cube per candidate of the store's `{CANDIDATES_TABLE}` table: pass "
                                f"--candidates {Path(candidates).resolve()} to `genesis convert` together with the "
                                f"dataset; negatives kept per positive (train/validation) as "
                                f"{closest.name.upper()}; check")
    else:
        spec = TaskSpec(
            **base, title=f"{ds.name}: segmentation of {'every label > 0' if target_values is None else label}",
            kind="segmentation", data_layout=layout,
            sampling=Sampling(kind="pos_neg", label=LABEL_MAP, target_values=target_values,
                              per_scan=closest.sampling.per_scan, pos=1.0, neg=1.0, whole_volume_test=True),
            channels=channels, head="unet", loss="dice", metrics=closest.metrics, evaluation="whole_volume",
            notes=f"Drafted by `genesis tasks init` from {ds.path} ({n}).")
        comments["sampling"] = (f"cubes centred on foreground and background 1:1 in the label map `{LABEL_MAP}`; "
                                f"the target: {target_text}; check")
        comments["evaluation"] = "test scans are evaluated whole (sliding window), as LCS and BMS"
    header = (f"Task file drafted by `genesis tasks init` from {ds.path}.\n"
              "Lines marked 'check' are guesses a person should confirm before a store is built.\n"
              "Schema: storage_schemas/task_spec.schema.json; build its store with `genesis patches task FILE.yaml`.")
    return spec, comments, header


@dataclass(frozen=True)
class InitResult:
    path: Path
    spec: TaskSpec

    def report(self) -> str:
        s = self.spec
        return (f"wrote {self.path}: task {s.name} ({s.kind}, channels {','.join(s.channels) or '1'}, cube "
                f"{'x'.join(map(str, s.cube_size))}, {s.intensity.kind} intensity)\n"
                f"  check the values marked 'check', then: genesis patches task {self.path} --store VOLUMES")


def init_task(folder: str | Path, out: str | Path, *, name: str | None = None, label: str | None = None,
              candidates: str | Path | None = None, force: bool = False) -> InitResult:
    """Draft the task file of a dataset folder into `out` (refused when it exists, unless `force`). The text is
    read back and validated against the schema before it is written."""
    out = Path(out)
    if out.suffix.lower() not in (".yaml", ".yml"):
        raise ValueError(f"--out {out}: a task file ends in .yaml or .yml")
    if out.exists() and not force:
        raise FileExistsError(f"--out {out}: exists; pass --force to overwrite it")
    spec, comments, header = draft_task(folder, name=name, label=label, candidates=candidates)
    text = task_to_yaml(spec, comments=comments, header=header)
    if task_from_text(text, str(out)) != spec:
        raise RuntimeError(f"{out}: the drafted task file does not read back equal (a bug)")
    storage_schemas.validate_attrs("task_spec", task_to_dict(spec), str(out))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(out)
    return InitResult(path=out, spec=spec)
