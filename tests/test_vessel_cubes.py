"""ECC's vessel-oriented cubes (the paper's VOIR): a vessel given by the candidate table lies along the cube's z axis.

The core on synthetic volumes (an oblique bright cylinder, non-identity spacing, then a rotated scan),
then the real `genesis convert` -> `genesis patches task ecc` path on the PE-CAD sample, checked against
cubes recomputed from the .mhd files through SimpleITK, and the bad-direction refusal of the task build.
"""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import SimpleITK as sitk

from pipeline.cli import main
from pipeline.patches.store import PatchStore
from pipeline.patches.task_extract import _candidate_cube
from pipeline.sample_data.pe import write_pe_sample
from pipeline.tasks import sampling as S
from pipeline.tasks.geometry import cube_steps, index_to_world, vessel_frame, world_to_index

SIZE = (16, 16, 16)
BOUNDS = (-1000.0, 1000.0)


def _rotation(axis, degrees: float) -> np.ndarray:
    a = np.asarray(axis, float) / np.linalg.norm(axis)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    t = np.deg2rad(degrees)
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * k @ k


def _attrs(spacing_zyx, direction=np.eye(3), origin_zyx=(-40.0, 12.5, -7.0)) -> dict:
    return {"spacing": list(spacing_zyx), "origin": list(origin_zyx),
            "direction": [float(v) for v in np.asarray(direction).reshape(-1)]}


def _cylinder(shape, attrs, centre_zyx, axis_xyz, radius_mm=2.0) -> np.ndarray:
    """int16 HU: +1000 within radius_mm of the world line through voxel centre_zyx along axis_xyz, else -1000."""
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1).reshape(-1, 3)
    p = index_to_world(idx, attrs) - index_to_world(centre_zyx, attrs)
    a = np.asarray(axis_xyz, float) / np.linalg.norm(axis_xyz)
    dist = np.linalg.norm(p - (p @ a)[:, None] * a[None, :], axis=1)
    return np.where(dist <= radius_mm, 1000, -1000).astype(np.int16).reshape(shape)


def _principal_angle(cube: np.ndarray, steps_mm) -> float:
    """Degrees between the cube's z axis and the principal axis of its bright voxels, in mm."""
    pts = np.argwhere(cube > 0.5) * np.asarray(steps_mm, float)
    pts -= pts.mean(axis=0)
    _, vecs = np.linalg.eigh(pts.T @ pts)
    return float(np.degrees(np.arccos(min(1.0, abs(vecs[0, -1])))))


CASES = {
    "identity direction": (np.eye(3), (2.0, 0.8, 0.6)),
    "rotated scan": (_rotation((0.3, -1.0, 0.4), 25.0), (1.5, 0.7, 0.9)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_oblique_vessel_lies_along_the_cube_z_axis(name):
    direction, spacing = CASES[name]
    attrs = _attrs(spacing, direction)
    shape = (40, 72, 80)
    centre = np.array([20.0, 36.0, 40.0])
    axis = np.array([0.45, -0.6, 0.66])  # oblique in world x, y, z
    volume = _cylinder(shape, attrs, centre, axis)
    cube, start, voxel, z_axis = _candidate_cube(volume, attrs, centre, list(axis), SIZE, BOUNDS)
    cube = cube[0]
    assert cube.shape == SIZE and cube.dtype == np.float32
    np.testing.assert_array_equal(voxel, centre)
    np.testing.assert_array_equal(start, centre - np.array(SIZE) // 2)
    # the recorded orientation is the vessel's, normalised (sign: along the scan's z axis)
    assert abs(np.dot(z_axis, axis / np.linalg.norm(axis))) == pytest.approx(1.0, abs=1e-12)
    # the vessel runs along the cube's z axis: bright along the whole central line, dark off it
    assert (cube[:, 8, 8] > 0.9).all(), cube[:, 8, 8]
    assert (cube[:, 0, 0] < 0.1).all() and (cube[:, 15, 15] < 0.1).all()
    assert _principal_angle(cube, spacing) < 3.0
    # the axis-aligned crop of the same candidate does not show it along z
    aligned = S.scale(S.crop(volume, start, SIZE, fill=BOUNDS[0]), BOUNDS)
    assert _principal_angle(aligned, spacing) > 30.0
    assert not (aligned[:, 8, 8] > 0.9).all()
    # the table's sign carries no meaning: the same cube either way
    flipped, *_ = _candidate_cube(volume, attrs, centre, list(-axis), SIZE, BOUNDS)
    np.testing.assert_array_equal(flipped[0], cube)
    # the cube is the scan resampled: its centre voxel exactly, its rows at the frame's mm positions
    assert cube[8, 8, 8] == pytest.approx(1.0)
    frame = vessel_frame(axis, attrs)
    np.testing.assert_allclose(frame @ frame.T, np.eye(3), atol=1e-12)  # orthonormal in world mm
    assert np.linalg.det(frame[::-1]) == pytest.approx(1.0)  # (x, y, z) right-handed: no mirror image
    steps = cube_steps(frame, spacing, attrs)
    p = index_to_world(centre + 3 * steps[0] - 2 * steps[2], attrs)[0]
    q = index_to_world(centre, attrs)[0] + 3 * spacing[0] * frame[0] - 2 * spacing[2] * frame[2]
    np.testing.assert_allclose(p, q, atol=1e-9)


def test_no_direction_is_the_axis_aligned_crop_and_z_direction_matches_it():
    attrs = _attrs((2.0, 0.8, 0.6))
    rng = np.random.default_rng(0)
    volume = rng.integers(-1200, 1500, size=(30, 40, 44)).astype(np.int16)
    centre = np.array([10.2, 30.6, 5.4])  # near a border: the crop is padded
    start = S.centred_start(centre, SIZE)
    expected = S.scale(S.crop(volume, start, SIZE, fill=BOUNDS[0]), BOUNDS)
    cube, start2, voxel, z_axis = _candidate_cube(volume, attrs, centre, None, SIZE, BOUNDS)
    np.testing.assert_array_equal(cube[0], expected)
    assert voxel is None and z_axis is None and tuple(start2) == tuple(start)
    # a vessel along the scan's z axis (either sign) gives exactly the axis-aligned crop, padding included
    for d in ([0.0, 0.0, 1.0], [0.0, 0.0, -1.0]):
        cube, _, _, z_axis = _candidate_cube(volume, attrs, centre, d, SIZE, BOUNDS)
        np.testing.assert_allclose(cube[0], expected, atol=1e-6)
        assert z_axis == [0.0, 0.0, 1.0]


def test_oriented_crop_reads_only_the_block_it_needs():
    class Counting(np.ndarray):
        read: list = []

        def __getitem__(self, key):
            if isinstance(key, tuple) and all(isinstance(k, slice) for k in key):
                Counting.read.append(tuple(k.stop - k.start for k in key))
            return super().__getitem__(key)

    volume = np.zeros((200, 300, 300), dtype=np.int16).view(Counting)
    attrs = _attrs((1.0, 1.0, 1.0))
    frame = vessel_frame([1.0, 1.0, 1.0], attrs)
    S.oriented_crop(volume, np.array([100.0, 150.0, 150.0]), cube_steps(frame, (1, 1, 1), attrs), SIZE)
    (block,) = Counting.read
    assert max(block) <= int(np.ceil(16 * np.sqrt(3))) + 2


@pytest.mark.parametrize("bad", [[0.0, 0.0, 0.0], [np.inf, 0.0, 1.0], [np.nan, 1.0, 0.0]])
def test_a_direction_that_cannot_orient_is_refused(bad):
    with pytest.raises(ValueError, match="zero length|not finite"):
        vessel_frame(bad, _attrs((1.0, 1.0, 1.0)))


# --- through the real commands, on the PE-CAD sample -----------------------------------------------

@pytest.fixture(scope="module")
def ecc(tmp_path_factory):
    root = tmp_path_factory.mktemp("ecc")
    sample = write_pe_sample(root / "PE-CAD", n_scans=5, seed=5, small=True)  # 3 patients: folds 1..3
    store = root / "vs"
    assert main(["convert", str(sample.out_dir), "--store", str(store), "--workers", "1", "--no-progress"]) == 0
    assert main(["patches", "task", "ecc", "--store", str(store), "--out", str(root / "ps"), "--workers", "1",
                 "--no-progress"]) == 0
    return sample, store, PatchStore(next((root / "ps").glob("task-ecc-*"))), root


def test_ecc_store_cubes_are_vessel_oriented(ecc):
    sample, store, ps, _ = ecc
    truth = {(c.case_id, c.coord_xyz_mm): c for c in sample.candidates}
    table = pq.read_table(store / "tables" / "pe_candidates.parquet").to_pandas()
    images = {s.case_id: sitk.ReadImage(str(sample.mhd_path(s.case_id))) for s in sample.scans}
    counts = ps.attrs["candidate_counts"]  # the plan's per-split counts, kept with the store
    assert sum(c["candidates"] for c in counts.values()) == len(table)
    assert all(c["negatives_kept"] == c["negatives"] for c in counts.values())  # ECC keeps every candidate
    oriented = 0
    for r in ps.index.itertuples():
        cand = table.iloc[r.source_id]
        c = truth[(cand.case_id, (cand.coordX, cand.coordY, cand.coordZ))]
        image = images[r.case_id]
        hu = sitk.GetArrayFromImage(image)
        attrs = _attrs(image.GetSpacing()[::-1], np.reshape(image.GetDirection(), (3, 3)), image.GetOrigin()[::-1])
        centre = world_to_index(c.coord_xyz_mm, attrs)[0]
        cube = ps.cubes[r.row, 0]
        if c.direction_xyz is None:  # lymph nodes: axis-aligned, as before
            assert np.isnan(r.direction_x)
            start = S.centred_start(centre, (64, 64, 64))
            np.testing.assert_array_equal(cube, S.scale(S.crop(hu, start, (64, 64, 64), fill=-1000), BOUNDS))
            continue
        oriented += 1
        recorded = np.array([r.direction_x, r.direction_y, r.direction_z])
        assert abs(recorded @ np.asarray(c.direction_xyz)) == pytest.approx(1.0, abs=1e-3)
        frame = vessel_frame(c.direction_xyz, attrs)
        np.testing.assert_allclose(recorded, frame[0], atol=1e-12)
        steps = cube_steps(frame, image.GetSpacing()[::-1], attrs)
        again = S.scale(S.oriented_crop(hu, np.floor(centre + 0.5), steps, (64, 64, 64), fill=-1000), BOUNDS)
        np.testing.assert_allclose(cube, again, atol=1e-6)
        # the centre row of the index is the candidate's voxel
        np.testing.assert_allclose([r.center_x_mm, r.center_y_mm, r.center_z_mm],
                                   index_to_world(np.floor(centre + 0.5), attrs)[0], atol=1e-9)
        if c.kind == "vein":  # the sample's directions follow its vessels: enhanced along cube z, lung across
            line = cube[32 - 2:32 + 3, 32, 32]
            across = [cube[32, 32, 32 + k] for k in (-12, 12)] + [cube[32, 32 + k, 32] for k in (-12, 12)]
            assert line.min() > 0.5 > 0.2 > min(across), (line, across)
    assert oriented >= 3


def test_task_build_refuses_a_zero_direction_before_any_work(ecc, capsys, tmp_path):
    _, store, _, root = ecc
    import shutil

    copy = tmp_path / "vs"
    shutil.copytree(store, copy)
    path = copy / "tables" / "pe_candidates.parquet"
    df = pq.read_table(path).to_pandas()
    row = int(df.index[df["dirX"].notna()][0])
    df.loc[row, ["dirX", "dirY", "dirZ"]] = 0.0
    import pyarrow as pa

    pq.write_table(pa.Table.from_pandas(df, schema=pq.read_schema(path), preserve_index=False), path)
    out = tmp_path / "ps"
    code = main(["patches", "task", "ecc", "--store", str(copy), "--out", str(out), "--workers", "1",
                 "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    (line,) = [ln for ln in err.splitlines() if ln.strip()]
    assert str(path) in line and f"row {row}" in line and "(0, 0, 0)" in line and "zero length" in line
    assert not out.exists() or not any(out.iterdir())
