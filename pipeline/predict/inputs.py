"""What `genesis predict --input` accepts, grouped into cases of channels, and read back as SimpleITK images.

An input is:
- an image file: NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr) or MetaImage (.mha, .mhd);
- a DICOM series: a folder of DICOM files, or a zip of one (read by `pipeline.ingest`, as `genesis convert` reads it);
- a folder of image files (e.g. nnU-Net's `imagesTs/`): every image file directly inside it;
- a volume store: `STORE` for all its scans, `STORE::SCAN_ID` for one (read from level 0 of the store, which is
  already in LPS; its label map is written in the store's geometry).

Channels are grouped as nnU-Net does: `<case>_<XXXX>.<ext>` is channel XXXX of case `<case>` (the task's
`channels` in that order). Store scans are grouped by their `case` identifier, their channel named by their
`channel` or `sequence` identifier (or their modality). A file without the suffix is a case of one channel.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

__all__ = ["InputItem", "Case", "Loaded", "IMAGE_SUFFIXES", "expand_inputs", "group_cases", "read_item",
           "item_checksum", "output_suffix", "stem"]

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<index>\d{4})$")


@dataclass(frozen=True)
class InputItem:
    """One readable thing: an image file, a DICOM series (folder or zip), or a scan of a volume store."""

    path: str
    kind: str  # image | dicom | store
    scan_id: str | None = None  # store scans
    name: str = ""  # the case (and channel) name it came with: file stem, series folder, scan id
    channel_hint: str | None = None  # store scans: the channel name their identifiers give

    @property
    def label(self) -> str:
        return f"{self.path}::{self.scan_id}" if self.kind == "store" else self.path


@dataclass
class Case:
    """A case: its channels in the task's order (None where one is missing), or the problem that makes it
    unusable with the task (found before any work: exit 2)."""

    case_id: str
    channels: list[InputItem | None] = field(default_factory=list)


@dataclass
class Loaded:
    """An input read: `image` in the input's own geometry and orientation, `modality` when the input says it
    (DICOM Modality, a store's modality), `suffix` of the label map written for it."""

    image: sitk.Image
    modality: str | None
    suffix: str


def stem(path: str) -> str:
    name = os.path.basename(path.rstrip("/"))
    low = name.lower()
    for suffix in IMAGE_SUFFIXES + (".zip",):
        if low.endswith(suffix):
            return name[: -len(suffix)]
    return name


def output_suffix(path: str) -> str:
    """The label map's format: the input's own for MetaImage and NRRD, else NIfTI."""
    low = path.lower()
    if low.endswith((".mha", ".mhd")):
        return ".mha" if low.endswith(".mha") else ".mhd"
    if low.endswith((".nrrd", ".nhdr")):
        return ".nrrd"
    return ".nii.gz"


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


def _is_store(path: Path) -> bool:
    return path.is_dir() and (path / "zarr.json").is_file() and (path / "scans").is_dir()


def expand_inputs(args: list[str]) -> tuple[list[InputItem], list[str]]:
    """(items, problems): every input `args` name, in the order given (a folder's files sorted); `problems` are
    inputs that name nothing readable (one line each: the run goes on without them and exits 1)."""
    from pipeline.ingest.sources import is_dicom_file

    items, problems = [], []
    for arg in args:
        if "::" in arg:
            root, scan_id = arg.split("::", 1)
            if not _is_store(Path(root)):
                problems.append(f"{arg}: {root} is not a volume store")
                continue
            items += _store_items(root, [scan_id])
            continue
        path = Path(arg)
        if not path.exists():
            problems.append(f"{arg}: no such file or folder")
        elif _is_store(path):
            items += _store_items(arg, None)
        elif path.is_dir():
            files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
            images = [p for p in files if _is_image(p.name) and not p.name.lower().endswith((".raw", ".zraw"))]
            if images:
                items += [InputItem(path=str(p), kind="image", name=stem(str(p))) for p in images]
                items += [InputItem(path=str(p), kind="dicom", name=stem(str(p))) for p in files
                          if p.name.lower().endswith(".zip")]
            elif any(is_dicom_file(p) or p.name.lower().endswith(".dcm") for p in files):
                items.append(InputItem(path=str(path), kind="dicom", name=path.name))
            elif any(p.name.lower().endswith(".zip") for p in files):
                items += [InputItem(path=str(p), kind="dicom", name=stem(str(p))) for p in files
                          if p.name.lower().endswith(".zip")]
            else:
                problems.append(f"{arg}: no image files (NIfTI, NRRD, MetaImage), DICOM series or zip in this folder")
        elif _is_image(path.name):
            items.append(InputItem(path=arg, kind="image", name=stem(arg)))
        elif path.name.lower().endswith(".zip") or is_dicom_file(path):
            items.append(InputItem(path=arg, kind="dicom", name=stem(arg)))
        else:
            problems.append(f"{arg}: not a NIfTI, NRRD, MetaImage, DICOM or zip file")
    return items, problems


def _store_items(root: str, scan_ids: list[str] | None) -> list[InputItem]:
    from pipeline.volume_store.store import VolumeStore

    store = VolumeStore(root)
    out = []
    for sid in (store.scan_ids() if scan_ids is None else scan_ids):
        try:
            attrs = store.scan_attrs(sid).get("genesis", {})
        except Exception:  # noqa: BLE001 - a missing scan is reported when it is read
            attrs = {}
        ids = attrs.get("identifiers") or (attrs.get("source") or {}).get("identifiers") or {}
        case = ids.get("case") or sid
        hint = ids.get("channel") or ids.get("sequence") or attrs.get("modality")
        out.append(InputItem(path=root, kind="store", scan_id=sid, name=case, channel_hint=hint))
    return out


def group_cases(items: list[InputItem], channels: tuple[str, ...]) -> tuple[list[Case], list[str]]:
    """Cases of the task's channels (`channels`: the spec's, () = one channel), and the usage problems:
    a case missing a channel, a one-channel input for a multi-channel task (exit 2, naming case and channel)."""
    n = max(1, len(channels))
    names = list(channels) or ["image"]
    cases: dict[str, Case] = {}
    problems = []
    for item in items:
        m = _CHANNEL.match(item.name) if item.kind != "store" else None
        if item.kind == "store" and n > 1:
            hint = (item.channel_hint or "").lower()
            index = next((i for i, c in enumerate(names) if c.lower() == hint), None)
            case_id = item.name
            if index is None:
                problems.append(f"{item.label}: scan of case {case_id!r} is channel {item.channel_hint!r}, not one "
                                f"of the task's channels {', '.join(names)}")
                continue
        elif m:
            case_id, index = m["case"], int(m["index"])
        elif n == 1:
            case_id, index = (item.scan_id if item.kind == "store" else item.name), 0
        else:
            problems.append(f"{item.label}: case {item.name!r} is one image, but the task takes {n} channels "
                            f"({', '.join(names)}): name them {item.name}_0000 ... {item.name}_{n - 1:04d}")
            continue
        if index >= n:
            problems.append(f"{item.label}: channel {index:04d} of case {case_id!r}, but the task takes {n} "
                            f"channel(s) ({', '.join(names)})")
            continue
        case = cases.setdefault(case_id, Case(case_id=case_id, channels=[None] * n))
        if case.channels[index] is not None:
            problems.append(f"{item.label}: case {case_id!r} has channel {index:04d} twice "
                            f"({case.channels[index].label})")
            continue
        case.channels[index] = item
    for case in cases.values():
        missing = [f"{i:04d} ({names[i]})" for i, c in enumerate(case.channels) if c is None]
        if missing:
            problems.append(f"case {case.case_id!r}: missing channel {', '.join(missing)} of the task's "
                            f"{', '.join(names)}")
    return list(cases.values()), problems


def read_item(item: InputItem) -> Loaded:
    """The input as a SimpleITK image in its own geometry; a ValueError (one line) when it cannot be read."""
    from pipeline.ingest.read import read_image

    if item.kind == "image":
        return Loaded(read_image(item.path), None, output_suffix(item.path))
    if item.kind == "dicom":
        return _read_dicom(item)
    return _read_store_scan(item)


def _read_dicom(item: InputItem) -> Loaded:
    """A DICOM series read as `genesis convert` reads it (LPS `Volume`), turned back to the series' own
    orientation (its source direction), so the label map lies on the series' grid."""
    from pipeline.ingest.read import read_source
    from pipeline.ingest.sources import discover

    found = discover([item.path]).scans
    usable = [s for s in found if not s.problem]
    if len(usable) != 1:
        why = found[0].problem if found and found[0].problem else f"{len(usable)} DICOM series found, expected one"
        raise ValueError(f"{item.path}: {why}")
    volume = read_source(usable[0])
    image = sitk.GetImageFromArray(volume.voxels)
    image.SetSpacing(tuple(reversed(volume.spacing)))
    image.SetOrigin(tuple(reversed(volume.origin)))
    image.SetDirection(volume.direction)
    code = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(volume.source_direction)
    return Loaded(sitk.DICOMOrient(image, code), volume.modality, ".nii.gz")


def _read_store_scan(item: InputItem) -> Loaded:
    from pipeline.volume_store.store import VolumeStore

    group = VolumeStore(item.path).open_scan(item.scan_id)
    attrs = dict(group.attrs).get("genesis", {})
    image = sitk.GetImageFromArray(np.asarray(group["0"][...]))
    image.SetSpacing(tuple(float(v) for v in reversed(attrs["spacing"])))
    image.SetOrigin(tuple(float(v) for v in reversed(attrs["origin"])))
    image.SetDirection(tuple(float(v) for v in attrs["direction"]))
    return Loaded(image, attrs.get("modality"), ".nii.gz")


def item_checksum(item: InputItem) -> str:
    """sha256 of the input's bytes: the file (with a MetaImage/NRRD detached data file), every file of a DICOM
    folder in name order, or a store scan's stored content digest."""
    h = hashlib.sha256()
    if item.kind == "store":
        from pipeline.volume_store.store import VolumeStore

        store = VolumeStore(item.path)
        record = next((r for r in store.records() if r.get("scan_id") == item.scan_id), {}) or {}
        return str(record.get("content_digest") or "")
    path = Path(item.path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path, *_data_files(path)]
    for p in files:
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _data_files(path: Path) -> list[Path]:
    """The detached data file a .mhd or .nhdr header names (in its folder)."""
    low = path.name.lower()
    if not low.endswith((".mhd", ".nhdr")):
        return []
    key = "elementdatafile" if low.endswith(".mhd") else "data file"
    try:
        for line in path.read_text(encoding="latin-1").splitlines():
            k, sep, v = line.partition("=" if low.endswith(".mhd") else ":")
            if sep and k.strip().lower() == key:
                candidate = path.parent / v.strip()
                return [candidate] if candidate.is_file() else []
    except OSError:
        return []
    return []
