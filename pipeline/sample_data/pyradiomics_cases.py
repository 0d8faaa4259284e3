"""Real chest CT: the two lung test cases shipped in the pyradiomics-bhklab source distribution.

`lung1` (512 x 512 x 48, 0.57 x 0.57 x 5 mm) and `lung2` (512 x 512 x 61, 0.63 x 0.63 x 5 mm)
are int16 HU NRRD images with a tumour mask each (`lungN_image.nrrd`, `lungN_label.nrrd` under
`data/`). The sdist is fetched once with pip into a cache; without network the step is skipped
with a reason, never an exception. Note: both have fewer than 96 slices, so Models Genesis
sampling with the reference's borders (30 slices at each end, `min_slices` 96) skips them; `make demo`
pretrains with 4-slice borders (`pipeline.demo`), which takes them.
"""

from __future__ import annotations

import hashlib
import logging
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .luna16_layout import CandidateRecord, NoduleRecord, ScanRecord, write_scan, world_xyz
from .registry_files import PYRADIOMICS_SDIST, fetch

log = logging.getLogger(__name__)

CASES = ("lung1", "lung2")
SOURCE = PYRADIOMICS_SDIST.requirement


def read_cases(sdist: Path, names: tuple[str, ...] = CASES) -> dict[str, tuple[sitk.Image, sitk.Image]]:
    """{case: (image, mask)} read from the sdist's data/ folder (`<case>_image.nrrd`, `<case>_label.nrrd`):
    the lung CTs here, the brain MRIs for the BraTS sample."""
    cases = {}
    with tarfile.open(sdist, "r:gz") as tar, tempfile.TemporaryDirectory() as tmp:
        members = {Path(m.name).name: m for m in tar.getmembers()
                   if m.isfile() and Path(m.name).parent.name == "data"}
        for case in names:
            images = []
            for kind in ("image", "label"):
                name = f"{case}_{kind}.nrrd"
                if name not in members:
                    raise FileNotFoundError(f"{sdist.name} has no data/{name}")
                path = Path(tmp) / name
                path.write_bytes(tar.extractfile(members[name]).read())
                images.append(sitk.ReadImage(str(path)))
            cases[case] = (images[0], images[1])
    return cases


def case_seriesuid(case: str) -> str:
    """A deterministic UID under the UUID-derived root 2.25 (DICOM PS3.5 B.2), so a real case is
    never mistaken for a LIDC/LUNA16 series."""
    digest = hashlib.sha256(f"{SOURCE}/{case}".encode()).digest()[:16]
    return "2.25." + str(int.from_bytes(digest, "big"))


def tumours(image: sitk.Image, mask: sitk.Image, uid: str) -> tuple[NoduleRecord, ...]:
    """One annotation per connected mask component: centroid (world mm) and the diameter of the
    sphere of equal volume."""
    if mask.GetSize() != image.GetSize() or not np.allclose(mask.GetSpacing(), image.GetSpacing()):
        mask = sitk.Resample(mask, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    components = sitk.RelabelComponent(sitk.ConnectedComponent(mask > 0), minimumObjectSize=10)
    labels = sitk.GetArrayViewFromImage(components)
    voxel_mm3 = float(np.prod(image.GetSpacing()))
    records = []
    for label in range(1, int(labels.max()) + 1):
        idx = np.argwhere(labels == label)  # (z, y, x)
        volume = len(idx) * voxel_mm3
        diameter = (6.0 * volume / np.pi) ** (1.0 / 3.0)
        records.append(NoduleRecord(uid, world_xyz(image, idx.mean(axis=0)), round(float(diameter), 4)))
    return tuple(records)


NEGATIVES_PER_CASE = 6
"""False candidates (class 0) written per real case, as the phantoms' six: without them NCC saw a real CT only as
a positive and could learn "a real scan" instead of "a nodule"."""
LUNG_HU = (-920.0, -600.0)
"""Lung parenchyma: denser than the air around the patient (about -1000 HU), lighter than soft tissue."""
MIN_GAP_MM = 30.0
"""A false candidate lies at least this far from every tumour centre and from the other false candidates."""
MAX_DRAWS = 20_000


def lung_candidates(volume: np.ndarray, image: sitk.Image, nodules: tuple[NoduleRecord, ...], uid: str,
                    n: int = NEGATIVES_PER_CASE) -> tuple[CandidateRecord, ...]:
    """`n` class-0 candidates in the lung of a real case, as LUNA16's candidates.csv lists points that are not
    nodules: voxels of lung HU (`LUNG_HU`) in the middle 60% of the slices and of the in-plane field (inside the
    chest), at least `MIN_GAP_MM` from every tumour and from each other (fewer when `MAX_DRAWS` uniform draws find
    fewer). Drawn with a generator seeded by the case's UID, so the sample stays byte-identical."""
    rng = np.random.default_rng(int.from_bytes(hashlib.sha256(f"negatives/{uid}".encode()).digest()[:8], "big"))
    box = [(int(0.2 * n), int(0.8 * n)) for n in volume.shape]  # (z, y, x): inside the chest
    taken = [np.asarray(image.TransformPhysicalPointToContinuousIndex(t.coord_xyz_mm))[::-1] for t in nodules]
    spacing = np.asarray(image.GetSpacing())[::-1]
    out = []
    for _ in range(MAX_DRAWS):
        if len(out) == n:
            break
        p = np.array([rng.integers(lo, hi + 1) for lo, hi in box])
        if LUNG_HU[0] < volume[tuple(p)] < LUNG_HU[1] and all(np.linalg.norm((p - t) * spacing) >= MIN_GAP_MM
                                                              for t in taken):
            taken.append(p.astype(float))
            out.append(CandidateRecord(uid, world_xyz(image, p), 0))
    return tuple(out)


def write_real_scans(build_dir: Path, *, subset: int = 0, cache_dir: Path | None = None
                     ) -> tuple[list[ScanRecord], str]:
    """Convert the pyradiomics lung cases into build_dir/subset{subset}/. Returns (records,
    status) where status is "ok: ..." or "skipped: <reason>"; never raises for a missing network
    or a bad download."""
    sdist, reason = fetch(PYRADIOMICS_SDIST, cache_dir)
    if sdist is None:
        status = f"skipped: {reason}"
        log.warning("real CT %s", status)
        return [], status
    try:
        cases = read_cases(sdist)
    except (OSError, tarfile.TarError, RuntimeError) as e:
        status = f"skipped: cannot read {sdist}: {e}"
        log.warning("real CT %s", status)
        return [], status
    folder = build_dir / f"subset{subset}"
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for case, (image, mask) in cases.items():
        uid = case_seriesuid(case)
        # rebuild the image so that no NRRD metadata leaks into the .mhd header
        volume = sitk.GetArrayFromImage(sitk.Cast(image, sitk.sitkInt16))
        written = write_scan(volume, folder / f"{uid}.mhd", tuple(reversed(image.GetSpacing())),
                             image.GetOrigin(), image.GetDirection())
        nodules = tumours(written, mask, uid)
        records.append(ScanRecord(
            seriesuid=uid, subset=subset, source=f"{SOURCE}:data/{case}_image.nrrd",
            shape_zyx=tuple(volume.shape), spacing_zyx_mm=tuple(float(s) for s in reversed(image.GetSpacing())),
            origin_xyz_mm=tuple(float(o) for o in image.GetOrigin()), nodules=nodules,
            candidates=tuple(CandidateRecord(uid, n.coord_xyz_mm, 1) for n in nodules)
            + lung_candidates(volume, written, nodules, uid)))
    return records, f"ok: {len(records)} scans from {SOURCE} ({', '.join(cases)}) in subset{subset}"
