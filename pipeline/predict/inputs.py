"""What `genesis predict --input` accepts, grouped into cases of channels, and read back as SimpleITK images.

An input is:
- an image file: NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr) or MetaImage (.mha, .mhd);
- a DICOM series: a folder of DICOM files, or a zip of one (read by `pipeline.ingest`, as `genesis convert` reads it);
- a folder of image files (e.g. nnU-Net's `imagesTs/`): every image file directly inside it;
- a volume store: `STORE` for all its scans, `STORE::SCAN_ID` for one (read from level 0 of the store, which is
  already in LPS; its label map is written in the store's geometry). STORE is a folder or `s3://BUCKET/PREFIX`:
  a bucket store's scans are inputs exactly as a local store's (read through `VolumeStore`, every checksum
  checked); the bucket is checked first (`Tree.check`: credentials, endpoint, bucket; exit 2 in seconds), and
  the URL is kept as given (never resolved as a path). Outputs are local files either way.

Channels are grouped as nnU-Net does: for a task of several channels, `<case>_<XXXX>.<ext>` is channel XXXX of
case `<case>` (the task's `channels` in that order; channels of one case lie in one folder), and a 4-D file (MSD) is
a case whose 4th axis holds the channels. For a one-channel task every file is a case of its own: only `_0000` is
taken as a channel suffix (`patient_0042.nii.gz` is case `patient_0042`). Store scans are grouped by their `case`
identifier, their channel found by their `sequence` identifier (the task's channel names are those `genesis convert`
stores), else by the digits of their `channel` identifier (nnU-Net's XXXX), else by their modality. Two cases of
the same name (from two folders) get distinct names: the second `<case>-2`, and so on.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from pipeline.runtime.paths import files_sha256
from pipeline.storage.objects import is_remote

__all__ = ["InputItem", "Case", "Loaded", "IMAGE_SUFFIXES", "expand_inputs", "group_cases", "read_item",
           "read_items", "item_checksum", "output_suffix", "stem", "one_channel_case", "declared_modality",
           "source_files"]

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<index>\d{4})$")


@dataclass(frozen=True)
class InputItem:
    """One readable thing: an image file, a DICOM series (folder or zip), or a scan of a volume store."""

    path: str
    kind: str  # image | dicom | store
    scan_id: str | None = None  # store scans
    name: str = ""  # the case (and channel) name it came with: file stem, series folder, scan id
    channel_hint: str | None = None  # store scans: the channel name their identifiers give (sequence, modality)
    channel_index: int | None = None  # store scans: nnU-Net's channel number (identifier `channel`, "0001" -> 1)
    modality: str | None = None  # store scans: the modality the store records
    component: int | None = None  # a 4-D file: the channel on its 4th axis this item stands for

    @property
    def label(self) -> str:
        where = f"{self.path}::{self.scan_id}" if self.kind == "store" else self.path
        return where if self.component is None else f"{where} (channel {self.component} of its 4th axis)"

    @property
    def source(self) -> tuple[str, str | None]:
        """What is read for it: two items of one 4-D file share their source."""
        return where_of(self.path), self.scan_id


@dataclass
class Case:
    """A case: its channels in the task's order (None where one is missing), or the problem that makes it
    unusable with the task (found before any work: exit 2)."""

    case_id: str
    channels: list[InputItem | None] = field(default_factory=list)
    name: str = ""  # the name its inputs give it (case_id differs when two cases share it)


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


def one_channel_case(name: str) -> str:
    """The case a file stem names for a one-channel task: nnU-Net's `_0000` taken off, any other `_dddd` kept
    (`patient_0042`, `CT_2019` are cases, not channels)."""
    m = _CHANNEL.match(name)
    return m["case"] if m and m["index"] == "0000" else name


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


def where_of(path: str) -> str:
    """The place an input names, as a key: a local path resolved (two spellings of one file are one input), a
    bucket URL as given less a trailing slash (`realpath` would turn `s3://b/vs` into a local `.../s3:/b/vs`)."""
    return path.rstrip("/") if is_remote(path) else os.path.realpath(path)


def _is_store(root: str) -> bool:
    """Whether `root` (a folder or a bucket URL) is a volume store. A bucket is checked first: a wrong URL,
    credentials, endpoint or a missing bucket is a StorageError (one line, exit 2) before any work."""
    if is_remote(root):
        from pipeline.storage.objects import open_tree
        from pipeline.volume_store.store import StoreError, VolumeStore

        tree = open_tree(root)
        tree.check()
        try:
            VolumeStore(tree)  # reads and validates the root's attributes: kind volume-store
        except StoreError:
            return False
        return True
    path = Path(root)
    return path.is_dir() and (path / "zarr.json").is_file() and (path / "scans").is_dir()


def expand_inputs(args: list[str]) -> tuple[list[InputItem], list[tuple[str, str]]]:
    """(items, problems): every input `args` name, in the order given (a folder's files sorted); `problems` are
    (argument, one line) for inputs that name nothing readable: the run goes on without them and exits 1."""
    from pipeline.ingest.sources import is_dicom_file

    items, problems = [], []
    for arg in args:
        if "::" in arg:
            root, scan_id = arg.split("::", 1)
            root = root.rstrip("/") if is_remote(root) else root
            if not _is_store(root):
                problems.append((arg, f"{arg}: {root} is not a volume store"))
                continue
            items += _store_items(root, [scan_id])
            continue
        if is_remote(arg):  # only a volume store can be in a bucket
            if _is_store(arg):
                items += _store_items(arg.rstrip("/"), None)
            else:
                problems.append((arg, f"{arg}: not a volume store (in a bucket only a volume store can be read: "
                                      f"STORE or STORE::SCAN_ID)"))
            continue
        path = Path(arg)
        if not path.exists():
            problems.append((arg, f"{arg}: no such file or folder"))
        elif _is_store(arg):
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
                problems.append((arg, f"{arg}: no image files (NIfTI, NRRD, MetaImage), DICOM series or zip in "
                                      f"this folder"))
        elif _is_image(path.name):
            items.append(InputItem(path=arg, kind="image", name=stem(arg)))
        elif path.name.lower().endswith(".zip") or is_dicom_file(path):
            items.append(InputItem(path=arg, kind="dicom", name=stem(arg)))
        else:
            problems.append((arg, f"{arg}: not a NIfTI, NRRD, MetaImage, DICOM or zip file"))
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
        digits = str(ids.get("channel") or "")
        out.append(InputItem(path=root, kind="store", scan_id=sid, name=case,
                             channel_hint=ids.get("sequence") or attrs.get("modality"),
                             channel_index=int(digits) if digits.isdigit() else None,
                             modality=attrs.get("modality")))
    return out


def _axis4_channels(item: InputItem) -> int | None:
    """The length of a file's 4th axis (its channels, MSD), read from the header only; None for a 3-D image or a
    file whose header cannot be read (reading it reports that, one line)."""
    if item.kind != "image":
        return None
    try:
        reader = sitk.ImageFileReader()
        reader.SetFileName(item.path)
        reader.ReadImageInformation()
    except RuntimeError:
        return None
    return int(reader.GetSize()[3]) if reader.GetDimension() == 4 else None


def _store_channel(item: InputItem, names: list[str]) -> int | None:
    """A store scan's channel among the task's `names`: its sequence (or modality) named, else its nnU-Net
    channel number."""
    hint = (item.channel_hint or "").lower()
    by_name = next((i for i, c in enumerate(names) if c.lower() == hint), None)
    return by_name if by_name is not None else item.channel_index


def group_cases(items: list[InputItem], channels: tuple[str, ...]) -> tuple[list[Case], list[str]]:
    """Cases of the task's channels (`channels`: the spec's, () = one channel), and the usage problems:
    a case missing a channel, a one-channel input for a multi-channel task, a 4-D file of another number of
    channels (exit 2, naming case and channel). An input given twice is taken once; cases of the same name from
    different places get distinct `case_id`s (so their outputs never overwrite each other)."""
    n = max(1, len(channels))
    names = list(channels) or ["image"]
    groups: dict[tuple, Case] = {}
    problems = []
    seen: set[tuple[str, str | None]] = set()
    for item in items:
        if item.source in seen:
            continue
        seen.add(item.source)
        depth = _axis4_channels(item)
        if depth is not None:
            if depth != n:
                problems.append(f"{item.path}: a 4-D image with {depth} channels on its 4th axis, but the task "
                                f"takes {n} ({', '.join(names)})")
                continue
            case = groups.setdefault(("file",) + item.source, Case(case_id=item.name, channels=[None] * n,
                                                                  name=item.name))
            case.channels = [dataclasses.replace(item, component=i) for i in range(n)]
            continue
        if item.kind == "store":
            if n == 1:
                key, case_name, index = ("store", item.path, item.scan_id), item.scan_id, 0
            else:
                index = _store_channel(item, names)
                key, case_name = ("store", where_of(item.path), item.name), item.name
                if index is None:
                    problems.append(f"{item.label}: scan of case {item.name!r} is channel {item.channel_hint!r}, "
                                    f"not one of the task's channels {', '.join(names)}")
                    continue
        elif n == 1:
            # one channel: only nnU-Net's _0000 is a channel suffix; `CT_2019` or `patient_0042` is the case
            case_name, key, index = one_channel_case(item.name), ("file",) + item.source, 0
        else:
            m = _CHANNEL.match(item.name)
            if not m:
                problems.append(f"{item.label}: case {item.name!r} is one image, but the task takes {n} channels "
                                f"({', '.join(names)}): name them {item.name}_0000 ... {item.name}_{n - 1:04d}")
                continue
            case_name, index = m["case"], int(m["index"])
            key = ("folder", os.path.dirname(os.path.realpath(item.path)), case_name)
        if index >= n:
            problems.append(f"{item.label}: channel {index:04d} of case {case_name!r}, but the task takes {n} "
                            f"channel(s) ({', '.join(names)})")
            continue
        case = groups.setdefault(key, Case(case_id=case_name, channels=[None] * n, name=case_name))
        if case.channels[index] is not None:
            problems.append(f"{item.label}: case {case_name!r} has channel {index:04d} twice "
                            f"({case.channels[index].label})")
            continue
        case.channels[index] = item
    for case in groups.values():
        missing = [f"{i:04d} ({names[i]})" for i, c in enumerate(case.channels) if c is None]
        if missing:
            problems.append(f"case {case.case_id!r}: missing channel {', '.join(missing)} of the task's "
                            f"{', '.join(names)}")
    return _distinct(list(groups.values())), problems


def _distinct(cases: list[Case]) -> list[Case]:
    """Cases renamed where two share a name: the first keeps it, the next are `<name>-2`, `<name>-3`, ..."""
    used = {c.case_id for c in cases}
    taken: set[str] = set()
    for case in cases:
        if case.case_id in taken:
            k = 2
            while f"{case.name}-{k}" in used:
                k += 1
            case.case_id = f"{case.name}-{k}"
            used.add(case.case_id)
        taken.add(case.case_id)
    return cases


def declared_modality(item: InputItem) -> str | None:
    """The modality an input declares without reading its voxels: a store scan's recorded modality, a DICOM
    series' Modality header; None for image files (NIfTI, NRRD, MetaImage say none)."""
    if item.kind == "store":
        return item.modality
    if item.kind == "dicom":
        from pipeline.ingest.sources import discover

        try:
            found = [s for s in discover([item.path]).scans if not s.problem]
        except (OSError, ValueError):
            return None
        return found[0].modality if len(found) == 1 else None
    return None


def read_item(item: InputItem) -> Loaded:
    """The input as a SimpleITK image in its own geometry; a ValueError (one line) when it cannot be read."""
    from pipeline.ingest.read import read_image

    if item.kind == "image":
        image = read_image(item.path)
        if item.component is not None:
            image = _component(image, item)
        return Loaded(image, None, output_suffix(item.path))
    if item.kind == "dicom":
        return _read_dicom(item)
    return _read_store_scan(item)


def read_items(items: list[InputItem]) -> list[Loaded]:
    """`read_item` of each, a file read once for all the channels its 4th axis holds."""
    from pipeline.ingest.read import read_image

    images: dict[tuple[str, str | None], sitk.Image] = {}
    out = []
    for item in items:
        if item.component is None:
            out.append(read_item(item))
            continue
        if item.source not in images:
            images[item.source] = read_image(item.path)
        out.append(Loaded(_component(images[item.source], item), None, output_suffix(item.path)))
    return out


def _component(image: sitk.Image, item: InputItem) -> sitk.Image:
    """Channel `item.component` of a 4-D image (its 4th axis), as `pipeline.ingest.read` takes MSD channels."""
    size = image.GetSize()
    if image.GetDimension() != 4 or not 0 <= item.component < size[3]:
        raise ValueError(f"{item.path}: expected a 4-D image with channel {item.component} on its 4th axis, got "
                         f"{image.GetDimension()}-D of size {'x'.join(map(str, size))}")
    return sitk.Extract(image, [size[0], size[1], size[2], 0], [0, 0, 0, item.component])


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


def source_files(item: InputItem) -> list[Path]:
    """The files an input is read from: the file (with a MetaImage/NRRD detached data file), every file of a
    DICOM folder in name order; none for a store scan (its store's files are not the input's own)."""
    if item.kind == "store":
        return []
    path = Path(item.path)
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path, *_data_files(path)]


def item_checksum(item: InputItem) -> tuple[str, str]:
    """(field, value) naming how the input is identified: ("sha256", hex digest of its bytes, `source_files`)
    for a file, a DICOM folder or zip; ("content_digest", the digest the volume store recorded for the scan's
    voxels, e.g. "xxh3-128:...") for a store scan ("" when the store's catalog has no row for it)."""
    if item.kind == "store":
        from pipeline.volume_store.store import VolumeStore

        store = VolumeStore(item.path)
        record = next((r for r in store.records() if r.get("scan_id") == item.scan_id), {}) or {}
        return "content_digest", str(record.get("content_digest") or "")
    return "sha256", files_sha256(*source_files(item))


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
