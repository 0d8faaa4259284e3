"""Procedural CT pulmonary angiography in the PE-CAD layout (storage_schemas/PE_CAD_LAYOUT.md).

PE-CAD, the data of the Models Genesis ECC task (pulmonary embolism false-positive reduction),
is not public, so the pipeline defines its layout and this module writes samples of it:
`<case_id>.mhd/.raw` (int16 HU), `pe_candidates.csv` (world mm, class, vessel direction) and
`pe_folds.csv` (patient-level folds 1..3).

What matters for ECC is that a candidate cannot be classified by its intensity alone: emboli
are filling defects (+20..+80 HU) inside contrast-filled arteries (+250..+400 HU), while the
false candidates are bifurcations, partial-volume vessel walls, under-enhanced veins
(+100..+180 HU) and lymph nodes (~+40 HU) beside vessels. Their HU at the centre overlap, so
only shape and context (the cube along the vessel direction) separate them.

A candidate's direction is the axis of the vessel segment it sits in (a bifurcation: the parent
branch's), written in world (x, y, z): the scans carry the identity direction matrix, so it is the
segment's (z, y, x) mm direction reversed. ECC's vessel-oriented cubes follow it (tests/test_pe.py
checks that the vessel continues along it and the lung lies across it).

As in `phantom`, every random choice is drawn (`draw_pe_scan`) apart from being rendered
(`render_pe_scan`), and scan i depends only on (seed, i). The body, lungs, ribs and spine come
from `phantom.render_phantom` (its own vessels, nodules and noise turned off). Geometry is in
mm measured from voxel (0, 0, 0), (z, y, x), LPS with identity direction.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .luna16_layout import phantom_origin_xyz, prepare_build_dir, publish, world_xyz, write_scan
from .phantom import LUNG, PhantomConfig, PhantomParams, draw_phantom, render_phantom
from .target import existing_sample, read_manifest_body, write_manifest

__all__ = ["PeConfig", "PeCandidate", "PeScanRecord", "PeSampleSummary", "Tube", "PeScanParams",
           "default_pe_config", "small_pe_config", "draw_pe_scan", "render_pe_scan", "centre_mean_hu",
           "write_pe_sample", "read_pe_manifest", "PE_CANDIDATES_HEADER", "PE_FOLDS_HEADER",
           "CANDIDATE_KINDS"]

PE_CANDIDATES_HEADER = ("case_id", "patient_id", "coordX", "coordY", "coordZ", "class", "dirX", "dirY", "dirZ")
PE_FOLDS_HEADER = ("patient_id", "fold")
MANIFEST_KIND = "genesis-sample-data-pe"
MANIFEST_VERSION = 1
N_FOLDS = 3
CANDIDATE_KINDS = ("embolus", "bifurcation", "vessel_wall", "vein", "lymph_node")
"""Class 1 is `embolus`; the other kinds are the false candidates (class 0)."""

# Intensity ranges (HU), drawn per scan (vessels) or per candidate (emboli, nodes).
HU_ARTERY = (250.0, 400.0)
HU_VEIN = (100.0, 180.0)
HU_EMBOLUS = (20.0, 80.0)
HU_LYMPH_NODE = (25.0, 60.0)
# Label values beyond phantom.LABEL_NAMES (0..6).
ARTERY, VEIN, EMBOLUS, LYMPH_NODE = 7, 8, 9, 10

_MIN_EMBOLUS_VESSEL_MM = 2.2   # emboli sit in vessels wide enough to hold a 1 mm centre sphere
_MIN_CANDIDATE_GAP_MM = 8.0    # so the centre spheres of two candidates never overlap
_TRIES = 40


@dataclass(frozen=True, kw_only=True)
class PeConfig:
    """Size and content of one procedural CT pulmonary angiogram."""

    shape: tuple[int, int, int] = (128, 256, 256)
    """Voxels (z, y, x). ECC cubes are 64^3, so at least 64 slices."""
    spacing_mm: tuple[float, float, float] = (1.25, 0.7, 0.7)
    """Voxel size (z, y, x) in mm, as a thin-slice CTPA."""
    root_radius_mm: float = 4.5
    """Radius of each lung's main (lobar) artery; each generation is 0.72 times thinner."""
    generations: int = 5
    """Levels of binary branching of the arterial and venous trees."""
    emboli_per_scan: tuple[int, int] = (1, 3)
    """Inclusive range of emboli (class 1) per scan."""
    false_per_kind: int = 1
    """False candidates per scan of each kind: bifurcation, vessel_wall, vein, lymph_node."""
    noise_sd_hu: float = 15.0
    margin_vox: tuple[int, int, int] = (32, 32, 32)
    """Candidate centres stay at least this far (voxels) from every border, so a 64^3 ECC cube
    centred on them fits; smaller samples relax it and mark each candidate's `cube_inside`."""

    def __post_init__(self) -> None:
        for name in ("shape", "emboli_per_scan", "margin_vox", "spacing_mm"):
            value = getattr(self, name)
            if not isinstance(value, tuple) or not all(isinstance(v, (int, float)) for v in value):
                raise ValueError(f"PeConfig.{name}={value!r}: must be a tuple of numbers")
        if len(self.shape) != 3 or self.shape[0] < 64 or min(self.shape[1:]) < 64:
            raise ValueError(f"PeConfig.shape={self.shape}: need (z, y, x) with at least 64 voxels "
                             "per axis (ECC cubes are 64^3)")
        if len(self.spacing_mm) != 3 or min(self.spacing_mm) <= 0:
            raise ValueError(f"PeConfig.spacing_mm={self.spacing_mm}: need 3 values > 0")
        lo, hi = self.emboli_per_scan
        if not 0 <= lo <= hi:
            raise ValueError(f"PeConfig.emboli_per_scan={self.emboli_per_scan}: need 0 <= low <= high")
        if any(2 * m >= n for m, n in zip(self.margin_vox, self.shape)):
            raise ValueError(f"PeConfig.margin_vox={self.margin_vox}: leaves no room in shape={self.shape}")
        if not 1 <= self.generations <= 7:
            raise ValueError(f"PeConfig.generations={self.generations!r}: must be in [1, 7]")
        if self.false_per_kind < 0 or self.noise_sd_hu < 0 or self.root_radius_mm <= 0:
            raise ValueError("PeConfig: false_per_kind and noise_sd_hu must be >= 0, root_radius_mm > 0 "
                             f"(got {self.false_per_kind}, {self.noise_sd_hu}, {self.root_radius_mm})")

    def to_dict(self) -> dict:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
                for f in dataclasses.fields(self)}


def default_pe_config() -> PeConfig:
    """128 slices of 256 x 256 at 1.25 x 0.7 x 0.7 mm (16 MB per scan)."""
    return PeConfig()


def small_pe_config() -> PeConfig:
    """64 slices of 96 x 96 at 2.0 x 1.5 x 1.5 mm, for tests (1.2 MB per scan)."""
    return PeConfig(shape=(64, 96, 96), spacing_mm=(2.0, 1.5, 1.5), root_radius_mm=4.5, generations=4,
                    emboli_per_scan=(1, 2), margin_vox=(12, 16, 16))


# --- records -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Tube:
    """One vessel segment: a capsule from start to end (mm, z y x), flowing away from the hilum."""

    start_mm: tuple[float, float, float]
    end_mm: tuple[float, float, float]
    radius_mm: float
    kind: str
    """"artery" or "vein"."""
    parent: int
    """Index of the parent tube in the scan's tube list, -1 for a root."""

    @property
    def direction_zyx(self) -> np.ndarray:
        d = np.subtract(self.end_mm, self.start_mm)
        return d / np.linalg.norm(d)


@dataclass(frozen=True)
class PeCandidate:
    """Ground truth of one row of pe_candidates.csv."""

    case_id: str
    kind: str
    """One of CANDIDATE_KINDS."""
    label: int
    """The `class` column: 1 for an embolus, 0 otherwise."""
    index_zyx: tuple[int, int, int]
    """The voxel the candidate is centred on."""
    coord_xyz_mm: tuple[float, float, float]
    """World x, y, z of that voxel's centre (mm, LPS), as written."""
    direction_xyz: tuple[float, float, float] | None
    """Unit vessel direction (world x, y, z), None where unknown (lymph nodes)."""
    hu: float
    """Painted HU of the structure (embolus, node, vein, artery lumen) before noise."""
    length_mm: float = 0.0
    """Extent along the vessel (emboli; node diameter for lymph nodes)."""
    radius_mm: float = 0.0
    """Cross-section radius (emboli, nodes), or the vessel radius (others)."""
    cube_inside: bool = True
    """Whether a 64^3 cube centred on the candidate lies inside the volume."""


@dataclass(frozen=True)
class PeScanParams:
    """Every random choice of one scan; `render_pe_scan` applies them."""

    body: PhantomParams
    """phantom.PhantomParams of the chest (no vessels, nodules or noise)."""
    tubes: tuple[Tube, ...]
    artery_hu: float
    vein_hu: float
    emboli: tuple[tuple[int, float, float, float, tuple[int, int, int]], ...]
    """(tube index, length mm, radius mm, HU, centre voxel) per embolus."""
    nodes: tuple[tuple[float, float, tuple[int, int, int]], ...]
    """(radius mm, HU, centre voxel) per lymph node."""
    false_candidates: tuple[tuple[str, int, tuple[int, int, int]], ...]
    """(kind, tube index, centre voxel) per bifurcation, vessel wall or vein candidate."""
    noise_seed: int


@dataclass(frozen=True)
class PeScanRecord:
    case_id: str
    patient_id: str
    fold: int
    shape_zyx: tuple[int, int, int]
    spacing_zyx_mm: tuple[float, float, float]
    origin_xyz_mm: tuple[float, float, float]
    artery_hu: float
    vein_hu: float
    candidates: tuple[PeCandidate, ...]

    @property
    def relative_mhd(self) -> str:
        return f"{self.case_id}.mhd"


@dataclass(frozen=True)
class PeSampleSummary:
    out_dir: Path
    scans: tuple[PeScanRecord, ...]
    request: dict
    reused: bool = False
    """True when out_dir already held this exact sample and nothing was written."""

    @property
    def candidates_csv(self) -> Path:
        return self.out_dir / "pe_candidates.csv"

    @property
    def folds_csv(self) -> Path:
        return self.out_dir / "pe_folds.csv"

    @property
    def candidates(self) -> tuple[PeCandidate, ...]:
        return tuple(c for s in self.scans for c in s.candidates)

    @property
    def folds(self) -> dict[str, int]:
        """patient_id -> fold."""
        return {s.patient_id: s.fold for s in self.scans}

    def mhd_path(self, case_id: str) -> Path:
        return self.out_dir / f"{case_id}.mhd"

    def describe(self, per_candidate: bool = False) -> str:
        """A few lines for a command line; per_candidate adds the ground truth of every row."""
        cands = self.candidates
        kinds = ", ".join(f"{k} {sum(c.kind == k for c in cands)}" for k in CANDIDATE_KINDS)
        folds = ", ".join(f"fold{k}: {sum(f == k for f in self.folds.values())}" for k in range(1, N_FOLDS + 1))
        lines = [f"{'reused' if self.reused else 'wrote'} {len(self.scans)} CTPA scans in PE-CAD layout under "
                 f"{self.out_dir} ({len(self.folds)} patients; {folds})",
                 f"{len(cands)} rows in pe_candidates.csv: {sum(c.label for c in cands)} emboli (class 1), "
                 f"{sum(1 - c.label for c in cands)} false candidates (class 0); by kind: {kinds}"]
        if per_candidate:
            for c in cands:
                d = "-" if c.direction_xyz is None else "(" + ", ".join(f"{v:+.2f}" for v in c.direction_xyz) + ")"
                lines.append(f"  {c.case_id} class {c.label} {c.kind:<11} xyz=({c.coord_xyz_mm[0]:.1f}, "
                             f"{c.coord_xyz_mm[1]:.1f}, {c.coord_xyz_mm[2]:.1f}) mm zyx={c.index_zyx} dir={d} "
                             f"hu={c.hu:.0f} length={c.length_mm:.1f} radius={c.radius_mm:.1f}"
                             f"{'' if c.cube_inside else ' (64^3 cube crosses the border)'}")
        return "\n".join(lines)


# --- geometry helpers ----------------------------------------------------------------------------

def _unit(v) -> np.ndarray:
    v = np.asarray(v, float)
    return v / np.linalg.norm(v)


def _perpendicular(d: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random unit vector perpendicular to unit d."""
    while True:
        v = rng.standard_normal(3)
        v -= (v @ d) * d
        if np.linalg.norm(v) > 1e-3:
            return _unit(v)


def _segment_distance(p: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    ab = b - a
    t = np.clip((p - a) @ ab / max(ab @ ab, 1e-12), 0, 1)
    return float(np.linalg.norm(p - a - t * ab))


def _clearance(p_mm: np.ndarray, tubes, skip=()) -> float:
    """Distance from p to the nearest tube surface (negative inside a tube)."""
    gaps = [_segment_distance(p_mm, np.asarray(t.start_mm), np.asarray(t.end_mm)) - t.radius_mm
            for i, t in enumerate(tubes) if i not in skip]
    return min(gaps, default=np.inf)


def centre_mean_hu(volume_zyx: np.ndarray, index_zyx, spacing_zyx, radius_mm: float = 1.0) -> float:
    """Mean HU of the voxels within radius_mm of a voxel's centre: what a threshold on the
    candidate's own intensity sees (one voxel is too noisy, a cube would leave a thin vessel)."""
    spacing = np.asarray(spacing_zyx, float)
    reach = np.floor(radius_mm / spacing).astype(int)
    lo = np.maximum(np.asarray(index_zyx) - reach, 0)
    hi = np.minimum(np.asarray(index_zyx) + reach + 1, volume_zyx.shape)
    grids = np.meshgrid(*[(np.arange(a, b) - i) * s for a, b, i, s in zip(lo, hi, index_zyx, spacing)],
                        indexing="ij")
    inside = sum(g * g for g in grids) <= radius_mm * radius_mm + 1e-9
    block = volume_zyx[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    return float(block[inside].astype(np.float64).mean())


# --- drawing -------------------------------------------------------------------------------------

def _body_config(config: PeConfig) -> PhantomConfig:
    """The chest phantom under the vessels: no vessels, nodules or noise of its own."""
    return PhantomConfig(shape=tuple(config.shape), spacing_mm=tuple(float(s) for s in config.spacing_mm),
                         nodules_per_scan=(0, 0), false_candidates_per_scan=0, vessel_trees_per_lung=0,
                         noise_sd_hu=0.0)


def _hilum(lung: np.ndarray, side: int, spacing: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """(hilum point mm, lateral unit vector, lung half width mm) of lung `side` (0 right, 1 left).

    Found on the rendered lung mask: the medial edge of the lung at 55% of its height."""
    nx = lung.shape[2]
    half = lung[..., : nx // 2] if side == 0 else lung[..., nx // 2:]
    offset = 0 if side == 0 else nx // 2
    zs = np.flatnonzero(half.any(axis=(1, 2)))
    z = int(zs[0] + 0.55 * (zs[-1] - zs[0]))
    ys, xs = np.nonzero(half[z])
    xs = xs + offset
    x_med = xs.max() if side == 0 else xs.min()
    y_med = ys[xs == x_med].mean()
    width = (xs.max() - xs.min()) * spacing[2] / 2
    lateral = np.array([0.0, 0.0, -1.0 if side == 0 else 1.0])
    return np.array([z, y_med, x_med], float) * spacing, lateral, float(width)


def _inside(lung: np.ndarray, p_mm: np.ndarray, spacing: np.ndarray) -> bool:
    idx = np.rint(p_mm / spacing).astype(int)
    return bool(np.all(idx >= 0) and np.all(idx < lung.shape) and lung[tuple(idx)])


def _grow_tree(lung, spacing, root_start, root_dir, length, radius, kind, generations, rng) -> list[Tube]:
    """A binary tree of tubes from the hilum into the lung; each child turns 20-45 degrees away
    from its parent, 0.8 times as long and 0.72 times as thin; children leaving the lung are redrawn."""
    tubes = [Tube(tuple(root_start), tuple(root_start + length * root_dir), radius, kind, -1)]
    frontier = [0]
    for _ in range(1, generations):
        nxt = []
        for p in frontier:
            parent = tubes[p]
            d, start = parent.direction_zyx, np.asarray(parent.end_mm)
            u = _perpendicular(d, rng)
            for sign in (1.0, -1.0):
                for _ in range(8):
                    angle = np.deg2rad(rng.uniform(20, 45))
                    w = _unit(sign * u + 0.3 * rng.standard_normal(3))
                    w = _unit(w - (w @ d) * d)
                    child_dir = np.cos(angle) * d + np.sin(angle) * w
                    parent_len = float(np.linalg.norm(np.subtract(parent.end_mm, parent.start_mm)))
                    end = start + parent_len * rng.uniform(0.7, 0.9) * child_dir
                    if _inside(lung, end, spacing) and _inside(lung, (start + end) / 2, spacing):
                        tubes.append(Tube(tuple(start), tuple(end), parent.radius_mm * 0.72, kind, p))
                        nxt.append(len(tubes) - 1)
                        break
        frontier = nxt
    return tubes


def _draw_tubes(config: PeConfig, lung: np.ndarray, rng: np.random.Generator) -> list[Tube]:
    """Arterial and venous trees of both lungs. Arteries start in the mediastinum at the hilum;
    veins leave a little lower and further back, as the pulmonary veins do."""
    spacing = np.asarray(config.spacing_mm, float)
    tubes: list[Tube] = []
    for side in (0, 1):
        hilum, lateral, width = _hilum(lung, side, spacing)
        for kind, shift, radius in (("artery", np.array([0.0, -4.0, 0.0]), config.root_radius_mm),
                                    ("vein", np.array([-12.0, 8.0, 0.0]), 0.85 * config.root_radius_mm)):
            tilt = _unit(lateral + 0.35 * rng.standard_normal(3) * np.array([1.0, 1.0, 0.0]))
            start = hilum + shift - 6.0 * lateral
            length = 6.0 + 0.45 * width
            base = len(tubes)
            tree = _grow_tree(lung, spacing, start, tilt, length, radius, kind, config.generations, rng)
            tubes += [dataclasses.replace(t, parent=t.parent + base if t.parent >= 0 else -1) for t in tree]
    return tubes


def _voxel(p_mm, spacing) -> tuple[int, int, int]:
    return tuple(int(v) for v in np.rint(np.asarray(p_mm) / spacing))


class _Placer:
    """Keeps candidates inside the margin and apart from each other."""

    def __init__(self, config: PeConfig):
        self.spacing = np.asarray(config.spacing_mm, float)
        self.lo = np.asarray(config.margin_vox)
        self.hi = np.asarray(config.shape) - 1 - self.lo
        self.taken: list[np.ndarray] = []

    def ok(self, idx) -> bool:
        idx = np.asarray(idx)
        if np.any(idx < self.lo) or np.any(idx > self.hi):
            return False
        p = idx * self.spacing
        return all(np.linalg.norm(p - q) >= _MIN_CANDIDATE_GAP_MM for q in self.taken)

    def take(self, idx) -> None:
        self.taken.append(np.asarray(idx) * self.spacing)


def _draw_emboli(config, tubes, placer, rng):
    spacing = placer.spacing
    wanted = int(rng.integers(config.emboli_per_scan[0], config.emboli_per_scan[1] + 1))
    eligible = [i for i, t in enumerate(tubes) if t.kind == "artery" and t.radius_mm >= _MIN_EMBOLUS_VESSEL_MM]
    emboli = []
    for i in rng.permutation(eligible).tolist():
        if len(emboli) == wanted:
            break
        t = tubes[i]
        a, b = np.asarray(t.start_mm), np.asarray(t.end_mm)
        seg_len = float(np.linalg.norm(b - a))
        for _ in range(_TRIES):
            idx = _voxel(a + rng.uniform(0.3, 0.7) * (b - a), spacing)
            if placer.ok(idx) and _clearance(np.asarray(idx) * spacing, tubes, skip={i, t.parent}) > 2.0:
                placer.take(idx)
                length = float(min(rng.uniform(4.0, 12.0), 0.8 * seg_len))
                radius = float(t.radius_mm * rng.uniform(0.7, 1.0))
                emboli.append((i, length, radius, float(rng.uniform(*HU_EMBOLUS)), idx))
                break
    return tuple(emboli)


def _draw_false(config, tubes, placer, rng):
    """Bifurcations, partial-volume vessel walls and under-enhanced veins, false_per_kind each."""
    spacing = placer.spacing
    parents = {t.parent for t in tubes if t.parent >= 0}
    pools = {"bifurcation": [i for i in parents if tubes[i].kind == "artery"],
             "vessel_wall": [i for i, t in enumerate(tubes) if t.kind == "artery" and t.radius_mm >= 1.5],
             "vein": [i for i, t in enumerate(tubes) if t.kind == "vein" and t.radius_mm >= _MIN_EMBOLUS_VESSEL_MM]}
    found = []
    for kind, pool in pools.items():
        n = 0
        for _ in range(_TRIES * max(config.false_per_kind, 1)):
            if n == config.false_per_kind or not pool:
                break
            i = int(rng.choice(pool))
            t = tubes[i]
            a, b = np.asarray(t.start_mm), np.asarray(t.end_mm)
            if kind == "bifurcation":
                p, skip = b, {i, t.parent} | {j for j, c in enumerate(tubes) if c.parent == i}
            elif kind == "vessel_wall":
                # on the soft edge, where the voxel mixes lumen and lung
                offset = t.radius_mm + rng.uniform(-0.6, 0.2) * float(spacing.min())
                p = a + rng.uniform(0.3, 0.7) * (b - a) + offset * _perpendicular(t.direction_zyx, rng)
                skip = {i}
            else:
                p, skip = a + rng.uniform(0.3, 0.7) * (b - a), {i, t.parent}
            idx = _voxel(p, spacing)
            if placer.ok(idx) and _clearance(np.asarray(idx) * spacing, tubes, skip=skip) > 2.0:
                placer.take(idx)
                found.append((kind, i, idx))
                n += 1
    return tuple(found)


def _draw_nodes(config, tubes, placer, rng):
    """Lymph nodes (~+40 HU) just outside the larger arteries: the classic mimic of an embolus."""
    spacing = placer.spacing
    pool = [i for i, t in enumerate(tubes) if t.kind == "artery" and t.radius_mm >= _MIN_EMBOLUS_VESSEL_MM]
    nodes = []
    for _ in range(_TRIES * max(config.false_per_kind, 1)):
        if len(nodes) == config.false_per_kind or not pool:
            break
        t = tubes[int(rng.choice(pool))]
        a, b = np.asarray(t.start_mm), np.asarray(t.end_mm)
        radius = float(rng.uniform(2.5, 4.5))
        p = (a + rng.uniform(0.2, 0.8) * (b - a)
             + (t.radius_mm + radius + 0.5) * _perpendicular(t.direction_zyx, rng))
        idx = _voxel(p, spacing)
        if placer.ok(idx) and _clearance(np.asarray(idx) * spacing, tubes) > radius:
            placer.take(idx)
            nodes.append((radius, float(rng.uniform(*HU_LYMPH_NODE)), idx))
    return tuple(nodes)


def draw_pe_scan(config: PeConfig, rng: np.random.Generator) -> PeScanParams:
    """Draw every random choice of one scan (the lung mask is rendered once to grow the trees in)."""
    body = draw_phantom(_body_config(config), rng)
    lung = render_phantom(_body_config(config), body).labels == LUNG
    tubes = _draw_tubes(config, lung, rng)
    placer = _Placer(config)
    emboli = _draw_emboli(config, tubes, placer, rng)
    false = _draw_false(config, tubes, placer, rng)
    nodes = _draw_nodes(config, tubes, placer, rng)
    return PeScanParams(body=body, tubes=tuple(tubes), artery_hu=float(rng.uniform(*HU_ARTERY)),
                        vein_hu=float(rng.uniform(*HU_VEIN)), emboli=emboli, nodes=nodes,
                        false_candidates=false, noise_seed=int(rng.integers(0, 2 ** 63)))


# --- rendering -----------------------------------------------------------------------------------

def _box(shape, spacing, lo_mm, hi_mm):
    lo = np.maximum(np.floor(np.asarray(lo_mm) / spacing).astype(int), 0)
    hi = np.minimum(np.ceil(np.asarray(hi_mm) / spacing).astype(int) + 1, shape)
    if np.any(hi <= lo):
        return None, None
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    coords = [np.arange(s.start, s.stop) * sp for s, sp in zip(box, spacing)]
    return box, (coords[0][:, None, None], coords[1][None, :, None], coords[2][None, None, :])


def _capsule_distance(zyx, a, b):
    ab = b - a
    t = ((zyx[0] - a[0]) * ab[0] + (zyx[1] - a[1]) * ab[1] + (zyx[2] - a[2]) * ab[2]) / max(ab @ ab, 1e-12)
    t = np.clip(t, 0, 1)
    return np.sqrt((zyx[0] - a[0] - t * ab[0]) ** 2 + (zyx[1] - a[1] - t * ab[1]) ** 2
                   + (zyx[2] - a[2] - t * ab[2]) ** 2)


def _paint_tube(volume, labels, spacing, tube: Tube, hu: float, label: int) -> None:
    """Blend the tube in with a one-voxel soft edge: the partial volume that makes vessel walls
    look like low-contrast structures."""
    a, b, r = np.asarray(tube.start_mm), np.asarray(tube.end_mm), tube.radius_mm
    edge = float(min(spacing))
    box, zyx = _box(volume.shape, spacing, np.minimum(a, b) - r - edge, np.maximum(a, b) + r + edge)
    if box is None:
        return
    frac = np.clip((r - _capsule_distance(zyx, a, b)) / edge + 0.5, 0, 1).astype(np.float32)
    frac[labels[box] == 0] = 0  # never paint outside the body
    sub = volume[box]
    sub += (np.float32(hu) - sub) * frac
    labels[box][frac >= 0.5] = label


def _paint_embolus(volume, labels, spacing, tube: Tube, embolus) -> None:
    """A filling defect: a capsule along the vessel through the centre voxel, inside the lumen only."""
    _, length, radius, hu, idx = embolus
    c, d = np.asarray(idx) * spacing, tube.direction_zyx
    a, b = c - d * length / 2, c + d * length / 2
    box, zyx = _box(volume.shape, spacing, np.minimum(a, b) - radius, np.maximum(a, b) + radius)
    hit = (_capsule_distance(zyx, a, b) <= radius) & (labels[box] == ARTERY)
    volume[box][hit], labels[box][hit] = hu, EMBOLUS


def _paint_node(volume, labels, spacing, node) -> None:
    radius, hu, idx = node
    c = np.asarray(idx) * spacing
    box, zyx = _box(volume.shape, spacing, c - radius, c + radius)
    d2 = (zyx[0] - c[0]) ** 2 + (zyx[1] - c[1]) ** 2 + (zyx[2] - c[2]) ** 2
    hit = (d2 <= radius * radius) & ~np.isin(labels[box], (ARTERY, VEIN, EMBOLUS))
    volume[box][hit], labels[box][hit] = hu, LYMPH_NODE


def render_pe_scan(config: PeConfig, params: PeScanParams) -> tuple[np.ndarray, np.ndarray]:
    """(int16 HU volume, uint8 labels), both (z, y, x); deterministic given params."""
    body = render_phantom(_body_config(config), params.body)
    volume, labels = body.volume.astype(np.float32), body.labels.copy()
    spacing = np.asarray(config.spacing_mm, float)
    for kind, hu, label in (("vein", params.vein_hu, VEIN), ("artery", params.artery_hu, ARTERY)):
        for tube in params.tubes:
            if tube.kind == kind:
                _paint_tube(volume, labels, spacing, tube, hu, label)
    for embolus in params.emboli:
        _paint_embolus(volume, labels, spacing, params.tubes[embolus[0]], embolus)
    for node in params.nodes:
        _paint_node(volume, labels, spacing, node)
    if config.noise_sd_hu > 0:
        noise = np.random.default_rng(params.noise_seed).standard_normal(volume.shape, dtype=np.float32)
        volume += noise * np.float32(config.noise_sd_hu)
    return np.clip(np.rint(volume), -1024, 3071).astype(np.int16), labels


# --- candidates ------------------------------------------------------------------------------------

def _direction_xyz(tube: Tube) -> tuple[float, float, float]:
    """World (x, y, z) unit direction: mm (z, y, x) reversed, identity direction matrix."""
    return tuple(round(float(v), 4) for v in tube.direction_zyx[::-1])


def _cube_inside(idx, shape, cube=64) -> bool:
    return all(i - cube // 2 >= 0 and i + cube // 2 <= n for i, n in zip(idx, shape))


def _candidates(case_id, config, params: PeScanParams, image, rng) -> tuple[PeCandidate, ...]:
    """The scan's rows of pe_candidates.csv, shuffled so the order tells nothing of the class."""
    tubes, out = params.tubes, []

    def add(kind, idx, tube, hu, length=0.0, radius=0.0):
        out.append(PeCandidate(
            case_id=case_id, kind=kind, label=int(kind == "embolus"), index_zyx=tuple(idx),
            coord_xyz_mm=world_xyz(image, idx),
            direction_xyz=None if tube is None else _direction_xyz(tube),
            hu=round(hu, 2), length_mm=round(length, 3), radius_mm=round(radius, 3),
            cube_inside=_cube_inside(idx, config.shape)))

    for i, length, radius, hu, idx in params.emboli:
        add("embolus", idx, tubes[i], hu, length, radius)
    for kind, i, idx in params.false_candidates:
        add(kind, idx, tubes[i], params.vein_hu if kind == "vein" else params.artery_hu,
            radius=tubes[i].radius_mm)
    for radius, hu, idx in params.nodes:
        add("lymph_node", idx, None, hu, 2 * radius, radius)
    return tuple(out[j] for j in rng.permutation(len(out)))


# --- cohort, files, manifest ----------------------------------------------------------------------

def _cohort(n_scans: int, seed: int, rng: np.random.Generator) -> tuple[list[str], list[str], dict[str, int]]:
    """(case ids, patient id per case, fold per patient): about 2 scans in 3 from distinct
    patients, the rest repeat scans; folds 1..3 dealt over shuffled patients."""
    n_patients = max(1, min(n_scans, round(n_scans * 2 / 3)))
    patients = [f"pe{seed}-p{j:02d}" for j in range(n_patients)]
    owner = list(range(n_patients)) + rng.integers(0, n_patients, max(n_scans - n_patients, 0)).tolist()
    owner = owner[:n_scans]
    folds = {patients[j]: 1 + k % N_FOLDS for k, j in enumerate(rng.permutation(n_patients).tolist())}
    cases = [f"pe{seed}-c{i:03d}" for i in range(n_scans)]
    return cases, [patients[o] for o in owner], folds


def _fmt(value: float) -> str:
    return repr(round(float(value), 4))


def _write_tables(out_dir: Path, scans: list[PeScanRecord]) -> None:
    rows = [",".join(PE_CANDIDATES_HEADER)]
    for s in scans:
        for c in s.candidates:
            d = ["", "", ""] if c.direction_xyz is None else [_fmt(v) for v in c.direction_xyz]
            rows.append(",".join([c.case_id, s.patient_id, *map(_fmt, c.coord_xyz_mm), str(c.label), *d]))
    (out_dir / "pe_candidates.csv").write_text("\n".join(rows) + "\n", encoding="ascii")
    folds = sorted({s.patient_id: s.fold for s in scans}.items())
    (out_dir / "pe_folds.csv").write_text(
        "\n".join([",".join(PE_FOLDS_HEADER)] + [f"{p},{k}" for p, k in folds]) + "\n", encoding="ascii")


def _write_manifest(out_dir: Path, scans, request: dict) -> None:
    body = {"kind": MANIFEST_KIND, "version": MANIFEST_VERSION, "request": request,
            "scans": [dataclasses.asdict(s) for s in scans]}
    write_manifest(out_dir, body)


def _scan_from_dict(d: dict) -> PeScanRecord:
    def cand(c):
        return PeCandidate(**{**c, "index_zyx": tuple(c["index_zyx"]), "coord_xyz_mm": tuple(c["coord_xyz_mm"]),
                              "direction_xyz": None if c["direction_xyz"] is None else tuple(c["direction_xyz"])})
    return PeScanRecord(**{**d, "shape_zyx": tuple(d["shape_zyx"]), "spacing_zyx_mm": tuple(d["spacing_zyx_mm"]),
                           "origin_xyz_mm": tuple(d["origin_xyz_mm"]),
                           "candidates": tuple(cand(c) for c in d["candidates"])})


def read_pe_manifest(out_dir) -> PeSampleSummary | None:
    """The summary of a finished PE sample in out_dir, or None if there is none."""
    body = read_manifest_body(out_dir, MANIFEST_KIND, MANIFEST_VERSION)
    if body is None:
        return None
    return PeSampleSummary(out_dir=Path(out_dir), scans=tuple(_scan_from_dict(d) for d in body["scans"]),
                           request=body["request"], reused=True)


def _check_target(out_dir: Path, request: dict, overwrite: bool) -> PeSampleSummary | None:
    """The existing sample to reuse, None to build; raises if out_dir holds something else."""
    return existing_sample(out_dir, request, overwrite, read_pe_manifest, "PE-CAD")


def _write_scan(build: Path, config: PeConfig, case_id: str, patient_id: str, fold: int,
                seq: np.random.SeedSequence) -> PeScanRecord:
    rng = np.random.default_rng(seq)
    origin = phantom_origin_xyz(config.shape, config.spacing_mm, rng)
    params = draw_pe_scan(config, rng)
    volume, _ = render_pe_scan(config, params)
    image = write_scan(volume, build / f"{case_id}.mhd", config.spacing_mm, origin)
    return PeScanRecord(case_id=case_id, patient_id=patient_id, fold=fold, shape_zyx=tuple(config.shape),
                        spacing_zyx_mm=tuple(float(s) for s in config.spacing_mm), origin_xyz_mm=origin,
                        artery_hu=round(params.artery_hu, 2), vein_hu=round(params.vein_hu, 2),
                        candidates=_candidates(case_id, config, params, image, rng))


def write_pe_sample(out_dir, *, n_scans: int = 6, seed: int = 0, small: bool = False,
                    overwrite: bool = False) -> PeSampleSummary:
    """Write n_scans procedural CTPA scans to out_dir in the PE-CAD layout.

    Built in a hidden sibling folder and renamed into place, so a reader never sees half a
    sample; the same arguments give byte-identical files, and a rerun reuses a finished sample.
    """
    for name, value in (("n_scans", n_scans), ("seed", seed)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name}={value!r}: must be an int >= 0")
    out_dir = Path(out_dir)
    config = small_pe_config() if small else default_pe_config()
    request = {"dataset": "pe", "n_scans": n_scans, "seed": seed, "small": bool(small),
               "config": config.to_dict()}
    existing = _check_target(out_dir, request, overwrite)
    if existing is not None:
        return existing
    seqs = np.random.SeedSequence(seed).spawn(n_scans + 1)
    cases, patients, folds = _cohort(n_scans, seed, np.random.default_rng(seqs[0]))
    build = prepare_build_dir(out_dir)
    scans = [_write_scan(build, config, c, p, folds[p], s) for c, p, s in zip(cases, patients, seqs[1:])]
    _write_tables(build, scans)
    _write_manifest(build, scans, request)
    publish(build, out_dir)
    return PeSampleSummary(out_dir=out_dir, scans=tuple(scans), request=request)
