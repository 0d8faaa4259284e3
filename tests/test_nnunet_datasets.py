"""nnU-Net v2 and MSD datasets convert as cases: one scan per channel, the label map on channel 0, dataset.json
checked against the folders, label values against dataset.json, a candidates CSV as the candidates table.

Real files in the real layouts (written by the sample writers, then edited where a test needs a fault), real
conversions into a real volume store."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from pipeline.ingest.read import read_source
from pipeline.ingest.sources import discover
from pipeline.sample_data.datasets import DATASETS, write_sample
from pipeline.sample_data.nnunet import (CT_DATASET, LABELS, MR_DATASET, MSD_DATASET, write_msd_sample,
                                        write_nnunet_ct_sample, write_nnunet_sample)
from pipeline.volume_store.convert import convert
from pipeline.volume_store.convert_task import source_from_spec, source_spec
from pipeline.volume_store.store import VolumeStore
from pipeline.volume_store.tables import read_table


def _convert(sources, store: Path):
    summary = convert([str(s) for s in sources], str(store), workers=1, progress=False)
    return summary, VolumeStore(store).catalog()


def _genesis(store: Path, scan_id: str) -> dict:
    return dict(VolumeStore(store).open_scan(scan_id).attrs)["genesis"]


def _lps(path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.DICOMOrient(sitk.ReadImage(str(path)), "LPS"))


def _failed(cat: pd.DataFrame) -> dict[str, str]:
    rows = cat[cat["status"] == "failed"]
    return dict(zip(rows["scan_id"], rows["error"]))


def test_sample_datasets_are_registered_and_deterministic(tmp_path):
    assert {"nnunet", "msd", "nnunet-ct"} <= set(DATASETS)
    a = write_sample("nnunet-ct", tmp_path / "a", n_scans=1, seed=3, small=True)
    b = write_sample("nnunet-ct", tmp_path / "b", n_scans=1, seed=3, small=True)
    assert a.root == tmp_path / "a" / CT_DATASET and "candidates.csv with" in a.describe()
    for rel in ("imagesTr/chest_000_0000.nii.gz", "labelsTr/chest_000.nii.gz", "candidates.csv"):
        assert (a.root / rel).read_bytes() == (b.root / rel).read_bytes()
    assert write_sample("nnunet-ct", tmp_path / "a", n_scans=1, seed=3, small=True).reused
    hu = sitk.GetArrayFromImage(sitk.ReadImage(str(a.root / "imagesTr/chest_000_0000.nii.gz")))
    assert hu.shape == (24, 48, 48) and hu.min() <= -900 and -850 < np.median(hu[(hu > -900) & (hu < -600)]) < -750


def test_two_channel_nnunet_dataset_converts_as_cases(tmp_path):
    sample = write_nnunet_sample(tmp_path / "src", n_scans=3, small=True, seed=1)
    root = sample.root
    store = tmp_path / "store"
    summary, cat = _convert([tmp_path / "src"], store)
    assert summary.ok, summary.report()
    # 3 train + 2 test cases, two channels each; label maps are never scans of their own
    assert len(cat) == 10 and (cat["status"] == "ok").all()
    assert set(cat["dataset"]) == {MR_DATASET}
    by_id = cat.set_index("scan_id")
    for case in sample.cases:
        for c, name in enumerate(("T2", "ADC")):
            sid = f"{case.case}_{c:04d}"
            row = by_id.loc[sid]
            g = _genesis(store, sid)
            assert g["source"]["identifiers"] == {"case": case.case, "sequence": name.lower(), "channel": f"{c:04d}"}
            assert row["modality"] == name and row["subset"] == case.subset
            assert g["dataset_json"] == {"channel_names": {"0": "T2", "1": "ADC"}, "labels": LABELS}
            np.testing.assert_array_equal(VolumeStore(store).open_scan(sid)["0"][...],
                                          _lps(root / ("imagesTr" if case.subset == "train" else "imagesTs")
                                               / f"{sid}.nii.gz"))
            expected_labels = ["label"] if case.subset == "train" and c == 0 else []
            assert list(row["labels"]) == expected_labels
        if case.subset == "train":
            group = VolumeStore(store).open_scan(f"{case.case}_0000")
            np.testing.assert_array_equal(group["labels/label/0"][...], _lps(root / "labelsTr" / f"{case.case}.nii.gz"))
            assert dict(group["labels/label"].attrs)["genesis"] == {"labels": LABELS}
            counts = {str(v): int(n) for v, n in zip(*np.unique(group["labels/label/0"][...], return_counts=True)) if v}
            assert counts == case.label_voxels
    assert sample.cases[1].direction != (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)  # an oblique case is covered
    # the record's source reads the same scan again (repair, verify)
    rec = VolumeStore(store).read_record("phantom_000_0000")
    again = read_source(source_from_spec(json.loads(json.dumps(rec["source"]))))
    assert again.label_attrs == {"label": {"labels": LABELS}} and again.identifiers["case"] == "phantom_000"


def test_msd_4d_images_become_one_scan_per_channel(tmp_path):
    sample = write_msd_sample(tmp_path / "src", n_scans=2, small=True)
    root = sample.root
    assert sorted(p.name for p in (root / "imagesTr").iterdir())[:1] == ["._phantom_000.nii.gz"]  # as MSD ships
    store = tmp_path / "store"
    summary, cat = _convert([tmp_path / "src"], store)
    assert summary.ok, summary.report()
    assert len(cat) == 8 and set(cat["dataset"]) == {MSD_DATASET}
    four_d = sitk.ReadImage(str(root / "imagesTr" / "phantom_000.nii.gz"))
    assert four_d.GetDimension() == 4 and four_d.GetSize()[3] == 2
    channels = sitk.GetArrayFromImage(four_d)  # (c, z, y, x); phantom_000 has the identity direction
    for c, name in enumerate(("t2", "adc")):
        sid = f"phantom_000_{c:04d}"
        np.testing.assert_array_equal(VolumeStore(store).open_scan(sid)["0"][...], channels[c])
        assert _genesis(store, sid)["source"]["identifiers"]["sequence"] == name
    labels = cat.set_index("scan_id")["labels"]
    assert list(labels["phantom_000_0000"]) == ["label"] and list(labels["phantom_000_0001"]) == []
    assert cat.set_index("scan_id").loc["phantom_100_0001", "subset"] == "test"
    # the channel survives the record: repair reads channel 1 again, not channel 0
    rec = VolumeStore(store).read_record("phantom_001_0001")
    src = source_from_spec(json.loads(json.dumps(rec["source"])))
    assert src.channel == 1 and src.n_channels == 2 and source_from_spec(source_spec(src)) == src
    oblique = sitk.ReadImage(str(root / "imagesTr" / "phantom_001.nii.gz"))
    expected = sitk.DICOMOrient(sitk.Extract(oblique, list(oblique.GetSize()[:3]) + [0], [0, 0, 0, 1]), "LPS")
    np.testing.assert_array_equal(read_source(src).voxels, sitk.GetArrayFromImage(expected))


def test_msd_channel_count_must_match_modality(tmp_path):
    root = write_msd_sample(tmp_path / "src", n_scans=1, small=True).root
    meta = json.loads((root / "dataset.json").read_text())
    meta["modality"] = {"0": "T2", "1": "ADC", "2": "FLAIR"}
    (root / "dataset.json").write_text(json.dumps(meta))
    _, cat = _convert([tmp_path / "src"], tmp_path / "store")
    failed = _failed(cat)
    assert failed["phantom_000_0002"] == ("imagesTr/phantom_000.nii.gz has 2 channels on its 4th axis but "
                                          "dataset.json names 3 modalities")
    assert (cat["status"] == "failed").sum() == 9  # every channel of every case: the file cannot be read as named


def _tiny_dataset(root: Path, ending: str, cases=("a_01", "a_02"), channels=("MRI",), shape=(16, 20, 24)) -> None:
    """A hand-made nnU-Net v2 dataset with its own file ending."""
    rng = np.random.default_rng(7)
    for sub in ("imagesTr", "labelsTr"):
        (root / sub).mkdir(parents=True)
    for case in cases:
        for c in range(len(channels)):
            img = sitk.GetImageFromArray(rng.integers(0, 900, shape).astype(np.int16))
            img.SetOrigin((10.0, -20.0, 5.0))
            sitk.WriteImage(img, str(root / "imagesTr" / f"{case}_{c:04d}{ending}"))
        lab = sitk.GetImageFromArray((rng.random(shape) > 0.8).astype(np.uint8))
        lab.SetOrigin((10.0, -20.0, 5.0))
        sitk.WriteImage(lab, str(root / "labelsTr" / f"{case}{ending}"))
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {str(i): n for i, n in enumerate(channels)}, "labels": {"background": 0, "organ": 1},
        "numTraining": len(cases), "file_ending": ending}))


def test_file_ending_is_respected(tmp_path):
    root = tmp_path / "Dataset777_Mha"
    _tiny_dataset(root, ".mha")
    stray = sitk.ReadImage(str(root / "imagesTr" / "a_01_0000.mha"))
    sitk.WriteImage(stray, str(root / "imagesTr" / "a_03_0000.nii.gz"))
    summary, cat = _convert([tmp_path], tmp_path / "store")
    ok = cat[cat["status"] == "ok"].set_index("scan_id")
    assert sorted(ok.index) == ["a_01_0000", "a_02_0000"]
    assert list(ok.loc["a_01_0000", "labels"]) == ["label"] and ok.loc["a_01_0000", "modality"] == "MRI"
    assert _failed(cat) == {"a_03_0000": "imagesTr/a_03_0000.nii.gz does not end in dataset.json's file_ending .mha"}


def test_dataset_json_disagreeing_with_the_folders_gives_failed_rows(tmp_path):
    root = write_nnunet_sample(tmp_path / "src", n_scans=3, small=True).root
    meta = json.loads((root / "dataset.json").read_text())
    meta["numTraining"] = 4
    (root / "dataset.json").write_text(json.dumps(meta))
    (root / "labelsTr" / "phantom_001.nii.gz").unlink()
    (root / "imagesTr" / "phantom_002_0001.nii.gz").unlink()
    shutil.copy(root / "imagesTr" / "phantom_000_0001.nii.gz", root / "imagesTr" / "phantom_000_0002.nii.gz")
    summary, cat = _convert([tmp_path / "src"], tmp_path / "store")
    failed = _failed(cat)
    assert failed == {
        MR_DATASET: "dataset.json: numTraining is 4 but imagesTr holds 3 cases",
        "phantom_001": "labelsTr/phantom_001.nii.gz is missing: imagesTr case phantom_001 has no label map",
        "phantom_002_0001": "imagesTr/phantom_002_0001.nii.gz is missing: case phantom_002 has no channel 0001 (ADC) "
                            "that dataset.json names",
        "phantom_000_0002": "imagesTr/phantom_000_0002.nii.gz: channel 0002 is not in dataset.json's channel_names "
                            "(0, 1)",
    }
    paths = cat.set_index("scan_id")["source_path"]
    assert paths[MR_DATASET].endswith(f"{MR_DATASET}/dataset.json")
    assert paths["phantom_001"].endswith("labelsTr/phantom_001.nii.gz")
    ok = cat[cat["status"] == "ok"].set_index("scan_id")
    # the cases still convert: phantom_001 without its label, phantom_002 with the channel it has
    assert {"phantom_001_0000", "phantom_001_0001", "phantom_002_0000"} <= set(ok.index)
    assert list(ok.loc["phantom_001_0000", "labels"]) == [] and list(ok.loc["phantom_002_0000", "labels"]) == ["label"]
    assert "FAILED phantom_001" in summary.report()


def test_label_values_dataset_json_does_not_name_are_a_failed_row(tmp_path):
    root = write_nnunet_sample(tmp_path / "src", n_scans=2, small=True).root
    path = root / "labelsTr" / "phantom_000.nii.gz"
    label = sitk.ReadImage(str(path))
    arr = sitk.GetArrayFromImage(label)
    arr[0, 0, 0], arr[0, 0, 1] = 7, 3
    bad = sitk.GetImageFromArray(arr)
    bad.CopyInformation(label)
    sitk.WriteImage(bad, str(path))
    _, cat = _convert([tmp_path / "src"], tmp_path / "store")
    message = "labelsTr/phantom_000.nii.gz holds label values 3, 7 that dataset.json does not name (0, 1, 2)"
    assert _failed(cat) == {"phantom_000_0000": message}
    # the check travels with the source: repair meets it again
    rec = VolumeStore(tmp_path / "store").read_record("phantom_000_0000")
    with pytest.raises(ValueError, match="holds label values 3, 7"):
        read_source(source_from_spec(json.loads(json.dumps(rec["source"]))))


def test_region_based_labels_are_accepted_as_written(tmp_path):
    root = tmp_path / "Dataset778_Regions"
    _tiny_dataset(root, ".nii.gz", cases=("r_01",))
    meta = json.loads((root / "dataset.json").read_text())
    meta["labels"] = {"background": 0, "organ": [1], "whole": [1, 2]}
    meta["regions_class_order"] = [1, 2]
    (root / "dataset.json").write_text(json.dumps(meta))
    summary, cat = _convert([root], tmp_path / "store")
    assert summary.ok, summary.report()
    group = VolumeStore(tmp_path / "store").open_scan("r_01_0000")
    assert dict(group["labels/label"].attrs)["genesis"] == {"labels": {"background": 0, "organ": [1], "whole": [1, 2]}}


def test_label_on_another_grid_stays_a_failed_row(tmp_path):
    root = write_nnunet_sample(tmp_path / "src", n_scans=2, small=True).root
    path = root / "labelsTr" / "phantom_001.nii.gz"
    label = sitk.ReadImage(str(path))
    label.SetOrigin(tuple(v + 5.0 for v in label.GetOrigin()))
    sitk.WriteImage(label, str(path))
    _, cat = _convert([tmp_path / "src"], tmp_path / "store")
    failed = _failed(cat)
    assert list(failed) == ["phantom_001_0000"] and "label map 'label' is not on the image's grid: origin" in \
        failed["phantom_001_0000"]


def test_candidates_csv_becomes_the_candidates_table(tmp_path):
    sample = write_nnunet_ct_sample(tmp_path / "src", n_scans=2, small=True)
    summary, cat = _convert([tmp_path / "src"], tmp_path / "store")
    assert summary.ok, summary.report()
    ok = cat.set_index("scan_id")
    assert set(ok["modality"]) == {"CT"} and set(ok["dataset"]) == {CT_DATASET}
    table = read_table(tmp_path / "store", "candidates")
    csv = pd.read_csv(sample.root / "candidates.csv")
    assert len(table) == len(csv) == sample.candidates
    assert table["seriesuid"].tolist() == [f"{c}_0000" for c in csv["case_id"]]
    np.testing.assert_allclose(table[["coordX", "coordY", "coordZ"]].to_numpy(), csv[["x", "y", "z"]].to_numpy())
    assert table["class"].tolist() == csv["label"].tolist()
    # each positive of a labelled case sits on a nodule, each negative off them: the label map at the world point
    for r in table.itertuples():
        path = sample.root / "labelsTr" / f"{r.seriesuid[:-len('_0000')]}.nii.gz"
        if path.exists():
            image = sitk.ReadImage(str(path))
            assert image[image.TransformPhysicalPointToIndex((r.coordX, r.coordY, r.coordZ))] == r._5


def test_a_candidates_csv_given_by_name_with_unknown_cases(tmp_path):
    sample = write_nnunet_ct_sample(tmp_path / "src", n_scans=2, small=True)
    good = tmp_path / "my_points.csv"
    good.write_text("case_id,x,y,z,label\nchest_001,1.5,2.5,3.5,1\n")
    summary, _ = _convert([sample.root / "imagesTr", good], tmp_path / "store")
    assert summary.ok, summary.report()
    table = read_table(tmp_path / "store", "candidates")
    assert table.to_dict("records") == [{"seriesuid": "chest_001_0000", "coordX": 1.5, "coordY": 2.5, "coordZ": 3.5,
                                         "class": 1}]
    bad = tmp_path / "typo.csv"
    bad.write_text("case_id,x,y,z,label\nchest_001,1,2,3,0\nchset_009,1,2,3,1\n")
    summary, _ = _convert([sample.root / "imagesTr", bad], tmp_path / "store2")
    assert len(summary.table_problems) == 1
    assert summary.table_problems[0].startswith(f"{bad}: case_id chset_009 is not among the cases converted with it")


def test_dataset_root_without_dataset_json_is_one_failed_row(tmp_path):
    root = write_msd_sample(tmp_path / "src", n_scans=2, small=True).root
    (root / "dataset.json").unlink()
    _, cat = _convert([tmp_path / "src"], tmp_path / "store")
    assert len(cat) == 1
    row = cat.iloc[0]
    assert row["status"] == "failed" and row["scan_id"] == MSD_DATASET
    assert row["source_path"].endswith(f"{MSD_DATASET}/dataset.json")
    assert row["error"].startswith("dataset.json is missing")


@pytest.mark.parametrize("text,reason", [
    ("{not json", "dataset.json: not JSON (Expecting property name enclosed in double quotes at line 1)"),
    ('{"labels": {"background": 0}, "file_ending": ".nii.gz"}',
     "dataset.json: has neither channel_names (nnU-Net v2) nor modality (MSD)"),
    ('{"channel_names": {"0": "CT"}, "file_ending": ".nii.gz"}', "dataset.json: has no labels"),
    ('{"channel_names": {"0": "CT"}, "labels": {"a": -1}, "file_ending": ".nii.gz"}',
     "dataset.json: label 'a' has value -1; expected an integer >= 0 or a list of them"),
    ('{"channel_names": {"0": "CT"}, "labels": {"a": 1}, "file_ending": ".png"}',
     "dataset.json: file_ending '.png' is not a 3-D format genesis reads (.nii.gz, .nii, .mha, .mhd, .nrrd, .nhdr)"),
])
def test_bad_dataset_json_is_one_row_naming_it(tmp_path, text, reason):
    root = tmp_path / "Dataset900_Bad"
    _tiny_dataset(root, ".nii.gz")
    (root / "dataset.json").write_text(text)
    found = discover([str(tmp_path)])
    assert [(s.scan_id, s.problem) for s in found.scans] == [("Dataset900_Bad", reason)]


def test_an_image_folder_given_alone_converts_its_cases_with_labels(tmp_path):
    root = write_nnunet_sample(tmp_path / "src", n_scans=2, small=True).root
    found = discover([str(root / "imagesTr"), str(root / "imagesTs" / "phantom_100_0001.nii.gz")])
    got = {s.scan_id: (s.subset, [n for n, _ in s.labels], s.problem) for s in found.scans}
    assert got == {"phantom_000_0000": ("train", ["label"], None), "phantom_000_0001": ("train", [], None),
                   "phantom_001_0000": ("train", ["label"], None), "phantom_001_0001": ("train", [], None),
                   "phantom_100_0000": ("test", [], None), "phantom_100_0001": ("test", [], None)}


def test_case_candidates_beside_plain_images_join_the_file_names(tmp_path):
    src = tmp_path / "ct"
    src.mkdir()
    rng = np.random.default_rng(3)
    for name in ("lung_a", "lung_b"):
        sitk.WriteImage(sitk.GetImageFromArray(rng.integers(-1000, 400, (16, 20, 24)).astype(np.int16)),
                        str(src / f"{name}.nii.gz"))
    (src / "candidates.csv").write_text("case_id,x,y,z,label\nlung_b,4.0,5.0,6.0,0\nlung_a,1.0,2.0,3.0,1\n")
    summary, _ = _convert([src], tmp_path / "store")
    assert summary.ok, summary.report()
    assert read_table(tmp_path / "store", "candidates")[["seriesuid", "class"]].values.tolist() == [["lung_b", 0],
                                                                                                   ["lung_a", 1]]


def _write_label(path: Path, edit) -> None:
    """Rewrite the label map at `path` after `edit(image, array)` changed its voxels or geometry in place."""
    label = sitk.ReadImage(str(path))
    arr = sitk.GetArrayFromImage(label)
    out = sitk.GetImageFromArray(edit(label, arr) if edit else arr)
    out.CopyInformation(label)
    if edit is None:
        out.SetOrigin(tuple(v + 5.0 for v in label.GetOrigin()))
    sitk.WriteImage(out, str(path))


def test_labels_ts_label_the_test_cases_and_are_never_scans(tmp_path):
    sample = write_nnunet_sample(tmp_path / "src", n_scans=2, small=True, test_labels=True)
    root = sample.root
    assert sorted(p.name for p in (root / "labelsTs").iterdir()) == ["phantom_100.nii.gz", "phantom_101.nii.gz"]
    store = tmp_path / "store"
    summary, cat = _convert([tmp_path / "src"], store)
    assert summary.ok, summary.report()
    assert len(cat) == 8 and set(cat["scan_id"]) == {f"phantom_{c}_{x:04d}" for c in ("000", "001", "100", "101")
                                                     for x in (0, 1)}
    by_id = cat.set_index("scan_id")
    for case in (c for c in sample.cases if c.subset == "test"):
        assert by_id.loc[f"{case.case}_0000", "subset"] == "test"
        assert list(by_id.loc[f"{case.case}_0000", "labels"]) == ["label"]
        assert list(by_id.loc[f"{case.case}_0001", "labels"]) == []
        group = VolumeStore(store).open_scan(f"{case.case}_0000")
        np.testing.assert_array_equal(group["labels/label/0"][...], _lps(root / "labelsTs" / f"{case.case}.nii.gz"))
        assert dict(group["labels/label"].attrs)["genesis"] == {"labels": LABELS}
        counts = {str(v): int(n) for v, n in zip(*np.unique(group["labels/label/0"][...], return_counts=True)) if v}
        assert counts == case.label_voxels and counts
    # a labelsTs folder or file given alone converts the test cases it labels, with their labels
    got = {s.scan_id: (s.subset, [n for n, _ in s.labels]) for s in discover([str(root / "labelsTs")]).scans}
    assert got == {"phantom_100_0000": ("test", ["label"]), "phantom_100_0001": ("test", []),
                   "phantom_101_0000": ("test", ["label"]), "phantom_101_0001": ("test", [])}
    got = {s.scan_id: s.subset for s in discover([str(root / "labelsTs" / "phantom_101.nii.gz")]).scans}
    assert got == {"phantom_101_0000": "test", "phantom_101_0001": "test"}


def test_labels_ts_are_checked_as_labels_tr_are(tmp_path):
    root = write_nnunet_sample(tmp_path / "src", n_scans=1, small=True, test_labels=True).root

    def bad_values(_, arr):
        arr[0, 0, 0] = 7
        return arr
    _write_label(root / "labelsTs" / "phantom_100.nii.gz", bad_values)
    _write_label(root / "labelsTs" / "phantom_101.nii.gz", None)  # moved 5 mm: another grid
    shutil.copy(root / "labelsTs" / "phantom_100.nii.gz", root / "labelsTs" / "phantom_999.nii.gz")
    (root / "imagesTs" / "phantom_102_0000.nii.gz").write_bytes((root / "imagesTs" / "phantom_100_0000.nii.gz")
                                                                .read_bytes())
    (root / "imagesTs" / "phantom_102_0001.nii.gz").write_bytes((root / "imagesTs" / "phantom_100_0001.nii.gz")
                                                                .read_bytes())
    summary, cat = _convert([tmp_path / "src"], tmp_path / "store")
    failed = _failed(cat)
    assert set(failed) == {"phantom_100_0000", "phantom_101_0000", "phantom_999", "phantom_102"}
    assert failed["phantom_100_0000"] == ("labelsTs/phantom_100.nii.gz holds label value 7 that dataset.json does "
                                          "not name (0, 1, 2)")
    assert "label map 'label' is not on the image's grid: origin" in failed["phantom_101_0000"]
    assert failed["phantom_999"] == "labelsTs/phantom_999.nii.gz has no image: imagesTs/phantom_999_0000.nii.gz is missing"
    assert failed["phantom_102"] == "labelsTs/phantom_102.nii.gz is missing: imagesTs case phantom_102 has no label map"
    ok = cat[cat["status"] == "ok"].set_index("scan_id")
    assert list(ok.loc["phantom_102_0000", "labels"]) == [] and ok.loc["phantom_102_0000", "subset"] == "test"
    # phantom_000's two channels, the test cases' unlabelled channels 0001, phantom_102 without a label
    assert sorted(ok.index) == ["phantom_000_0000", "phantom_000_0001", "phantom_100_0001", "phantom_101_0001",
                                "phantom_102_0000", "phantom_102_0001"]


def test_msd_labels_ts_label_the_test_cases(tmp_path):
    sample = write_msd_sample(tmp_path / "src", n_scans=1, small=True, test_labels=True)
    root = sample.root
    assert (root / "labelsTs" / "._phantom_100.nii.gz").exists()  # MSD's AppleDouble files, there too
    summary, cat = _convert([tmp_path / "src"], tmp_path / "store")
    assert summary.ok, summary.report()
    assert len(cat) == 6 and set(cat["subset"]) == {"train", "test"}
    labels = cat.set_index("scan_id")["labels"]
    assert {s: list(v) for s, v in labels.items()} == {
        "phantom_000_0000": ["label"], "phantom_000_0001": [], "phantom_100_0000": ["label"],
        "phantom_100_0001": [], "phantom_101_0000": ["label"], "phantom_101_0001": []}
    group = VolumeStore(tmp_path / "store").open_scan("phantom_101_0000")
    np.testing.assert_array_equal(group["labels/label/0"][...], _lps(root / "labelsTs" / "phantom_101.nii.gz"))
    (root / "labelsTs" / "phantom_100.nii.gz").rename(root / "labelsTs" / "phantom_107.nii.gz")
    _, cat = _convert([tmp_path / "src"], tmp_path / "store2")
    assert _failed(cat) == {
        "phantom_100": "labelsTs/phantom_100.nii.gz is missing: imagesTs case phantom_100 has no label map",
        "phantom_107": "labelsTs/phantom_107.nii.gz has no image: imagesTs/phantom_107.nii.gz is missing"}


def test_nnunet_v1_task_folder_converts_as_cases(tmp_path):
    """nnU-Net v1: MSD's dataset.json (modality, labels value -> name) over v2's one-file-per-channel names."""
    root = write_nnunet_sample(tmp_path / "src", n_scans=2, small=True).root
    (root / "dataset.json").write_text(json.dumps({
        "name": "Phantom", "tensorImageSize": "4D", "modality": {"0": "T2", "1": "ADC"},
        "labels": {str(v): k for k, v in LABELS.items()}, "numTraining": 2, "numTest": 2,
        "training": [{"image": f"./imagesTr/phantom_00{i}.nii.gz", "label": f"./labelsTr/phantom_00{i}.nii.gz"}
                     for i in range(2)],
        "test": ["./imagesTs/phantom_100.nii.gz", "./imagesTs/phantom_101.nii.gz"]}))
    summary, cat = _convert([tmp_path / "src"], tmp_path / "store")
    assert summary.ok, summary.report()
    by_id = cat.set_index("scan_id")
    assert sorted(by_id.index) == [f"phantom_{c}_{x:04d}" for c in ("000", "001", "100", "101") for x in (0, 1)]
    assert list(by_id.loc["phantom_001_0000", "labels"]) == ["label"] and by_id.loc["phantom_001_0001", "modality"] == "ADC"
    np.testing.assert_array_equal(VolumeStore(tmp_path / "store").open_scan("phantom_001_0001")["0"][...],
                                  _lps(root / "imagesTr" / "phantom_001_0001.nii.gz"))
