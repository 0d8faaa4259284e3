"""The README's "Your own data" walkthrough, run verbatim: an nnU-Net v2 dataset (two MR channels) -> a volume store
-> a drafted task file -> MR pretraining -> the task store -> the transfer grid -> `genesis predict` on the test
cases, whose label maps must come back in the input's own geometry."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
START, END = "<!-- own-data-walkthrough -->", "<!-- /own-data-walkthrough -->"


def walkthrough() -> list[str]:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert START in readme and END in readme, f"README.md lacks the {START} block"
    block = readme.split(START, 1)[1].split(END, 1)[0]
    return [line.strip() for line in block.splitlines() if line.strip()]


def test_the_walkthrough_is_plain_commands():
    lines = walkthrough()
    assert lines[0].startswith("G=") and len(lines) >= 8
    steps = [line.split()[1] for line in lines[1:]]
    assert steps == ["sample-data", "convert", "tasks", "patches", "pretrain", "patches", "transfer", "predict"]


@pytest.mark.timeout(1500)
def test_readme_own_data_walkthrough_runs_verbatim(tmp_path):
    (tmp_path / ".venv").symlink_to(REPO / ".venv")
    script = "set -euo pipefail\n" + "\n".join(walkthrough()) + "\n"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_ADDRESS"))}
    run = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, encoding="utf-8",
                         errors="replace", timeout=1400)  # the table prints "±"; CI's locale may be ASCII
    assert run.returncode == 0, f"walkthrough failed (exit {run.returncode}):\n{run.stdout[-4000:]}\n{run.stderr[-4000:]}"
    own = tmp_path / "own"

    # the drafted task file is the one the runs used: two channels, percentiles, every label > 0
    task = (own / "phantom.yaml").read_text(encoding="utf-8")
    assert "channels: [t2, adc]" in task and "kind: percentile" in task

    # the transfer table: both inits finished on the user's task
    results = (own / "results" / "results.md").read_text(encoding="utf-8")
    assert "PHANTOM" in results
    rows = [r for r in results.splitlines() if r.startswith(("| scratch", "| models:/genesis-pretrained@best"))]
    assert len(rows) == 2 and all(r.rstrip(" |").endswith("| 0") for r in rows), results

    # one label map per test case, in exactly the geometry of the case's input, holding the task's label value
    data = own / "data" / "Dataset501_Phantom"
    cases = sorted(p.name[: -len("_0000.nii.gz")] for p in (data / "imagesTs").glob("*_0000.nii.gz"))
    assert cases
    for case in cases:
        src = sitk.ReadImage(str(data / "imagesTs" / f"{case}_0000.nii.gz"))
        out = sitk.ReadImage(str(own / "predictions" / f"{case}.nii.gz"))
        assert out.GetSize() == src.GetSize()
        np.testing.assert_allclose(out.GetSpacing(), src.GetSpacing(), atol=1e-6)
        np.testing.assert_allclose(out.GetOrigin(), src.GetOrigin(), atol=1e-4)
        np.testing.assert_allclose(out.GetDirection(), src.GetDirection(), atol=1e-6)
        assert set(np.unique(sitk.GetArrayViewFromImage(out)).tolist()) <= {0, 1}

    record = json.loads((own / "predictions" / "predictions.json").read_text(encoding="utf-8"))
    assert record["model"]["name"] == "genesis-phantom" and record["task"]["name"] == "phantom"
    assert [c["case_id"] for c in record["cases"]] == cases
    assert all(c["status"] == "ok" and len(c["inputs"]) == 2 and all(len(i["sha256"]) == 64 for i in c["inputs"])
               for c in record["cases"])

    # the model's run logged the task file it was trained with
    from pipeline.runtime.tracking import Tracker

    logged = Tracker.at(f"sqlite:///{own / 'mlflow.db'}").read_text(record["model"]["run_id"], "task/phantom.yaml")
    assert logged is not None and "name: phantom" in logged


def test_classification_from_a_candidates_csv(tmp_path):
    """nnU-Net CT dataset + candidates.csv (case_id,x,y,z,label; test cases' candidates too) -> a store whose
    `candidates` table feeds a drafted classification task's store, one cube per candidate."""
    import pandas as pd

    from pipeline.cli import main
    from pipeline.patches.store import PatchStore
    from pipeline.sample_data.datasets import write_sample

    write_sample("nnunet-ct", tmp_path / "data", small=True)
    root = tmp_path / "data" / "Dataset502_PhantomCT"
    table = pd.read_csv(root / "candidates.csv", dtype={"case_id": str})
    assert main(["convert", str(root), "--store", str(tmp_path / "vol"), "--workers", "1", "--no-progress"]) == 0
    assert main(["tasks", "init", str(root), "--out", str(tmp_path / "ct.yaml"),
                 "--candidates", str(root / "candidates.csv")]) == 0
    assert main(["patches", "task", str(tmp_path / "ct.yaml"), "--store", str(tmp_path / "vol"), "--out",
                 str(tmp_path / "ps"), "--size", "8,16,16", "--negative-ratio", "all", "--workers", "1",
                 "--no-progress"]) == 0
    store = PatchStore(str(next((tmp_path / "ps").glob("task-phantomct-*"))))
    index = store.index
    assert len(index) == len(table)
    assert int((index["label"] > 0).sum()) == int(table["label"].sum())
    assert store.cubes.shape[1:] == (1, 8, 16, 16)


def test_tasks_init_leaves_the_ignore_label_out_of_the_target(tmp_path):
    from pipeline.tasks.task_init import draft_task

    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1, "tumour": 2, "ignore": 3},
        "numTraining": 0, "file_ending": ".nii.gz"}), encoding="utf-8")
    spec, comments, _ = draft_task(tmp_path, name="organ")
    assert spec.sampling.target_values == (1, 2)


def test_a_channel_on_another_grid_fails_its_case_in_the_task_store(tmp_path):
    """nnU-Net's rule: the channels of a case share one grid. A second channel shifted by 5 mm converts (each scan is
    fine alone) but its case is a failed row of the task store, named, instead of misaligned cubes."""
    from pipeline.cli import main
    from pipeline.patches.store import PatchStore
    from pipeline.patches.task_extract import extract_task
    from pipeline.sample_data.datasets import write_sample
    from pipeline.tasks.task_init import draft_task

    write_sample("nnunet", tmp_path / "data", small=True)
    root = tmp_path / "data" / "Dataset501_Phantom"
    moved = root / "imagesTr" / "phantom_002_0001.nii.gz"
    image = sitk.ReadImage(str(moved))
    image.SetOrigin(tuple(v + 5.0 for v in image.GetOrigin()))
    sitk.WriteImage(image, str(moved))
    assert main(["convert", str(root), "--store", str(tmp_path / "vol"), "--workers", "1", "--no-progress"]) == 0
    spec, _, _ = draft_task(root)
    spec = spec.with_overrides(cube_size=(8, 16, 16))
    result = extract_task(str(tmp_path / "vol"), spec, out_root=str(tmp_path / "ps"), workers=1, progress=False)
    skipped = [s for s in result.skipped if "phantom_002" in s["scan_id"]]
    assert len(skipped) == 2 and all("different grids" in s["reason"] for s in skipped), result.skipped
    assert not any("phantom_002" in str(c) for c in PatchStore(result.path).index["case_id"])


def test_tasks_init_names_channels_as_convert_stores_them(tmp_path):
    """One dataset.json parser for convert and tasks init: two channels sharing a name get the sequence ids convert
    gives them (t1_0000, t1_0001), so the drafted task finds both."""
    from pipeline.ingest.nnunet import read_dataset_json as read_meta
    from pipeline.tasks.task_init import draft_task

    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "T1", "1": "T1"}, "labels": {"background": 0, "lesion": 1},
        "numTraining": 0, "file_ending": ".nii.gz"}), encoding="utf-8")
    spec, _, _ = draft_task(tmp_path, name="twins")
    assert spec.channels == tuple(read_meta(str(tmp_path / "dataset.json")).sequences().values()) == \
        ("t1_0000", "t1_0001")
