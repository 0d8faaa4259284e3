"""Brain MRI with tumour labels in the BraTS 2018 layout, built on the real MNI152 template.

`HGG|LGG/Brats18_<inst>_<id>_1/Brats18_<inst>_<id>_1_{flair,t1,t1ce,t2,seg}.nii.gz`: four
co-registered, skull-stripped sequences at BraTS size and spacing (240 x 240 x 155, 1 mm) and a
label map (1 necrotic / non-enhancing core, 2 oedema, 4 enhancing tumour; the BMS target is
labels > 0). The anatomy is the ICBM 2009a MNI152 template that nilearn ships in its wheel (T1
plus grey- and white-matter maps), read straight out of the wheel; each case gets a small random
affine + B-spline deformation and intensity changes, then T2 and FLAIR are synthesised from the
tissue classes and a procedural tumour is painted in white matter.

Without the template (offline and not cached) the procedural cases are skipped with the reason
in the summary rather than replaced by a cruder phantom: BMS needs real brain anatomy for its
numbers to mean anything. The two real MRIs with tumour masks of the pyradiomics-bhklab sdist
(`brain1`, `brain2`: post-contrast T1-weighted, judged from the images: dark CSF, bright scalp
fat, enhancing lesion) are added as single-sequence `t1ce` cases under `PYRADIOMICS/` when that
sdist can be fetched. Nothing is fetched at import time; a failed fetch never raises.
"""

from __future__ import annotations

import dataclasses
import logging
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .luna16_layout import prepare_build_dir, publish
from .phantom import smooth_noise
from .pyradiomics_cases import read_cases
from .registry_files import NILEARN_WHEEL, PYRADIOMICS_SDIST, fetch
from .target import existing_sample, read_manifest_body, write_manifest

log = logging.getLogger(__name__)

__all__ = ["BratsCaseRecord", "BratsSampleSummary", "BratsTumourParams", "write_brats_sample",
           "read_brats_manifest", "SEQUENCES", "TEMPLATE_MEMBERS", "REAL_CASES"]

SEQUENCES = ("flair", "t1", "t1ce", "t2")
NECROTIC, OEDEMA, ENHANCING = 1, 2, 4
BRATS_SIZE_XYZ = (240, 240, 155)
SMALL_SIZE_XYZ = (112, 112, 64)
"""small=True crops the case to 64 x 112 x 112 (z, y, x) around the tumour: more than the BMS
crop (50 x 100 x 100) and one 32 x 64 x 64 cube."""
TEMPLATE_DIR = "nilearn/datasets/data/"
TEMPLATE_MEMBERS = {k: f"{TEMPLATE_DIR}mni_icbm152_{k}_tal_nlin_sym_09a_converted.nii.gz" for k in ("t1", "gm", "wm")}
TEMPLATE_SOURCE = f"{NILEARN_WHEEL.requirement}:{TEMPLATE_MEMBERS['t1']}"
REAL_CASES = ("brain1", "brain2")
REAL_SEQUENCE = "t1ce"
REAL_FOLDER = "PYRADIOMICS"
MANIFEST_KIND = "genesis-sample-data/brats"
MANIFEST_VERSION = 1
INSTITUTIONS = ("2013", "CBICA", "TCIA01", "TCIA02", "TCIA04", "TCIA08")

# Relative signal per tissue and sequence (white matter of T1 = 1): T2 makes CSF bright, FLAIR
# nulls it, oedema is bright on both; the enhancing rim is bright only after contrast.
_TISSUE = {"t2": {"csf": 1.0, "gm": 0.55, "wm": 0.36}, "flair": {"csf": 0.12, "gm": 0.6, "wm": 0.45}}
_TUMOUR = {  # (necrotic/non-enhancing core, oedema, enhancing rim)
    "t1": (0.35, 0.7, 0.6), "t1ce": (0.35, 0.72, 1.8), "t2": (0.95, 0.82, 0.6), "flair": (0.5, 0.98, 0.75)}
_SCALE = {"t1": 700.0, "t1ce": 800.0, "t2": 1400.0, "flair": 600.0}


# --- records -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BratsCaseRecord:
    case: str
    grade: str
    """"HGG", "LGG", or the folder of a real case whose grade is not known."""
    folder: str
    """Case folder relative to out_dir."""
    sequences: tuple[str, ...]
    source: str
    shape_zyx: tuple[int, int, int]
    spacing_zyx_mm: tuple[float, float, float]
    origin_xyz_mm: tuple[float, float, float]
    direction: tuple[float, ...]
    label_voxels: dict[str, int]
    """Voxels per label value ("1", "2", "4"), counted in the written seg file."""
    whole_tumour_voxels: int
    """Voxels with label > 0: the BMS target."""
    centre_xyz_mm: tuple[float, float, float] | None
    """World centre of the procedural tumour; None for a real case."""
    note: str = ""

    def path(self, out_dir: Path, sequence: str) -> Path:
        return Path(out_dir) / self.folder / f"{self.case}_{sequence}.nii.gz"


@dataclass(frozen=True)
class BratsSampleSummary:
    out_dir: Path
    cases: tuple[BratsCaseRecord, ...]
    request: dict
    template_status: str
    """"ok: ..." or "skipped: <reason>" for the procedural cases on the MNI152 template."""
    real_status: str
    """"ok: ...", "not requested" or "skipped: <reason>" for the pyradiomics brain MRIs."""
    reused: bool = False

    def describe(self) -> str:
        """A few lines for a command line to print."""
        lines = [f"{'reused' if self.reused else 'wrote'} {len(self.cases)} cases in BraTS 2018 layout under "
                 f"{self.out_dir} (labels 1 core, 2 oedema, 4 enhancing)",
                 f"procedural on MNI152: {self.template_status}", f"real MRI: {self.real_status}"]
        for c in self.cases:
            counts = ", ".join(f"{k}: {v}" for k, v in sorted(c.label_voxels.items()))
            lines.append(f"  {c.folder}: {'+'.join(c.sequences)}, {'x'.join(map(str, c.shape_zyx))} voxels, "
                         f"whole tumour {c.whole_tumour_voxels} voxels ({counts})")
        return "\n".join(lines)


# --- the template --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Template:
    """MNI152 maps as one 4-component float image (t1 / WM-normalised, gm, wm, intracranial)."""

    maps: sitk.Image
    depth_mm: np.ndarray
    """Distance inside the intracranial mask, (z, y, x) on the template grid."""
    wm: np.ndarray


def read_template(wheel: Path) -> Template:
    """Read the T1, GM and WM maps out of the nilearn wheel (a zip) via temporary files."""
    images = {}
    with zipfile.ZipFile(wheel) as zf, tempfile.TemporaryDirectory() as tmp:
        for key, member in TEMPLATE_MEMBERS.items():
            path = Path(tmp) / Path(member).name
            path.write_bytes(zf.read(member))
            images[key] = sitk.Cast(sitk.ReadImage(str(path)), sitk.sitkFloat32)
    gm = sitk.GetArrayFromImage(images["gm"]) / 255.0
    wm = sitk.GetArrayFromImage(images["wm"]) / 255.0
    t1 = sitk.GetArrayFromImage(images["t1"])
    t1 = t1 / np.median(t1[wm > 0.9])
    tissue = sitk.GetImageFromArray(((gm + wm) > 0.4).astype(np.uint8))
    tissue.CopyInformation(images["gm"])
    # ventricles and sulci are holes in the GM+WM mask: closing and filling gives the intracranial CSF
    intracranial = sitk.BinaryFillhole(sitk.BinaryMorphologicalClosing(tissue, (3, 3, 3)))
    depth = sitk.GetArrayFromImage(sitk.SignedMaurerDistanceMap(intracranial, insideIsPositive=True,
                                                                squaredDistance=False, useImageSpacing=True))
    icm = sitk.GetArrayFromImage(intracranial).astype(np.float32)
    maps = sitk.Compose(*[_like(a.astype(np.float32), images["gm"]) for a in (t1, gm, wm, icm)])
    return Template(maps=maps, depth_mm=depth, wm=wm)


def _like(array: np.ndarray, reference: sitk.Image) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(reference)
    return image


def brats_grid(template: Template, size_xyz=BRATS_SIZE_XYZ) -> sitk.Image:
    """An empty 1 mm grid of BraTS size with the template's direction, centred on the brain."""
    icm = sitk.GetArrayFromImage(sitk.VectorIndexSelectionCast(template.maps, 3))
    idx = np.argwhere(icm > 0.5)
    centre_index = (idx.min(axis=0) + idx.max(axis=0)) / 2.0  # (z, y, x)
    centre = np.array(template.maps.TransformContinuousIndexToPhysicalPoint(
        tuple(float(c) for c in centre_index[::-1])))
    return _grid_at(template.maps.GetDirection(), centre, size_xyz)


def _grid_at(direction, centre_xyz, size_xyz) -> sitk.Image:
    grid = sitk.Image([int(s) for s in size_xyz], sitk.sitkUInt8)
    grid.SetDirection(direction)
    d = np.asarray(direction, dtype=float).reshape(3, 3)
    half = (np.asarray(size_xyz, dtype=float) - 1) / 2
    grid.SetOrigin(tuple(float(round(v, 4)) for v in np.asarray(centre_xyz) - d @ half))
    return grid


# --- one procedural case -------------------------------------------------------------------------

@dataclass(frozen=True)
class BratsTumourParams:
    """Every random choice of one case; `render_case` applies them."""

    grade: str
    centre_xyz_mm: tuple[float, float, float]
    core_mm: float
    rim_mm: float
    oedema_mm: float
    axes: tuple[float, float, float]
    """Relative stretch of the tumour along (z, y, x)."""
    rotation_deg: tuple[float, float, float]
    scale: tuple[float, float, float]
    shift_mm: tuple[float, float, float]
    bspline_mm: tuple[float, ...]
    gains: tuple[float, float, float, float]
    """Per-sequence gain (flair, t1, t1ce, t2)."""
    noise: float
    field_seed: int


def draw_case(template: Template, grade: str, rng: np.random.Generator) -> BratsTumourParams:
    """Tumour in deep white matter (away from the skull), deformation and intensity draws."""
    core = float(rng.uniform(4, 11) if grade == "HGG" else rng.uniform(8, 16))
    rim = float(rng.uniform(2, 5))
    oedema = float(rng.uniform(6, 22))
    deep = (template.wm > 0.7) & (template.depth_mm > core + rim + 0.5 * oedema + 6)
    candidates = np.argwhere(deep)
    z, y, x = candidates[rng.integers(len(candidates))]
    centre = template.maps.TransformIndexToPhysicalPoint((int(x), int(y), int(z)))
    return BratsTumourParams(
        grade=grade, centre_xyz_mm=tuple(round(float(c), 3) for c in centre), core_mm=round(core, 3),
        rim_mm=round(rim, 3), oedema_mm=round(oedema, 3),
        axes=tuple(round(float(a), 3) for a in rng.uniform(0.8, 1.25, 3)),
        rotation_deg=tuple(round(float(a), 3) for a in rng.uniform(-4, 4, 3)),
        scale=tuple(round(float(a), 4) for a in rng.uniform(0.95, 1.05, 3)),
        shift_mm=tuple(round(float(a), 3) for a in rng.uniform(-3, 3, 3)),
        bspline_mm=tuple(round(float(a), 3) for a in rng.normal(0, 1.5, 3 * 7 ** 3)),
        gains=tuple(round(float(a), 4) for a in rng.uniform(0.85, 1.15, 4)),
        noise=round(float(rng.uniform(0.015, 0.035)), 4), field_seed=int(rng.integers(0, 2**31 - 1)))


def _transform(template: Template, p: BratsTumourParams) -> sitk.Transform:
    """Small affine about the tumour centre (so it stays in white matter), then a smooth B-spline:
    the per-case anatomy."""
    affine = sitk.Euler3DTransform()
    affine.SetCenter(p.centre_xyz_mm)
    affine.SetRotation(*np.radians(p.rotation_deg))
    affine.SetTranslation(p.shift_mm)
    scaled = sitk.AffineTransform(affine.GetMatrix(), affine.GetTranslation(), affine.GetCenter())
    scaled.Scale(p.scale)
    bspline = sitk.BSplineTransformInitializer(sitk.VectorIndexSelectionCast(template.maps, 0), [4, 4, 4])
    bspline.SetParameters(p.bspline_mm)
    return sitk.CompositeTransform([scaled, bspline])


def _coarse_field(transform: sitk.Transform, grid: sitk.Image, step: int = 4) -> sitk.Transform:
    """The transform sampled every `step` voxels as a displacement field: the deformation is smooth,
    and evaluating a B-spline at each of 9 million voxels takes 20 s, the field a fraction of that."""
    size = [int(np.ceil((n - 1) / step)) + 2 for n in grid.GetSize()]
    field = sitk.TransformToDisplacementField(transform, sitk.sitkVectorFloat64, size, grid.GetOrigin(),
                                              [s * step for s in grid.GetSpacing()], grid.GetDirection())
    return sitk.DisplacementFieldTransform(field)


def render_case(template: Template, p: BratsTumourParams, grid: sitk.Image) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """({sequence: int16 (z, y, x)}, seg uint8) on `grid`."""
    warped = sitk.Resample(template.maps, grid, _coarse_field(_transform(template, p), grid), sitk.sitkLinear, 0.0,
                           sitk.sitkVectorFloat32)
    t1, gm, wm, icm = (sitk.GetArrayFromImage(sitk.VectorIndexSelectionCast(warped, k)) for k in range(4))
    brain = icm > 0.5
    csf = np.clip(1.0 - gm - wm, 0, 1) * brain
    rng = np.random.default_rng(p.field_seed)
    seg = _tumour_labels(grid, p, gm + wm, rng)
    soft = {lab: _soft(seg == lab, grid) for lab in (NECROTIC, OEDEMA, ENHANCING)}
    bias = 1.0 + 0.06 * smooth_noise(seg.shape, (40, 40, 40), rng)
    out = {}
    for k, seq in enumerate(SEQUENCES):
        if seq in ("t1", "t1ce"):
            tissue = t1 * (1.05 if seq == "t1ce" else 1.0)
        else:
            tissue = csf * _TISSUE[seq]["csf"] + gm * _TISSUE[seq]["gm"] + wm * _TISSUE[seq]["wm"]
        core, oedema, rim = _TUMOUR[seq]
        if p.grade == "LGG" and seq == "flair":
            core = 0.85  # non-enhancing core of a low-grade glioma stays FLAIR-bright
        tum = soft[NECROTIC] + soft[OEDEMA] + soft[ENHANCING]
        signal = tissue * (1 - tum) + core * soft[NECROTIC] + oedema * soft[OEDEMA] + rim * soft[ENHANCING]
        signal = signal * bias * p.gains[k] * _SCALE[seq]
        noise = rng.standard_normal((2, *seg.shape), dtype=np.float32) * (p.noise * _SCALE[seq])
        magnitude = np.sqrt((signal + noise[0]) ** 2 + noise[1] ** 2)  # Rician, as in magnitude MRI
        out[seq] = np.rint(np.where(brain, magnitude, 0)).astype(np.int16)
    return out, np.where(brain, seg, 0).astype(np.uint8)


def _tumour_labels(grid: sitk.Image, p: BratsTumourParams, tissue: np.ndarray, rng) -> np.ndarray:
    """Nested deformed shells: core (1), enhancing rim (4, HGG only), oedema (2) spreading in tissue."""
    nz, ny, nx = tissue.shape
    sp = np.asarray(grid.GetSpacing())
    c_index = np.asarray(grid.TransformPhysicalPointToContinuousIndex(p.centre_xyz_mm))  # (x, y, z)
    # mm offsets along the index axes: distances need no direction (it is a signed permutation here)
    offs = [((np.arange(n) - c_index[i]) * sp[i]).astype(np.float32) for i, n in enumerate((nx, ny, nz))]
    ax, ay, az = p.axes[2], p.axes[1], p.axes[0]
    dist = np.sqrt((offs[2].reshape(-1, 1, 1) / az) ** 2 + (offs[1].reshape(1, -1, 1) / ay) ** 2
                   + (offs[0].reshape(1, 1, -1) / ax) ** 2)
    dist = dist + 2.5 * smooth_noise(tissue.shape, (8, 8, 8), rng)
    dist_oedema = dist + 4.0 * smooth_noise(tissue.shape, (12, 12, 12), rng)
    seg = np.zeros(tissue.shape, dtype=np.uint8)
    seg[(dist_oedema < p.core_mm + p.rim_mm + p.oedema_mm) & (tissue > 0.5)] = OEDEMA
    if p.grade == "HGG":
        seg[dist < p.core_mm + p.rim_mm] = ENHANCING
        seg[dist < p.core_mm] = NECROTIC
    else:
        seg[dist < p.core_mm + p.rim_mm] = NECROTIC
    return seg


def _soft(mask: np.ndarray, grid: sitk.Image) -> np.ndarray:
    """A partial-volume version of a label (edges blurred over about 1 mm)."""
    image = sitk.GetImageFromArray(mask.astype(np.float32))
    image.CopyInformation(grid)
    return sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(image, 0.8))


def _small_grid(full: sitk.Image, centre_xyz) -> sitk.Image:
    """The SMALL_SIZE_XYZ part of the full grid around the tumour (snapped to whole voxels, inside)."""
    index = np.rint(full.TransformPhysicalPointToContinuousIndex(tuple(centre_xyz))).astype(int)
    size = np.asarray(SMALL_SIZE_XYZ)
    start = np.clip(index - size // 2, 0, np.asarray(full.GetSize()) - size)
    grid = sitk.Image([int(s) for s in size], sitk.sitkUInt8)
    grid.SetDirection(full.GetDirection())
    grid.SetSpacing(full.GetSpacing())
    grid.SetOrigin(full.TransformIndexToPhysicalPoint(tuple(int(i) for i in start)))
    return grid


def _case_names(n_scans: int, rng: np.random.Generator) -> list[tuple[str, str]]:
    """(grade, case) per case: every third is LGG; ids unique and BraTS-shaped."""
    names = []
    for i in range(n_scans):
        grade = "LGG" if i % 3 == 2 else "HGG"
        inst = INSTITUTIONS[int(rng.integers(len(INSTITUTIONS)))]
        names.append((grade, f"Brats18_{inst}_{100 + i}_1"))
    return names


def _write_image(array: np.ndarray, grid: sitk.Image, path: Path) -> None:
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    image.CopyInformation(grid)
    sitk.WriteImage(image, str(path), useCompression=True)


def _counts(seg: np.ndarray) -> dict[str, int]:
    return {str(v): int((seg == v).sum()) for v in (NECROTIC, OEDEMA, ENHANCING)}


def write_procedural_case(build: Path, template: Template, full_grid: sitk.Image, grade: str, case: str,
                          small: bool, seq: np.random.SeedSequence) -> BratsCaseRecord:
    params = draw_case(template, grade, np.random.default_rng(seq))
    grid = _small_grid(full_grid, params.centre_xyz_mm) if small else full_grid
    images, seg = render_case(template, params, grid)
    folder = build / grade / case
    folder.mkdir(parents=True)
    for name, array in {**images, "seg": seg}.items():
        _write_image(array, grid, folder / f"{case}_{name}.nii.gz")
    return BratsCaseRecord(
        case=case, grade=grade, folder=f"{grade}/{case}", sequences=SEQUENCES,
        source=f"procedural tumour on {TEMPLATE_SOURCE}", shape_zyx=tuple(int(s) for s in seg.shape),
        spacing_zyx_mm=tuple(float(s) for s in reversed(grid.GetSpacing())),
        origin_xyz_mm=tuple(float(o) for o in grid.GetOrigin()), direction=tuple(grid.GetDirection()),
        label_voxels=_counts(seg), whole_tumour_voxels=int((seg > 0).sum()), centre_xyz_mm=params.centre_xyz_mm)


def write_procedural_cases(build: Path, *, n_scans: int, seed: int, small: bool, cache_dir
                           ) -> tuple[list[BratsCaseRecord], str]:
    """All procedural cases, or none with "skipped: <reason>" when the template cannot be had."""
    if n_scans == 0:
        return [], "not requested"
    wheel, reason = fetch(NILEARN_WHEEL, cache_dir=cache_dir)
    if wheel is None:
        log.warning("BraTS sample: procedural cases skipped: %s", reason)
        return [], f"skipped: no MNI152 template ({reason})"
    try:
        template = read_template(wheel)
    except (OSError, KeyError, zipfile.BadZipFile, RuntimeError) as e:
        return [], f"skipped: cannot read the MNI152 template from {wheel}: {e}"
    full = brats_grid(template)
    seqs = np.random.SeedSequence(seed).spawn(n_scans + 1)
    names = _case_names(n_scans, np.random.default_rng(seqs[0]))
    records = [write_procedural_case(build, template, full, g, c, small, s) for (g, c), s in zip(names, seqs[1:])]
    return records, f"ok: {len(records)} cases on the MNI152 template of {NILEARN_WHEEL.requirement}"


# --- the real pyradiomics brain MRIs -------------------------------------------------------------

def read_real_cases(sdist: Path) -> dict[str, tuple[sitk.Image, sitk.Image]]:
    """{case: (image, mask)} for brain1/brain2 from the sdist's data/ folder."""
    return read_cases(sdist, REAL_CASES)


def write_real_cases(build: Path, cache_dir=None) -> tuple[list[BratsCaseRecord], str]:
    """brain1/brain2 as `PYRADIOMICS/Brats18_PyRadiomics_<n>_1/..._{t1ce,seg}.nii.gz`; never raises
    for a missing network or a bad download."""
    sdist, reason = fetch(PYRADIOMICS_SDIST, cache_dir=cache_dir)
    if sdist is None:
        log.warning("BraTS sample: real MRI skipped: %s", reason)
        return [], f"skipped: {reason}"
    try:
        cases = read_real_cases(sdist)
    except (OSError, tarfile.TarError, RuntimeError) as e:
        return [], f"skipped: cannot read {sdist}: {e}"
    records = []
    for n, (name, (image, mask)) in enumerate(cases.items(), start=1):
        case = f"Brats18_PyRadiomics_{n}_1"
        folder = build / REAL_FOLDER / case
        folder.mkdir(parents=True)
        volume = sitk.GetArrayFromImage(sitk.Cast(image, sitk.sitkInt16))
        seg = (sitk.GetArrayFromImage(mask) > 0).astype(np.uint8)  # the one tumour mask -> label 1
        _write_image(volume, image, folder / f"{case}_{REAL_SEQUENCE}.nii.gz")
        _write_image(seg, image, folder / f"{case}_seg.nii.gz")
        records.append(BratsCaseRecord(
            case=case, grade=REAL_FOLDER, folder=f"{REAL_FOLDER}/{case}", sequences=(REAL_SEQUENCE,),
            source=f"{PYRADIOMICS_SDIST.requirement}:data/{name}_image.nrrd", shape_zyx=tuple(volume.shape),
            spacing_zyx_mm=tuple(float(s) for s in reversed(image.GetSpacing())),
            origin_xyz_mm=tuple(float(o) for o in image.GetOrigin()),
            direction=tuple(float(d) for d in image.GetDirection()),
            label_voxels={"1": int(seg.sum()), "2": 0, "4": 0}, whole_tumour_voxels=int(seg.sum()),
            centre_xyz_mm=None,
            note=f"real MRI, sequence {REAL_SEQUENCE} (post-contrast T1-weighted, judged from the image); "
                 f"label 1 = the whole pyradiomics tumour mask (sub-regions not given); "
                 f"{volume.shape[0]} slices of {image.GetSpacing()[2]:.1f} mm (fewer than a 32-slice cube)"))
    return records, f"ok: {len(records)} cases ({', '.join(cases)}) from {PYRADIOMICS_SDIST.requirement}, sequence {REAL_SEQUENCE}"


# --- manifest and the whole sample ---------------------------------------------------------------

def _write_manifest(out_dir: Path, cases, request: dict, template_status: str, real_status: str) -> None:
    body = {"kind": MANIFEST_KIND, "version": MANIFEST_VERSION, "request": request,
            "template_status": template_status, "real_status": real_status,
            "cases": [dataclasses.asdict(c) for c in cases]}
    write_manifest(out_dir, body)


def read_brats_manifest(out_dir) -> BratsSampleSummary | None:
    """The summary of a finished BraTS sample in out_dir, or None if there is none."""
    body = read_manifest_body(out_dir, MANIFEST_KIND, MANIFEST_VERSION)
    if body is None:
        return None

    def case(d):
        tuples = {k: tuple(d[k]) for k in ("sequences", "shape_zyx", "spacing_zyx_mm", "origin_xyz_mm", "direction")}
        centre = None if d["centre_xyz_mm"] is None else tuple(d["centre_xyz_mm"])
        return BratsCaseRecord(**{**d, **tuples, "centre_xyz_mm": centre})
    return BratsSampleSummary(out_dir=Path(out_dir), cases=tuple(case(d) for d in body["cases"]),
                              request=body["request"], template_status=body["template_status"],
                              real_status=body["real_status"], reused=True)


def _check_target(out_dir: Path, request: dict, overwrite: bool) -> BratsSampleSummary | None:
    """The existing sample to reuse, None to build; raises if out_dir holds something else. A sample
    that skipped a part (offline then) is rebuilt, to retry the fetch."""
    return existing_sample(out_dir, request, overwrite, read_brats_manifest, "BraTS",
                           retry=lambda s: s.template_status.startswith("skipped") or s.real_status.startswith("skipped"))


def write_brats_sample(out_dir, *, n_scans: int = 4, seed: int = 0, small: bool = False, include_real: bool = True,
                       cache_dir=None, overwrite: bool = False) -> BratsSampleSummary:
    """Write n_scans procedural BraTS cases (plus the two real pyradiomics brain MRIs) to out_dir.

    Parts whose download fails are skipped with the reason in the summary, never an exception.
    Built in a hidden sibling folder and renamed into place; the same arguments give
    byte-identical files. `cache_dir` is where fetched registry files are kept (default: the
    user cache).
    """
    for name, value in (("n_scans", n_scans), ("seed", seed)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name}={value!r}: must be an int >= 0")
    out_dir = Path(out_dir)
    request = {"dataset": "brats", "n_scans": n_scans, "seed": seed, "small": bool(small),
               "include_real": bool(include_real), "size_xyz": list(SMALL_SIZE_XYZ if small else BRATS_SIZE_XYZ)}
    existing = _check_target(out_dir, request, overwrite)
    if existing is not None:
        return existing
    cache = None if cache_dir is None else Path(cache_dir)
    build = prepare_build_dir(out_dir)
    cases, template_status = write_procedural_cases(build, n_scans=n_scans, seed=seed, small=small, cache_dir=cache)
    real, real_status = write_real_cases(build, cache) if include_real else ([], "not requested")
    _write_manifest(build, cases + real, request, template_status, real_status)
    publish(build, out_dir)
    return BratsSampleSummary(out_dir=out_dir, cases=tuple(cases + real), request=request,
                              template_status=template_status, real_status=real_status)

