"""Procedural abdominal CT in the LiTS 2017 layout: `volume-K.nii` + `segmentation-K.nii`.

The liver segmentation task (LCS) needs a liver that cannot be found by thresholding: here the
liver (~60 HU) shares its intensity range with spleen, muscle, inferior vena cava, bowel wall and
kidney medulla, so a model has to learn shape and context, as on real LiTS scans. Labels follow
LiTS: 0 background, 1 liver, 2 tumour (the task's target is liver including tumour).

Geometry is analytic in millimetres around the volume centre (x to the patient's left, y to the
back, z to the head, i.e. an LPS array), so the default and the small preset show the same anatomy
at different resolutions. Every random choice is drawn first (`draw_lits`) and rendered apart
(`render_lits`), so a scan depends only on (seed, index). Files are written with the RAS-style
direction diag(-1, -1, 1) that real LiTS NIfTI files carry, so readers must reorient to LPS.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .luna16_layout import prepare_build_dir, publish
from .phantom import smooth_noise
from .target import existing_sample, read_manifest_body, write_manifest

__all__ = ["LitsConfig", "LitsParams", "LitsTumourRecord", "LitsScanRecord", "LitsSampleSummary",
           "default_lits_config", "small_lits_config", "SMALL_INPLANE", "TINY_INPLANE", "draw_lits", "render_lits",
           "write_lits_sample", "read_lits_manifest", "BACKGROUND", "LIVER", "TUMOUR"]

BACKGROUND, LIVER, TUMOUR = 0, 1, 2
MANIFEST_KIND = "genesis-sample-data/lits"
MANIFEST_VERSION = 1
RAS_DIRECTION = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
HU_MIN, HU_MAX = -1024, 3071


@dataclass(frozen=True, kw_only=True)
class LitsConfig:
    """Size and content of one procedural abdominal CT."""

    shape: tuple[int, int, int] = (96, 192, 192)
    """Voxels (z, y, x)."""
    spacing_mm: tuple[float, float, float] = (2.5, 1.7, 1.7)
    """Voxel size (z, y, x). In-plane coarser than real LiTS (0.6-1.0 mm) so that the whole
    abdomen (326 mm field of view) fits 192 voxels and a scan renders in about a second."""
    tumours_per_scan: tuple[int, int] = (0, 3)
    """Inclusive range of the number of hypodense tumours."""
    tumour_radius_mm: tuple[float, float] = (6.0, 22.0)
    noise_sd_hu: tuple[float, float] = (10.0, 18.0)
    """Range of the white noise standard deviation drawn per scan."""

    def __post_init__(self) -> None:
        for name, value, length, kind in (("shape", self.shape, 3, int), ("spacing_mm", self.spacing_mm, 3, (int, float)),
                                          ("tumours_per_scan", self.tumours_per_scan, 2, int),
                                          ("tumour_radius_mm", self.tumour_radius_mm, 2, (int, float)),
                                          ("noise_sd_hu", self.noise_sd_hu, 2, (int, float))):
            if (not isinstance(value, tuple) or len(value) != length
                    or not all(isinstance(v, kind) and not isinstance(v, bool) for v in value)):
                raise ValueError(f"LitsConfig.{name}={value!r}: must be a tuple of {length} numbers")
        if self.shape[0] < 16 or min(self.shape[1:]) < 32:
            raise ValueError(f"LitsConfig.shape={self.shape}: need at least 16 slices of 32x32")
        if min(self.spacing_mm) <= 0:
            raise ValueError(f"LitsConfig.spacing_mm={self.spacing_mm}: must be > 0")
        lo, hi = self.tumours_per_scan
        if lo < 0 or hi < lo:
            raise ValueError(f"LitsConfig.tumours_per_scan={self.tumours_per_scan}: need 0 <= low <= high")
        if not 0 < self.tumour_radius_mm[0] <= self.tumour_radius_mm[1]:
            raise ValueError(f"LitsConfig.tumour_radius_mm={self.tumour_radius_mm}: need 0 < low <= high")
        if not 0 <= self.noise_sd_hu[0] <= self.noise_sd_hu[1]:
            raise ValueError(f"LitsConfig.noise_sd_hu={self.noise_sd_hu}: need 0 <= low <= high")

    def to_dict(self) -> dict:
        return {k: list(v) for k, v in dataclasses.asdict(self).items()}


def default_lits_config() -> LitsConfig:
    """96 x 192 x 192 at 2.5 x 1.7 x 1.7 mm (7 MB per volume)."""
    return LitsConfig()


SMALL_INPLANE = 96
"""The small preset's in-plane voxels (3.4 mm over the 326 mm field of view)."""
TINY_INPLANE = 64
"""In-plane voxels for a fine-tuning at the tiny preset (`write_lits_sample(inplane=TINY_INPLANE)`, the demo's
setting): LCS halves a scan in-plane (32 x 32 on its task grid), and the tiny preset trains on the central
16x32x32 of each stored 32x64x64 cube, so each training input shows the whole slice (body wall, air, the
padding outside the reconstruction circle), as every window of the whole-volume evaluation does. With 96
(48 x 48 on the task grid) every cube is the same padded slice and its centre crop never shows the outer 8
voxels nor any in-plane shift, while the evaluation's windows are shifted by 8 voxels: a fine-tuning learns
one in-plane view and predicts liver in the wrong place (foreground Dice 0.06-0.25 from the demo's pretrained
model); with 64, 0.79-0.86 from both inits at label fractions 0.5 and 1.0."""


def small_lits_config(inplane: int = SMALL_INPLANE) -> LitsConfig:
    """48 x 96 x 96 at 5 x 3.4 x 3.4 mm: the same anatomy, still >= one 32x64x64 LCS cube. `inplane` voxels
    other than 96 keep the field of view (the spacing scales), so the anatomy is the same at another
    resolution (see TINY_INPLANE)."""
    if not isinstance(inplane, int) or isinstance(inplane, bool) or inplane < 32:
        raise ValueError(f"inplane={inplane!r}: must be an int >= 32")
    spacing = round(3.4 * SMALL_INPLANE / inplane, 4)
    return LitsConfig(shape=(48, inplane, inplane), spacing_mm=(5.0, spacing, spacing), tumour_radius_mm=(9.0, 22.0))


# --- the draw ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Ellipsoid:
    centre_mm: tuple[float, float, float]
    """(z, y, x) in mm from the volume centre."""
    half_mm: tuple[float, float, float]


@dataclass(frozen=True)
class LitsParams:
    """Every random choice of one scan; `render_lits` applies them."""

    body_scale: float
    fat_fraction: float
    liver_lobes: tuple[Ellipsoid, ...]
    spleen: Ellipsoid
    stomach: Ellipsoid
    gallbladder: Ellipsoid
    kidneys: tuple[Ellipsoid, Ellipsoid]
    liver_hu: float
    spleen_hu: float
    tumour_hu: tuple[float, ...]
    tumour_radius_mm: tuple[float, ...]
    aorta_hu: float
    kidney_cortex_hu: float
    noise_sd_hu: float
    rib_phase_mm: float
    field_seed: int
    """Seeds the smooth fields (liver deformation, textures, bowel, noise) and tumour placement."""
    origin_xyz_mm: tuple[float, float, float]


def _jitter(rng, centre, half, shift_mm: float, scale: tuple[float, float]) -> Ellipsoid:
    c = tuple(round(float(v + rng.uniform(-shift_mm, shift_mm)), 3) for v in centre)
    h = tuple(round(float(v * rng.uniform(*scale)), 3) for v in half)
    return Ellipsoid(c, h)


def draw_lits(config: LitsConfig, rng: np.random.Generator) -> LitsParams:
    """Draw one scan: organ placement and size, intensities (with or without contrast), tumours."""
    s = float(rng.uniform(0.92, 1.05))
    lobes = (_jitter(rng, (40, 0, -72), (75, 80, 62), 8, (0.85, 1.15)),     # right lobe
             _jitter(rng, (55, -48, 5), (38, 32, 52), 8, (0.75, 1.2)),      # left lobe
             _jitter(rng, (35, 22, -22), (28, 20, 18), 4, (0.8, 1.2)))      # caudate
    contrast = bool(rng.random() < 0.5)
    liver_hu = float(rng.uniform(55, 70)) + (40.0 if contrast else 0.0)
    n_tumours = int(rng.integers(config.tumours_per_scan[0], config.tumours_per_scan[1] + 1))
    sd = sorted(rng.uniform(*config.tumour_radius_mm, size=n_tumours).tolist(), reverse=True)
    fov_yx = np.asarray(config.shape[1:]) * np.asarray(config.spacing_mm[1:])
    return LitsParams(
        body_scale=round(s, 4), fat_fraction=round(float(rng.uniform(0.05, 0.13)), 4), liver_lobes=lobes,
        spleen=_jitter(rng, (35, 35, 95), (50, 55, 28), 8, (0.8, 1.15)),
        stomach=_jitter(rng, (45, -35, 55), (50, 38, 45), 8, (0.85, 1.15)),
        gallbladder=_jitter(rng, (-15, -40, -45), (32, 17, 15), 5, (0.8, 1.2)),
        kidneys=(_jitter(rng, (-55, 45, -65), (52, 30, 27), 6, (0.9, 1.1)),
                 _jitter(rng, (-40, 45, 65), (52, 30, 27), 6, (0.9, 1.1))),
        liver_hu=round(liver_hu, 2),
        spleen_hu=round(liver_hu + float(rng.uniform(-12, 8)), 2),
        tumour_hu=tuple(round(float(rng.uniform(20, 35)) + (25.0 if contrast else 0.0), 2) for _ in range(n_tumours)),
        tumour_radius_mm=tuple(round(r, 3) for r in sd),
        aorta_hu=round(float(rng.uniform(150, 250) if contrast else rng.uniform(35, 50)), 2),
        kidney_cortex_hu=round(float(rng.uniform(140, 190) if contrast else rng.uniform(30, 40)), 2),
        noise_sd_hu=round(float(rng.uniform(*config.noise_sd_hu)), 3),
        rib_phase_mm=round(float(rng.uniform(0, 30)), 3),
        field_seed=int(rng.integers(0, 2**31 - 1)),
        origin_xyz_mm=(round(float(-fov_yx[1] / 2 + rng.uniform(-10, 10)), 2),
                       round(float(-fov_yx[0] / 2 + rng.uniform(-10, 10)), 2),
                       round(float(rng.uniform(-700.0, -400.0)), 2)))


# --- rendering -----------------------------------------------------------------------------------

class _Grid:
    """Broadcastable mm coordinates (z, y, x) from the volume centre, and smooth random fields."""

    def __init__(self, config: LitsConfig, rng: np.random.Generator):
        self.config, self.rng = config, rng
        self.shape = config.shape
        self.spacing = np.asarray(config.spacing_mm, dtype=np.float32)
        axes = [((np.arange(n, dtype=np.float32) - (n - 1) / 2) * sp) for n, sp in zip(self.shape, self.spacing)]
        self.z = axes[0].reshape(-1, 1, 1)
        self.y = axes[1].reshape(1, -1, 1)
        self.x = axes[2].reshape(1, 1, -1)

    def field(self, cell_mm: float) -> np.ndarray:
        """A smooth unit field with features about cell_mm wide (same draw order every run)."""
        cell = tuple(max(1, int(round(cell_mm / sp))) for sp in self.spacing)
        return smooth_noise(self.shape, cell, self.rng)

    def ellipsoid_r(self, e: Ellipsoid, dz=0.0, dy=0.0, dx=0.0) -> np.ndarray:
        """Normalised radius (< 1 inside) of an ellipsoid, optionally at displaced coordinates."""
        (cz, cy, cx), (hz, hy, hx) = e.centre_mm, e.half_mm
        return np.sqrt(((self.z + dz - cz) / hz) ** 2 + ((self.y + dy - cy) / hy) ** 2
                       + ((self.x + dx - cx) / hx) ** 2)

    def tube(self, cy: float, cx: float, r: float) -> np.ndarray:
        return np.broadcast_to((self.y - cy) ** 2 + (self.x - cx) ** 2 < r * r, self.shape)


def render_lits(config: LitsConfig, params: LitsParams) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
    """(volume int16 HU, labels uint8, voxels per tumour), all (z, y, x) in LPS order.

    Organs are painted back to front; the liver is carved by the organs it touches in reality
    (gallbladder, stomach, great vessels, spine) and painted last, so the label map is exactly
    where liver intensity was written.
    """
    g = _Grid(config, np.random.default_rng(params.field_seed))
    hu = np.full(config.shape, -1000.0, dtype=np.float32)
    body, cavity = _paint_body(g, params, hu)
    _paint_abdomen(g, params, hu, cavity)
    liver = _liver_mask(g, params, cavity)
    tumours = _tumour_masks(g, params, liver)
    hu[liver] = params.liver_hu + 5.0 * g.field(25.0)[liver]
    _paint_hepatic_veins(g, params, hu, liver)
    labels = liver.astype(np.uint8)
    counts = []
    for mask, t_hu in zip(tumours, params.tumour_hu):
        hu[mask] = t_hu + 6.0 * g.field(8.0)[mask]
        labels[mask] = TUMOUR
        counts.append(int(mask.sum()))
    _paint_ribs(g, params, hu, body, cavity)
    return _finish(g, params, hu), labels, tuple(counts)


def _paint_body(g: _Grid, p: LitsParams, hu: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Air, subcutaneous fat, the muscle wall and back muscles; returns (body, cavity) masks."""
    s = p.body_scale
    wobble = 1.0 + 0.03 * g.field(80.0)
    rho = np.sqrt((g.x / (150 * s)) ** 2 + ((g.y - 5) / (110 * s)) ** 2) / wobble
    body = rho < 1.0
    hu[body] = -100.0 + 8.0 * g.field(20.0)[body]
    wall_out, wall_in = 1.0 - p.fat_fraction, 1.0 - p.fat_fraction - 0.07
    muscle = (rho < wall_out) & ((rho >= wall_in) | ((g.y > 55) & (np.abs(g.x) < 75)))
    hu[muscle] = 50.0 + 6.0 * g.field(15.0)[muscle]
    cavity = (rho < wall_in) & ~muscle
    return body, cavity


def _paint_abdomen(g: _Grid, p: LitsParams, hu: np.ndarray, cavity: np.ndarray) -> None:
    """Bowel in mesenteric fat, psoas, spine, great vessels, kidneys, spleen, stomach, gallbladder."""
    bowel = cavity & (g.field(22.0) > 0.2)
    hu[bowel] = 35.0 + 8.0 * g.field(10.0)[bowel]
    gas = bowel & (g.field(12.0) > 1.4)
    hu[gas] = -850.0
    psoas_r = 8 + 16 * np.clip((10 - g.z) / 100, 0, 1)
    for side in (-1, 1):
        psoas = np.broadcast_to((g.y - 50) ** 2 + (g.x - side * 38) ** 2 < psoas_r ** 2, g.shape) & cavity
        hu[psoas] = 48.0
    _paint_spine(g, hu)
    hu[g.tube(22, 18, 12)] = p.aorta_hu
    hu[g.tube(20, -25, 11)] = p.liver_hu - 8.0  # IVC: same range as liver, touching it
    for kidney in p.kidneys:
        r = g.ellipsoid_r(kidney)
        hu[r < 1] = p.kidney_cortex_hu
        hu[r < 0.72] = 32.0  # medulla
        sinus = (r < 0.4) & (np.abs(g.x) < np.abs(kidney.centre_mm[2]))
        hu[sinus] = -60.0
    spleen = g.ellipsoid_r(p.spleen) < 1
    hu[spleen] = p.spleen_hu + 5.0 * g.field(20.0)[spleen]
    _paint_stomach(g, p, hu)
    hu[g.ellipsoid_r(p.gallbladder) < 1] = 10.0


def _paint_spine(g: _Grid, hu: np.ndarray) -> None:
    """Vertebral bodies (cortex, marrow) with discs, the canal and the posterior arch."""
    d_body = np.sqrt((g.y - 60) ** 2 + g.x ** 2)
    disc = np.broadcast_to(np.mod(g.z, 30.0) < 5.0, g.shape)
    vb = np.broadcast_to(d_body < 20, g.shape)
    hu[vb] = 900.0
    hu[np.broadcast_to(d_body < 17.5, g.shape)] = 380.0
    hu[vb & disc] = 85.0
    d_canal = np.sqrt((g.y - 92) ** 2 + g.x ** 2)
    arch = np.broadcast_to((d_canal < 15) | ((g.y > 92) & (g.y < 122) & (np.abs(g.x) < 4)), g.shape) & ~disc
    hu[arch] = 650.0
    hu[np.broadcast_to(d_canal < 9, g.shape)] = 15.0


def _paint_stomach(g: _Grid, p: LitsParams, hu: np.ndarray) -> None:
    """Soft-tissue wall; inside, air rises anteriorly (supine) above fluid."""
    r = g.ellipsoid_r(p.stomach)
    hu[r < 1] = 42.0
    inner = r < 1 - 5.0 / max(p.stomach.half_mm)
    air = inner & np.broadcast_to(g.y < p.stomach.centre_mm[1] - 0.3 * p.stomach.half_mm[1], g.shape)
    hu[inner] = 12.0
    hu[air] = -950.0


def _liver_mask(g: _Grid, p: LitsParams, cavity: np.ndarray) -> np.ndarray:
    """Union of deformed lobes, inside the cavity, carved by the organs it abuts."""
    dz, dy, dx = (12.0 * g.field(70.0) for _ in range(3))
    r = np.minimum.reduce([g.ellipsoid_r(lobe, dz, dy, dx) for lobe in p.liver_lobes])
    carve = ((g.ellipsoid_r(p.gallbladder) < 1) | (g.ellipsoid_r(p.stomach) < 1)
             | (g.ellipsoid_r(p.kidneys[0]) < 1.1) | g.tube(22, 18, 14) | g.tube(20, -25, 11.5)
             | np.broadcast_to((g.y - 60) ** 2 + g.x ** 2 < 24 ** 2, g.shape))
    return (r < 1.0) & cavity & ~carve


def _tumour_masks(g: _Grid, p: LitsParams, liver: np.ndarray) -> list[np.ndarray]:
    """Deformed spheres wholly inside the liver and apart from each other (so each is one
    component and its voxel count is its own). A tumour that fits nowhere is dropped."""
    depth = _inside_distance_mm(liver, g.spacing)
    warp = g.field(10.0)
    masks, placed = [], []
    for radius in p.tumour_radius_mm:
        ok = depth > radius * 1.25 + 2.0
        for c, r in placed:
            ok &= (g.z - c[0]) ** 2 + (g.y - c[1]) ** 2 + (g.x - c[2]) ** 2 > (r + radius + 6.0) ** 2
        where = np.flatnonzero(ok)
        if where.size == 0:
            masks.append(np.zeros(g.shape, dtype=bool))
            continue
        idx = np.unravel_index(where[g.rng.integers(where.size)], g.shape)
        centre = (float(g.z[idx[0], 0, 0]), float(g.y[0, idx[1], 0]), float(g.x[0, 0, idx[2]]))
        half = tuple(radius * float(f) for f in g.rng.uniform(0.85, 1.15, 3))
        rr = g.ellipsoid_r(Ellipsoid(centre, half)) + 0.12 * warp
        masks.append((rr < 1.0) & liver)
        placed.append((centre, radius * 1.2))
    return masks


def _inside_distance_mm(mask: np.ndarray, spacing_zyx) -> np.ndarray:
    image = sitk.GetImageFromArray(mask.astype(np.uint8))
    image.SetSpacing(tuple(float(s) for s in reversed(tuple(spacing_zyx))))
    dist = sitk.SignedMaurerDistanceMap(image, insideIsPositive=True, squaredDistance=False, useImageSpacing=True)
    return sitk.GetArrayFromImage(dist)


def _paint_hepatic_veins(g: _Grid, p: LitsParams, hu: np.ndarray, liver: np.ndarray) -> None:
    """Three hypodense veins from the IVC into the liver (labelled liver, as in LiTS)."""
    start = np.array([55.0, 20.0, -25.0])
    for angle in g.rng.uniform(np.pi * 0.55, np.pi * 1.35, 3):
        end = start + np.array([g.rng.uniform(-10, 25), 90 * np.sin(angle), 90 * np.cos(angle)])
        d = end - start
        t = np.clip(((g.z - start[0]) * d[0] + (g.y - start[1]) * d[1] + (g.x - start[2]) * d[2]) / d.dot(d), 0, 1)
        dist2 = (g.z - start[0] - t * d[0]) ** 2 + (g.y - start[1] - t * d[1]) ** 2 + (g.x - start[2] - t * d[2]) ** 2
        vein = liver & (dist2 < (5.0 - 3.0 * t) ** 2)
        hu[vein] = p.liver_hu - 18.0


def _paint_ribs(g: _Grid, p: LitsParams, hu: np.ndarray, body: np.ndarray, cavity: np.ndarray) -> None:
    """Oblique rib arcs in the muscle wall of the upper abdomen (absent at the midline)."""
    theta = np.degrees(np.arctan2(g.y, g.x))
    oblique = np.mod(g.z + p.rib_phase_mm + 0.35 * np.abs(theta), 30.0) < 9.0
    ribs = oblique & body & ~cavity & (g.z > -40) & (np.abs(g.x) > 45) & (g.y < 45)
    ribs &= hu > 0  # in the muscle wall, not in fat or the back muscles
    hu[ribs] = 700.0


def _finish(g: _Grid, p: LitsParams, hu: np.ndarray) -> np.ndarray:
    """Scanner blur, noise, the -1024 padding outside the reconstruction circle, int16."""
    image = sitk.GetImageFromArray(hu)
    image.SetSpacing(tuple(float(s) for s in reversed(g.spacing.tolist())))
    blurred = sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(image, 0.6 * float(g.spacing[1:].min())))
    noise = g.rng.standard_normal(g.shape, dtype=np.float32) * p.noise_sd_hu + 4.0 * g.field(6.0)
    out = blurred + noise
    half = min(g.y.max(), g.x.max())
    out[np.broadcast_to(g.y ** 2 + g.x ** 2 > half ** 2, g.shape)] = HU_MIN
    return np.clip(np.rint(out), HU_MIN, HU_MAX).astype(np.int16)


# --- records, manifest, writing ------------------------------------------------------------------

@dataclass(frozen=True)
class LitsTumourRecord:
    voxels: int
    hu: float
    radius_mm: float


@dataclass(frozen=True)
class LitsScanRecord:
    index: int
    volume_file: str
    segmentation_file: str
    shape_zyx: tuple[int, int, int]
    spacing_zyx_mm: tuple[float, float, float]
    origin_xyz_mm: tuple[float, float, float]
    """Origin of the file as written (its RAS-style direction puts it at the right-anterior corner)."""
    direction: tuple[float, ...]
    liver_voxels: int
    """Voxels labelled 1 (liver parenchyma, tumours excluded)."""
    target_voxels: int
    """Voxels labelled > 0: the LCS target, liver including tumour."""
    liver_hu: float
    contrast: bool
    tumours: tuple[LitsTumourRecord, ...]

    @property
    def tumour_voxels(self) -> int:
        return sum(t.voxels for t in self.tumours)


@dataclass(frozen=True)
class LitsSampleSummary:
    out_dir: Path
    scans: tuple[LitsScanRecord, ...]
    request: dict
    reused: bool = False
    """True when out_dir already held this exact sample and nothing was written."""

    def volume_path(self, index: int) -> Path:
        return self.out_dir / f"volume-{index}.nii"

    def segmentation_path(self, index: int) -> Path:
        return self.out_dir / f"segmentation-{index}.nii"

    def describe(self) -> str:
        """A few lines for a command line to print."""
        n_t = sum(len(s.tumours) for s in self.scans)
        lines = [f"{'reused' if self.reused else 'wrote'} {len(self.scans)} abdominal CTs in LiTS 2017 layout "
                 f"under {self.out_dir} (volume-K.nii + segmentation-K.nii; 1 liver, 2 tumour), {n_t} tumours"]
        for s in self.scans:
            lines.append(f"  volume-{s.index}: {'x'.join(map(str, s.shape_zyx))} voxels, liver {s.target_voxels} "
                         f"voxels incl. {len(s.tumours)} tumours ({s.tumour_voxels} voxels), liver "
                         f"{s.liver_hu:.0f} HU{' (contrast)' if s.contrast else ''}")
        return "\n".join(lines)


def _write_nifti(array: np.ndarray, path: Path, spacing_zyx, origin_xyz) -> sitk.Image:
    """Write an LPS (z, y, x) array as NIfTI with LiTS's RAS-style direction (axes x, y flipped)."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    image.SetSpacing(tuple(float(s) for s in reversed(tuple(spacing_zyx))))
    image.SetOrigin(tuple(float(o) for o in origin_xyz))
    flipped = sitk.DICOMOrient(image, "RAS")
    sitk.WriteImage(flipped, str(path), useCompression=False)
    return flipped


def _write_scan(build: Path, config: LitsConfig, index: int, seq: np.random.SeedSequence) -> LitsScanRecord:
    params = draw_lits(config, np.random.default_rng(seq))
    volume, labels, tumour_voxels = render_lits(config, params)
    written = _write_nifti(volume, build / f"volume-{index}.nii", config.spacing_mm, params.origin_xyz_mm)
    _write_nifti(labels, build / f"segmentation-{index}.nii", config.spacing_mm, params.origin_xyz_mm)
    tumours = tuple(LitsTumourRecord(v, h, r) for v, h, r in
                    zip(tumour_voxels, params.tumour_hu, params.tumour_radius_mm) if v > 0)
    return LitsScanRecord(
        index=index, volume_file=f"volume-{index}.nii", segmentation_file=f"segmentation-{index}.nii",
        shape_zyx=tuple(config.shape), spacing_zyx_mm=tuple(float(s) for s in config.spacing_mm),
        origin_xyz_mm=tuple(round(float(o), 4) for o in written.GetOrigin()),
        direction=tuple(float(d) for d in written.GetDirection()),
        liver_voxels=int((labels == LIVER).sum()), target_voxels=int((labels > 0).sum()),
        liver_hu=params.liver_hu, contrast=params.aorta_hu > 100, tumours=tumours)


def _write_manifest(out_dir: Path, scans, request: dict) -> None:
    body = {"kind": MANIFEST_KIND, "version": MANIFEST_VERSION, "request": request,
            "scans": [dataclasses.asdict(s) for s in scans]}
    write_manifest(out_dir, body)


def read_lits_manifest(out_dir) -> LitsSampleSummary | None:
    """The summary of a finished LiTS sample in out_dir, or None if there is none."""
    body = read_manifest_body(out_dir, MANIFEST_KIND, MANIFEST_VERSION)
    if body is None:
        return None
    scans = tuple(LitsScanRecord(**{**d, "shape_zyx": tuple(d["shape_zyx"]),
                                    "spacing_zyx_mm": tuple(d["spacing_zyx_mm"]),
                                    "origin_xyz_mm": tuple(d["origin_xyz_mm"]), "direction": tuple(d["direction"]),
                                    "tumours": tuple(LitsTumourRecord(**t) for t in d["tumours"])})
                  for d in body["scans"])
    return LitsSampleSummary(out_dir=Path(out_dir), scans=scans, request=body["request"], reused=True)


def _check_target(out_dir: Path, request: dict, overwrite: bool) -> LitsSampleSummary | None:
    """The existing sample to reuse, None to build; raises if out_dir holds something else."""
    return existing_sample(out_dir, request, overwrite, read_lits_manifest, "LiTS")


def write_lits_sample(out_dir, *, n_scans: int = 6, seed: int = 0, small: bool = False,
                      overwrite: bool = False, inplane: int | None = None) -> LitsSampleSummary:
    """Write n_scans procedural abdominal CTs with liver/tumour labels to out_dir (LiTS 2017 layout).

    Built in a hidden sibling folder and renamed into place, so a reader never sees half a
    sample; the same arguments give byte-identical files and a rerun reuses a finished sample.
    Scan K depends only on (seed, K). `inplane` (small only; None: 96) sets the small preset's in-plane
    voxels over the same field of view: the demo passes TINY_INPLANE so that LCS is learnable at the
    tiny preset. Organ placement, intensities and tumour sizes are drawn alike at any `inplane`; the smooth
    fields (liver deformation, textures, noise) are drawn on the grid, so shapes differ in detail.
    """
    for name, value in (("n_scans", n_scans), ("seed", seed)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name}={value!r}: must be an int >= 0")
    out_dir = Path(out_dir)
    if inplane is not None and not small:
        raise ValueError("inplane applies to the small preset only (small=True)")
    config = small_lits_config(inplane if inplane is not None else SMALL_INPLANE) if small else default_lits_config()
    request = {"dataset": "lits", "n_scans": n_scans, "seed": seed, "small": bool(small), "config": config.to_dict()}
    existing = _check_target(out_dir, request, overwrite)
    if existing is not None:
        return existing
    build = prepare_build_dir(out_dir)
    scans = [_write_scan(build, config, k, seq) for k, seq in enumerate(np.random.SeedSequence(seed).spawn(n_scans))]
    _write_manifest(build, scans, request)
    publish(build, out_dir)
    return LitsSampleSummary(out_dir=out_dir, scans=tuple(scans), request=request)
