"""nnU-Net v2 raw datasets and Medical Segmentation Decathlon (MSD) task folders, read as cases.

A dataset root is a folder holding `imagesTr/` and `dataset.json` (and maybe `labelsTr/`,
`imagesTs/`). The layouts store a case as several channels; each channel becomes one scan
(as BraTS sequences are), named `<case>_<XXXX>` and identified by `case`, `sequence` (the
channel's name, lower-cased) and `channel` (XXXX), so the task plans group them by case:

- nnU-Net v2: `imagesTr/<case>_<XXXX><file_ending>` per channel, `labelsTr/<case><file_ending>`,
  `dataset.json` with `channel_names` {"0": "T2"}, `labels` {"background": 0, "whole": [1, 2]}
  (name -> value, or values for a region), `numTraining`, `file_ending`;
- MSD: `imagesTr/<case>.nii.gz` is 4-D, its 4th axis the channels named by `modality`
  {"0": "T2"}; `labels` maps value -> name; the label map has the image's name. MSD archives
  ship macOS `._*` files beside each image: they are not images and are ignored;
- nnU-Net v1 task folders (`Task005_Prostate`, still on many disks): MSD's dataset.json (`modality`, value -> name
  labels) with v2's names, one 3-D `imagesTr/<case>_<XXXX>.nii.gz` per channel and `labelsTr/<case>.nii.gz`;
  recognised by those names and read as v2 is.

The label map goes to the case's channel-0 scan only. `imagesTs` cases convert as subset "test",
without labels, or with `labelsTs/<case><file_ending>` (MSD: the image's name) when the dataset ships
that folder (many do, for their held-out cases): checked as labelsTr maps are, and never a scan of its
own. Whatever dataset.json and the folders disagree on (numTraining, a missing
label or channel, a channel dataset.json does not name) is a failed row naming the file; only
names are looked at here, the voxels are checked when a scan is read (`read.read_source`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field

from pipeline.ingest.scan_source import ScanSource

__all__ = ["DatasetJson", "DatasetSources", "read_dataset_json", "dataset_sources", "is_dataset_root",
           "looks_like_dataset_root", "DATASET_JSON", "IMAGE_FOLDERS", "LABELS_FOLDER", "LABEL_FOLDERS",
           "DATASET_FOLDERS", "CANDIDATES"]

DATASET_JSON = "dataset.json"
IMAGE_FOLDERS = ("imagesTr", "imagesTs")
LABELS_FOLDER = "labelsTr"
LABEL_FOLDERS = {"imagesTr": LABELS_FOLDER, "imagesTs": "labelsTs"}
"""Each image folder's label maps; labelsTs is optional (a missing labelsTr map is a failed row)."""
DATASET_FOLDERS = IMAGE_FOLDERS + tuple(LABEL_FOLDERS.values())
"""The folders a dataset root reads as cases: never walked file by file."""
CANDIDATES = "candidates.csv"
FILE_ENDINGS = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr")
"""3-D formats genesis reads; nnU-Net's 2-D ones (.png, .tif) are not scans."""
V1_FILE_ENDING = ".nii.gz"
"""nnU-Net v1 read NIfTI only."""
_SUBSET = {"imagesTr": "train", "imagesTs": "test"}
_CHANNEL = re.compile(r"(.+)_(\d{4})")


@dataclass(frozen=True)
class DatasetJson:
    """What one dataset.json says, in one shape for both layouts."""

    path: str
    layout: str
    """"nnunet" (v2), "msd", or "nnunet-v1" (MSD's dataset.json, one file per channel as v2)."""
    channels: tuple[tuple[str, str], ...]
    """(key as written, e.g. "0", name) in channel order."""
    labels: tuple[tuple[str, int | tuple[int, ...]], ...]
    """name -> value (nnU-Net's region-based labels: a tuple of values), MSD's value -> name turned round."""
    num_training: int | None
    file_ending: str | None
    """nnU-Net's file_ending (v1: always .nii.gz); None for MSD (its images are NIfTI, named as listed)."""

    def modality(self, name: str) -> str:
        """"CT" (in any case) is CT; every other channel name is kept as written (T2, ADC, MRI, ...)."""
        return "CT" if name.strip().upper() == "CT" else name.strip()

    def sequences(self) -> dict[str, str]:
        """Channel key -> sequence identifier: the name lower-cased, made unique with the channel index."""
        names = [n.strip().lower() for _, n in self.channels]
        return {k: n if names.count(n) == 1 else f"{n}_{int(k):04d}" for (k, _), n in zip(self.channels, names)}


@dataclass
class DatasetSources:
    scans: list[ScanSource] = field(default_factory=list)
    case_scans: dict[str, str] = field(default_factory=dict)
    """Case -> the name of its channel-0 scan (what a candidates table's case_id joins to)."""
    candidates: str | None = None
    """The root's candidates.csv, if it has one."""


def looks_like_dataset_root(folder: str) -> bool:
    """imagesTr/ beside dataset.json or labelsTr/: an nnU-Net or MSD dataset (with or without its dataset.json)."""
    return os.path.isdir(os.path.join(folder, "imagesTr")) and (
        os.path.isfile(os.path.join(folder, DATASET_JSON)) or os.path.isdir(os.path.join(folder, LABELS_FOLDER)))


def is_dataset_root(folder: str) -> bool:
    return os.path.isdir(os.path.join(folder, "imagesTr")) and os.path.isfile(os.path.join(folder, DATASET_JSON))


def _channel_keys(value, where: str, key: str) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, dict) or not value:
        raise ValueError(f"{where}: {key} must be an object such as {{\"0\": \"T2\"}}, got {value!r}")
    out = []
    for k, name in value.items():
        if not (isinstance(k, str) and k.isdigit()):
            raise ValueError(f"{where}: {key} key {k!r} is not a channel index (0, 1, ...)")
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"{where}: {key} {k!r} has no name (got {name!r})")
        out.append((k, name))
    out.sort(key=lambda kv: int(kv[0]))
    indices = [int(k) for k, _ in out]
    if indices != list(range(len(out))):
        raise ValueError(f"{where}: {key} indices are {indices}, expected 0..{len(out) - 1}")
    return tuple(out)


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _nnunet_labels(value, where: str) -> tuple[tuple[str, int | tuple[int, ...]], ...]:
    if not isinstance(value, dict) or not value:
        raise ValueError(f"{where}: labels must be an object name -> value, got {value!r}")
    out: list[tuple[str, int | tuple[int, ...]]] = []
    for name, v in value.items():
        if _int(v) and v >= 0:
            out.append((name, v))
        elif isinstance(v, list) and v and all(_int(x) and x >= 0 for x in v):
            out.append((name, tuple(v)))  # a region (nnU-Net's region-based training), kept as written
        else:
            raise ValueError(f"{where}: label {name!r} has value {v!r}; expected an integer >= 0 or a list of them")
    return tuple(out)


def _msd_labels(value, where: str) -> tuple[tuple[str, int], ...]:
    if not isinstance(value, dict) or not value:
        raise ValueError(f"{where}: labels must be an object value -> name such as {{\"0\": \"background\"}}, "
                         f"got {value!r}")
    out = []
    for k, name in value.items():
        if not (isinstance(k, str) and k.isdigit()) or not isinstance(name, str):
            raise ValueError(f"{where}: labels entry {k!r}: {name!r} is not value -> name (MSD)")
        out.append((name, int(k)))
    return tuple(sorted(out, key=lambda nv: nv[1]))


def read_dataset_json(path: str, where: str = DATASET_JSON) -> DatasetJson:
    """Parse an nnU-Net v2 or MSD dataset.json; ValueError with one line naming `where` and the problem."""
    try:
        with open(path, encoding="utf-8-sig") as fh:
            body = json.load(fh)
    except OSError as exc:
        raise ValueError(f"{where}: cannot read it: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{where}: not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where}: not JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(body, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(body).__name__}")
    if "channel_names" in body:
        layout, channels = "nnunet", _channel_keys(body["channel_names"], where, "channel_names")
    elif "modality" in body:
        layout, channels = "msd", _channel_keys(body["modality"], where, "modality")
    else:
        raise ValueError(f"{where}: has neither channel_names (nnU-Net v2) nor modality (MSD)")
    if "labels" not in body:
        raise ValueError(f"{where}: has no labels")
    labels = _nnunet_labels(body["labels"], where) if layout == "nnunet" else _msd_labels(body["labels"], where)
    num = body.get("numTraining")
    if num is not None and not (_int(num) and num >= 0):
        raise ValueError(f"{where}: numTraining is {num!r}, expected a count")
    ending = None
    if layout == "nnunet":
        ending = body.get("file_ending")
        if ending is None:
            raise ValueError(f"{where}: has no file_ending (nnU-Net v2 names its files <case>_<XXXX><file_ending>)")
        if ending not in FILE_ENDINGS:
            raise ValueError(f"{where}: file_ending {ending!r} is not a 3-D format genesis reads "
                             f"({', '.join(FILE_ENDINGS)})")
    return DatasetJson(path=path, layout=layout, channels=channels, labels=labels, num_training=num,
                       file_ending=ending)


def _failed(scan_id: str, dataset: str, path: str, problem: str) -> ScanSource:
    return ScanSource(scan_id=scan_id, kind="unknown", dataset=dataset, files=(), source_path=path, problem=problem)


def _listing(folder: str) -> list[str]:
    """Entries of `folder` that may be images: not hidden, not macOS `._` resource forks."""
    try:
        return sorted(n for n in os.listdir(folder) if not n.startswith("."))
    except OSError:
        return []


def _image_name(name: str) -> bool:
    return name.lower().endswith(FILE_ENDINGS)


def _msd_stem(name: str) -> str | None:
    for ending in sorted(FILE_ENDINGS, key=len, reverse=True):
        if name.lower().endswith(ending):
            return name[: -len(ending)]
    return None


def dataset_sources(root: str, parts: tuple[str, ...] = IMAGE_FOLDERS, cases: set[str] | None = None) -> DatasetSources:
    """The scans of the dataset at `root`: one per channel of each case of `parts` (imagesTr, imagesTs), or
    only of `cases`; plus a failed row for each disagreement between dataset.json and the folders."""
    dataset = os.path.basename(os.path.normpath(root)) or root
    json_path = os.path.join(root, DATASET_JSON)
    out = DatasetSources()
    if os.path.isfile(os.path.join(root, CANDIDATES)):
        out.candidates = os.path.join(root, CANDIDATES)
    if not os.path.exists(json_path):
        out.scans.append(_failed(dataset, dataset, json_path,
                                 f"{DATASET_JSON} is missing: {dataset} has imagesTr and labelsTr (an nnU-Net or "
                                 f"MSD dataset) but no {DATASET_JSON} naming its channels and labels; add it"))
        return out
    try:
        meta = read_dataset_json(json_path)
    except ValueError as exc:
        out.scans.append(_failed(dataset, dataset, json_path, str(exc)))
        return out
    if meta.layout == "msd" and _v1_names(root):
        meta = dataclasses.replace(meta, layout="nnunet-v1", file_ending=V1_FILE_ENDING)
    dataset_problems: list[str] = []
    for part in parts:
        folder = os.path.join(root, part)
        if not os.path.isdir(folder):
            continue
        found = _nnunet_cases(root, part, meta, dataset, out) if meta.layout != "msd" else \
            _msd_cases(root, part, meta, dataset, out)
        if cases is not None:
            found = {c: v for c, v in found.items() if c in cases}
        # labelsTr is required; labelsTs labels the test cases only where the dataset ships it
        labelled = part == "imagesTr" or os.path.isdir(os.path.join(root, LABEL_FOLDERS[part]))
        for case, files in sorted(found.items()):
            out.scans.extend(_case_scans(root, part, meta, dataset, case, files, labelled, out))
        if part == "imagesTr" and cases is None and meta.num_training is not None \
                and meta.num_training != len(found):
            dataset_problems.append(f"numTraining is {meta.num_training} but imagesTr holds {len(found)} "
                                    f"case{'s' if len(found) != 1 else ''}")
        if labelled and cases is None:
            out.scans.extend(_orphan_labels(root, part, meta, dataset, set(found)))
    if dataset_problems:
        out.scans.append(_failed(dataset, dataset, json_path, f"{DATASET_JSON}: " + "; ".join(dataset_problems)))
    return out


def _v1_names(root: str) -> bool:
    """An MSD-style dataset.json over nnU-Net v1 files: every imagesTr image is named `<case>_<XXXX>.nii.gz` and
    none has a label map of its own name (an MSD image does: labelsTr/<image name>)."""
    names = [n for n in _listing(os.path.join(root, "imagesTr")) if _image_name(n)]
    return bool(names) and all(
        n.endswith(V1_FILE_ENDING) and _CHANNEL.fullmatch(n[: -len(V1_FILE_ENDING)])
        and not os.path.lexists(os.path.join(root, LABELS_FOLDER, n)) for n in names)


def _key(meta: DatasetJson, index: int) -> str | None:
    return next((k for k, _ in meta.channels if int(k) == index), None)


def _nnunet_cases(root: str, part: str, meta: DatasetJson, dataset: str,
                  out: DatasetSources) -> dict[str, dict[int, str]]:
    """case -> {channel index: path}; misnamed files and channels dataset.json does not name become failed rows."""
    ending = meta.file_ending or ""
    cases: dict[str, dict[int, str]] = {}
    for name in _listing(os.path.join(root, part)):
        path = os.path.join(root, part, name)
        if not name.endswith(ending):
            if _image_name(name):
                out.scans.append(_failed(_msd_stem(name) or name, dataset, path,
                                         f"{part}/{name} does not end in dataset.json's file_ending {ending}"))
            continue  # a sidecar (a MetaImage's .raw, notes): read through its image or not at all
        m = _CHANNEL.fullmatch(name[: -len(ending)])
        if not m:
            out.scans.append(_failed(name[: -len(ending)], dataset, path,
                                     f"{part}/{name} is not named <case>_<XXXX>{ending} (nnU-Net's channel suffix)"))
            continue
        index = int(m.group(2))
        if _key(meta, index) is None:
            out.scans.append(_failed(name[: -len(ending)], dataset, path,
                                     f"{part}/{name}: channel {m.group(2)} is not in dataset.json's channel_names "
                                     f"({', '.join(k for k, _ in meta.channels)})"))
            continue
        cases.setdefault(m.group(1), {})[index] = path
    return cases


def _msd_cases(root: str, part: str, meta: DatasetJson, dataset: str,
               out: DatasetSources) -> dict[str, dict[int, str]]:
    """case -> {channel index: the one 4-D file} for every channel dataset.json names."""
    cases: dict[str, dict[int, str]] = {}
    for name in _listing(os.path.join(root, part)):
        stem = _msd_stem(name)
        if stem is None:
            continue
        path = os.path.join(root, part, name)
        cases[stem] = {int(k): path for k, _ in meta.channels}
    return cases


def _case_scans(root: str, part: str, meta: DatasetJson, dataset: str, case: str, files: dict[int, str],
                labelled: bool, out: DatasetSources) -> list[ScanSource]:
    scans: list[ScanSource] = []
    sequences = meta.sequences()
    present = sorted(files)
    first = present[0]
    out.case_scans.setdefault(case, f"{case}_{first:04d}")
    labels: tuple[tuple[str, str], ...] = ()
    if labelled:
        if meta.layout != "msd":
            label_name = case + (meta.file_ending or "")
        else:
            label_name = os.path.basename(files[first])
        folder = LABEL_FOLDERS[part]
        label_path = os.path.join(root, folder, label_name)
        if os.path.lexists(label_path):
            labels = (("label", label_path),)
        else:
            scans.append(_failed(case, dataset, label_path, f"{folder}/{label_name} is missing: {part} case "
                                                            f"{case} has no label map"))
    for key, name in meta.channels:
        index = int(key)
        xxxx = f"{index:04d}"
        scan_id = f"{case}_{xxxx}"
        if index not in files:
            expected = f"{scan_id}{meta.file_ending}"
            scans.append(_failed(scan_id, dataset, os.path.join(root, part, expected),
                                 f"{part}/{expected} is missing: case {case} has no channel {xxxx} ({name}) "
                                 f"that dataset.json names"))
            continue
        path = files[index]
        scans.append(ScanSource(
            scan_id=scan_id, kind="image", dataset=dataset, files=(path,), source_path=path,
            subset=_SUBSET[part], modality=meta.modality(name),
            labels=labels if index == first else (),
            identifiers=(("case", case), ("sequence", sequences[key]), ("channel", xxxx)),
            channel=index if meta.layout == "msd" else None,
            n_channels=len(meta.channels) if meta.layout == "msd" else None,
            channel_names=meta.channels, label_names=meta.labels))
    return scans


def _orphan_labels(root: str, part: str, meta: DatasetJson, dataset: str, cases: set[str]) -> list[ScanSource]:
    """Label maps (labelsTr, labelsTs) that belong to no case of their image folder (`part`): never scans,
    but worth a row (a case lost its images)."""
    folder = LABEL_FOLDERS[part]
    out = []
    for name in _listing(os.path.join(root, folder)):
        if meta.layout != "msd":
            if not name.endswith(meta.file_ending or ""):
                continue
            case = name[: -len(meta.file_ending or "")]
            expected = f"{part}/{case}_0000{meta.file_ending}"
        else:
            case = _msd_stem(name)
            if case is None:
                continue
            expected = f"{part}/{name}"
        if case not in cases:
            out.append(_failed(case, dataset, os.path.join(root, folder, name),
                               f"{folder}/{name} has no image: {expected} is missing"))
    return out
