"""Small datasets in the layouts labs already have on disk: nnU-Net v2 raw and the Medical Segmentation Decathlon.

Three samples, each `OUT/<dataset>/` with a correct dataset.json (and `OUT/sample_data.json`, the
manifest of the ground truth):

- "nnunet": `Dataset501_Phantom`, MR-like with two channels (T2, ADC): imagesTr/<case>_0000.nii.gz,
  _0001.nii.gz, labelsTr/<case>.nii.gz (0 background, 1 lesion, 2 edema), imagesTs/ without labels (or, with
  `test_labels=True`, with labelsTs/<case>.nii.gz, as many datasets ship their held-out cases);
- "msd": `Task99_Phantom`, the same cases as 4-D two-channel NIfTI (channels on the 4th axis), MSD's
  dataset.json (modality, labels value -> name, training/test lists), and the macOS `._*` files MSD
  archives carry;
- "nnunet-ct": `Dataset502_PhantomCT`, one CT channel in HU (body ~0 HU, lungs -800, nodules +50), label
  1 = nodule, and candidates.csv (case_id, x, y, z, label; world mm, LPS) with every nodule centre as a
  positive and random lung points as negatives, computed from the written images' geometry.

The anatomy is procedural (ellipsoids, smooth noise, spheres), deterministic for a seed: a head
with lesions bright on T2 and an edema shell around them, which a tiny U-Net learns in a few
epochs. Every second case has an oblique direction; every case a non-zero origin, so that code
placing voxels in world space is exercised.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .luna16_layout import prepare_build_dir, publish
from .phantom import smooth_noise
from .target import existing_sample, read_manifest_body, write_manifest

__all__ = ["NnunetCaseRecord", "NnunetSampleSummary", "write_nnunet_sample", "write_msd_sample",
           "write_nnunet_ct_sample", "read_nnunet_manifest", "MR_DATASET", "MSD_DATASET", "CT_DATASET",
           "LABELS", "CT_LABELS"]

MR_DATASET, MSD_DATASET, CT_DATASET = "Dataset501_Phantom", "Task99_Phantom", "Dataset502_PhantomCT"
LABELS = {"background": 0, "lesion": 1, "edema": 2}
CT_LABELS = {"background": 0, "nodule": 1}
MR_CHANNELS = ("T2", "ADC")
SIZE_ZYX, SMALL_SIZE_ZYX = (32, 96, 96), (24, 48, 48)
MR_SPACING_ZYX, CT_SPACING_ZYX = (2.5, 1.5, 1.5), (2.5, 1.2, 1.2)
N_TEST = 2
NEGATIVES_PER_CASE = 4
MANIFEST_VERSION = 1
_KIND = {"nnunet": "genesis-sample-data/nnunet", "msd": "genesis-sample-data/msd",
         "nnunet-ct": "genesis-sample-data/nnunet-ct"}
_APPLE_DOUBLE = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + bytes(54)
"""The start of a macOS AppleDouble `._` file, as MSD's tar archives carry beside every image."""


@dataclass(frozen=True)
class NnunetCaseRecord:
    case: str
    subset: str
    """"train" (imagesTr, with a label map) or "test" (imagesTs; a label map in labelsTs when asked for)."""
    files: tuple[str, ...]
    """Image files relative to out_dir (one per channel; one 4-D file for MSD)."""
    label_file: str | None
    shape_zyx: tuple[int, int, int]
    spacing_zyx_mm: tuple[float, float, float]
    origin_xyz_mm: tuple[float, float, float]
    direction: tuple[float, ...]
    label_voxels: dict[str, int]
    """Voxels per label value ("1", "2"), counted in the label map."""
    centres_xyz_mm: tuple[tuple[float, float, float], ...]
    """World (LPS) centres of the lesions or nodules."""


@dataclass(frozen=True)
class NnunetSampleSummary:
    out_dir: Path
    dataset: str
    """The dataset root's folder name under out_dir."""
    layout: str
    """"nnunet" or "msd"."""
    cases: tuple[NnunetCaseRecord, ...]
    request: dict
    candidates: int = 0
    """Rows of the dataset's candidates.csv (0: none written)."""
    reused: bool = False

    @property
    def root(self) -> Path:
        return Path(self.out_dir) / self.dataset

    def describe(self) -> str:
        """A few lines for a command line to print."""
        train = [c for c in self.cases if c.subset == "train"]
        layout = "MSD" if self.layout == "msd" else "nnU-Net v2"
        lines = [f"{'reused' if self.reused else 'wrote'} {self.dataset} ({layout} layout) under {self.out_dir}: "
                 f"{len(train)} imagesTr cases with labels, "
                 f"{len(self.cases) - len(train)} imagesTs cases"
                 + (" with labels (labelsTs)" if any(c.label_file for c in self.cases if c.subset == "test") else "")
                 + (f", candidates.csv with {self.candidates} rows" if self.candidates else "")]
        for c in self.cases:
            counts = ", ".join(f"{k}: {v}" for k, v in sorted(c.label_voxels.items())) or "no labels"
            lines.append(f"  {c.case} ({c.subset}): {len(c.files)} file(s), {'x'.join(map(str, c.shape_zyx))} "
                         f"voxels, {counts}")
        return "\n".join(lines)


# --- geometry ------------------------------------------------------------------------------------

def _direction(rng: np.random.Generator, oblique: bool) -> tuple[float, ...]:
    """ITK row-major 3x3: identity, or a rotation of 8-15 degrees about z then 3-6 about x."""
    if not oblique:
        return (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    a, b = np.deg2rad(rng.uniform(8, 15)) * rng.choice([-1, 1]), np.deg2rad(rng.uniform(3, 6))
    rz = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]])
    return tuple(float(v) for v in (rz @ rx).ravel())


def _grid(shape_zyx, spacing_zyx, rng: np.random.Generator, oblique: bool) -> sitk.Image:
    """An empty image carrying the case's geometry (non-zero origin, maybe oblique)."""
    grid = sitk.Image([int(s) for s in reversed(shape_zyx)], sitk.sitkUInt8)
    grid.SetSpacing([float(s) for s in reversed(spacing_zyx)])
    grid.SetDirection(_direction(rng, oblique))
    grid.SetOrigin(tuple(float(v) for v in np.round(rng.uniform(-120, -60, 3) * (1, 1, 0.5) + (0, 0, 40), 2)))
    return grid


def _image(array: np.ndarray, grid: sitk.Image) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(grid)
    return image


def _world(grid: sitk.Image, index_zyx) -> tuple[float, float, float]:
    return tuple(round(float(v), 3) for v in grid.TransformContinuousIndexToPhysicalPoint(
        [float(v) for v in reversed(index_zyx)]))  # type: ignore[return-value]


def _mm(shape_zyx, spacing_zyx) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distances (mm) of every voxel from the volume's centre, per axis, broadcastable (z, y, x)."""
    return tuple(((np.arange(n) - (n - 1) / 2) * s).reshape([n if a == i else 1 for a in range(3)])
                 for i, (n, s) in enumerate(zip(shape_zyx, spacing_zyx)))  # type: ignore[return-value]


def _ellipsoid(axes_mm, centre_mm, zyx) -> np.ndarray:
    return sum(((c - m) / a) ** 2 for c, m, a in zip(zyx, centre_mm, axes_mm)) <= 1.0


def _sphere_index(centre_mm, shape_zyx, spacing_zyx) -> tuple[float, float, float]:
    return tuple((m / s) + (n - 1) / 2 for m, s, n in zip(centre_mm, spacing_zyx, shape_zyx))  # type: ignore


# --- MR cases ------------------------------------------------------------------------------------

def _mr_case(shape, rng: np.random.Generator) -> tuple[dict[str, np.ndarray], np.ndarray, list[tuple]]:
    """T2 and ADC arrays (arbitrary units, 0..~2000), the label map, and the lesion centres (mm from the centre)."""
    spacing = MR_SPACING_ZYX
    zyx = _mm(shape, spacing)
    extent = np.array(shape) * np.array(spacing)
    axes = extent * 0.42 * rng.uniform(0.93, 1.0, 3)
    head = _ellipsoid(axes, (0, 0, 0), zyx)
    label = np.zeros(shape, np.uint8)
    centres = []
    for _ in range(int(rng.integers(1, 3))):
        r = float(rng.uniform(0.16, 0.22) * axes[1:].min())
        centre = tuple(float(v) for v in rng.uniform(-0.45, 0.45, 3) * (axes - 1.6 * r).clip(0))
        dist = np.sqrt(sum(((c - m) / 1.0) ** 2 for c, m in zip(zyx, centre)))
        label[(dist <= 1.6 * r) & head & (label == 0)] = 2
        label[(dist <= r) & head] = 1
        centres.append(centre)
    cell = (4, 12, 12)
    bias = 1.0 + 0.08 * smooth_noise(shape, cell, rng)
    texture = smooth_noise(shape, (2, 4, 4), rng)
    images = {}
    for name, (tissue, lesion, edema, tex) in {"T2": (700.0, 1800.0, 1300.0, 90.0),
                                                "ADC": (800.0, 550.0, 1500.0, 70.0)}.items():
        arr = np.where(head, tissue + tex * texture, 0.0)
        arr[label == 2] = edema + 0.5 * tex * texture[label == 2]
        arr[label == 1] = lesion + 0.5 * tex * texture[label == 1]
        arr = arr * bias + np.abs(rng.normal(0.0, 12.0, shape))  # Rician-like background, never negative
        images[name] = np.clip(np.rint(arr), 0, 4000).astype(np.int16)
    return images, label, centres


def _ct_case(shape, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, list[tuple], np.ndarray]:
    """HU array, nodule label map, nodule centres (mm from the centre), and the lung mask."""
    spacing = CT_SPACING_ZYX
    zyx = _mm(shape, spacing)
    extent = np.array(shape) * np.array(spacing)
    body_axes = extent * np.array([0.6, 0.38, 0.45]) * rng.uniform(0.95, 1.0, 3)
    body = _ellipsoid(body_axes, (0, 0, 0), zyx)
    lung_axes = body_axes * np.array([0.8, 0.7, 0.38])
    lungs = np.zeros(shape, bool)
    lung_centres = []
    for side in (-1, 1):
        c = (0.0, -0.05 * body_axes[1], side * 0.5 * body_axes[2])
        lungs |= _ellipsoid(lung_axes, c, zyx)
        lung_centres.append(c)
    label = np.zeros(shape, np.uint8)
    centres = []
    for i in range(int(rng.integers(1, 3))):
        lc = lung_centres[i % 2]
        r = float(rng.uniform(0.18, 0.26) * lung_axes[1:].min())
        centre = tuple(float(v) for v in np.array(lc) + rng.uniform(-0.4, 0.4, 3) * (lung_axes - r).clip(0))
        label[_ellipsoid((r, r, r), centre, zyx) & lungs] = 1
        centres.append(centre)
    hu = np.full(shape, -1000.0)
    hu[body] = 0.0 + 25.0 * smooth_noise(shape, (2, 6, 6), rng)[body]
    hu[lungs] = -800.0 + 40.0 * smooth_noise(shape, (2, 6, 6), rng)[lungs]
    hu[label == 1] = 50.0
    hu += rng.normal(0.0, 15.0, shape)
    return np.clip(np.rint(hu), -1024, 3071).astype(np.int16), label, centres, lungs & (label == 0)


# --- writers -------------------------------------------------------------------------------------

def _counts(label: np.ndarray | None) -> dict[str, int]:
    if label is None:
        return {}
    values, counts = np.unique(label, return_counts=True)
    return {str(int(v)): int(n) for v, n in zip(values, counts) if v}


def _case_names(n_scans: int, prefix: str) -> list[tuple[str, str]]:
    return [(f"{prefix}_{i:03d}", "train") for i in range(n_scans)] + \
           [(f"{prefix}_{100 + i:03d}", "test") for i in range(N_TEST)]


def _write_mr(build: Path, root: str, layout: str, n_scans: int, seed: int, small: bool,
              test_labels: bool = False) -> list[NnunetCaseRecord]:
    shape = SMALL_SIZE_ZYX if small else SIZE_ZYX
    records = []
    for i, (case, subset) in enumerate(_case_names(n_scans, "phantom")):
        rng = np.random.default_rng([seed, i, 501])
        grid = _grid(shape, MR_SPACING_ZYX, rng, oblique=i % 2 == 1)
        images, label, centres = _mr_case(shape, rng)
        folder = "imagesTr" if subset == "train" else "imagesTs"
        (build / root / folder).mkdir(parents=True, exist_ok=True)
        if layout == "nnunet":
            files = []
            for c, name in enumerate(MR_CHANNELS):
                rel = f"{root}/{folder}/{case}_{c:04d}.nii.gz"
                sitk.WriteImage(_image(images[name], grid), str(build / rel), useCompression=True)
                files.append(rel)
        else:  # MSD: one 4-D file, the channels on its 4th axis
            rel = f"{root}/{folder}/{case}.nii.gz"
            joined = sitk.JoinSeries([_image(images[name], grid) for name in MR_CHANNELS])
            sitk.WriteImage(joined, str(build / rel), useCompression=True)
            (build / root / folder / f"._{case}.nii.gz").write_bytes(_APPLE_DOUBLE)
            files = [rel]
        label_rel = None
        if subset == "train" or test_labels:
            labels_folder = "labelsTr" if subset == "train" else "labelsTs"
            label_rel = f"{root}/{labels_folder}/{case}.nii.gz"
            (build / root / labels_folder).mkdir(exist_ok=True)
            sitk.WriteImage(_image(label, grid), str(build / label_rel), useCompression=True)
            if layout == "msd":
                (build / root / labels_folder / f"._{case}.nii.gz").write_bytes(_APPLE_DOUBLE)
        world = tuple(_world(grid, _sphere_index(c, shape, MR_SPACING_ZYX)) for c in centres)
        records.append(_record(case, subset, files, label_rel, grid, shape, label if label_rel else None, world))
    return records


def _record(case, subset, files, label_rel, grid: sitk.Image, shape, label, centres) -> NnunetCaseRecord:
    return NnunetCaseRecord(case=case, subset=subset, files=tuple(files), label_file=label_rel,
                            shape_zyx=tuple(int(s) for s in shape),  # type: ignore[arg-type]
                            spacing_zyx_mm=tuple(float(s) for s in reversed(grid.GetSpacing())),  # type: ignore
                            origin_xyz_mm=tuple(float(v) for v in grid.GetOrigin()),  # type: ignore[arg-type]
                            direction=tuple(float(v) for v in grid.GetDirection()),
                            label_voxels=_counts(label), centres_xyz_mm=tuple(centres))


def _nnunet_json(channels: dict[str, str], labels: dict[str, int], n_train: int, name: str, what: str) -> dict:
    return {"channel_names": channels, "labels": labels, "numTraining": n_train, "file_ending": ".nii.gz",
            "name": name, "description": f"{what}; procedural, written by genesis sample-data",
            "reference": "genesis-pipeline sample data", "licence": "CC0"}


def _write_json(path: Path, body: dict) -> None:
    path.write_text(json.dumps(body, indent=2) + "\n", encoding="utf-8")


def _write_ct(build: Path, root: str, n_scans: int, seed: int, small: bool) -> tuple[list[NnunetCaseRecord], int]:
    shape = SMALL_SIZE_ZYX if small else SIZE_ZYX
    records, rows = [], []
    for i, (case, subset) in enumerate(_case_names(n_scans, "chest")):
        rng = np.random.default_rng([seed, i, 502])
        grid = _grid(shape, CT_SPACING_ZYX, rng, oblique=i % 2 == 1)
        hu, label, centres, lung = _ct_case(shape, rng)
        folder = "imagesTr" if subset == "train" else "imagesTs"
        (build / root / folder).mkdir(parents=True, exist_ok=True)
        rel = f"{root}/{folder}/{case}_0000.nii.gz"
        sitk.WriteImage(_image(hu, grid), str(build / rel), useCompression=True)
        label_rel = None
        if subset == "train":
            label_rel = f"{root}/labelsTr/{case}.nii.gz"
            (build / root / "labelsTr").mkdir(exist_ok=True)
            sitk.WriteImage(_image(label, grid), str(build / label_rel), useCompression=True)
        world = tuple(_world(grid, _sphere_index(c, shape, CT_SPACING_ZYX)) for c in centres)
        rows += [(case, *xyz, 1) for xyz in world]
        lung_idx = np.argwhere(lung)
        for k in rng.choice(len(lung_idx), size=min(NEGATIVES_PER_CASE, len(lung_idx)), replace=False):
            rows.append((case, *_world(grid, lung_idx[k]), 0))
        records.append(_record(case, subset, [rel], label_rel, grid, shape, label if label_rel else None, world))
    lines = ["case_id,x,y,z,label"] + [f"{c},{x:.3f},{y:.3f},{z:.3f},{lab}" for c, x, y, z, lab in rows]
    (build / root / "candidates.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return records, len(rows)


# --- manifest and the samples --------------------------------------------------------------------

def read_nnunet_manifest(out_dir, which: str = "nnunet") -> NnunetSampleSummary | None:
    """The summary of a finished sample `which` ("nnunet", "msd", "nnunet-ct") in out_dir, or None."""
    body = read_manifest_body(out_dir, _KIND[which], MANIFEST_VERSION)
    if body is None:
        return None

    def case(d):
        tuples = {k: tuple(d[k]) for k in ("files", "shape_zyx", "spacing_zyx_mm", "origin_xyz_mm", "direction")}
        return NnunetCaseRecord(**{**d, **tuples, "centres_xyz_mm": tuple(tuple(c) for c in d["centres_xyz_mm"])})
    return NnunetSampleSummary(out_dir=Path(out_dir), dataset=body["dataset"], layout=body["layout"],
                               cases=tuple(case(d) for d in body["cases"]), request=body["request"],
                               candidates=body["candidates"], reused=True)


def _write(which: str, out_dir, n_scans: int, seed: int, small: bool, overwrite: bool,
           test_labels: bool = False) -> NnunetSampleSummary:
    for name, value in (("n_scans", n_scans), ("seed", seed)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1 - (name == "seed"):
            raise ValueError(f"{name}={value!r}: must be an int >= {1 - (name == 'seed')}")
    out_dir = Path(out_dir)
    request = {"dataset": which, "n_scans": n_scans, "seed": seed, "small": bool(small),
               "size_zyx": list(SMALL_SIZE_ZYX if small else SIZE_ZYX)}
    if test_labels:  # only when asked for, so that samples written before the option are still reused
        request["test_labels"] = True
    existing = existing_sample(out_dir, request, overwrite, lambda d: read_nnunet_manifest(d, which),
                               {"nnunet": "nnU-Net", "msd": "MSD", "nnunet-ct": "nnU-Net CT"}[which])
    if existing is not None:
        return existing
    build = prepare_build_dir(out_dir)
    n_candidates = 0
    channels = {str(i): n for i, n in enumerate(MR_CHANNELS)}
    if which == "nnunet":
        root, layout = MR_DATASET, "nnunet"
        cases = _write_mr(build, root, layout, n_scans, seed, small, test_labels)
        _write_json(build / root / "dataset.json",
                    _nnunet_json(channels, LABELS, n_scans, "Phantom", "MR-like head with lesions (T2, ADC)"))
    elif which == "msd":
        root, layout = MSD_DATASET, "msd"
        cases = _write_mr(build, root, layout, n_scans, seed, small, test_labels)
        train = [c for c in cases if c.subset == "train"]
        _write_json(build / root / "dataset.json", {
            "name": "Phantom", "description": "MR-like head with lesions (T2, ADC); procedural",
            "reference": "genesis-pipeline sample data", "licence": "CC0", "release": "1.0",
            "tensorImageSize": "4D", "modality": channels,
            "labels": {str(v): k for k, v in LABELS.items()},
            "numTraining": len(train), "numTest": len(cases) - len(train),
            "training": [{"image": "./" + c.files[0].split("/", 1)[1], "label": "./" + c.label_file.split("/", 1)[1]}
                         for c in train],
            "test": ["./" + c.files[0].split("/", 1)[1] for c in cases if c.subset == "test"]})
    else:
        root, layout = CT_DATASET, "nnunet"
        cases, n_candidates = _write_ct(build, root, n_scans, seed, small)
        _write_json(build / root / "dataset.json",
                    _nnunet_json({"0": "CT"}, CT_LABELS, n_scans, "PhantomCT", "chest CT with lung nodules (HU)"))
    write_manifest(build, {"kind": _KIND[which], "version": MANIFEST_VERSION, "request": request, "dataset": root,
                           "layout": layout, "candidates": n_candidates,
                           "cases": [dataclasses.asdict(c) for c in cases]})
    publish(build, out_dir)
    return NnunetSampleSummary(out_dir=out_dir, dataset=root, layout=layout, cases=tuple(cases), request=request,
                               candidates=n_candidates)


def write_nnunet_sample(out_dir, *, n_scans: int = 8, seed: int = 0, small: bool = False,
                        overwrite: bool = False, test_labels: bool = False) -> NnunetSampleSummary:
    """`out_dir/Dataset501_Phantom`: a two-channel (T2, ADC) nnU-Net v2 raw dataset, n_scans imagesTr cases
    with labels (1 lesion, 2 edema) and 2 imagesTs cases (labelled in labelsTs with `test_labels`). Built in
    a hidden sibling and renamed into place; the same arguments give the same voxels."""
    return _write("nnunet", out_dir, n_scans, seed, small, overwrite, test_labels)


def write_msd_sample(out_dir, *, n_scans: int = 8, seed: int = 0, small: bool = False,
                     overwrite: bool = False, test_labels: bool = False) -> NnunetSampleSummary:
    """`out_dir/Task99_Phantom`: the same kind of cases as an MSD task (4-D two-channel NIfTI); `test_labels`
    adds labelsTs/<case>.nii.gz for the imagesTs cases (rare in MSD, but found)."""
    return _write("msd", out_dir, n_scans, seed, small, overwrite, test_labels)


def write_nnunet_ct_sample(out_dir, *, n_scans: int = 8, seed: int = 0, small: bool = False,
                           overwrite: bool = False) -> NnunetSampleSummary:
    """`out_dir/Dataset502_PhantomCT`: one CT channel (HU), label 1 = nodule, and candidates.csv for classification."""
    return _write("nnunet-ct", out_dir, n_scans, seed, small, overwrite)
