"""Procedural chest CT phantoms: pure numpy, no I/O.

A phantom is drawn (`draw_phantom(config, rng) -> PhantomParams`: every random choice, nodules
and false candidates included) apart from being rendered (`render_phantom(config, params)`:
deterministic given the params). Volumes are int16 Hounsfield units in (z, y, x) order with the
patient in LPS orientation: x grows to the patient's left, y to the back, z to the head (index 0
is the lung base), as in a LUNA16 scan with identity direction.

Anatomy is analytic (ellipses, superellipses, capsules), so rendering is a handful of broadcast
array operations plus small per-segment boxes, never a loop over voxels.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

# Label values of `Phantom.labels`.
AIR, FAT, SOFT_TISSUE, LUNG, VESSEL, BONE, NODULE = range(7)
LABEL_NAMES = ("air", "fat", "soft_tissue", "lung", "vessel", "bone", "nodule")

HU_AIR = -1000.0
HU_FAT = -100.0
HU_SOFT_TISSUE = 40.0
HU_LUNG = -850.0
HU_VESSEL = 40.0
HU_MARROW = 450.0
HU_CORTEX = 900.0
HU_RIB = 700.0
HU_NODULE = 30.0
HU_MIN, HU_MAX = -1024, 3071  # the range a 12-bit CT scanner stores

# Geometry as fractions of the field of view, chosen so that the default volume behaves like a
# LUNA16 scan for Models Genesis sampling (lungs fill the region left after the 100-voxel
# in-plane border is excluded).
_BODY_HALF_X, _BODY_HALF_Y, _BODY_SHIFT_Y = 0.88, 0.62, 0.05   # of the half field of view
_FAT_INNER = 0.93          # body radius where subcutaneous fat begins
_RIB_BAND = (0.84, 0.895)  # body radius of the rib ring
_CHEST_CAVITY = 0.82       # lungs stay inside this body radius
_LUNG_CENTER_X, _LUNG_HALF_X, _LUNG_HALF_Y = 0.46, 0.34, 0.78  # of the body half axes
_LUNG_EXPONENT = 3.0       # superellipse: rounder than a box, fuller than an ellipse
_LUNG_Z = (0.05, 0.97)     # lung base and apex, fraction of the slices
_SPINE_Y, _SPINE_RADIUS = 0.72, 0.12  # of the body half axis y


@dataclass(frozen=True, kw_only=True)
class PhantomConfig:
    """Size and content of one procedural chest CT."""

    shape: tuple[int, int, int] = (112, 384, 384)
    """Voxels (z, y, x). The default passes Models Genesis sampling: >= 96 slices, and lungs
    inside the region left after excluding 100 in-plane border voxels and 30 end slices."""
    spacing_mm: tuple[float, float, float] = (2.5, 0.7, 0.7)
    """Voxel size (z, y, x) in mm, like a typical LUNA16 scan."""
    nodules_per_scan: tuple[int, int] = (1, 3)
    """Inclusive range of the number of nodules drawn per scan."""
    nodule_diameter_mm: tuple[float, float] = (5.0, 20.0)
    """Range of nodule diameters (LUNA16 annotates nodules >= 3 mm)."""
    false_candidates_per_scan: int = 6
    """Class-0 candidates per scan: half on vessel cross-sections, half on pleura-attached soft-tissue
    blobs (what a nodule detector's false positives mostly are), so NCC is not trivial."""
    noise_sd_hu: float = 20.0
    """Standard deviation of the white Gaussian noise added everywhere."""
    lung_texture_sd_hu: float = 20.0
    """Amplitude of the smooth parenchyma texture added to the lungs."""
    vessel_trees_per_lung: int = 5
    vessel_generations: int = 5
    """Levels of binary branching per vessel tree (1 = a single segment)."""
    vessel_radius_mm: float = 4.0
    """Radius of a tree's root segment; each generation is 0.72 times thinner."""

    def __post_init__(self) -> None:
        _check_tuple("shape", self.shape, 3, int)
        if self.shape[0] < 8 or min(self.shape[1:]) < 32:
            raise ValueError(f"PhantomConfig.shape={self.shape}: need at least 8 slices and 32x32 "
                             "in-plane voxels")
        _check_tuple("spacing_mm", self.spacing_mm, 3, (int, float))
        if min(self.spacing_mm) <= 0:
            raise ValueError(f"PhantomConfig.spacing_mm={self.spacing_mm}: must be > 0")
        _check_tuple("nodules_per_scan", self.nodules_per_scan, 2, int)
        lo, hi = self.nodules_per_scan
        if not 0 <= lo <= hi:
            raise ValueError(f"PhantomConfig.nodules_per_scan={self.nodules_per_scan}: need "
                             "0 <= low <= high")
        _check_tuple("nodule_diameter_mm", self.nodule_diameter_mm, 2, (int, float))
        dlo, dhi = self.nodule_diameter_mm
        if not 0 < dlo <= dhi:
            raise ValueError(f"PhantomConfig.nodule_diameter_mm={self.nodule_diameter_mm}: need "
                             "0 < low <= high")
        lung_mm = lung_half_widths_mm(self)
        if hi > 0 and dhi / 2 > 0.6 * min(lung_mm):
            raise ValueError(
                f"PhantomConfig.nodule_diameter_mm={self.nodule_diameter_mm}: nodules up to {dhi} mm "
                f"do not fit lungs of half width {min(lung_mm):.1f} mm at shape={self.shape}, "
                f"spacing_mm={self.spacing_mm}; use smaller nodules or a larger shape/spacing")
        for name in ("false_candidates_per_scan", "vessel_trees_per_lung"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"PhantomConfig.{name}={value!r}: must be an int >= 0")
        if not isinstance(self.vessel_generations, int) or not 1 <= self.vessel_generations <= 8:
            raise ValueError(f"PhantomConfig.vessel_generations={self.vessel_generations!r}: "
                             "must be an int in [1, 8]")
        for name in ("noise_sd_hu", "lung_texture_sd_hu"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"PhantomConfig.{name}={value!r}: must be a number >= 0")
        if not isinstance(self.vessel_radius_mm, (int, float)) or not self.vessel_radius_mm > 0:
            raise ValueError(f"PhantomConfig.vessel_radius_mm={self.vessel_radius_mm!r}: must be > 0")

    def to_dict(self) -> dict:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
                for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict) -> PhantomConfig:
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items()})


def _check_tuple(name: str, value, length: int, types) -> None:
    if (not isinstance(value, tuple) or len(value) != length
            or not all(isinstance(v, types) and not isinstance(v, bool) for v in value)):
        raise ValueError(f"PhantomConfig.{name}={value!r}: must be a tuple of {length} "
                         f"{'ints' if types is int else 'numbers'}")


def default_config() -> PhantomConfig:
    """LUNA16-like scans that Models Genesis sampling accepts (about 33 MB each)."""
    return PhantomConfig()


def tiny_config() -> PhantomConfig:
    """A 40 x 64 x 64 scan with coarse voxels, for tests (160 KB)."""
    return PhantomConfig(shape=(40, 64, 64), spacing_mm=(5.0, 2.0, 2.0), nodules_per_scan=(1, 2),
                         nodule_diameter_mm=(8.0, 14.0), vessel_radius_mm=2.0,
                         vessel_generations=3)


def demo_config() -> PhantomConfig:
    """The default scan with 8-10 nodules of 8-20 mm and 20 false candidates: an NCC that the tiny preset's width-4
    classifier learns within the demo's 12 epochs.

    Why: with 4 phantoms the LUNA16 split trains on 2 (plus the two real CTs), validates on 1 and tests on 1. At the
    default 1-3 nodules and 6 false candidates that is about 10 training nodules and a test AUC over 8 cubes (the
    demo scored AUC 52-77). More nodules alone (8-10 of 5-20 mm) still gave AUC 34-94 over fine-tuning seeds: a
    5-8 mm nodule shrinks to 2-5 voxels in the tiny preset's halved 16x32x32 input, a vessel cross-section's size;
    from 8 mm it stays rounder and larger than all but the root vessels. 12-14 nodules per scan score worse (AUC
    63-84): a false candidate's cube then often holds a nodule too. Measured on sample seed 0 (the demo's), 12
    epochs, 3 fine-tuning seeds: test AUC 78-100 on every row (scratch and pretrained, label fractions 0.5 and 1.0);
    sample seed 1's test phantom is harder at label fraction 0.5 (AUC 29-69). Geometry, anatomy and the scan size
    are the default's, so pretraining samples these scans as it does the default ones."""
    return PhantomConfig(nodules_per_scan=(8, 10), nodule_diameter_mm=(8.0, 20.0), false_candidates_per_scan=20)


PRESETS = {"default": default_config, "tiny": tiny_config, "demo": demo_config}


@dataclass(frozen=True)
class Nodule:
    center_zyx: tuple[float, float, float]
    """Centre as a continuous voxel index (z, y, x)."""
    diameter_mm: float


@dataclass(frozen=True)
class VesselSegment:
    start_mm: tuple[float, float, float]
    end_mm: tuple[float, float, float]
    radius_mm: float


@dataclass(frozen=True)
class PhantomParams:
    """Every random choice of one phantom; `render_phantom` applies them."""

    body_wobble: tuple[tuple[float, float], ...]   # (amplitude, phase) of harmonics 2, 3, ...
    lung_wobble: tuple[tuple[tuple[float, float], ...], tuple[tuple[float, float], ...]]
    rib_phase_mm: float
    vessels: tuple[VesselSegment, ...]
    nodules: tuple[Nodule, ...]
    false_candidates_zyx: tuple[tuple[float, float, float], ...]
    noise_seed: int
    pleural_blobs: tuple[Nodule, ...] = ()
    """Soft-tissue blobs attached to the chest wall (false candidates that look like juxtapleural nodules)."""


@dataclass(frozen=True)
class Phantom:
    volume: np.ndarray
    """int16 HU, (z, y, x)."""
    labels: np.ndarray
    """uint8, (z, y, x), values AIR..NODULE (see LABEL_NAMES)."""


# --- geometry ------------------------------------------------------------------------------------

def _half_fov_mm(config: PhantomConfig) -> np.ndarray:
    return np.asarray(config.shape, float) * np.asarray(config.spacing_mm, float) / 2


def lung_half_widths_mm(config: PhantomConfig) -> tuple[float, float]:
    """In-plane half widths (x, y) of each lung at its widest, in mm."""
    _, hy, hx = _half_fov_mm(config)
    return (_LUNG_HALF_X * _BODY_HALF_X * hx, _LUNG_HALF_Y * _BODY_HALF_Y * hy)


def _mm_axes(config: PhantomConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Voxel-centre coordinates (z, y, x) in mm, relative to the volume centre."""
    return tuple((np.arange(n) - (n - 1) / 2) * s for n, s in zip(config.shape, config.spacing_mm))


def _index_to_mm(config: PhantomConfig, zyx) -> np.ndarray:
    zyx = np.asarray(zyx, float)
    return (zyx - (np.asarray(config.shape) - 1) / 2) * np.asarray(config.spacing_mm)


def _mm_to_index(config: PhantomConfig, mm) -> np.ndarray:
    return np.asarray(mm, float) / np.asarray(config.spacing_mm) + (np.asarray(config.shape) - 1) / 2


def _wobble(theta: np.ndarray, harmonics) -> np.ndarray:
    out = np.ones_like(theta)
    for k, (amp, phase) in enumerate(harmonics, start=2):
        out += amp * np.cos(k * theta + phase)
    return out


class _Anatomy:
    """Analytic shapes of one phantom, evaluated on points or broadcast grids (mm)."""

    def __init__(self, config: PhantomConfig, params: PhantomParams):
        hz, hy, hx = _half_fov_mm(config)
        self.config, self.params = config, params
        self.bx, self.by = _BODY_HALF_X * hx, _BODY_HALF_Y * hy
        self.cy = _BODY_SHIFT_Y * hy
        self.lung_cx = (-_LUNG_CENTER_X * self.bx, _LUNG_CENTER_X * self.bx)
        self.lx, self.ly = _LUNG_HALF_X * self.bx, _LUNG_HALF_Y * self.by
        self.z_base, self.z_apex = (-hz + 2 * hz * _LUNG_Z[0], -hz + 2 * hz * _LUNG_Z[1])

    def body_radius(self, y, x):
        """Normalised body radius: < 1 inside the body outline."""
        dy, dx = (y - self.cy) / self.by, x / self.bx
        return np.sqrt(dx * dx + dy * dy) / _wobble(np.arctan2(dy, dx), self.params.body_wobble)

    def lung_profile_cubed(self, z):
        """Cube of the relative lung cross-section size at height z (0 outside the lungs)."""
        t = (z - self.z_base) / (self.z_apex - self.z_base)
        inside = (t >= 0) & (t <= 1)
        tc = np.clip(t, 0, 1)
        # wide at the base, a dome towards the apex; rounded off at the very base
        p = np.sqrt(np.clip(1 - tc ** 3, 0, 1)) * np.sqrt(np.clip(tc / 0.04, 0, 1))
        return np.where(inside, p ** 3, 0.0)

    def lung_inplane(self, side: int, y, x):
        """Superellipse value of lung `side` (0 right, 1 left): < 1 inside at full size."""
        dx, dy = (x - self.lung_cx[side]) / self.lx, (y - self.cy) / self.ly
        s = np.abs(dx) ** _LUNG_EXPONENT + np.abs(dy) ** _LUNG_EXPONENT
        return s / _wobble(np.arctan2(dy, dx), self.params.lung_wobble[side])

    def in_lung(self, z, y, x):
        """Boolean, broadcast over z, y, x (mm)."""
        cavity = self.body_radius(y, x) < _CHEST_CAVITY
        p3 = self.lung_profile_cubed(z)
        either = (self.lung_inplane(0, y, x) < p3) | (self.lung_inplane(1, y, x) < p3)
        return either & cavity


# --- drawing -------------------------------------------------------------------------------------

def draw_phantom(config: PhantomConfig, rng: np.random.Generator) -> PhantomParams:
    """Draw every random choice of one phantom."""
    body_wobble = tuple((float(rng.uniform(0, 0.03)), float(rng.uniform(0, 2 * np.pi)))
                        for _ in range(3))
    lung_wobble = tuple(tuple((float(rng.uniform(0, 0.06)), float(rng.uniform(0, 2 * np.pi)))
                              for _ in range(3)) for _ in range(2))
    provisional = PhantomParams(body_wobble=body_wobble, lung_wobble=lung_wobble, rib_phase_mm=0.0,
                                vessels=(), nodules=(), false_candidates_zyx=(), noise_seed=0)
    anatomy = _Anatomy(config, provisional)
    vessels = _draw_vessels(config, anatomy, rng)
    nodules = _draw_nodules(config, anatomy, rng)
    false_candidates, blobs = _draw_false_candidates(config, anatomy, vessels, nodules, rng)
    return dataclasses.replace(
        provisional, rib_phase_mm=float(rng.uniform(0, 30.0)), vessels=vessels, nodules=nodules,
        false_candidates_zyx=false_candidates, noise_seed=int(rng.integers(0, 2 ** 63)), pleural_blobs=blobs)


def _draw_vessels(config, anatomy: _Anatomy, rng) -> tuple[VesselSegment, ...]:
    segments = []
    z_mid = anatomy.z_base + 0.45 * (anatomy.z_apex - anatomy.z_base)
    length0 = 0.55 * min(anatomy.lx, anatomy.ly, (anatomy.z_apex - anatomy.z_base) / 2)
    for side, sign in ((0, -1.0), (1, 1.0)):
        hilum = np.array([z_mid, anatomy.cy, anatomy.lung_cx[side] - sign * 0.55 * anatomy.lx])
        for _ in range(config.vessel_trees_per_lung):
            # (z, y, x): outwards from the hilum, up, down, forwards or back
            direction = np.array([rng.uniform(-1, 1), rng.uniform(-0.8, 0.8), sign * rng.uniform(0.3, 1)])
            stack = [(hilum, direction, config.vessel_radius_mm, length0, 1)]
            while stack:
                start, direction, radius, length, generation = stack.pop()
                direction = direction / np.linalg.norm(direction)
                end = start + direction * length
                segments.append(VesselSegment(tuple(map(float, start)), tuple(map(float, end)),
                                              float(radius)))
                if generation < config.vessel_generations:
                    for _ in range(2):
                        child = direction + rng.normal(0, 0.55, 3)
                        stack.append((end, child, radius * 0.72, length * 0.8, generation + 1))
    return tuple(segments)


_SPHERE_DIRECTIONS = np.concatenate([
    np.eye(3), -np.eye(3),
    np.array([[a, b, c] for a in (-1, 1) for b in (-1, 1) for c in (-1, 1)]) / np.sqrt(3)])


def _draw_nodules(config, anatomy: _Anatomy, rng) -> tuple[Nodule, ...]:
    count = int(rng.integers(config.nodules_per_scan[0], config.nodules_per_scan[1] + 1))
    placed: list[tuple[np.ndarray, float]] = []
    for _ in range(count):
        diameter = float(rng.uniform(*config.nodule_diameter_mm))
        radius = diameter / 2
        for _attempt in range(500):
            side = int(rng.integers(0, 2))
            centre = np.array([
                rng.uniform(anatomy.z_base, anatomy.z_apex),
                anatomy.cy + rng.uniform(-1, 1) * anatomy.ly,
                anatomy.lung_cx[side] + rng.uniform(-1, 1) * anatomy.lx])
            # whole sphere inside a lung (1 mm margin), apart from the other nodules
            probe = np.vstack([centre, centre + _SPHERE_DIRECTIONS * (radius + 1.0)])
            if not anatomy.in_lung(probe[:, 0], probe[:, 1], probe[:, 2]).all():
                continue
            if any(np.linalg.norm(centre - c) < radius + r + 3.0 for c, r in placed):
                continue
            placed.append((centre, radius))
            break
        else:
            raise RuntimeError(f"could not place a {diameter:.1f} mm nodule in 500 attempts; "
                               f"PhantomConfig.nodule_diameter_mm={config.nodule_diameter_mm} is too "
                               f"large for shape={config.shape}, spacing_mm={config.spacing_mm}")
    return tuple(Nodule(tuple(map(float, _mm_to_index(config, c))), round(2 * r, 3))
                 for c, r in placed)


def _draw_false_candidates(config, anatomy, vessels, nodules, rng):
    """Points on vessel centrelines inside the lungs, and pleura-attached blobs, away from nodules.

    A blob is placed by walking from a random lung point sideways to the chest wall; its centre
    sits inside the lung, half its radius from the wall, so the blob touches the pleura. Returns
    (candidate centres as voxel indices, blobs).
    """
    wanted = config.false_candidates_per_scan
    if wanted == 0:
        return (), ()
    nodule_mm = [(_index_to_mm(config, n.center_zyx), n.diameter_mm / 2) for n in nodules]

    def usable(p, margin=5.0):
        return (bool(anatomy.in_lung(p[0], p[1], p[2]))
                and all(np.linalg.norm(p - c) > r + margin for c, r in nodule_mm))

    found, blobs = [], []
    n_vessel = (wanted + 1) // 2 if vessels else 0
    step = 0.5 * min(config.spacing_mm[1:])
    for _ in range(200 * wanted):
        if len(found) >= wanted:
            break
        if len(found) < n_vessel:
            seg = vessels[int(rng.integers(0, len(vessels)))]
            p = np.asarray(seg.start_mm) + rng.uniform(0, 1) * (np.subtract(seg.end_mm, seg.start_mm))
            if usable(p):
                found.append(tuple(map(float, _mm_to_index(config, p))))
            continue
        side = int(rng.integers(0, 2))
        p = np.array([rng.uniform(anatomy.z_base, anatomy.z_apex), anatomy.cy + rng.uniform(-0.7, 0.7) * anatomy.ly,
                      anatomy.lung_cx[side]])
        if not anatomy.in_lung(*p):
            continue
        outward = np.array([0.0, 0.0, np.sign(anatomy.lung_cx[side]) or 1.0])
        while anatomy.in_lung(*(p + step * outward)):
            p = p + step * outward
        radius = float(rng.uniform(2.5, 5.0))
        centre = p - outward * 0.5 * radius
        if usable(centre, margin=radius + 5.0):
            found.append(tuple(map(float, _mm_to_index(config, centre))))
            blobs.append(Nodule(tuple(map(float, _mm_to_index(config, centre))), round(2 * radius, 3)))
    return tuple(found), tuple(blobs)


# --- rendering -----------------------------------------------------------------------------------

def smooth_noise(shape: tuple[int, ...], cell: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Unit-variance-ish smooth random field: a coarse Gaussian grid, linearly upsampled."""
    out = rng.standard_normal(tuple(n // c + 2 for n, c in zip(shape, cell))).astype(np.float32)
    for axis, (n, c) in enumerate(zip(shape, cell)):
        pos = (np.arange(n) + 0.5) / c
        i0 = np.floor(pos).astype(np.intp)
        w = (pos - i0).astype(np.float32).reshape([n if a == axis else 1 for a in range(len(shape))])
        lo, hi = np.take(out, i0, axis=axis), np.take(out, i0 + 1, axis=axis)
        out = lo + (hi - lo) * w
    return out * np.float32(1.6)  # linear interpolation loses about 0.6 of the variance


def render_phantom(config: PhantomConfig, params: PhantomParams) -> Phantom:
    """Apply `params`: deterministic, vectorised."""
    anatomy = _Anatomy(config, params)
    z, y, x = _mm_axes(config)
    y2, x2 = y[:, None], x[None, :]
    depth = config.shape[0]

    # static in-plane anatomy, one slice broadcast along z
    r = anatomy.body_radius(y2, x2)
    hu2d = np.full(r.shape, HU_AIR, np.float32)
    lab2d = np.zeros(r.shape, np.uint8)
    hu2d[r < 1], lab2d[r < 1] = HU_FAT, FAT
    hu2d[r < _FAT_INNER], lab2d[r < _FAT_INNER] = HU_SOFT_TISSUE, SOFT_TISSUE
    spine_y, spine_r = anatomy.cy + _SPINE_Y * anatomy.by, _SPINE_RADIUS * anatomy.by
    spine_d = np.sqrt(x2 ** 2 + (y2 - spine_y) ** 2)
    hu2d[spine_d < spine_r], lab2d[spine_d < spine_r] = HU_CORTEX, BONE
    hu2d[spine_d < 0.75 * spine_r] = HU_MARROW
    volume = np.broadcast_to(hu2d, (depth, *hu2d.shape)).copy()
    labels = np.broadcast_to(lab2d, (depth, *lab2d.shape)).copy()

    # ribs: a band of the chest wall every 30 mm in z, open at the front (costal cartilage)
    # ribs slope down from back to front, so an axial slice cuts them into arcs
    rib_2d = (r >= _RIB_BAND[0]) & (r < _RIB_BAND[1]) & ((y2 - anatomy.cy) > -0.55 * anatomy.by)
    rib_shift = (np.float32(40.0) * (y2 - anatomy.cy) / anatomy.by).astype(np.float32)
    rib_z = (z.astype(np.float32) - np.float32(params.rib_phase_mm))[:, None, None]
    rib = (np.mod(rib_z - rib_shift[None], np.float32(30.0)) < 9.0) & rib_2d[None]
    volume[rib], labels[rib] = HU_RIB, BONE

    lung = anatomy.in_lung(z[:, None, None], y2[None], x2[None])
    volume[lung], labels[lung] = HU_LUNG, LUNG

    for seg in params.vessels:
        _paint_capsule(config, volume, labels, seg, lung)
    for nodule in params.nodules:
        _paint_sphere(config, volume, labels, nodule)
    for blob in params.pleural_blobs:
        _paint_sphere(config, volume, labels, blob, hu=HU_SOFT_TISSUE, label=SOFT_TISSUE)

    noise_rng = np.random.default_rng(params.noise_seed)
    if config.lung_texture_sd_hu > 0:
        cell = tuple(max(2, round(8.0 / s)) for s in config.spacing_mm)  # about 8 mm blobs
        texture = smooth_noise(config.shape, cell, noise_rng)
        in_lung = labels == LUNG
        volume[in_lung] += np.float32(config.lung_texture_sd_hu) * texture[in_lung]
    if config.noise_sd_hu > 0:
        volume += noise_rng.standard_normal(volume.shape, dtype=np.float32) * np.float32(config.noise_sd_hu)
    out = np.clip(np.rint(volume), HU_MIN, HU_MAX).astype(np.int16)
    return Phantom(volume=out, labels=labels)


def _box(config, lo_mm, hi_mm):
    """Voxel slices covering the mm box [lo, hi], clipped to the volume (None if empty)."""
    lo = np.floor(_mm_to_index(config, lo_mm)).astype(int)
    hi = np.ceil(_mm_to_index(config, hi_mm)).astype(int) + 1
    lo, hi = np.maximum(lo, 0), np.minimum(hi, config.shape)
    if np.any(hi <= lo):
        return None
    return tuple(slice(a, b) for a, b in zip(lo, hi))


def _box_coords(config, box):
    z, y, x = _mm_axes(config)
    return z[box[0]][:, None, None], y[box[1]][None, :, None], x[box[2]][None, None, :]


def _paint_capsule(config, volume, labels, seg: VesselSegment, lung) -> None:
    # keep vessels visible on coarse grids: never thinner than about a voxel
    radius = max(seg.radius_mm, 0.6 * min(config.spacing_mm))
    a, b = np.asarray(seg.start_mm), np.asarray(seg.end_mm)
    box = _box(config, np.minimum(a, b) - radius, np.maximum(a, b) + radius)
    if box is None:
        return
    zz, yy, xx = _box_coords(config, box)
    ab = b - a
    t = ((zz - a[0]) * ab[0] + (yy - a[1]) * ab[1] + (xx - a[2]) * ab[2]) / max(ab @ ab, 1e-12)
    t = np.clip(t, 0, 1)
    d2 = (zz - a[0] - t * ab[0]) ** 2 + (yy - a[1] - t * ab[1]) ** 2 + (xx - a[2] - t * ab[2]) ** 2
    hit = (d2 <= radius * radius) & lung[box]
    volume[box][hit], labels[box][hit] = HU_VESSEL, VESSEL


def _paint_sphere(config, volume, labels, nodule: Nodule, hu: float = HU_NODULE, label: int = NODULE) -> None:
    c = _index_to_mm(config, nodule.center_zyx)
    radius = nodule.diameter_mm / 2
    box = _box(config, c - radius, c + radius)
    if box is None:
        return
    zz, yy, xx = _box_coords(config, box)
    hit = (zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2 <= radius * radius
    volume[box][hit], labels[box][hit] = hu, label


def generate_phantom(config: PhantomConfig, rng: np.random.Generator) -> tuple[PhantomParams, Phantom]:
    """Draw and render one phantom."""
    params = draw_phantom(config, rng)
    return params, render_phantom(config, params)
