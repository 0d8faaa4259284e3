"""`genesis predict` and models that carry their task file and preprocessing.

A tiny U-Net (width 4, batch norm) is trained for a few dozen steps on synthetic bright spheres, without Ray, and
logged with `log_finetuned_model` into a real MLflow SQLite store through the Tracker, registered as
`genesis-spheres`. Inputs are real files (SimpleITK writes NIfTI / MetaImage) with an oblique direction and a
non-zero origin; the label map must come back in exactly that geometry and on the sphere.
"""

from __future__ import annotations

import argparse
import json
import math

import mlflow
import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import torch

from pipeline.finetune.config import preset
from pipeline.finetune.evaluate import model_preprocessing
from pipeline.model_io.load import load_model
from pipeline.model_io.model_format import log_finetuned_model
from pipeline.models.classifier import UNet3DClassifier
from pipeline.models.unet3d import UNet3D
from pipeline.predict.model_card import load_model_card
from pipeline.predict.run import NO_TASK
from pipeline.predict_cli import add_predict_parser, run_predict
from pipeline.runtime.errors import UsageError
from pipeline.runtime.tracking import Tracker
from pipeline.tasks.spec import Intensity, Sampling, SplitRule, TaskSpec
from pipeline.tasks.task_file import task_file_sha256, task_file_text

CUBE = (16, 16, 16)


def _spec(name="spheres", channels=(), kind="segmentation", modality="CT") -> TaskSpec:
    seg = kind == "segmentation"
    return TaskSpec(
        name=name, title="bright spheres", kind=kind, dataset="synthetic", modality=modality,
        data_layout="synthetic", cube_size=CUBE, channels=channels,
        intensity=Intensity(kind="window", low=0.0, high=1000.0) if modality == "CT"
        else Intensity(kind="percentile", low=0.5, high=99.5),
        sampling=Sampling(kind="pos_neg", label="label", target_values=(2,)) if seg
        else Sampling(kind="candidates", table="candidates"),
        split=SplitRule(kind="patient_seeded"), head="unet" if seg else "encoder-gap-dense",
        loss="dice" if seg else "bce", metrics=("dice",) if seg else ("auc",))


def _spheres(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(n, 1, 16, 16, 16) windowed images in [0, 1] and their masks: a bright ball of random size and place."""
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in CUBE], indexing="ij"), -1).astype(float)
    xs, ys = [], []
    for _ in range(n):
        centre, radius = rng.uniform(2, 14, 3), rng.uniform(2.5, 6)
        mask = np.linalg.norm(grid - centre, axis=-1) <= radius
        if rng.random() < 0.2:
            mask[:] = False
        img = np.where(mask, 900.0, 100.0) + rng.normal(0, 40, CUBE)
        xs.append(np.clip(img / 1000.0, 0, 1)[None])
        ys.append(mask[None])
    return np.stack(xs).astype(np.float32), np.stack(ys).astype(np.float32)


def _train(steps: int = 60) -> UNet3D:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = UNet3D(base_channels=4, norm="batch")
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        x, y = (torch.from_numpy(a) for a in _spheres(8, rng))
        loss = torch.nn.functional.binary_cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def _log(tracker: Tracker, model, spec: TaskSpec | None, name: str, kind="segmentation", in_channels=1) -> str:
    """Log `model` (with `spec`'s task file and preprocessing when given) in a run; register it as `name`."""
    run_id = tracker.create_run("predict-test", name)
    logger = tracker.logger(run_id, system_metrics=False)
    try:
        if spec is None:
            info = log_finetuned_model(model, in_channels=in_channels, kind=kind)
        else:
            config = preset("paper", spec).with_overrides(input_size=CUBE, base_channels=4)
            info = log_finetuned_model(model, in_channels=in_channels, kind=kind, task_file=task_file_text(spec),
                                       preprocessing=model_preprocessing(spec, config))
        version = tracker.register_finetuned(info.model_uri, name)
    finally:
        logger.end()
    return f"models:/{name}/{version.version}"


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("predict-registry")
    uri = f"sqlite:///{tmp}/mlflow.db"
    mlflow.MlflowClient(tracking_uri=uri).create_experiment("predict-test", artifact_location=str(tmp / "artifacts"))
    tracker = Tracker(uri)
    torch.manual_seed(1)
    models = {
        "seg": _log(tracker, _train(), _spec(), "genesis-spheres"),
        "old": _log(tracker, UNet3D(base_channels=4, norm="batch").eval(), None, "genesis-old"),
        "two": _log(tracker, UNet3D(base_channels=4, norm="batch", in_channels=2).eval(),
                    _spec("brains", ("t1", "t2"), modality="MR"), "genesis-brains", in_channels=2),
        "cls": _log(tracker, UNet3DClassifier(base_channels=4, hidden=8, norm="batch").eval(),
                    _spec("nodules", kind="classification"), "genesis-nodules", kind="classification"),
        "phantom": _log(tracker, UNet3D(base_channels=4, norm="batch", in_channels=2).eval(),
                        _spec("phantom", ("t2", "adc"), modality="MR"), "genesis-phantom", in_channels=2),
    }
    return uri, models


def _oblique(shape_xyz=(40, 36, 20), centre_xyz=(24, 14, 11), radius=6.0, seed=0):
    """An image with an oblique direction (a rotation about a tilted axis, one axis flipped) and a non-zero
    origin: a bright ball (900 + noise) on 100 + noise; and the ball's mask as a (z, y, x) array."""
    rng = np.random.default_rng(seed)
    zyx = np.stack(np.meshgrid(*[np.arange(s) for s in reversed(shape_xyz)], indexing="ij"), -1).astype(float)
    mask = np.linalg.norm(zyx - np.array(centre_xyz[::-1], float), axis=-1) <= radius
    arr = (np.where(mask, 900.0, 100.0) + rng.normal(0, 40, mask.shape)).astype(np.int16)
    image = sitk.GetImageFromArray(arr)
    a, b = math.radians(25), math.radians(10)
    rz = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]])
    direction = rz @ rx @ np.diag([-1.0, 1.0, -1.0])
    image.SetDirection(tuple(direction.ravel()))
    image.SetOrigin((12.5, -30.25, 7.75))
    image.SetSpacing((1.0, 1.2, 1.5))
    return image, mask


def _predict(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="genesis")
    add_predict_parser(parser.add_subparsers(dest="command"), [])
    return run_predict(parser.parse_args(["predict", "--no-progress", *argv]))


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


def _same_geometry(a: sitk.Image, b: sitk.Image) -> None:
    assert a.GetSize() == b.GetSize()
    for get in ("GetSpacing", "GetOrigin", "GetDirection"):
        np.testing.assert_allclose(getattr(a, get)(), getattr(b, get)(), atol=1e-6, err_msg=get)


def test_oblique_nifti_round_trip_lands_on_the_sphere(registry, tmp_path):
    uri, models = registry
    image, mask = _oblique()
    src = tmp_path / "in" / "case_a.nii.gz"
    src.parent.mkdir()
    sitk.WriteImage(image, str(src))
    assert _predict("--model", models["seg"], "--input", str(src), "--out", str(tmp_path / "out"),
                    "--tracking-uri", uri, "--device", "cpu", "--probabilities") == 0
    label = sitk.ReadImage(str(tmp_path / "out" / "case_a.nii.gz"))
    written = sitk.ReadImage(str(src))
    _same_geometry(label, written)
    arr = sitk.GetArrayFromImage(label)
    assert arr.dtype == np.uint8 and set(np.unique(arr)) <= {0, 2}  # the task's target value
    assert _dice(arr == 2, mask) > 0.8
    prob = sitk.ReadImage(str(tmp_path / "out" / "case_a_probabilities.nii.gz"))
    _same_geometry(prob, written)
    p = sitk.GetArrayFromImage(prob)
    assert p.dtype == np.float32 and 0 <= p.min() and p.max() <= 1
    np.testing.assert_array_equal(p > 0.5, arr == 2)

    summary = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert summary["model"]["uri"] == models["seg"] and summary["model"]["name"] == "genesis-spheres"
    assert summary["model"]["version"] == "1" and summary["model"]["run_id"]
    assert summary["task"]["name"] == "spheres" and summary["task"]["task_file_sha256"] == task_file_sha256(_spec())
    assert summary["preprocessing"]["orientation"] == "LPS" and summary["preprocessing"]["threshold"] == 0.5
    case = summary["cases"][0]
    import hashlib

    assert case["inputs"][0]["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert case["outputs"] == ["case_a.nii.gz", "case_a_probabilities.nii.gz"]
    assert case["foreground_voxels"] == int(np.count_nonzero(arr))


def test_metaimage_input_gives_metaimage_and_unreadable_input_is_exit_1(registry, tmp_path, capsys):
    uri, models = registry
    image, mask = _oblique(centre_xyz=(15, 20, 9), seed=2)
    good = tmp_path / "in" / "scan_b.mha"
    good.parent.mkdir()
    sitk.WriteImage(image, str(good))
    bad = tmp_path / "in" / "broken.nii.gz"
    bad.write_bytes(b"not a nifti file at all")
    code = _predict("--model", models["seg"], "--input", str(tmp_path / "in"), "--out", str(tmp_path / "out"),
                    "--tracking-uri", uri, "--device", "cpu")
    assert code == 1
    err = capsys.readouterr().err
    assert "broken.nii.gz" in err and len([l for l in err.splitlines() if "broken" in l]) == 1
    label = sitk.ReadImage(str(tmp_path / "out" / "scan_b.mha"))
    _same_geometry(label, sitk.ReadImage(str(good)))
    assert _dice(sitk.GetArrayFromImage(label) == 2, mask) > 0.8
    cases = {c["case_id"]: c for c in json.loads((tmp_path / "out" / "predictions.json").read_text())["cases"]}
    assert cases["scan_b"]["status"] == "ok" and cases["broken"]["status"] == "failed"


def test_two_channel_grouping_and_missing_channel(registry, tmp_path):
    uri, models = registry
    folder = tmp_path / "imagesTs"
    folder.mkdir()
    for case in ("brain_000", "brain_001"):
        for ch in range(2):
            image, _ = _oblique(shape_xyz=(20, 18, 16), centre_xyz=(9, 9, 8), radius=4, seed=ch)
            sitk.WriteImage(image, str(folder / f"{case}_{ch:04d}.nii.gz"))
    assert _predict("--model", models["two"], "--input", str(folder), "--out", str(tmp_path / "out"),
                    "--tracking-uri", uri, "--device", "cpu") == 0
    for case in ("brain_000", "brain_001"):
        label = sitk.ReadImage(str(tmp_path / "out" / f"{case}.nii.gz"))
        _same_geometry(label, sitk.ReadImage(str(folder / f"{case}_0000.nii.gz")))
    summary = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert [len(c["inputs"]) for c in summary["cases"]] == [2, 2]

    (folder / "brain_001_0001.nii.gz").unlink()
    with pytest.raises(UsageError, match=r"brain_001.*missing channel 0001 \(t2\)"):
        _predict("--model", models["two"], "--input", str(folder), "--out", str(tmp_path / "out2"),
                 "--tracking-uri", uri, "--device", "cpu")
    single = tmp_path / "single.nii.gz"
    sitk.WriteImage(_oblique(shape_xyz=(20, 18, 16))[0], str(single))
    with pytest.raises(UsageError, match=r"single.*one image.*2 channels"):
        _predict("--model", models["two"], "--input", str(single), "--out", str(tmp_path / "out3"),
                 "--tracking-uri", uri, "--device", "cpu")


def test_model_without_task_and_task_mismatch_are_exit_2(registry, tmp_path):
    uri, models = registry
    src = tmp_path / "x.nii.gz"
    sitk.WriteImage(_oblique(shape_xyz=(20, 18, 16))[0], str(src))
    with pytest.raises(UsageError, match=NO_TASK):
        _predict("--model", models["old"], "--input", str(src), "--out", str(tmp_path / "o1"), "--tracking-uri", uri)
    with pytest.raises(UsageError, match=r"task 'spheres', not of task 'lcs'"):
        _predict("--model", models["seg"], "--input", str(src), "--out", str(tmp_path / "o2"), "--tracking-uri", uri,
                 "--task", "lcs")
    assert not (tmp_path / "o2" / "predictions.json").exists()


def test_classification_candidates_give_scores(registry, tmp_path):
    uri, models = registry
    image, _ = _oblique(seed=4)
    src = tmp_path / "lung_1.nii.gz"
    sitk.WriteImage(image, str(src))
    inside = image.TransformContinuousIndexToPhysicalPoint((20.0, 18.0, 10.0))
    # world mm in LPS: ITK's physical space is LPS
    pd.DataFrame({"case_id": ["lung_1", "lung_1"], "x": [inside[0], 1e4], "y": [inside[1], 0.0],
                  "z": [inside[2], 0.0], "label": [1, 0]}).to_csv(tmp_path / "cands.csv", index=False)
    assert _predict("--model", models["cls"], "--input", str(src), "--out", str(tmp_path / "out"),
                    "--tracking-uri", uri, "--candidates", str(tmp_path / "cands.csv"), "--device", "cpu") == 0
    scores = pd.read_csv(tmp_path / "out" / "predictions.csv")
    assert list(scores.columns) == ["case_id", "x", "y", "z", "label", "score"]
    assert 0 < scores["score"][0] < 1 and math.isnan(scores["score"][1])  # the second lies outside the scan
    summary = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert summary["cases"][0]["scores_file"] == "predictions.csv"
    assert len(summary["candidates"]["sha256"]) == 64


def test_model_card_and_attributes(registry, tmp_path):
    uri, models = registry
    card = load_model_card(models["seg"], tracking_uri=uri)
    assert card.task == _spec() and card.task_source == "model"
    assert card.preprocessing["network_input_size"] == list(CUBE)
    assert card.preprocessing["labels"]["output_value"] == 2
    assert card.preprocessing["sliding_window"]["roi_size"] == list(CUBE)
    assert card.name == "genesis-spheres" and card.version == "1" and card.run_id
    model = load_model(models["seg"], tracking_uri=uri)
    assert model.genesis_task_file == task_file_text(_spec())
    assert model.genesis_preprocessing == card.preprocessing
    old = load_model(models["old"], tracking_uri=uri)  # a model without the files loads as before
    assert old.genesis_task_file is None and old.genesis_preprocessing is None
    old_card = load_model_card(models["old"], tracking_uri=uri)
    assert old_card.task is None and old_card.preprocessing is None


# ---- review fixes: stores, names, outputs, candidates, 4-D files, modality, bounded reads -----------------


def _predict_cpu(uri: str, *argv: str) -> int:
    return _predict(*argv, "--tracking-uri", uri, "--device", "cpu")


def test_a_two_channel_nnunet_volume_store_is_predicted_and_a_ct_model_refuses_its_mr_scans(registry, tmp_path):
    """The store's scans carry `channel` "0000"/"0001" and `sequence` "t2"/"adc" (modality T2/ADC): grouped by
    the task's channel names; the CT model is refused before any work (T2 and ADC are not CT)."""
    from pipeline.sample_data.datasets import write_sample
    from pipeline.volume_store.convert import convert

    uri, models = registry
    write_sample("nnunet", tmp_path / "raw", n_scans=2, small=True)
    convert([str(tmp_path / "raw")], str(tmp_path / "vs"), workers=1, progress=False)
    assert _predict_cpu(uri, "--model", models["phantom"], "--input", str(tmp_path / "vs"),
                        "--out", str(tmp_path / "out")) == 0
    summary = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert summary["cases"] and all(c["status"] == "ok" for c in summary["cases"])
    for case in summary["cases"]:
        assert [i["path"].rsplit("::", 1)[1] for i in case["inputs"]] == [f"{case['case_id']}_0000",
                                                                         f"{case['case_id']}_0001"]
        assert all(i["content_digest"].startswith("xxh3-128:") and "sha256" not in i for i in case["inputs"])
        assert (tmp_path / "out" / f"{case['case_id']}.nii.gz").is_file()
    with pytest.raises(UsageError, match=r"modality T2 but the model's task 'spheres' is CT"):
        scan = f"{tmp_path / 'vs'}::{summary['cases'][0]['case_id']}_0000"
        _predict_cpu(uri, "--model", models["seg"], "--input", scan, "--out", str(tmp_path / "ct"))
    assert not (tmp_path / "ct").exists()  # nothing written: the check is a pre-pass


def test_out_in_the_inputs_folder_is_refused_before_the_input_is_overwritten(registry, tmp_path):
    uri, models = registry
    src = tmp_path / "s.nii.gz"
    sitk.WriteImage(_oblique(shape_xyz=(20, 18, 16))[0], str(src))
    before = src.read_bytes()
    with pytest.raises(UsageError, match=r"would overwrite the input .*s\.nii\.gz; give another --out"):
        _predict_cpu(uri, "--model", models["seg"], "--input", str(src), "--out", str(tmp_path))
    assert src.read_bytes() == before and not (tmp_path / "predictions.json").exists()


def test_one_channel_names_with_digits_and_equal_stems_from_two_folders(registry, tmp_path):
    """`patient_0042`, `CT_2019` are cases of a one-channel task (only `_0000` is a channel suffix); two `x`
    from two folders give `x` and `x-2`, neither overwriting the other; `y_0000` is case `y`."""
    uri, models = registry
    image, mask = _oblique(shape_xyz=(24, 20, 16), centre_xyz=(12, 10, 8), radius=5)
    names = ["a/patient_0042.nii.gz", "a/CT_2019.nii.gz", "a/x.nii.gz", "b/x.nii.gz", "b/y_0000.nii.gz"]
    for name in names:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        sitk.WriteImage(image, str(tmp_path / name))
    assert _predict_cpu(uri, "--model", models["seg"], "--input", str(tmp_path / "a"), str(tmp_path / "b"),
                        "--out", str(tmp_path / "out")) == 0
    summary = json.loads((tmp_path / "out" / "predictions.json").read_text())
    got = {c["case_id"]: c["inputs"][0]["path"] for c in summary["cases"]}
    assert got == {"CT_2019": str(tmp_path / "a/CT_2019.nii.gz"),
                   "patient_0042": str(tmp_path / "a/patient_0042.nii.gz"),
                   "x": str(tmp_path / "a/x.nii.gz"), "x-2": str(tmp_path / "b/x.nii.gz"),
                   "y": str(tmp_path / "b/y_0000.nii.gz")}
    for case in got:
        label = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / f"{case}.nii.gz")))
        assert _dice(label == 2, mask) > 0.8


def test_msd_four_d_input_is_one_case_of_its_channels(registry, tmp_path):
    """An MSD imagesTs file holds the channels on its 4th axis: one case, the label map on its 3-D grid."""
    uri, models = registry
    three, _ = _oblique(shape_xyz=(20, 18, 16), centre_xyz=(9, 9, 8), radius=4)
    four = sitk.JoinSeries([three, three * 2])
    four.SetOrigin(three.GetOrigin() + (0.0,))
    four.SetSpacing(three.GetSpacing() + (1.0,))
    direction = np.eye(4)
    direction[:3, :3] = np.reshape(three.GetDirection(), (3, 3))
    four.SetDirection(tuple(direction.ravel()))
    src = tmp_path / "BRATS_001.nii.gz"
    sitk.WriteImage(four, str(src))
    assert _predict_cpu(uri, "--model", models["two"], "--input", str(src), "--out", str(tmp_path / "out")) == 0
    _same_geometry(sitk.ReadImage(str(tmp_path / "out" / "BRATS_001.nii.gz")), three)
    case = json.loads((tmp_path / "out" / "predictions.json").read_text())["cases"][0]
    assert len(case["inputs"]) == 2 and case["inputs"][1]["path"].endswith("(channel 1 of its 4th axis)")
    with pytest.raises(UsageError, match=r"4-D image with 2 channels on its 4th axis, but the task takes 1"):
        _predict_cpu(uri, "--model", models["seg"], "--input", str(src), "--out", str(tmp_path / "o2"))


def test_candidates_keep_numeric_case_ids_and_int_labels_and_an_unreadable_input_is_exit_1(registry, tmp_path):
    uri, models = registry
    image, _ = _oblique(seed=4)
    sitk.WriteImage(image, str(tmp_path / "001.nii.gz"))
    inside = image.TransformContinuousIndexToPhysicalPoint((20.0, 18.0, 10.0))
    (tmp_path / "cands.csv").write_text(f"case_id,x,y,z,label\n001,{inside[0]},{inside[1]},{inside[2]},1\n"
                                        f"002,{inside[0]},{inside[1]},{inside[2]},0\n")
    assert _predict_cpu(uri, "--model", models["cls"], "--input", str(tmp_path / "001.nii.gz"),
                        str(tmp_path / "002.nii.gz"), "--out", str(tmp_path / "out"),
                        "--candidates", str(tmp_path / "cands.csv")) == 1  # 002.nii.gz does not exist
    lines = (tmp_path / "out" / "predictions.csv").read_text().splitlines()
    assert lines[0] == "case_id,x,y,z,label,score" and len(lines) == 2
    assert lines[1].startswith("001,") and lines[1].split(",")[4] == "1"
    cases = {c["case_id"]: c for c in json.loads((tmp_path / "out" / "predictions.json").read_text())["cases"]}
    assert cases["001"]["status"] == "ok" and cases["001"]["candidates"] == 1
    assert cases["002"]["status"] == "failed" and "no such file" in cases["002"]["error"]


def test_resampling_pads_with_the_scan_minimum_as_the_store_does():
    from pipeline.predict.run import _resampled

    arr = np.full((1, 4, 4, 4), 500.0, np.float32)
    lps = sitk.GetImageFromArray(arr[0])
    _, out = _resampled(lps, arr, (0.6, 0.6, 0.6))  # 7 voxels a side reach past the last input voxel
    assert out.shape == (1, 7, 7, 7) and out.min() == 500.0


def test_spacing_the_model_cannot_name_is_said():
    from pipeline.predict.run import _spacing_warnings

    assert _spacing_warnings({"spacing": {"resampled_to": [1.0, 1.0, 1.0]}}, True) == []
    assert _spacing_warnings({"spacing": {"resampled_to": None}}, True) == []  # the store kept source voxels
    moved = _spacing_warnings({"spacing": {"resampled_to": None, "resampled_to_unknown": "store moved"}}, True)
    assert len(moved) == 1 and "(store moved)" in moved[0]
    assert "no preprocessing.json" in _spacing_warnings({"spacing": {"resampled_to": None}}, False)[0]


def test_a_runs_task_artifact_is_read_bounded_and_without_aliases(registry, tmp_path):
    from pipeline.predict.model_card import parse_task_text

    uri, _ = registry
    model = _log(Tracker(uri), UNet3D(base_channels=4, norm="batch").eval(), None, "genesis-huge-task")
    run_id = load_model_card(model, tracking_uri=uri).run_id
    mlflow.MlflowClient(tracking_uri=uri).log_text(run_id, "name: x\nnotes: '" + "y" * 300_000 + "'\n",
                                                   "task/huge.yaml")
    with pytest.raises(ValueError, match=r"task/huge\.yaml: over the \d+-byte limit"):
        load_model_card(model, tracking_uri=uri)
    with pytest.raises(ValueError, match=r"m\.yaml: not valid YAML at line 2: anchor &a is not allowed"):
        parse_task_text("name: x\na: &a [1, 2]\nb: [*a, *a]\n", "m.yaml")
