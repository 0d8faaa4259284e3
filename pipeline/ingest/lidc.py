"""LIDC-IDRI nodule labels: the readers' XML contours turned into one consensus label volume.

LIDC-IDRI ships, in each CT series folder, one XML file (root `LidcReadMessage`, namespace
http://www.nih.gov) holding up to four blinded-then-unblinded reading sessions. Each session's
`unblindedReadNodule` has one `roi` per slice: the slice (`imageSOP_UID`, `imageZposition`),
`inclusion` TRUE (nodule) or FALSE (a hole), and the outline as `edgeMap` pixel points
(`xCoord` = column, `yCoord` = row). The rules follow pylidc (the reference reader everyone's
LIDC nodule counts come from), re-implemented here without it:

- A nodule < 3 mm is marked by one point and has no outline: an annotation none of whose rois
  can enclose any area is ignored (pylidc leaves these out of its database). `nonNodule`
  marks are ignored.
- Annotations from the readers are grouped into nodules as `Scan.cluster_annotations` does:
  two annotations are adjacent when the smallest distance between their contour points, in
  voxel-index units (k, row, column), is <= the slice thickness; nodules are the connected
  components; while a group has more than 4 annotations the tolerance shrinks by 0.9 (down
  to 0.1). pylidc compares index distances with a tolerance in mm; that unit mix is kept on
  purpose so that the nodules found here are the nodules pylidc (and the published LIDC
  splits) count.
- Each annotation is rasterised as `Annotation.boolean_mask` does: a pixel is in when its
  centre is inside an inclusion contour (even-odd rule) and it is not a contour point (LIDC
  outlines are drawn just outside the nodule); pixels inside an exclusion contour, and that
  contour's own points, are then removed from the slice.
- The consensus is `utils.consensus(clevel=0.5)`: a voxel is in when >= 50% of the cluster's
  annotations include it.

A contour finds its slice by SOP Instance UID, else by `imageZposition` within half the slice
spacing along z (the pitch of ImagePositionPatient z; a series whose slices do not advance in
z can only be matched by UID). A contour that finds no slice makes its whole nodule unusable:
the nodule is skipped with a problem naming the XML, the reader and the UID, and the scan
still converts (the problems travel with the label's attributes, under "problems"). So is a
group still holding more than four annotations at pylidc's smallest tolerance (pylidc keeps
it with a warning; its consensus would merge two nodules). The label volume is in the DICOM series'
own (z, y, x) array order, slices sorted along their normal as `order_slices` sorts them;
label k (1..n) is the k-th nodule by world position of its consensus centroid (z, then y,
then x, LPS mm).

Readings that miss the image are never silent: every roi (the < 3 mm marks' included) is
counted, and those lying outside the image's rows x columns, wholly or partly, or matching no
slice are named in one line (`ContourCounts.summary`: "LIDC XML 069.xml: 3 of 12 contours
outside the image, 1 matching no slice"), kept with the label's attributes. An XML none of
whose contours lands on the series (`ContourCounts.all_missed`: most likely another series'
reading) is the DICOM reader's to refuse.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass

import numpy as np

__all__ = [
    "LIDC_ROOT", "ConsensusConfig", "Contour", "ReaderAnnotation", "LidcRead", "SeriesGrid", "LidcNodule",
    "ContourCounts", "LidcLabels", "count_contours", "lidc_header", "parse_lidc_xml", "parse_lidc_text",
    "polygon_interior", "annotation_mask", "cluster_annotations", "lidc_labels", "series_grid", "read_lidc_labels",
]

LIDC_ROOT = "LidcReadMessage"


@dataclass(frozen=True, kw_only=True)
class ConsensusConfig:
    """How annotations become nodules; the defaults are pylidc's."""

    clevel: float = 0.5
    """Fraction of a nodule's annotations that must include a voxel (pylidc `consensus(clevel=0.5)`)."""
    tolerance: float | None = None
    """Clustering tolerance in voxel-index units; None = the slice thickness (pylidc's default)."""
    factor: float = 0.9
    """Tolerance multiplier applied while a group holds more than `max_annotations`."""
    min_tolerance: float = 0.1
    """Below this the shrinking stops; an oversized group is then recorded as a problem."""
    max_annotations: int = 4
    """LIDC has at most four readers per scan."""

    def __post_init__(self) -> None:
        if not 0.0 < self.clevel <= 1.0:
            raise ValueError(f"ConsensusConfig.clevel must be in (0, 1], got {self.clevel}")
        if not 0.0 < self.factor < 1.0:
            raise ValueError(f"ConsensusConfig.factor must be in (0, 1), got {self.factor}")
        if self.tolerance is not None and self.tolerance < 0:
            raise ValueError(f"ConsensusConfig.tolerance must be >= 0, got {self.tolerance}")


@dataclass(frozen=True)
class Contour:
    """One roi: a closed outline on one slice; `points` are (x=column, y=row) pixel coordinates."""

    sop_uid: str | None
    z: float | None
    inclusion: bool
    points: np.ndarray

    @property
    def has_area(self) -> bool:
        """At least three distinct points (one or two points enclose nothing)."""
        return len(np.unique(self.points, axis=0)) >= 3


@dataclass(frozen=True)
class ReaderAnnotation:
    """One reader's outline of one nodule (an `unblindedReadNodule`)."""

    session: int
    reader: str
    nodule_id: str
    contours: tuple[Contour, ...]

    @property
    def label(self) -> str:
        return f"reader {self.reader} ({self.session + 1}) {self.nodule_id!r}"


@dataclass(frozen=True)
class LidcRead:
    """A parsed LIDC XML: the series it annotates and the usable (>= 3 mm) annotations."""

    path: str
    series_uid: str | None
    study_uid: str | None
    annotations: tuple[ReaderAnnotation, ...]
    small: int = 0
    """Annotations ignored as < 3 mm (no contour with area)."""
    sessions: int = 0
    small_contours: tuple[Contour, ...] = ()
    """The contours (centre marks) of the ignored < 3 mm annotations: counted, never drawn."""


@dataclass(frozen=True)
class SeriesGrid:
    """What the rasteriser needs to know about the series, slices in array order."""

    shape: tuple[int, int, int]
    sop_uids: tuple[str, ...]
    positions: np.ndarray
    """(nz, 3) ImagePositionPatient per slice, LPS mm."""
    orientation: tuple[float, ...]
    """ImageOrientationPatient: row direction (3) then column direction (3)."""
    pixel_spacing: tuple[float, float]
    """(row spacing, column spacing) = (dy, dx) mm, DICOM PixelSpacing order."""
    slice_thickness: float

    def world(self, kji: np.ndarray) -> np.ndarray:
        """LPS mm (x, y, z) of fractional voxel indices (k, row, column)."""
        k, j, i = (float(v) for v in kji)
        nz = self.shape[0]
        step = (self.positions[-1] - self.positions[0]) / (nz - 1) if nz > 1 else np.zeros(3)
        o = np.asarray(self.orientation, dtype=float)
        return self.positions[0] + k * step + i * self.pixel_spacing[1] * o[:3] + j * self.pixel_spacing[0] * o[3:]

    def slice_of(self, contour: Contour) -> int | None:
        """Slice index by SOP UID, else by z within half the slice spacing along z; None if neither."""
        if contour.sop_uid and contour.sop_uid in self._uid_index:
            return self._uid_index[contour.sop_uid]
        if contour.z is None:
            return None
        zs = self.positions[:, 2]
        pitch = float(np.median(np.abs(np.diff(zs)))) if len(zs) > 1 else self.slice_thickness
        if pitch <= 1e-6:  # slices do not advance along z (sagittal/coronal): z cannot pick one
            return None
        k = int(np.argmin(np.abs(zs - contour.z)))
        return k if abs(zs[k] - contour.z) <= pitch / 2 + 1e-6 else None

    @property
    def _uid_index(self) -> dict[str, int]:
        cached = self.__dict__.get("_uids")
        if cached is None:
            cached = {u: k for k, u in enumerate(self.sop_uids)}
            object.__setattr__(self, "_uids", cached)
        return cached


@dataclass(frozen=True)
class LidcNodule:
    """One consensus nodule of the label volume."""

    label: int
    readers: int
    annotations: tuple[str, ...]
    voxels: int
    centroid_voxel: tuple[float, float, float]
    """(k, row, column) in the series' array order."""
    centroid_mm: tuple[float, float, float]
    """LPS world (x, y, z) mm."""

    def attrs(self) -> dict:
        """World centroid only: voxel indices of the series' grid mean nothing in the LPS store."""
        return {"label": self.label, "readers": self.readers, "annotations": list(self.annotations),
                "voxels": self.voxels, "centroid_lps_xyz_mm": [round(v, 3) for v in self.centroid_mm]}


@dataclass(frozen=True)
class ContourCounts:
    """How an XML's contours land on the series (every roi of every reading, < 3 mm marks included).

    A contour is outside the image when a point of it lies outside the rows x columns of the
    slices (partly: some of its points are inside); it lands when it matches a slice and has a
    point inside the image.
    """

    source: str = ""
    total: int = 0
    outside: int = 0
    partly_outside: int = 0
    no_slice: int = 0
    landed: int = 0

    @property
    def all_missed(self) -> bool:
        """Contours there are, and none lands: the XML does not belong to this series' image."""
        return self.total > 0 and self.landed == 0

    @property
    def summary(self) -> str | None:
        """One line naming the XML and what missed; None when every contour landed whole."""
        parts = []
        of = f" of {self.total} contour{'s' if self.total != 1 else ''}"
        if self.outside:
            partly = f" ({self.partly_outside} partly)" if self.partly_outside else ""
            parts.append(f"{self.outside}{of} outside the image{partly}")
            of = ""
        if self.no_slice:
            parts.append(f"{self.no_slice}{of} matching no slice")
        return f"LIDC XML {os.path.basename(self.source)}: {', '.join(parts)}" if parts else None

    def attrs(self) -> dict:
        return {"total": self.total, "outside_image": self.outside, "partly_outside_image": self.partly_outside,
                "matching_no_slice": self.no_slice, "landed": self.landed}


def count_contours(read: LidcRead, grid: SeriesGrid) -> ContourCounts:
    """Count the XML's contours that lie outside the image or match no slice of `grid`."""
    rows, columns = grid.shape[1], grid.shape[2]
    total = outside = partly = no_slice = landed = 0
    contours = [c for a in read.annotations for c in a.contours] + list(read.small_contours)
    for contour in contours:
        total += 1
        x, y = contour.points[:, 0], contour.points[:, 1]
        inside = (x >= 0) & (x <= columns - 1) & (y >= 0) & (y <= rows - 1)
        if not inside.all():
            outside += 1
            partly += bool(inside.any())
        on_slice = grid.slice_of(contour) is not None
        no_slice += not on_slice
        landed += on_slice and bool(inside.any())
    return ContourCounts(source=read.path, total=total, outside=outside, partly_outside=partly, no_slice=no_slice,
                         landed=landed)


@dataclass(frozen=True)
class LidcLabels:
    """The label volume (uint16, series array order), its nodules and what could not be used."""

    mask: np.ndarray
    nodules: tuple[LidcNodule, ...]
    problems: tuple[str, ...] = ()
    ignored_small: int = 0
    source: str = ""
    clevel: float = 0.5
    contours: ContourCounts = ContourCounts()

    def attrs(self) -> dict:
        """JSON-serialisable metadata for the label group's attributes (`contour_summary`: the one
        line naming what missed the image, or null)."""
        return {"kind": "lidc-consensus", "source": os.path.basename(self.source), "clevel": self.clevel,
                "nodules": [n.attrs() for n in self.nodules], "ignored_small_annotations": self.ignored_small,
                "problems": list(self.problems), "contours": self.contours.attrs(),
                "contour_summary": self.contours.summary}


# --- XML ---------------------------------------------------------------------------------------

def _local(tag: str) -> str:
    """Tag name without its namespace: TCIA's files use xmlns=http://www.nih.gov, some copies none."""
    return tag.rsplit("}", 1)[-1]


def _child(elem: ET.Element, name: str) -> ET.Element | None:
    return next((c for c in elem if _local(c.tag) == name), None)


def _children(elem: ET.Element, name: str) -> list[ET.Element]:
    return [c for c in elem if _local(c.tag) == name]


def _text(elem: ET.Element | None, name: str) -> str | None:
    c = _child(elem, name) if elem is not None else None
    return c.text.strip() if c is not None and c.text and c.text.strip() else None


def lidc_header(path: str) -> tuple[bool, str | None]:
    """(is this an LIDC read message, its SeriesInstanceUid) reading only the file's start.

    Discovery calls this for every .xml beside a DICOM series, so it stops at the end of the
    ResponseHeader instead of parsing thousands of contour points.
    """
    try:
        events = ET.iterparse(path, events=("start", "end"))
        _, root = next(events)
        if _local(root.tag) != LIDC_ROOT:
            return False, None
        for event, elem in events:
            name = _local(elem.tag)
            if event == "end" and name == "SeriesInstanceUid":
                return True, (elem.text or "").strip() or None
            if event == "end" and name == "ResponseHeader" or event == "start" and name == "readingSession":
                return True, None
        return True, None
    except (ET.ParseError, OSError, StopIteration):
        return False, None


def parse_lidc_xml(path: str) -> LidcRead:
    """Read one LIDC XML file; ValueError naming the file when it is not a readable LIDC read."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise ValueError(f"cannot read LIDC XML {path}: {exc.strerror or exc}") from None
    return parse_lidc_text(data, path)


def parse_lidc_text(data: bytes | str, path: str = "<LIDC XML>") -> LidcRead:
    """Parse an LIDC read message (the pure half of `parse_lidc_xml`)."""
    try:
        root = ET.fromstring(data)
    except ET.ParseError as exc:
        raise ValueError(f"malformed LIDC XML {path}: {exc}") from None
    if _local(root.tag) != LIDC_ROOT:
        raise ValueError(f"{path} is not an LIDC read message (root element <{_local(root.tag)}>, "
                         f"expected <{LIDC_ROOT}>)")
    header = _child(root, "ResponseHeader")
    annotations: list[ReaderAnnotation] = []
    small = 0
    small_contours: list[Contour] = []
    sessions = _children(root, "readingSession")
    for s, session in enumerate(sessions):
        reader = _text(session, "servicingRadiologistID") or f"session{s + 1}"
        for n, nodule in enumerate(_children(session, "unblindedReadNodule")):
            nodule_id = _text(nodule, "noduleID") or f"nodule{n + 1}"
            contours = tuple(_contour(roi, path, reader, nodule_id) for roi in _children(nodule, "roi"))
            if not any(c.has_area for c in contours):
                small += 1  # < 3 mm: a centre mark, not an outline
                small_contours.extend(contours)
                continue
            annotations.append(ReaderAnnotation(session=s, reader=reader, nodule_id=nodule_id, contours=contours))
    return LidcRead(path=path, series_uid=_text(header, "SeriesInstanceUid"),
                    study_uid=_text(header, "StudyInstanceUID"), annotations=tuple(annotations), small=small,
                    sessions=len(sessions), small_contours=tuple(small_contours))


def _contour(roi: ET.Element, path: str, reader: str, nodule_id: str) -> Contour:
    z_text = _text(roi, "imageZposition")
    inclusion = (_text(roi, "inclusion") or "TRUE").upper()
    points = []
    for edge in _children(roi, "edgeMap"):
        x, y = _text(edge, "xCoord"), _text(edge, "yCoord")
        try:
            point = (float(x), float(y))  # type: ignore[arg-type]
        except (TypeError, ValueError):
            point = (float("nan"), 0.0)
        if not all(np.isfinite(point)):
            raise ValueError(f"{path}: reader {reader} nodule {nodule_id!r} has an edgeMap point "
                             f"({x!r}, {y!r}) that is not a pair of finite numbers")
        points.append(point)
    try:
        z = float(z_text) if z_text is not None else None
    except ValueError:
        z = float("nan")
    if z is not None and not np.isfinite(z):
        raise ValueError(f"{path}: reader {reader} nodule {nodule_id!r} has imageZposition {z_text!r}, "
                         f"not a finite number")
    return Contour(sop_uid=_text(roi, "imageSOP_UID"), z=z, inclusion=inclusion != "FALSE",
                   points=np.asarray(points, dtype=float).reshape(-1, 2))


# --- rasterisation -----------------------------------------------------------------------------

def polygon_interior(points: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """(len(rows), len(cols)) bool: pixel centres strictly inside the closed polygon `points` (x, y).

    Even-odd rule (matplotlib's `contains_points`, which pylidc uses), and pixels lying on the
    outline are out, so the result does not depend on floating-point luck at the boundary.
    """
    pts = np.asarray(points, dtype=float)
    py = np.asarray(rows, dtype=float)[:, None]
    px = np.asarray(cols, dtype=float)[None, :]
    inside = np.zeros((py.shape[0], px.shape[1]), dtype=bool)
    on_edge = np.zeros_like(inside)
    if len(pts) < 3:
        return inside
    for (x1, y1), (x2, y2) in zip(pts, np.roll(pts, -1, axis=0)):
        crosses = (y1 > py) != (y2 > py)
        if crosses.any():
            with np.errstate(divide="ignore", invalid="ignore"):
                x_at = x1 + (py - y1) * (x2 - x1) / (y2 - y1)
            inside ^= crosses & (px < x_at)
        cross = (x2 - x1) * (py - y1) - (y2 - y1) * (px - x1)
        on_edge |= ((np.abs(cross) <= 1e-9) & (px >= min(x1, x2)) & (px <= max(x1, x2))
                    & (py >= min(y1, y2)) & (py <= max(y1, y2)))
    return inside & ~on_edge


@dataclass(frozen=True)
class _Box:
    """A boolean mask placed at (k0, r0, c0) in the series grid."""

    origin: tuple[int, int, int]
    mask: np.ndarray

    @property
    def stop(self) -> tuple[int, int, int]:
        return tuple(o + s for o, s in zip(self.origin, self.mask.shape))  # type: ignore[return-value]


def annotation_mask(annotation: ReaderAnnotation, slices: list[int], shape: tuple[int, int, int]) -> _Box:
    """One reader's nodule as a boolean box: inclusion contours ORed per slice, then holes cut out."""
    pts = np.vstack([c.points for c in annotation.contours])
    r0 = max(int(np.floor(pts[:, 1].min())), 0)
    r1 = min(int(np.ceil(pts[:, 1].max())), shape[1] - 1)
    c0 = max(int(np.floor(pts[:, 0].min())), 0)
    c1 = min(int(np.ceil(pts[:, 0].max())), shape[2] - 1)
    k0, k1 = min(slices), max(slices)
    mask = np.zeros((k1 - k0 + 1, max(r1 - r0 + 1, 0), max(c1 - c0 + 1, 0)), dtype=bool)
    if mask.size == 0:
        return _Box((k0, r0, c0), mask)
    rows, cols = np.arange(r0, r1 + 1), np.arange(c0, c1 + 1)
    for inclusion in (True, False):
        for contour, k in zip(annotation.contours, slices):
            if contour.inclusion != inclusion:
                continue
            plane = mask[k - k0]
            area = polygon_interior(contour.points, rows, cols)
            if inclusion:
                plane |= area
            else:
                plane &= ~area
            _clear_points(plane, contour.points, r0, c0)
    return _Box((k0, r0, c0), mask)


def _clear_points(plane: np.ndarray, points: np.ndarray, r0: int, c0: int) -> None:
    """Remove the outline's own pixels (LIDC readers draw the outline outside the nodule)."""
    ij = np.rint(points[:, ::-1]).astype(int) - (r0, c0)
    ok = (ij[:, 0] >= 0) & (ij[:, 0] < plane.shape[0]) & (ij[:, 1] >= 0) & (ij[:, 1] < plane.shape[1])
    plane[ij[ok, 0], ij[ok, 1]] = False


def _consensus(boxes: list[_Box], shape: tuple[int, int, int], clevel: float) -> tuple[tuple[int, int, int], np.ndarray]:
    """pylidc `consensus`: the share of annotations including each voxel, thresholded at `clevel`."""
    lo = tuple(min(b.origin[a] for b in boxes) for a in range(3))
    hi = tuple(max(b.stop[a] for b in boxes) for a in range(3))
    votes = np.zeros(tuple(h - l for l, h in zip(lo, hi)), dtype=np.int32)
    for b in boxes:
        sl = tuple(slice(o - l, s - l) for o, s, l in zip(b.origin, b.stop, lo))
        votes[sl] += b.mask
    return lo, votes >= clevel * len(boxes) - 1e-9  # type: ignore[return-value]


# --- clustering --------------------------------------------------------------------------------

def _index_points(annotation: ReaderAnnotation, slices: list[int]) -> np.ndarray:
    """All contour points as (row, column, k): pylidc's `contours_matrix`."""
    return np.vstack([np.c_[c.points[:, ::-1], np.full(len(c.points), k)]
                      for c, k in zip(annotation.contours, slices)])


def _min_distance(a: np.ndarray, b: np.ndarray) -> float:
    best = np.inf
    for start in range(0, len(a), 512):  # bounded memory on very long outlines
        d = ((a[start:start + 512, None, :] - b[None, :, :]) ** 2).sum(-1)
        best = min(best, float(d.min()))
    return float(np.sqrt(best))


def _components(adjacent: np.ndarray) -> list[list[int]]:
    parent = list(range(len(adjacent)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in zip(*np.nonzero(np.triu(adjacent, 1))):
        parent[find(int(i))] = find(int(j))
    groups: dict[int, list[int]] = {}
    for i in range(len(adjacent)):
        groups.setdefault(find(i), []).append(i)
    return list(groups.values())


def cluster_annotations(points: list[np.ndarray], tolerance: float,
                        config: ConsensusConfig = ConsensusConfig()) -> tuple[list[list[int]], str | None]:
    """Group annotations (given by their index-space contour points) into nodules, as pylidc does.

    Returns the groups (lists of annotation indices) and a problem when some group still has
    more than `config.max_annotations` members at the smallest tolerance.
    """
    n = len(points)
    if n == 0:
        return [], None
    dist = np.zeros((n, n))
    for i in range(n):
        for j in range(i + 1, n):
            dist[i, j] = dist[j, i] = _min_distance(points[i], points[j])
    tol = tolerance
    groups = _components(dist <= tol)
    while any(len(g) > config.max_annotations for g in groups):
        tol *= config.factor
        if tol < config.min_tolerance:
            return groups, (f"could not split annotations into groups of <= {config.max_annotations} "
                            f"(nodules too close to separate automatically); those groups are skipped")
        groups = _components(dist <= tol)
    return groups, None


# --- the label volume --------------------------------------------------------------------------

def lidc_labels(read: LidcRead, grid: SeriesGrid, config: ConsensusConfig = ConsensusConfig()) -> LidcLabels:
    """Consensus nodule labels of one LIDC read on one series grid (pure: no I/O)."""
    name = os.path.basename(read.path)
    members, broken, problems = _place(read, grid, name)
    points = [_index_points(_only_found(a, k, grid), k) for a, k in members]
    tolerance = config.tolerance if config.tolerance is not None else grid.slice_thickness
    groups, too_close = cluster_annotations(points, tolerance, config)
    if too_close:
        problems.append(f"{name}: {too_close}")
    found = []
    for group in groups:
        anns = [members[i][0] for i in group]
        who = ", ".join(a.label for a in anns)
        bad = [a for a in anns if id(a) in broken]
        if bad:
            problems.append(f"{name}: nodule of {who} skipped: {bad[0].label} names {broken[id(bad[0])]}, "
                            f"which matches no slice of the series")
        elif len(group) > config.max_annotations:
            problems.append(f"{name}: nodule of {who} skipped: {len(group)} annotations, more than readers")
        else:
            boxes = [annotation_mask(members[i][0], members[i][1], grid.shape) for i in group]
            origin, mask = _consensus(boxes, grid.shape, config.clevel)
            if mask.any():
                found.append((mask, [a.label for a in anns], origin, np.argwhere(mask).mean(axis=0) + origin))
            else:
                problems.append(f"{name}: nodule of {who} skipped: empty consensus mask")
    return _assemble(found, grid, problems, read, config.clevel, count_contours(read, grid))


def _place(read: LidcRead, grid: SeriesGrid, name: str) -> tuple[list[tuple[ReaderAnnotation, list[int]]],
                                                               dict[int, str], list[str]]:
    """Find each contour's slice. Returns the annotations to cluster with their contours' slices,
    the broken ones (id -> the first contour that found no slice) and problems so far.

    A broken annotation still joins the clustering through the contours that did find a slice,
    so that its whole nodule (not just its own outline) is reported and skipped; one with no
    placeable contour at all is reported on its own.
    """
    members: list[tuple[ReaderAnnotation, list[int]]] = []
    broken: dict[int, str] = {}
    problems: list[str] = []
    for ann in read.annotations:
        slices = [grid.slice_of(c) for c in ann.contours]
        known = [k for k in slices if k is not None]
        missing = [f"SOP UID {c.sop_uid} (z {c.z})" for c, k in zip(ann.contours, slices) if k is None]
        if missing:
            broken[id(ann)] = missing[0]
        if known:
            members.append((ann, known))
        else:
            problems.append(f"{name}: {ann.label} skipped: no contour matches a slice of the series "
                            f"({missing[0]}{' and more' if len(missing) > 1 else ''})")
    return members, broken, problems


def _only_found(ann: ReaderAnnotation, slices: list[int], grid: SeriesGrid) -> ReaderAnnotation:
    """The annotation restricted to the contours that found a slice (aligned with `slices`)."""
    kept = tuple(c for c in ann.contours if grid.slice_of(c) is not None)
    return ReaderAnnotation(session=ann.session, reader=ann.reader, nodule_id=ann.nodule_id, contours=kept)


def _assemble(found: list, grid: SeriesGrid, problems: list[str], read: LidcRead, clevel: float,
              contours: ContourCounts) -> LidcLabels:
    """Write the nodules into one uint16 volume, numbered by world centroid (z, then y, then x)."""
    worlds = [grid.world(c) for *_, c in found]
    order = sorted(range(len(found)), key=lambda i: (worlds[i][2], worlds[i][1], worlds[i][0]))
    volume = np.zeros(grid.shape, dtype=np.uint16)
    nodules = []
    for label, i in enumerate(order, start=1):
        mask, labels, origin, centroid = found[i]
        sl = tuple(slice(o, o + s) for o, s in zip(origin, mask.shape))
        view = volume[sl]
        free = mask & (view == 0)  # where two nodules' consensus overlap, the earlier label keeps the voxel
        view[free] = label
        nodules.append(LidcNodule(label=label, readers=len(labels), annotations=tuple(labels),
                                  voxels=int(free.sum()), centroid_voxel=tuple(float(v) for v in centroid),
                                  centroid_mm=tuple(float(v) for v in worlds[i])))
    return LidcLabels(mask=volume, nodules=tuple(nodules), problems=tuple(problems), ignored_small=read.small,
                      source=read.path, clevel=clevel, contours=contours)


# --- I/O: the series grid from DICOM headers ---------------------------------------------------

def series_grid(ordered_files: list[str]) -> SeriesGrid:
    """The grid of a series whose slice files are already in array order (`order_slices`)."""
    import pydicom

    tags = ["SOPInstanceUID", "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing",
            "SliceThickness", "Rows", "Columns"]
    uids, positions = [], []
    first = None
    for f in ordered_files:
        ds = pydicom.dcmread(f, stop_before_pixels=True, specific_tags=tags)
        first = first or ds
        uids.append(str(getattr(ds, "SOPInstanceUID", "")))
        positions.append([float(v) for v in ds.ImagePositionPatient])
    assert first is not None
    pos = np.asarray(positions, dtype=float)
    spacing = tuple(float(v) for v in getattr(first, "PixelSpacing", (1.0, 1.0)))
    normal_steps = np.linalg.norm(np.diff(pos, axis=0), axis=1) if len(pos) > 1 else np.array([1.0])
    thickness = getattr(first, "SliceThickness", None)
    thickness = float(thickness) if thickness not in (None, "") else float(np.median(normal_steps))
    return SeriesGrid(shape=(len(ordered_files), int(first.Rows), int(first.Columns)), sop_uids=tuple(uids),
                      positions=pos, orientation=tuple(float(v) for v in first.ImageOrientationPatient),
                      pixel_spacing=(spacing[0], spacing[1]), slice_thickness=thickness)


def read_lidc_labels(xml_path: str, ordered_files: list[str], config: ConsensusConfig = ConsensusConfig()) -> LidcLabels:
    """Parse `xml_path` and rasterise its consensus nodules on the series made of `ordered_files`."""
    return lidc_labels(parse_lidc_xml(xml_path), series_grid(ordered_files), config)
