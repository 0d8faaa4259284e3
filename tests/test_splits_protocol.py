"""Each task's split protocol as the reference ran it (issue 15, section 2), on small real stores.

ECC: patient-level 3-fold cross-validation, one store holding every fold, viewed per fold. NCC: the test
split scores every candidate. BMS: the reference's fold lists and its `random.Random(4)` draw. Any task:
splits from a CSV or nnU-Net's splits_final.json, and the bad inputs that must stop a build before it starts.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import random
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from conftest import make_image, write_mhd

from pipeline.cli import main
from pipeline.patches.store import PatchStore
from pipeline.patches.task_extract import extract_task, task_key
from pipeline.patches.task_plan import plan_task
from pipeline.sample_data.pe import write_pe_sample
from pipeline.tasks import Published, SplitRule, get_task, tasks_table
from pipeline.tasks.splits import assign_splits, fold_assignment, reference_list_splits, with_splits_file
from pipeline.volume_store.convert import convert
from pipeline.volume_store.store import VolumeStore

CUBE = (8, 16, 16)
DATA = Path(__file__).parent.parent / "pipeline" / "tasks" / "data"

# ---- ECC: 3-fold cross-validation by patient -------------------------------------------------------


def test_fold_assignment_gives_the_references_74_4_39_and_tests_every_patient_once():
    patients = {f"P{i:03d}": 1 + i % 3 for i in range(117)}  # 39 per fold, as PE-CAD
    tested = []
    for k in (1, 2, 3):
        got = fold_assignment(patients, k, 0.05, seed=0)
        counts = pd.Series(got).value_counts().to_dict()
        assert counts == {"train": 74, "validation": 4, "test": 39}
        assert {p for p, s in got.items() if s == "test"} == {p for p, f in patients.items() if f == k}
        assert all(patients[p] != k for p, s in got.items() if s == "validation")  # drawn from the training folds
        assert got == fold_assignment(patients, k, 0.05, seed=0)
        tested += [p for p, s in got.items() if s == "test"]
    assert sorted(tested) == sorted(patients)  # every patient is tested exactly once across the folds
    assert fold_assignment(patients, 1, 0.05, seed=1) != fold_assignment(patients, 1, 0.05, seed=0)
    # a small cohort: at least one validation patient while one is left to train
    assert pd.Series(fold_assignment({"a": 1, "b": 2, "c": 3}, 1, 0.05, 0)).value_counts().to_dict() == \
        {"test": 1, "validation": 1, "train": 1}
    assert fold_assignment({"a": 1, "b": 2}, 1, 0.05, 0) == {"a": "test", "b": "train"}


@pytest.fixture(scope="module")
def pe(tmp_path_factory):
    """A PE-CAD sample (8 scans, 5 patients: p00 fold1 x2 scans, p01 fold1, p02 fold3, p03 fold2, p04 fold2 x3)."""
    root = tmp_path_factory.mktemp("pe")
    summary = write_pe_sample(root / "src", n_scans=8, seed=0, small=True)
    assert convert([str(root / "src")], str(root / "vs"), workers=1, progress=False).ok
    return root, summary


def _pe_variant(root: Path, summary, name: str, folds: dict[str, int | None]) -> Path:
    """The sample converted again with another pe_folds.csv (a patient mapped to None has no row)."""
    src = root / name
    shutil.copytree(summary.out_dir, src)
    rows = ["patient_id,fold"] + [f"{p},{k}" for p, k in sorted(folds.items()) if k is not None]
    (src / "pe_folds.csv").write_text("\n".join(rows) + "\n", encoding="ascii")
    assert convert([str(src)], str(root / f"{name}_vs"), workers=1, progress=False).ok
    return root / f"{name}_vs"


def test_ecc_store_holds_every_fold_and_each_fold_view_is_what_its_build_writes(pe, tmp_path):
    root, summary = pe
    folds = summary.folds
    spec = get_task("ecc").with_overrides(cube_size=CUBE)
    assert spec.data_dict() == spec.with_overrides(**{"split.test_fold": 3}).data_dict()
    res = extract_task(str(root / "vs"), spec, out_root=str(tmp_path / "ps"), workers=1, progress=False)
    ps = PatchStore(res.path)
    truth = pd.read_csv(summary.candidates_csv)
    assert ps.folds == (1, 2, 3) and len(ps.index) == len(truth)  # every candidate of every fold
    tested = []
    for k in ps.folds:
        view = ps.for_fold(k)
        idx, scans = view.index, view.scans
        assert view.fold == k and ps.index is not idx
        assert idx.groupby("patient_id")["split"].nunique().max() == 1
        assert set(idx.loc[idx["split"] == "test", "patient_id"]) == {p for p, f in folds.items() if f == k}
        val = set(scans.loc[scans["split"] == "validation", "patient_id"])
        assert len(val) == 1 and folds[val.pop()] != k  # 5% of 3-4 patients, at least one, from the other folds
        assert view.attrs["counts"] == idx["split"].value_counts().reindex(
            ["train", "validation", "test"], fill_value=0).to_dict()
        train = idx["split"] == "train"
        assert sorted(idx.loc[train, "fraction_order"].astype(int)) == list(range(int(train.sum())))
        assert idx.loc[~train, "fraction_order"].isna().all()
        np.testing.assert_array_equal(np.sort(view.rows("test")), np.sort(idx.loc[idx["split"] == "test", "row"]))
        assert set(view.fraction_rows(1.0)) == set(idx.loc[train, "row"])
        tested += sorted(set(scans.loc[scans["split"] == "test", "patient_id"]))
    assert sorted(tested) == sorted(folds)  # each patient tested once
    # the fold is not part of the key: asking for fold 2 finds the same store
    again = extract_task(str(root / "vs"), spec.with_overrides(**{"split.test_fold": 2}),
                         out_root=str(tmp_path / "ps"), workers=1, progress=False)
    assert again.reused and again.path == res.path
    # whatever --test-fold builds it, the stored `split` column is fold 1's run (the key ignores the fold)
    other = PatchStore(extract_task(str(root / "vs"), spec.with_overrides(**{"split.test_fold": 2}),
                                    out_root=str(tmp_path / "ps2"), workers=1, progress=False).path)
    built = other.index.sort_values("row").reset_index(drop=True)
    assert list(built["split"]) == list(ps.for_fold(1).index["split"])
    # the fold-2 view is what the planner assigns for test fold 2, case by case, with the build's fraction order
    plan = plan_task(VolumeStore(str(root / "vs")), spec.with_overrides(**{"split.test_fold": 2}), 0)
    view = ps.for_fold(2)
    planned = {c["case_id"]: c["split"] for c in plan.cases}
    assert dict(zip(view.scans["case_id"], view.scans["split"])) == planned
    assert list(view.index["split"]) == [planned[c] for c in view.index["case_id"]]
    with pytest.raises(ValueError, match=rf"{ps.path} has folds 1, 2, 3; fold 4"):
        ps.for_fold(4)


def test_ecc_leaves_out_patients_without_a_fold_and_refuses_data_lacking_folds(pe, tmp_path, capsys):
    root, summary = pe
    spec = get_task("ecc").with_overrides(cube_size=CUBE)
    no_fold = dict(summary.folds, **{"pe0-p01": None})
    plan = plan_task(VolumeStore(_pe_variant(root, summary, "nofold", no_fold)), spec, 0)
    assert {c["patient_id"] for c in plan.cases} == set(summary.folds) - {"pe0-p01"}
    skipped = [s for s in plan.skipped if "no fold" in s["reason"]]
    assert [s["scan_id"] for s in skipped] == ["pe0-c001"] and "pe0-p01" in skipped[0]["reason"]
    # two folds where three are asked: one line naming the folds found, nothing built
    two = {p: min(k, 2) for p, k in summary.folds.items()}
    store = _pe_variant(root, summary, "twofolds", two)
    with pytest.raises(ValueError, match=r"needs folds 1\.\.3 .*the data has fold1, fold2 \(lacks fold3\)"):
        plan_task(VolumeStore(store), spec, 0)
    out = tmp_path / "ps"
    code = main(["patches", "task", "ecc", "--store", str(store), "--out", str(out), "--workers", "1", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "lacks fold3" in err and len(err.splitlines()) == 1
    assert not out.exists() or not any(out.iterdir())
    # a fold store keeps every candidate: a negative ratio is refused, before anything is built
    with pytest.raises(ValueError, match="fold-based store keeps every candidate"):
        plan_task(VolumeStore(root / "vs"), spec.with_overrides(**{"sampling.negatives_per_positive": 2.0}), 0)


# ---- NCC: every test candidate is scored --------------------------------------------------------


@pytest.fixture(scope="module")
def luna(tmp_path_factory):
    """Six LUNA16 scans (subsets 0, 1, 2 | 5 | 7, 8), one positive and three negatives each."""
    root = tmp_path_factory.mktemp("luna")
    rng = np.random.default_rng(5)
    rows = []
    for i, subset in enumerate([0, 1, 2, 5, 7, 8]):
        arr = (np.full((24, 32, 32), -850) + rng.normal(0, 10, (24, 32, 32))).astype(np.int16)
        path = write_mhd(root / "src" / f"subset{subset}" / f"1.3.6.{i}.mhd", arr, spacing=(1.0, 1.0, 1.5))
        image = sitk.ReadImage(str(path))
        for p, cls in [((12, 16, 16), 1), ((6, 8, 8), 0), ((18, 24, 8), 0), ((10, 20, 25), 0)]:
            x, y, z = image.TransformContinuousIndexToPhysicalPoint([float(v) for v in p[::-1]])
            rows.append({"seriesuid": f"1.3.6.{i}", "coordX": x, "coordY": y, "coordZ": z, "class": cls})
    pd.DataFrame(rows).to_csv(root / "src" / "candidates.csv", index=False)
    assert convert([str(root / "src")], str(root / "vs"), workers=1, progress=False).ok
    return root / "vs"


def test_ncc_test_split_keeps_every_candidate_and_counts_them(luna, tmp_path):
    spec = get_task("ncc").with_overrides(cube_size=CUBE, **{"sampling.negatives_per_positive": 1.0})
    plan = plan_task(VolumeStore(luna), spec, 0)
    assert plan.candidate_counts == {
        "train": {"candidates": 12, "positives": 3, "negatives": 9, "negatives_kept": 3},
        "validation": {"candidates": 4, "positives": 1, "negatives": 3, "negatives_kept": 1},
        "test": {"candidates": 8, "positives": 2, "negatives": 6, "negatives_kept": 6}}
    assert sum(len(c["candidates"]) for c in plan.cases if c["split"] == "test") == 8
    ps = PatchStore(extract_task(str(luna), spec, out_root=str(tmp_path / "ps"), workers=1, progress=False).path)
    labels = ps.index.groupby("split")["label"].value_counts().unstack().to_dict("index")
    assert labels == {"test": {0: 6, 1: 2}, "train": {0: 3, 1: 3}, "validation": {0: 1, 1: 1}}
    assert ps.folds == ()
    with pytest.raises(ValueError, match="not a fold-based task store"):
        ps.for_fold(1)


# ---- BMS: the reference's lists and its Random(4) ------------------------------------------------


def _config_py_bms(folder: Path) -> tuple[list[str], list[str], list[str]]:
    """keras/downstream_tasks/config.py:58-62 with its _load_csv (75-83), transcribed."""
    def _load_csv(foldfile):
        patient_ids = []
        with open(foldfile, "r") as f:
            reader = csv.reader(f, lineterminator="\n")
            patient_ids.extend(reader)
        for i, item in enumerate(patient_ids):
            patient_ids[i] = item[0]
        return patient_ids

    train_ids = _load_csv(folder / "fold_1.csv") + _load_csv(folder / "fold_2.csv")
    random.Random(4).shuffle(train_ids)
    validation_ids = train_ids[:len(train_ids) // 8]
    train_ids = train_ids[len(train_ids) // 8:]
    test_ids = _load_csv(folder / "fold_3.csv")
    return train_ids, validation_ids, test_ids


def test_bms_reference_lists_reproduce_config_py_and_unlisted_cases_get_the_seeded_draw():
    shipped = {f"fold_{k}.csv": hashlib.sha256((DATA / "bms" / f"fold_{k}.csv").read_bytes()).hexdigest()
               for k in (1, 2, 3)}
    assert shipped == {  # byte-identical to the reference's keras/downstream_tasks/data/bms/
        "fold_1.csv": "2d79242eaf40b7170f25fc421dc7d11bf020b2d39042a239efd20efd040c2256",
        "fold_2.csv": "b661cc543ee9445b8382ae03ba95818a7deac95288efd1809022c6a69278244f",
        "fold_3.csv": "494ea767150cfe29cb2f54f0d0973dc8245ae381c1b38057997fe1a5019b5354"}
    train, validation, test = _config_py_bms(DATA / "bms")
    assert (len(train), len(validation), len(test)) == (167, 23, 95)
    got = reference_list_splits("bms")
    assert {c for c, s in got.items() if s == "train"} == set(train)
    assert {c for c, s in got.items() if s == "validation"} == set(validation)
    assert {c for c, s in got.items() if s == "test"} == set(test)
    rule = get_task("bms").split
    assert rule.kind == "reference_lists" and rule.lists == "bms"
    listed = [validation[0], train[0], test[0]]
    mine = [f"Brats18_Mine_{i}_1" for i in range(6)]
    cases = pd.DataFrame({"case_id": listed + mine, "patient_id": listed + mine, "subset": [None] * 9})
    split = assign_splits(cases, rule)
    assert list(split[:3]) == ["validation", "train", "test"]
    assert set(split[3:]) == {"train", "validation", "test"}  # the seeded patient draw for the rest
    assert list(split) == list(assign_splits(cases, rule))


# ---- splits files ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lits(tmp_path_factory):
    """Five LiTS volumes (volume-0..4), liver label 1."""
    root = tmp_path_factory.mktemp("lits")
    (root / "src").mkdir()
    rng = np.random.default_rng(3)
    for k in range(5):
        img = rng.normal(40, 20, (16, 32, 32)).astype(np.int16)
        lab = np.zeros(img.shape, dtype=np.uint8)
        lab[4:10, 8:20, 6 + k:20] = 1
        for name, arr in ((f"volume-{k}", img), (f"segmentation-{k}", lab)):
            sitk.WriteImage(make_image(arr), str(root / "src" / f"{name}.nii.gz"))
    assert convert([str(root / "src")], str(root / "vs"), workers=1, progress=False).ok
    return root / "vs"


def _lcs():
    return get_task("lcs").with_overrides(cube_size=CUBE, **{"sampling.per_scan": 2})


def test_splits_csv_assigns_listed_cases_skips_the_rest_and_keys_the_store_by_content(lits, tmp_path):
    path = tmp_path / "splits.csv"
    path.write_text("case_id,split\nvolume-0,train\nvolume-1,val\nvolume-2,test\nvolume-3,TRAIN\n", encoding="utf-8")
    spec = with_splits_file(_lcs(), str(path))
    assert spec.split.kind == "file" and spec.split.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert "path" not in spec.data_dict()["split"] and spec.data_dict()["split"]["sha256"] == spec.split.sha256
    plan = plan_task(VolumeStore(lits), spec, 0)
    assert {c["case_id"]: c["split"] for c in plan.cases} == {
        "volume-0": "train", "volume-1": "validation", "volume-2": "test", "volume-3": "train"}
    assert [(s["scan_id"], "not in the splits file" in s["reason"]) for s in plan.skipped] == [("volume-4", True)]
    ps = PatchStore(extract_task(str(lits), spec, out_root=str(tmp_path / "ps"), workers=1, progress=False).path)
    assert dict(zip(ps.scans["case_id"], ps.scans["split"]))["volume-1"] == "validation"
    # the same content elsewhere is the same store; other content is another
    copy = tmp_path / "elsewhere" / "s.csv"
    copy.parent.mkdir()
    copy.write_bytes(path.read_bytes())
    same = with_splits_file(_lcs(), str(copy))
    assert task_key(plan_task(VolumeStore(lits), same, 0), same, 0) == task_key(plan, spec, 0)
    path.write_text("case_id,split\nvolume-0,test\nvolume-1,val\nvolume-2,train\nvolume-3,train\n", encoding="utf-8")
    changed = with_splits_file(_lcs(), str(path))
    assert task_key(plan_task(VolumeStore(lits), changed, 0), changed, 0) != task_key(plan, spec, 0)
    # a file changed after the spec was made is refused, not silently reread
    path.write_text("case_id,split\nvolume-0,train\n", encoding="utf-8")
    with pytest.raises(ValueError, match="changed since the task spec was made"):
        plan_task(VolumeStore(lits), changed, 0)


def test_nnunet_splits_final_json_picks_a_fold_and_tests_the_unlisted(lits, tmp_path):
    path = tmp_path / "splits_final.json"
    path.write_text(json.dumps([{"train": ["volume-0", "volume-1"], "val": ["volume-2"]},
                                {"train": ["volume-3", "volume-4"], "val": ["volume-0"]}]), encoding="utf-8")
    fold0 = plan_task(VolumeStore(lits), with_splits_file(_lcs(), str(path)), 0)
    assert {c["case_id"]: c["split"] for c in fold0.cases} == {
        "volume-0": "train", "volume-1": "train", "volume-2": "validation", "volume-3": "test", "volume-4": "test"}
    spec1 = with_splits_file(_lcs(), f"{path}#1")
    assert spec1.split.json_fold == 1 and spec1.split.describe() == "file splits_final.json#1"
    fold1 = plan_task(VolumeStore(lits), spec1, 0)
    assert {c["case_id"]: c["split"] for c in fold1.cases} == {
        "volume-0": "validation", "volume-1": "test", "volume-2": "test", "volume-3": "train", "volume-4": "train"}
    assert with_splits_file(_lcs(), str(path), fold=1).split == spec1.split


def test_bad_splits_files_stop_before_anything_is_built(lits, pe, tmp_path):
    unknown = tmp_path / "unknown.csv"
    names = [f"ghost-{i:02d}" for i in range(12)]
    unknown.write_text("case_id,split\nvolume-0,train\n" + "".join(f"{n},test\n" for n in names), encoding="utf-8")
    spec = with_splits_file(_lcs(), str(unknown))
    message = r"names 12 case\(s\) the data does not have: ghost-00, .*ghost-09 and 2 more"
    with pytest.raises(ValueError, match=message):
        plan_task(VolumeStore(lits), spec, 0)
    out = tmp_path / "ps"
    with pytest.raises(ValueError, match=message):
        extract_task(str(lits), spec, out_root=str(out), workers=1, progress=False)
    assert not out.exists()
    # one patient (pe0-p00: scans c000 and c007) in two splits
    root, _ = pe
    two = tmp_path / "two.csv"
    two.write_text("case_id,split\npe0-c000,train\npe0-c007,test\npe0-c001,train\n", encoding="utf-8")
    ecc = with_splits_file(get_task("ecc").with_overrides(cube_size=CUBE), str(two))
    with pytest.raises(ValueError, match="puts patient pe0-p00 in two splits: pe0-c000 in train, pe0-c007 in test"):
        plan_task(VolumeStore(root / "vs"), ecc, 0)
    # unreadable or malformed files: one line naming the file and the problem
    bad = {"header.csv": ("case,fold\nvolume-0,1\n", "must name the columns case_id and split"),
           "value.csv": ("case_id,split\nvolume-0,holdout\n", "split 'holdout' of case 'volume-0'"),
           "twice.csv": ("case_id,split\nvolume-0,train\nvolume-0,test\n",
                         "case 'volume-0' is in train and, on line 3"),
           "broken.json": ("[{\"train\": [", "not valid JSON"),
           "shape.json": ("{\"train\": []}", "expected nnU-Net's splits_final.json"),
           "empty.csv": ("", "empty")}
    for name, (text, why) in bad.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
        with pytest.raises(ValueError, match=why) as err:
            with_splits_file(_lcs(), str(tmp_path / name))
        assert str(tmp_path / name) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ValueError, match=r"has folds 0\.\.0, fold 3 was asked for"):
        (tmp_path / "one.json").write_text(json.dumps([{"train": [], "val": []}]), encoding="utf-8")
        with_splits_file(_lcs(), f"{tmp_path / 'one.json'}#3")
    with pytest.raises(ValueError, match=r"nope\.csv: cannot be read"):
        with_splits_file(_lcs(), str(tmp_path / "nope.csv"))


# ---- task values and published values ---------------------------------------------------------------


def test_every_task_trains_as_the_reference_code_runs_and_cites_it():
    tasks = [get_task(n) for n in ("ncc", "ncs", "ecc", "lcs", "bms")]
    assert [t.optimisation.lr for t in tasks] == [1e-3] * 5  # compile(optimizer='adam'): config.lr is never read
    for t in tasks:
        assert "config.py:" in t.notes and "utils.py:" in t.notes, t.name
    lcs = get_task("lcs")
    assert lcs.inplane_scale == 0.5 and "3D_LiTS_NPY_256x256xZ" in lcs.notes and "config.py:318" in lcs.notes
    assert lcs.data_dict()["inplane_scale"] == 0.5
    assert lcs.with_overrides(inplane_scale=1.0).data_dict() != lcs.data_dict()  # another store
    assert "in-plane x0.5" in tasks_table()
    with pytest.raises(ValueError, match=r"TaskSpec\('lcs'\)\.inplane_scale.*got 0"):
        lcs.with_overrides(inplane_scale=0)
    with pytest.raises(ValueError, match=r"SplitRule\.validation_fraction"):
        SplitRule(kind="folds", validation_fraction=1.5)


def test_every_published_value_has_a_source_and_unconfirmed_ones_are_marked():
    for name in ("ncc", "ncs", "ecc", "lcs", "bms"):
        pub = get_task(name).published
        assert set(pub.sources) == {"scratch", "medicalnet", "genesis"}
        assert all("arXiv 2004.07882" in s for s in pub.sources.values())
        assert set(pub.unverified) >= {"medicalnet", "genesis"}  # no readable source confirms them here
    ncc, ncs = get_task("ncc").published, get_task("ncs").published
    assert ncc.figure == {"scratch": 94.2, "genesis": 98.2} and ncs.figure == {"scratch": 74.0, "genesis": 77.6}
    assert "scratch" not in ncc.unverified and "figures/results.png" in ncc.sources["scratch"]
    assert get_task("bms").published.figure == {}  # its figure panel is BraTS 2013, another dataset
    assert "98.07+-0.59 (unverified)" in tasks_table()
    with pytest.raises(ValueError, match="needs its source; none for medicalnet"):
        Published(metric="AUC", scratch=(1, 0), medicalnet=(1, 0), genesis=(1, 0),
                  sources={"scratch": "x", "genesis": "y"})
    assert dataclasses.replace(ncc, unverified=()).unverified == ()
