"""Write scans in the LUNA16 layout: subsetK/<seriesuid>.mhd + .raw, annotations.csv, candidates.csv.

Everything written is a pure function of the arguments (no timestamps, no absolute paths), so
the same seed gives byte-identical files. A sample is built in a hidden sibling folder and
renamed into place when complete, so a reader never sees half a sample.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .phantom import PhantomConfig, draw_phantom, render_phantom

LUNA16_UID_ROOT = "1.3.6.1.4.1.14519.5.2.1.6279.6001."
ANNOTATIONS_HEADER = ("seriesuid", "coordX", "coordY", "coordZ", "diameter_mm")
CANDIDATES_HEADER = ("seriesuid", "coordX", "coordY", "coordZ", "class")
MANIFEST_NAME = "sample_data.json"
MANIFEST_VERSION = 1


@dataclass(frozen=True)
class NoduleRecord:
    seriesuid: str
    coord_xyz_mm: tuple[float, float, float]
    """World coordinates (x, y, z) in mm, as in annotations.csv."""
    diameter_mm: float


@dataclass(frozen=True)
class CandidateRecord:
    seriesuid: str
    coord_xyz_mm: tuple[float, float, float]
    label: int
    """1 for a true nodule, 0 otherwise (the `class` column)."""


@dataclass(frozen=True)
class ScanRecord:
    seriesuid: str
    subset: int
    source: str
    """"phantom" or where a real scan came from."""
    shape_zyx: tuple[int, int, int]
    spacing_zyx_mm: tuple[float, float, float]
    origin_xyz_mm: tuple[float, float, float]
    nodules: tuple[NoduleRecord, ...]
    candidates: tuple[CandidateRecord, ...]

    @property
    def relative_mhd(self) -> str:
        return f"subset{self.subset}/{self.seriesuid}.mhd"


@dataclass(frozen=True)
class SampleSummary:
    out_dir: Path
    scans: tuple[ScanRecord, ...]
    request: dict
    """The arguments that made the sample (also in sample_data.json)."""
    real_status: str = "not requested"
    """"ok: ...", "not requested" or "skipped: <reason>" for the real CT cases."""
    reused: bool = False
    """True when out_dir already held this exact sample and nothing was written."""

    @property
    def annotations_csv(self) -> Path:
        return self.out_dir / "annotations.csv"

    @property
    def candidates_csv(self) -> Path:
        return self.out_dir / "candidates.csv"

    @property
    def seriesuids(self) -> tuple[str, ...]:
        return tuple(s.seriesuid for s in self.scans)

    @property
    def nodules(self) -> tuple[NoduleRecord, ...]:
        return tuple(n for s in self.scans for n in s.nodules)

    def mhd_path(self, seriesuid: str) -> Path:
        scan = next(s for s in self.scans if s.seriesuid == seriesuid)
        return self.out_dir / scan.relative_mhd

    @property
    def mhd_paths(self) -> tuple[Path, ...]:
        return tuple(self.out_dir / s.relative_mhd for s in self.scans)

    def describe(self) -> str:
        """A few lines for a command line to print."""
        subsets = sorted({s.subset for s in self.scans})
        lines = [f"{'reused' if self.reused else 'wrote'} {len(self.scans)} scans in LUNA16 layout "
                 f"under {self.out_dir} (subsets {', '.join(map(str, subsets))}), "
                 f"{len(self.nodules)} nodules in annotations.csv, "
                 f"{sum(len(s.candidates) for s in self.scans)} rows in candidates.csv",
                 f"real CT: {self.real_status}"]
        return "\n".join(lines)


# --- pieces --------------------------------------------------------------------------------------

def phantom_seriesuid(rng: np.random.Generator) -> str:
    """A LUNA16-style dotted UID: the LIDC root plus 30 digits (the first not 0)."""
    digits = rng.integers(0, 10, 30)
    digits[0] = rng.integers(1, 10)
    return LUNA16_UID_ROOT + "".join(map(str, digits.tolist()))


def phantom_origin_xyz(shape_zyx, spacing_zyx, rng: np.random.Generator) -> tuple[float, float, float]:
    """A LUNA16-like origin: the volume roughly centred in x/y, z around -300 mm."""
    _, ny, nx = shape_zyx
    _, sy, sx = spacing_zyx
    return (round(float(-nx * sx / 2 + rng.uniform(-15, 15)), 2),
            round(float(-ny * sy / 2 + rng.uniform(-15, 15)), 2),
            round(float(rng.uniform(-350.0, -250.0)), 2))


def write_scan(volume_zyx: np.ndarray, path: Path, spacing_zyx, origin_xyz,
               direction=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)) -> sitk.Image:
    """Write one int16 (z, y, x) volume as MetaImage: `path` (.mhd) next to an uncompressed .raw."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(volume_zyx, dtype=np.int16))
    image.SetSpacing(tuple(float(s) for s in reversed(tuple(spacing_zyx))))
    image.SetOrigin(tuple(float(o) for o in origin_xyz))
    image.SetDirection(tuple(float(d) for d in direction))
    sitk.WriteImage(image, str(path), useCompression=False)
    return image


def world_xyz(image: sitk.Image, index_zyx) -> tuple[float, float, float]:
    """World (x, y, z) mm of a continuous voxel index (z, y, x)."""
    point = image.TransformContinuousIndexToPhysicalPoint(tuple(float(i) for i in reversed(tuple(index_zyx))))
    return tuple(round(float(c), 4) for c in point)


def _fmt(value: float) -> str:
    return repr(round(float(value), 4))


def write_tables(out_dir: Path, scans) -> None:
    """annotations.csv and candidates.csv, headers exactly as LUNA16's."""
    ann = [",".join(ANNOTATIONS_HEADER)]
    cand = [",".join(CANDIDATES_HEADER)]
    for scan in scans:
        ann += [",".join([n.seriesuid, *map(_fmt, n.coord_xyz_mm), _fmt(n.diameter_mm)])
                for n in scan.nodules]
        cand += [",".join([c.seriesuid, *map(_fmt, c.coord_xyz_mm), str(c.label)])
                 for c in scan.candidates]
    for name, rows in (("annotations.csv", ann), ("candidates.csv", cand)):
        (out_dir / name).write_text("\n".join(rows) + "\n", encoding="ascii")


def write_manifest(out_dir: Path, summary_scans, request: dict, real_status: str) -> None:
    body = {"kind": "genesis-sample-data", "version": MANIFEST_VERSION, "request": request,
            "real_status": real_status,
            "scans": [dataclasses.asdict(s) for s in summary_scans]}
    (out_dir / MANIFEST_NAME).write_text(json.dumps(body, indent=1, sort_keys=True) + "\n",
                                         encoding="utf-8")


def read_manifest(out_dir: Path) -> SampleSummary | None:
    """The summary of a finished sample in out_dir, or None if there is none."""
    path = Path(out_dir) / MANIFEST_NAME
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if body.get("kind") != "genesis-sample-data" or body.get("version") != MANIFEST_VERSION:
        return None

    def scan(d):
        return ScanRecord(
            seriesuid=d["seriesuid"], subset=d["subset"], source=d["source"],
            shape_zyx=tuple(d["shape_zyx"]), spacing_zyx_mm=tuple(d["spacing_zyx_mm"]),
            origin_xyz_mm=tuple(d["origin_xyz_mm"]),
            nodules=tuple(NoduleRecord(n["seriesuid"], tuple(n["coord_xyz_mm"]), n["diameter_mm"])
                          for n in d["nodules"]),
            candidates=tuple(CandidateRecord(c["seriesuid"], tuple(c["coord_xyz_mm"]), c["label"])
                             for c in d["candidates"]))
    return SampleSummary(out_dir=Path(out_dir), scans=tuple(scan(d) for d in body["scans"]),
                         request=body["request"], real_status=body["real_status"], reused=True)


def subset_of(index: int, n_scans: int, n_subsets: int) -> int:
    """Spread scans evenly over subset0..subset{n_subsets-1} (4 scans of 10 subsets: 0, 2, 5, 7,
    so the reference split puts them in train, train, validation and test)."""
    return index * n_subsets // max(n_scans, 1)


# --- phantoms ------------------------------------------------------------------------------------

def write_phantom_scans(build_dir: Path, *, n_scans: int, seed: int, config: PhantomConfig,
                        n_subsets: int) -> list[ScanRecord]:
    """Draw, render and write n_scans phantoms into build_dir. Scan i depends only on (seed, i)."""
    records = []
    for i, seq in enumerate(np.random.SeedSequence(seed).spawn(n_scans)):
        rng = np.random.default_rng(seq)
        uid = phantom_seriesuid(rng)
        origin = phantom_origin_xyz(config.shape, config.spacing_mm, rng)
        params = draw_phantom(config, rng)
        phantom = render_phantom(config, params)
        subset = subset_of(i, n_scans, n_subsets)
        folder = build_dir / f"subset{subset}"
        folder.mkdir(parents=True, exist_ok=True)
        image = write_scan(phantom.volume, folder / f"{uid}.mhd", config.spacing_mm, origin)
        nodules = tuple(NoduleRecord(uid, world_xyz(image, n.center_zyx), n.diameter_mm)
                        for n in params.nodules)
        candidates = ([CandidateRecord(uid, n.coord_xyz_mm, 1) for n in nodules]
                      + [CandidateRecord(uid, world_xyz(image, p), 0) for p in params.false_candidates_zyx])
        order = rng.permutation(len(candidates))
        records.append(ScanRecord(
            seriesuid=uid, subset=subset, source="phantom", shape_zyx=tuple(config.shape),
            spacing_zyx_mm=tuple(float(s) for s in config.spacing_mm), origin_xyz_mm=origin,
            nodules=nodules, candidates=tuple(candidates[j] for j in order)))
    uids = [r.seriesuid for r in records]
    if len(set(uids)) != len(uids):  # 10^-30 odds, but a silent overwrite would be worse
        raise RuntimeError(f"seriesuid collision for seed={seed}")
    return records


# --- build and publish ---------------------------------------------------------------------------

def check_sample_args(n_scans, seed, n_subsets) -> None:
    if not isinstance(n_scans, int) or isinstance(n_scans, bool) or n_scans < 0:
        raise ValueError(f"n_scans={n_scans!r}: must be an int >= 0")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed={seed!r}: must be an int >= 0")
    if not isinstance(n_subsets, int) or isinstance(n_subsets, bool) or n_subsets < 1:
        raise ValueError(f"n_subsets={n_subsets!r}: must be an int >= 1 (LUNA16 has 10)")


def prepare_build_dir(out_dir: Path) -> Path:
    """A fresh hidden sibling of out_dir to build into."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    build = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    if build.exists():
        shutil.rmtree(build)
    build.mkdir()
    return build


def check_target(out_dir: Path, request: dict, overwrite: bool) -> SampleSummary | None:
    """The existing sample to reuse, None to build; raises if out_dir holds something else."""
    if not out_dir.exists():
        return None
    if not out_dir.is_dir():
        raise FileExistsError(f"out_dir={str(out_dir)!r} exists and is not a folder")
    if not any(out_dir.iterdir()):
        return None
    existing = read_manifest(out_dir)
    if existing is None:
        raise FileExistsError(f"out_dir={str(out_dir)!r} is not empty and holds no {MANIFEST_NAME}; "
                              "choose a new or empty folder")
    if existing.request == request:
        # same arguments: reuse, unless the real CT was skipped then (retry it, e.g. now online)
        return None if existing.real_status.startswith("skipped") else existing
    if not overwrite:
        raise FileExistsError(f"out_dir={str(out_dir)!r} holds a sample made with "
                              f"{existing.request}, not {request}; remove that folder (`make clean-demo` "
                              "for the demo's) or choose another one")
    return None


def publish(build_dir: Path, out_dir: Path) -> None:
    """Move the finished build into place (replacing an earlier sample that check_target allowed)."""
    if out_dir.exists():
        shutil.rmtree(out_dir) if any(out_dir.iterdir()) else out_dir.rmdir()
    os.replace(build_dir, out_dir)


def phantom_request(n_scans: int, seed: int, config: PhantomConfig, n_subsets: int) -> dict:
    return {"n_scans": n_scans, "seed": seed, "n_subsets": n_subsets, "config": config.to_dict()}
