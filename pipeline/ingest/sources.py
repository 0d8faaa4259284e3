"""What a conversion is asked to read: one `ScanSource` per scan, found by walking the inputs.

Discovery only looks at names, sizes and (for DICOM) headers; it never decodes voxels, so it
is fast on a large archive and every scan becomes one independent task. A file that cannot be
a scan at all becomes a `ScanSource` with `problem` set, so that it gets its own failed row in
the catalog instead of stopping the run.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import re
import stat
import zipfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from pipeline.ingest.archive import safe_member
from pipeline.ingest.dicom import group_series, group_series_in_zip
from pipeline.ingest.nnunet import (CANDIDATES, DATASET_FOLDERS, DATASET_JSON, IMAGE_FOLDERS, LABEL_FOLDERS,
                                    dataset_sources, looks_like_dataset_root)
from pipeline.ingest.scan_source import ScanSource

__all__ = ["TableSource", "Discovery", "discover", "SourceError", "is_dicom_file", "is_case_candidates",
           "CASE_CANDIDATE_COLUMNS", "DOCUMENTED_LABELS"]

IMAGE_SUFFIXES = (".mhd", ".mha", ".nii", ".nii.gz", ".nrrd", ".nhdr")
# Files that travel beside images and are read through them (or are documentation).
SIDECAR_SUFFIXES = (".raw", ".zraw", ".img", ".csv", ".json", ".txt", ".md", ".pdf", ".xml", ".html",
                    ".py", ".log", ".yaml", ".yml", ".tsv", ".xlsx")
LABEL_SUFFIXES = ("_seg", "_label", "_labels", "_mask", "-seg", "-label", "-mask")
BRATS_SEQUENCES = ("flair", "t1ce", "t1", "t2")
LUNA16_TABLES = ("annotations.csv", "candidates.csv", "candidates_V2.csv")
# PE-CAD (storage_schemas/PE_CAD_LAYOUT.md): .mhd files beside pe_candidates.csv are its scans
PE_CANDIDATES, PE_FOLDS = "pe_candidates.csv", "pe_folds.csv"
PE_TABLES = (PE_CANDIDATES, PE_FOLDS)
TABLE_NAMES = LUNA16_TABLES + PE_TABLES
_SUBSET = re.compile(r"^subset(\d+)$")
LUNA16_LUNG_MASKS = "seg-lungs-LUNA16"
# The label values each dataset documents; a label map holding another value is a failed row naming it
# (read.check_label_values, as for an nnU-Net dataset.json). LiTS 2017 (Bilic et al., 2023): 1 liver, 2 tumour.
# BraTS 2018-2021 (Menze et al., 2015; Bakas et al., 2017): 1 necrotic / non-enhancing core, 2 oedema,
# 4 enhancing tumour (3 is unused).
DOCUMENTED_LABELS: dict[str, tuple[tuple[str, int], ...]] = {
    "lits": (("background", 0), ("liver", 1), ("tumour", 2)),
    "brats": (("background", 0), ("necrotic core", 1), ("oedema", 2), ("enhancing tumour", 4)),
}


class SourceError(ValueError):
    """An input path that cannot be used at all (bad usage rather than a bad scan)."""


CASE_CANDIDATE_COLUMNS = ("case_id", "x", "y", "z", "label")
"""A candidates CSV of one's own cases (world x/y/z in mm, LPS as LUNA16's coordX/Y/Z; label 0/1)."""


@dataclass(frozen=True)
class TableSource:
    """A table kept with the store: LUNA16's annotations.csv / candidates.csv (on disk or inside a
    zip), PE-CAD's pe_candidates.csv / pe_folds.csv (on disk), or a case candidates CSV
    (`CASE_CANDIDATE_COLUMNS`, any file name given explicitly, or candidates.csv in a dataset root).

    `case_scans` is set for a case candidates CSV only: case_id -> the discovered name of the case's
    (channel-0) scan, which the stored `candidates` table names as its seriesuid."""

    name: str
    path: str
    archive: str | None = None
    case_scans: tuple[tuple[str, str], ...] | None = None


@dataclass
class Discovery:
    scans: list[ScanSource] = field(default_factory=list)
    tables: list[TableSource] = field(default_factory=list)


def is_dicom_file(path: str | os.PathLike) -> bool:
    """DICOM Part 10 files carry 'DICM' at byte 128."""
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def _has_suffix(name: str, suffixes: tuple[str, ...]) -> bool:
    low = name.lower()
    return any(low.endswith(s) for s in suffixes)


def _stem(name: str) -> str:
    base = PurePosixPath(name).name
    for suffix in sorted(IMAGE_SUFFIXES, key=len, reverse=True):
        if base.lower().endswith(suffix):
            return base[: -len(suffix)]
    return base


def _subset_of(parts: tuple[str, ...]) -> str | None:
    for part in reversed(parts):
        if _SUBSET.match(part):
            return part
        if part.endswith(".zip") and _SUBSET.match(part[:-4]):
            return part[:-4]
    return None


def _inside(path: str, folder: str) -> bool:
    return os.path.commonpath([path, folder]) == folder


def _link_problem(path: str, root: str) -> str | None:
    """Why a file found under `root` may not be read: a symlink resolving outside the source tree
    (its bytes are not the tree's), a broken link, or not a regular file (a FIFO would block)."""
    if os.path.islink(path):
        real = os.path.realpath(path)
        if not _inside(real, root):
            return f"symlink {path} points outside the source tree {root} (to {real}); not read"
    try:
        st = os.stat(path)
    except OSError as exc:
        return f"cannot read {path}: {exc.strerror}"
    if not stat.S_ISREG(st.st_mode):
        return f"{path} is not a regular file"
    return None


def discover(paths: list[str | os.PathLike]) -> Discovery:
    """Find every scan under `paths` (files, folders searched recursively, zip archives).

    Inside a folder, a symlink is read only when it resolves inside that folder (the source
    tree); one pointing outside becomes a failed row with the reason, never a silent skip. A
    symlinked folder inside the tree is not walked twice: its files are found through the
    folder it points to.
    """
    found = Discovery()
    dicom_files: list[str] = []
    image_files: list[str] = []
    case_scans: dict[str, str] = {}
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise SourceError(f"source {str(raw)!r} does not exist")
        inside = _inside_dataset(str(path))
        if inside is not None:
            _dataset(inside[0], found, case_scans, os.path.realpath(inside[0]), inside[1], inside[2])
        elif path.is_dir():
            root = os.path.realpath(path)
            before = (len(found.scans), len(dicom_files), len(image_files), len(found.tables))
            for dirpath, dirnames, filenames in os.walk(path):
                kept = []
                for d in sorted(d for d in dirnames if not d.startswith(".")):
                    full = os.path.join(dirpath, d)
                    real = os.path.realpath(full)
                    if os.path.islink(full) and not _inside(real, root):
                        found.scans.append(ScanSource(
                            scan_id=d, kind="unknown", dataset="unknown", files=(), source_path=full,
                            problem=f"symlinked folder {full} points outside the source tree {root} (to {real}); "
                                    f"not searched"))
                    elif not os.path.islink(full):
                        kept.append(d)
                dirnames[:] = kept
                dataset_root = looks_like_dataset_root(dirpath)
                if dataset_root:  # nnU-Net / MSD: its image folders are read as cases, not file by file
                    _dataset(dirpath, found, case_scans, root)
                    dirnames[:] = [d for d in kept if d not in DATASET_FOLDERS]
                for name in sorted(filenames):
                    if dataset_root and name in (DATASET_JSON, CANDIDATES):
                        continue
                    if not name.startswith("."):
                        _classify(os.path.join(dirpath, name), found, dicom_files, image_files, explicit=False,
                                  root=root)
            if before == (len(found.scans), len(dicom_files), len(image_files), len(found.tables)):
                found.scans.append(ScanSource(scan_id=path.name or str(path), kind="unknown", dataset="unknown",
                                              files=(), source_path=str(path),
                                              problem=f"no scans found under folder {path}"))
        else:
            _classify(str(path), found, dicom_files, image_files, explicit=True, root=None)
    found.scans.extend(_image_scans(image_files))
    if dicom_files:
        found.scans.extend(group_series(dicom_files))
    _attach_case_tables(found, case_scans)
    return found


def _inside_dataset(path: str) -> tuple[str, tuple[str, ...], set[str] | None] | None:
    """(dataset root, image folders, cases or None) when `path` is an image folder of an nnU-Net/MSD dataset
    or a file in one, so that it converts as its cases (with their label maps); None otherwise."""
    path = os.path.normpath(path)
    parent = os.path.dirname(path)
    if os.path.isdir(path):
        if os.path.basename(path) in DATASET_FOLDERS and looks_like_dataset_root(parent):
            return parent, _folders(os.path.basename(path)), None
        return None
    folder = os.path.basename(parent)
    if folder in DATASET_FOLDERS and looks_like_dataset_root(os.path.dirname(parent)):
        name = os.path.basename(path)
        stem = _stem(name)
        case = re.sub(r"_\d{4}$", "", stem) if folder in IMAGE_FOLDERS else stem
        # an MSD case keeps its name; an nnU-Net channel file drops _XXXX: both forms are asked for
        return os.path.dirname(parent), _folders(folder), {stem, case}
    return None


def _folders(folder: str) -> tuple[str, ...]:
    """A label map is converted with its case, from the image folder it labels (labelsTs: imagesTs)."""
    return next(((images,) for images, labels in LABEL_FOLDERS.items() if labels == folder), (folder,))


def _dataset(root: str, found: Discovery, case_scans: dict[str, str], tree: str,
             parts: tuple[str, ...] = IMAGE_FOLDERS, cases: set[str] | None = None) -> None:
    """The scans of one nnU-Net/MSD dataset, each file held to the source tree's link rules."""
    got = dataset_sources(root, parts, cases)
    for scan in got.scans:
        problem = None
        for f in list(scan.files) + [p for _, p in scan.labels]:
            problem = problem or _link_problem(f, tree) or _outside(f, tree)
        found.scans.append(dataclasses.replace(scan, problem=problem) if problem and not scan.problem else scan)
    for case, scan in got.case_scans.items():
        case_scans.setdefault(case, scan)
    if got.candidates and cases is None and parts == IMAGE_FOLDERS:  # the whole dataset: its cases, its table
        found.tables.append(TableSource(name=CANDIDATES, path=got.candidates,
                                        case_scans=tuple(sorted(got.case_scans.items()))))


def _outside(path: str, tree: str) -> str | None:
    """A file reached through a symlinked folder that leads out of the tree (the walk does not enter those)."""
    real = os.path.realpath(path)
    return None if _inside(real, tree) else f"{path} resolves outside the source tree {tree} (to {real}); not read"


def _csv_header(path: str) -> tuple[str, ...]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            return tuple(c.strip() for c in next(csv.reader(fh), []))
    except (OSError, UnicodeDecodeError, csv.Error):
        return ()


def is_case_candidates(path: str) -> bool:
    """A CSV whose header has the case candidates columns (case_id, x, y, z, label)."""
    return set(CASE_CANDIDATE_COLUMNS) <= set(_csv_header(path))


def _attach_case_tables(found: Discovery, case_scans: dict[str, str]) -> None:
    """Case candidates CSVs that are not a dataset's own join the cases found in this run: each nnU-Net/MSD
    case by its channel-0 scan, and any other scan by its own name."""
    names = dict(case_scans)
    for scan in found.scans:
        if not scan.problem and scan.scan_id not in names:
            names[scan.scan_id] = scan.scan_id
    tables = []
    for t in found.tables:
        if t.case_scans is None and t.archive is None and t.name == CANDIDATES and is_case_candidates(t.path):
            t = dataclasses.replace(t, case_scans=tuple(sorted(names.items())))
        elif t.case_scans == ():  # an explicitly given case candidates CSV
            t = dataclasses.replace(t, case_scans=tuple(sorted(names.items())))
        tables.append(t)
    found.tables = tables


def _classify(path: str, found: Discovery, dicom_files: list[str], image_files: list[str], explicit: bool,
              root: str | None) -> None:
    name = os.path.basename(path)
    problem = _link_problem(path, root or os.path.realpath(path))
    if problem:
        found.scans.append(ScanSource(scan_id=_stem(name), kind="unknown", dataset="unknown", files=(path,),
                                      source_path=path, problem=problem))
        return
    if name.lower().endswith(".zip"):
        found.scans.extend(_zip_scans(path, found))
    elif name in TABLE_NAMES:
        found.tables.append(TableSource(name=name, path=path))
    elif explicit and name.lower().endswith(".csv") and is_case_candidates(path):
        found.tables.append(TableSource(name=name, path=path, case_scans=()))  # joined to the run's cases at the end
    elif _has_suffix(name, IMAGE_SUFFIXES):
        image_files.append(path)
    elif is_dicom_file(path) or name.lower().endswith(".dcm"):
        dicom_files.append(path)
    elif explicit or not _has_suffix(name, SIDECAR_SUFFIXES):
        found.scans.append(ScanSource(
            scan_id=_stem(name), kind="unknown", dataset="unknown", files=(path,), source_path=path,
            problem="not a recognised image file (expected .mhd/.mha, .nii/.nii.gz, .nrrd, DICOM or .zip)",
        ))


def _image_scans(files: list[str]) -> list[ScanSource]:
    """Pair images with their label maps (LiTS, BraTS, `X` + `X_seg`) and name the datasets (nnU-Net and MSD
    datasets are read as cases by `pipeline.ingest.nnunet`, never here)."""
    by_dir: dict[str, list[str]] = defaultdict(list)
    for f in files:
        by_dir[os.path.dirname(f)].append(f)
    claimed: set[str] = set()
    scans: list[ScanSource] = []
    stems = {f: _stem(f) for f in files}
    # LUNA16 ships lung masks as seg-lungs-LUNA16/<seriesuid>.mhd: label maps, not scans
    lung_masks = {stems[f]: f for f in files if os.path.basename(os.path.dirname(f)) == LUNA16_LUNG_MASKS}
    claimed.update(lung_masks.values())
    pe_folders: dict[str, _PeIndex | None] = {}

    for f in files:
        stem, folder = stems[f], os.path.dirname(f)
        siblings = {stems[g]: g for g in by_dir[folder]}
        m = re.fullmatch(r"volume-(\d+)", stem)
        if m:  # LiTS 2017
            k = int(m.group(1))
            seg = siblings.get(f"segmentation-{k}")
            split = "train" if k <= 99 else "validation" if k <= 114 else "test"
            claimed.add(f)
            if seg:
                claimed.add(seg)
            scans.append(ScanSource(scan_id=stem, kind="image", dataset="lits", files=(f,), source_path=f,
                                    subset=split, modality="CT",
                                    labels=(("segmentation", seg),) if seg else (),
                                    label_names=DOCUMENTED_LABELS["lits"] if seg else ()))
            continue
        m = re.fullmatch(r"(.+)_(flair|t1ce|t1|t2)", stem)
        if m and (m.group(1) + "_seg") in siblings or (m and "brats" in stem.lower()):
            case, seq = m.group(1), m.group(2)
            seg = siblings.get(case + "_seg")
            claimed.add(f)
            if seg:
                claimed.add(seg)
            scans.append(ScanSource(scan_id=stem, kind="image", dataset="brats", files=(f,), source_path=f,
                                    modality="MR", labels=(("seg", seg),) if seg else (),
                                    identifiers=(("case", case), ("sequence", seq)),
                                    label_names=DOCUMENTED_LABELS["brats"] if seg else ()))
            continue

    for f in files:
        if f in claimed or re.fullmatch(r"segmentation-\d+", stems[f]):
            continue
        stem, folder = stems[f], os.path.dirname(f)
        if any(stem.endswith(s) for s in LABEL_SUFFIXES) and any(
                stems[g] + s == stem for g in by_dir[folder] for s in LABEL_SUFFIXES):
            continue  # a label map of a sibling image, handled with it
        labels: list[tuple[str, str]] = []
        for g in by_dir[folder]:
            for s in LABEL_SUFFIXES:
                if stems[g] == stem + s:
                    labels.append((s.strip("_-"), g))
        problem = None
        low = f.lower()
        if folder not in pe_folders:
            pe_folders[folder] = _pe_index(folder)
        if low.endswith((".mhd", ".mha")) and pe_folders[folder] is not None:
            scans.append(pe_folders[folder].scan(stem, f, tuple(labels)))
        elif low.endswith((".mhd", ".mha")):
            subset = _subset_of(Path(f).parts)
            dataset = "luna16" if subset else "metaimage"
            if subset and stem in lung_masks:
                labels.append(("lungs", lung_masks[stem]))
            scans.append(ScanSource(scan_id=stem, kind="metaimage", dataset=dataset, files=(f,), source_path=f,
                                    subset=subset, modality="CT" if subset else None, labels=tuple(labels)))
        else:
            dataset = "nrrd" if low.endswith((".nrrd", ".nhdr")) else "nifti"
            scans.append(ScanSource(scan_id=stem, kind="image", dataset=dataset, files=(f,), source_path=f,
                                    labels=tuple(labels), problem=problem))
    return scans


@dataclass(frozen=True)
class _PeIndex:
    """What PE-CAD's tables say about the scans of one folder: case_id -> patient_id and
    patient_id -> fold. Only these two columns are read here; store_tables validates the rest
    and reports a bad table as a problem naming the file."""

    patients: dict[str, str]
    folds: dict[str, str]

    def scan(self, stem: str, path: str, labels: tuple[tuple[str, str], ...]) -> ScanSource:
        patient = self.patients.get(stem)
        fold = self.folds.get(patient) if patient is not None else None
        return ScanSource(scan_id=stem, kind="metaimage", dataset="pe", files=(path,), source_path=path,
                          subset=f"fold{fold}" if fold else None, modality="CT", labels=labels,
                          identifiers=(("patient_id", patient),) if patient is not None else ())


def _csv_column_map(path: str, key: str, value: str) -> dict[str, str]:
    """{row[key]: row[value]} of a small CSV; empty when the file or a column is unusable (the
    table itself then fails in store_tables with the reason)."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.DictReader(fh))
    except (OSError, UnicodeDecodeError, csv.Error):
        return {}
    out: dict[str, str] = {}
    for row in rows:
        k, v = (row.get(key) or "").strip(), (row.get(value) or "").strip()
        if k and v:
            out.setdefault(k, v)
    return out


def _pe_index(folder: str) -> _PeIndex | None:
    """The PE-CAD index of `folder`, or None when it holds no pe_candidates.csv."""
    candidates = os.path.join(folder, PE_CANDIDATES)
    if not os.path.isfile(candidates):
        return None
    folds_csv = os.path.join(folder, PE_FOLDS)
    folds = _csv_column_map(folds_csv, "patient_id", "fold") if os.path.isfile(folds_csv) else {}
    # as the table reads them (`01` is fold 1); a fold that is no integer >= 1 stops convert (tables.check_table_sources)
    folds = {p: str(int(k)) for p, k in folds.items() if k.isascii() and k.isdigit() and int(k) >= 1}
    return _PeIndex(patients=_csv_column_map(candidates, "case_id", "patient_id"), folds=folds)


def _zip_scans(path: str, found: Discovery) -> list[ScanSource]:
    try:
        with zipfile.ZipFile(path) as zf:
            members = [i for i in zf.infolist() if not i.is_dir()]
    except (zipfile.BadZipFile, OSError) as exc:
        return [ScanSource(scan_id=_stem(os.path.basename(path))[:-4] if path.endswith(".zip") else path,
                           kind="unknown", dataset="unknown", files=(path,), source_path=path,
                           problem=f"not a readable zip archive: {exc}")]
    scans: list[ScanSource] = []
    names = {m.filename for m in members}
    dicom_members: list[str] = []
    for info in members:
        name = info.filename
        base = PurePosixPath(name).name
        if base.startswith(".") or "__MACOSX" in name:
            continue
        if not safe_member(name):
            scans.append(ScanSource(scan_id=_stem(base), kind="unknown", dataset="unknown", files=(name,),
                                    source_path=f"{path}!{name}", archive=path,
                                    problem=f"unsafe path in archive (escapes the target folder): {name!r}"))
            continue
        if base in LUNA16_TABLES:
            found.tables.append(TableSource(name=base, path=name, archive=path))
        elif base.lower().endswith(".mhd"):
            subset = _subset_of(PurePosixPath(name).parts[:-1] + (os.path.basename(path),))
            scans.append(ScanSource(scan_id=_stem(base), kind="metaimage-zip",
                                    dataset="luna16" if subset else "metaimage",
                                    files=(name,), source_path=f"{path}!{name}", archive=path,
                                    subset=subset, modality="CT" if subset else None))
        elif _has_suffix(base, (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha")):
            scans.append(ScanSource(scan_id=_stem(base), kind="image-zip", dataset="nifti", files=(name,),
                                    source_path=f"{path}!{name}", archive=path))
        elif not _has_suffix(base, SIDECAR_SUFFIXES):
            dicom_members.append(name)
    del names
    if dicom_members:
        scans.extend(group_series_in_zip(path, dicom_members))
    return scans
