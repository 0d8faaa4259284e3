"""The task registry, patient splits, candidate geometry and task patch stores (real files, Dask, Zarr)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from conftest import make_image, write_mhd

from pipeline.cli import main
from pipeline.patches.store import PatchStore
from pipeline.patches.task_extract import extract_task
from pipeline.tasks.geometry import index_to_world, world_to_index
from pipeline.tasks.registry import get_task, register, task_names, tasks_table
from pipeline.tasks.sampling import crop, fraction_order, object_centres
from pipeline.tasks.spec import Sampling, SplitRule
from pipeline.tasks.splits import assign_splits
from pipeline.volume_store.convert import convert
from pipeline.volume_store.store import VolumeStore

# ---- registry ------------------------------------------------------------------------------------


def test_registry_holds_the_five_tasks_with_the_papers_cubes_and_recipes():
    assert task_names()[:5] == ["ncc", "ncs", "ecc", "lcs", "bms"]
    cubes = {n: get_task(n).cube_size for n in ("ncc", "ncs", "ecc", "lcs", "bms")}
    assert cubes == {"ncc": (32, 64, 64), "ncs": (32, 64, 64), "ecc": (64, 64, 64), "lcs": (32, 64, 64),
                     "bms": (32, 64, 64)}
    assert get_task("bms").sampling.crop_size == (50, 100, 100) and get_task("bms").channels == ("flair",)
    # the reference's compile(optimizer='adam') never reads config.lr: Adam's 1e-3 everywhere, LCS included
    assert [get_task(n).optimisation.lr for n in ("ncc", "ncs", "ecc", "lcs", "bms")] == [1e-3] * 5
    assert [get_task(n).optimisation.patience for n in ("ncc", "ncs", "ecc", "lcs", "bms")] == [10, 50, 38, 20, 30]
    assert get_task("NCC").published.genesis == (98.07, 0.59)
    assert {get_task(n).head for n in ("ncc", "ecc")} == {"encoder-gap-dense"}
    table = tasks_table()
    for name in ("NCC", "NCS", "ECC", "LCS", "BMS"):
        assert name in table
    assert "32x64x64 from 50x100x100" in tasks_table(markdown=True)


def test_a_sixth_task_is_one_entry_and_bad_specs_name_the_field():
    base = get_task("lcs")
    sixth = dataclasses.replace(base, name="kidney", title="kidney segmentation", dataset="kits",
                                sampling=dataclasses.replace(base.sampling, label="kidney"))
    register(sixth)
    try:
        assert get_task("kidney").sampling.label == "kidney" and "kidney" in tasks_table()
        with pytest.raises(ValueError, match="already registered"):
            register(sixth)
    finally:
        from pipeline.tasks import registry

        registry._TASKS.pop("kidney")
    with pytest.raises(ValueError, match=r"TaskSpec\('x'\).cube_size"):
        dataclasses.replace(base, name="x", cube_size=(32, 64))
    with pytest.raises(ValueError, match="Sampling.table"):
        Sampling(kind="candidates")
    with pytest.raises(ValueError, match="does not fit a classification task"):
        dataclasses.replace(get_task("ncc"), sampling=base.sampling)
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        get_task("nope")
    assert main(["tasks", "list"]) == 0 and main(["tasks", "show", "nope"]) == 2


# ---- splits --------------------------------------------------------------------------------------


def _cases(ids, patients=None, subsets=None):
    return pd.DataFrame({"case_id": ids, "patient_id": patients or ids, "subset": subsets or [None] * len(ids)})


def test_splits_are_by_patient_and_follow_each_rule():
    # luna16 subsets
    c = _cases([f"s{k}" for k in range(10)], subsets=[f"subset{k}" for k in range(10)])
    assert list(assign_splits(c, SplitRule(kind="luna16_subsets"))) == ["train"] * 5 + ["validation"] * 2 + ["test"] * 3
    # LiTS index ranges when the data cover them; a seeded patient draw otherwise (a 6-volume sample)
    lits = get_task("lcs").split
    full = _cases([f"volume-{k}" for k in (3, 99, 100, 114, 115, 129)])
    assert list(assign_splits(full, lits)) == ["train", "train", "validation", "validation", "test", "test"]
    small = _cases([f"volume-{k}" for k in range(6)])
    got = assign_splits(small, lits)
    assert set(got) == {"train", "validation", "test"} and list(got) == list(assign_splits(small, lits))
    # folds: fold 1 test; the other folds train, less one seeded validation patient (5%, at least one)
    f = _cases(["a", "b", "c", "d"], subsets=["fold1", "fold2", "fold3", "fold3"])
    got = list(assign_splits(f, SplitRule(kind="folds", test_fold=1)))
    assert got[0] == "test" and sorted(got[1:]) == ["train", "train", "validation"]
    with pytest.raises(ValueError, match="the data has fold1, fold2"):  # a fold-based task needs every fold
        assign_splits(f.iloc[:2], SplitRule(kind="folds", test_fold=1))
    # patient-seeded: several scans of one patient share its split, exact counts, seeded
    ids = [f"scan{k}" for k in range(40)]
    patients = [f"p{k // 2}" for k in range(40)]
    rule = SplitRule(kind="patient_seeded", fractions=(0.6, 0.2, 0.2), seed=3)
    s = assign_splits(_cases(ids, patients), rule)
    per_patient = pd.DataFrame({"p": patients, "s": s}).groupby("p")["s"].nunique()
    assert per_patient.max() == 1
    assert s.value_counts().to_dict() == {"train": 24, "validation": 8, "test": 8}
    assert list(s) != list(assign_splits(_cases(ids, patients), dataclasses.replace(rule, seed=4)))


def test_fraction_order_is_nested_and_stratified():
    labels = np.array([1] * 20 + [0] * 180)
    rank = fraction_order(labels, np.random.default_rng(0))
    assert sorted(rank) == list(range(200))
    for frac in (0.1, 0.25, 0.5):
        chosen = rank < int(frac * 200)
        assert abs(labels[chosen].mean() - 0.1) <= 0.02
    assert np.all((rank < 20) <= (rank < 50))  # 10% inside 25%


def test_crop_pads_outside_and_object_centres():
    vol = np.arange(4 * 5 * 6).reshape(4, 5, 6)
    out = crop(vol, np.array([-1, 3, 4]), (3, 3, 3), fill=-7)
    assert out[0].max() == -7 and out[1, 0, 0] == vol[0, 3, 4] and out[1, 2, 2] == -7
    lab = np.zeros((10, 10, 10), dtype=np.uint16)
    lab[1:4, 2:4, 5:7] = 1
    lab[7, 7, 7] = 3
    cents = object_centres(lab)
    np.testing.assert_allclose(cents[1], [2, 2.5, 5.5])
    np.testing.assert_allclose(cents[3], [7, 7, 7])
    assert set(cents) == {1, 3}


# ---- geometry: a candidate at a known world position ---------------------------------------------

OBLIQUE = (0, 1, 0, -1, 0, 0, 0, 0, -1)  # axes permuted and flipped: far from LPS


def test_candidate_world_position_lands_on_its_voxel_after_lps_reorientation(tmp_path):
    arr = np.full((20, 30, 40), -900, dtype=np.int16)
    marker = (13, 7, 29)
    arr[marker] = 500
    src = tmp_path / "luna" / "subset0"
    path = write_mhd(src / "1.2.3.mhd", arr, spacing=(0.7, 0.9, 2.5), origin=(-33.0, 71.5, -210.0),
                     direction=OBLIQUE)
    image = sitk.ReadImage(str(path))
    world = image.TransformContinuousIndexToPhysicalPoint([float(v) for v in marker[::-1]])
    store = tmp_path / "vs"
    assert convert([str(tmp_path / "luna")], str(store), workers=1, progress=False).ok
    vs = VolumeStore(store)
    attrs = vs.scan_attrs("1.2.3")["genesis"]
    stored = vs.read_scan("1.2.3")
    idx = np.rint(world_to_index(world, attrs)[0]).astype(int)
    assert stored[tuple(idx)] == 500 and stored.shape != arr.shape  # reoriented, and still found
    np.testing.assert_allclose(index_to_world(idx, attrs)[0], world, atol=1e-6)


# ---- task stores ---------------------------------------------------------------------------------


@pytest.fixture
def luna_store(tmp_path, rng):
    """Six LUNA16-layout scans with known bright findings (positives) and dark negatives, as candidates.csv."""
    src = tmp_path / "luna"
    rows, truth = [], {}
    for i, subset in enumerate([0, 1, 2, 5, 7, 8]):
        uid = f"1.2.840.{i}"
        arr = (np.full((40, 48, 48), -850) + rng.normal(0, 10, (40, 48, 48))).astype(np.int16)
        img = write_mhd(src / f"subset{subset}" / f"{uid}.mhd", arr, spacing=(0.8, 0.8, 1.5),
                        origin=(-20.0, 30.0, -100.0 - i), direction=(-1, 0, 0, 0, -1, 0, 0, 0, 1))
        image = sitk.ReadImage(str(img))
        pos = (20, 24, 20 + i)
        arr[pos] = 400
        sitk.WriteImage(make_image(arr, spacing=(0.8, 0.8, 1.5), origin=(-20.0, 30.0, -100.0 - i),
                                   direction=(-1, 0, 0, 0, -1, 0, 0, 0, 1)), str(img), useCompression=False)
        for k, (p, cls) in enumerate([(pos, 1), ((10, 10, 10), 0), ((30, 40, 8), 0), ((15, 30, 35), 0)]):
            x, y, z = image.TransformContinuousIndexToPhysicalPoint([float(v) for v in p[::-1]])
            rows.append({"seriesuid": uid, "coordX": x, "coordY": y, "coordZ": z, "class": cls})
        truth[uid] = pos
    rows.append({"seriesuid": "1.2.840.0", "coordX": 900.0, "coordY": 0.0, "coordZ": 0.0, "class": 0})  # outside
    rows.append({"seriesuid": "9.9.9", "coordX": 0.0, "coordY": 0.0, "coordZ": 0.0, "class": 1})  # no such scan
    pd.DataFrame(rows).to_csv(src / "candidates.csv", index=False)
    store = tmp_path / "vs"
    assert convert([str(src)], str(store), workers=1, progress=False).ok
    return store, truth


def test_classification_store_centres_candidates_and_records_splits(luna_store, tmp_path, capsys):
    store, truth = luna_store
    spec = get_task("ncc").with_overrides(cube_size=(8, 16, 16))
    spec = dataclasses.replace(spec, sampling=dataclasses.replace(spec.sampling, negatives_per_positive=None))
    res = extract_task(str(store), spec, out_root=str(tmp_path / "ps"), workers=1, progress=False)
    ps = PatchStore(res.path)
    idx = ps.index
    assert res.path.name == f"task-ncc-{res.key}" and ps.purpose == "classification"
    assert ps.cubes.shape == (len(idx), 1, 8, 16, 16) == (24, 1, 8, 16, 16)
    # the candidate outside its volume is a failed item with the reason; the unknown scan is counted
    assert len(res.failed) == 1 and "outside the volume" in res.failed[0]["reason"]
    assert ps.attrs["candidates_without_scan"] == 1
    pos = idx[idx["label"] == 1]
    assert len(pos) == 6
    for r in pos.itertuples():
        cube = ps.cubes[r.row, 0]
        assert cube.max() == cube[4, 8, 8] == pytest.approx(0.7)  # the finding at the middle voxel (side // 2)
    assert dict(zip(idx["scan_id"], idx["split"]))["1.2.840.3"] == "validation"
    assert idx.groupby("patient_id")["split"].nunique().max() == 1
    assert idx.loc[idx["split"] == "train", "fraction_order"].notna().all()
    assert idx.loc[idx["split"] != "train", "fraction_order"].isna().all()
    # negatives subsampled by a recorded ratio in train and validation; all positives kept, the test split whole
    sub = dataclasses.replace(spec, sampling=dataclasses.replace(spec.sampling, negatives_per_positive=1.0))
    res2 = extract_task(str(store), sub, out_root=str(tmp_path / "ps"), workers=1, progress=False)
    idx2 = PatchStore(res2.path).index
    assert res2.key != res.key and (idx2["label"] == 1).sum() == 6
    for split, group in idx2.groupby("split"):
        negatives = 3 * (group["label"] == 1).sum() if split == "test" else (group["label"] == 1).sum()
        assert (group["label"] == 0).sum() == negatives
    assert PatchStore(res2.path).attrs["config"]["task"]["sampling"]["negatives_per_positive"] == 1.0
    # the same inputs reuse the store; the CLI reports the failed candidate with exit status 1
    code = main(["patches", "task", "ncc", "--store", str(store), "--out", str(tmp_path / "ps"), "--size", "8,16,16",
                 "--negative-ratio", "all", "--workers", "1", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 1 and f"reused existing patch store {res.path}" in out
    assert main(["stores", "show", str(res.path)]) == 0
    assert main(["patches", "preview", str(res.path), "--out", str(tmp_path / "p.png")]) == 0
    assert (tmp_path / "p.png").stat().st_size > 10_000


def _write_pair(folder, name, image, label, **geom):
    folder.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(make_image(image, **geom), str(folder / f"{name}.nii.gz"))
    sitk.WriteImage(make_image(label, **geom), str(folder / f"{name.replace('volume', 'segmentation')}.nii.gz"))


def test_segmentation_store_masks_equal_the_stored_labels_and_test_scans_stay_whole(tmp_path, rng):
    src = tmp_path / "lits"
    for k in range(5):
        img = (rng.normal(40, 20, (24, 40, 40))).astype(np.int16)
        lab = np.zeros((24, 40, 40), dtype=np.uint8)
        lab[8:14, 12:22, 8 + k:18] = 1
        lab[10:12, 14:16, 14:16] = 2
        img[lab > 0] += 30
        _write_pair(src, f"volume-{k}", img, lab, direction=(-1, 0, 0, 0, -1, 0, 0, 0, 1))
    store = tmp_path / "vs"
    assert convert([str(src)], str(store), workers=1, progress=False).ok
    # on the volumes' own grid (inplane_scale 1): the masks are crops of the stored label maps
    spec = get_task("lcs").with_overrides(cube_size=(8, 16, 16), inplane_scale=1.0, **{"sampling.per_scan": 6})
    res = extract_task(str(store), spec, out_root=str(tmp_path / "ps"), workers=2, progress=False)
    ps = PatchStore(res.path)
    idx, scans = ps.index, ps.scans
    assert ps.masks.shape == ps.cubes.shape == (len(idx), 1, 8, 16, 16)
    assert set(scans["split"]) == {"train", "validation", "test"}
    test_cases = set(scans.loc[scans["split"] == "test", "case_id"])
    assert test_cases and not test_cases & set(idx["case_id"])  # whole-volume evaluation: no cubes
    assert (scans.loc[scans["split"] == "test", "n_cubes"] == 0).all()
    vs = VolumeStore(store)
    for r in idx.itertuples():
        label = vs.open_scan(r.scan_id)["labels"]["segmentation"]["0"][...]
        expect = crop(label, np.array([r.z, r.y, r.x]), (8, 16, 16)) > 0  # liver incl. tumour
        np.testing.assert_array_equal(ps.masks[r.row, 0], expect)
        assert r.label == int(expect.any()) and r.foreground_fraction == pytest.approx(expect.mean())
    assert 0 < idx["label"].mean() < 1  # positive and negative draws
    again = extract_task(str(store), spec, out_root=str(tmp_path / "ps"), workers=1, progress=False)
    assert again.reused and again.path == res.path


def test_object_centred_and_multichannel_segmentation(tmp_path, rng):
    # objects (NCS rule) on a store whose label map is `seg`: crops centred on each object plus jitter
    src = tmp_path / "nod"
    src.mkdir()
    img = np.full((30, 40, 40), -850, dtype=np.int16)
    lab = np.zeros_like(img, dtype=np.uint16)
    lab[8:11, 10:13, 10:13] = 1
    lab[20:23, 25:29, 30:33] = 2
    img[lab > 0] = 50
    sitk.WriteImage(make_image(img), str(src / "case.nii.gz"))
    sitk.WriteImage(make_image(lab), str(src / "case_seg.nii.gz"))
    store = tmp_path / "vs"
    assert convert([str(src)], str(store), workers=1, progress=False).ok
    ncs = get_task("ncs")
    spec = dataclasses.replace(ncs, dataset="nifti", cube_size=(8, 16, 16), split=SplitRule(kind="patient_seeded"),
                               sampling=dataclasses.replace(ncs.sampling, label="seg", per_object=3, jitter=(1, 2, 2)))
    res = extract_task(str(store), spec, out_root=str(tmp_path / "ps"), workers=1, progress=False)
    idx = PatchStore(res.path).index
    assert len(idx) == 6 and sorted(set(idx["source_id"])) == [1, 2]
    cents = object_centres(VolumeStore(store).open_scan("case")["labels"]["seg"]["0"][...])
    for r in idx.itertuples():  # the voxel in the middle of the cube is the one nearest centroid + jitter
        middle = np.array([r.z, r.y, r.x]) + np.array([8, 16, 16]) // 2
        wanted = cents[r.source_id] + np.array([r.jitter_z, r.jitter_y, r.jitter_x])
        np.testing.assert_array_equal(middle, np.floor(wanted + 0.5))
        assert abs(r.jitter_z) <= 1 and abs(r.jitter_y) <= 2
    # multi-channel (BMS rule): two sequences of a case stacked, a crop resized to the cube
    bsrc = tmp_path / "brats" / "HGG"
    for c in range(3):
        case = f"Brats18_X_{c}_1"
        seg = np.zeros((20, 32, 32), dtype=np.uint8)
        seg[8:12, 12:20, 12:20] = 2
        seg[9:11, 14:18, 14:18] = 4
        for seq, base in (("flair", 300), ("t1", 600)):
            arr = (rng.normal(base, 10, seg.shape) + 200 * (seg > 0)).astype(np.int16)
            (bsrc / case).mkdir(parents=True, exist_ok=True)
            sitk.WriteImage(make_image(arr, spacing=(1, 1, 1)), str(bsrc / case / f"{case}_{seq}.nii.gz"))
        sitk.WriteImage(make_image(seg, spacing=(1, 1, 1)), str(bsrc / case / f"{case}_seg.nii.gz"))
    bstore = tmp_path / "bvs"
    assert convert([str(tmp_path / "brats")], str(bstore), workers=1, progress=False).ok
    bms = get_task("bms")
    bspec = bms.with_overrides(cube_size=(4, 8, 8), channels=("flair", "t1"), **{"sampling.crop_size": (8, 16, 16),
                                                                               "sampling.per_scan": 4})
    res = extract_task(str(bstore), bspec, out_root=str(tmp_path / "ps"), workers=1, progress=False)
    ps = PatchStore(res.path)
    assert ps.cubes.shape[1:] == (2, 4, 8, 8) and ps.masks.shape[1:] == (1, 4, 8, 8)
    assert ps.attrs["channels"] == ["flair", "t1"]
    assert set(np.unique(ps.masks[...])) <= {0, 1}
    scans = ps.scans
    assert len(scans) == 3 and all(len(s) == 2 for s in scans["scan_ids"])
    assert all(s[0].endswith("_flair") and s[1].endswith("_t1") for s in scans["scan_ids"])
    cubes = ps.cubes[...]
    assert 0 <= cubes.min() and cubes.max() <= 1
    # a channel the cases lack: every case skipped with the reason, nothing built
    with pytest.raises(RuntimeError, match="no t2 sequence"):
        extract_task(str(bstore), bspec.with_overrides(channels=("t2",)), out_root=str(tmp_path / "ps"), workers=1,
                     progress=False)
    assert json.loads((res.path / "zarr.json").read_text(encoding="utf-8"))["attributes"]["genesis"]["task"] == "bms"


def test_readme_task_table_is_the_registry():
    from pathlib import Path

    readme = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    start, end = readme.index("<!-- tasks-table -->"), readme.index("<!-- /tasks-table -->")
    assert readme[start:end].split("\n", 1)[1].strip() == tasks_table(markdown=True, builtin_only=True).strip()


def test_interrupted_task_extraction_resumes_with_finished_cases(luna_store, tmp_path):
    from pipeline.patches.task_extract import extract_case, task_key
    from pipeline.patches.task_plan import plan_task

    store, _ = luna_store
    spec = get_task("ncc").with_overrides(cube_size=(8, 16, 16))
    ref = extract_task(str(store), spec, out_root=str(tmp_path / "ref"), workers=1, progress=False)
    # a run killed after its first case: the building folder holds that case's part and result only
    plan = plan_task(VolumeStore(store), spec, 0)
    name = f"task-ncc-{task_key(plan, spec, 0)}"
    building = tmp_path / "ps" / f".building-{name}"
    import zarr

    zarr.open_group(str(building), mode="w")
    (building / "results").mkdir()
    (building / "parts").mkdir()
    extract_case(str(store), plan.cases[0], spec, 0, 0, str(building))
    assert main(["stores", "list", str(tmp_path / "ps")]) == 0 and not (tmp_path / "ps" / name).exists()
    res = extract_task(str(store), spec, out_root=str(tmp_path / "ps"), workers=1, progress=False)
    assert res.path.name == name and not building.exists() and not res.reused
    assert [t["case_id"] for t in res.tasks] == [c["case_id"] for c in plan.cases[1:]]  # the first was kept
    np.testing.assert_array_equal(PatchStore(res.path).cubes[...], PatchStore(ref.path).cubes[...])
    assert PatchStore(res.path).index.equals(PatchStore(ref.path).index)


def test_draw_voxels_is_uniform_over_the_mask_without_listing_it():
    from pipeline.tasks.sampling import draw_voxels, pos_neg_centres

    mask = np.zeros((20, 30, 40), dtype=bool)
    mask[:, :, :30] = True  # a large class: drawn by rejection
    got = draw_voxels(mask, 6000, np.random.default_rng(0))
    assert mask.reshape(-1)[got].all() and np.array_equal(got, draw_voxels(mask, 6000, np.random.default_rng(0)))
    x = np.unravel_index(got, mask.shape)[2]
    assert np.abs(np.bincount(x, minlength=30)[:30] / 200 - 1).max() < 0.35  # ~200 per column
    small = np.zeros_like(mask)
    small[3, 4, 5] = True  # a tiny class: listed
    assert set(draw_voxels(small, 5, np.random.default_rng(1))) == {np.ravel_multi_index((3, 4, 5), mask.shape)}
    assert draw_voxels(np.zeros_like(mask), 3, np.random.default_rng(0)) is None
    # no target at all: every draw goes to the background
    centres, is_pos = pos_neg_centres(np.zeros_like(mask), mask, 10, 1.0, 1.0, (4, 8, 8), np.random.default_rng(2))
    assert not is_pos.any() and len(centres) == 10
