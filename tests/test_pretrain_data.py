"""Pretraining data without Ray: batches of different scans, each rank's share of the global batch, the
global batch rule, validation of the whole split (re-corrupted per epoch, reproducibly, sharded and reduced),
the restoration figure."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import write_mhd

from pipeline.data import (FIXED_CORRUPTION, CubeStreamConfig, PatchCubes, ValidationCubes, distinct_scans_per_batch,
                           epoch_order, rank_share)
from pipeline.patches.config import PretrainPatchConfig
from pipeline.patches.extract import extract_pretrain
from pipeline.patches.store import PatchStore
from pipeline.training.config import PretrainConfig, paper, per_worker_batch, precision, stable, tiny
from pipeline.training.pictures import CORRUPTIONS, figure_pairs, restoration_figure
from pipeline.training.steps import build_model, validation_sums
from pipeline.volume_store.convert import convert

CUBE = PretrainPatchConfig(cube_size=(16, 16, 16), per_scan=8, border_yx=4, border_z=2, min_slices=16)
TRAIN_SCANS, VAL_SCANS = 12, 3


@pytest.fixture(scope="module")
def many_scans(tmp_path_factory):
    """A store of 12 train scans (subsets 0-4) and 3 validation scans (subsets 5-6), 8 cubes each at most."""
    root = tmp_path_factory.mktemp("many_scans")
    rng = np.random.default_rng(0)
    subsets = [i % 5 for i in range(TRAIN_SCANS)] + [5, 6, 5]
    for i, subset in enumerate(subsets):
        vol = np.full((32, 48, 48), 40, dtype=np.int16)
        vol[:, :, :28] = -850
        vol = (vol + rng.normal(0, 10, vol.shape)).astype(np.int16)
        write_mhd(root / "src" / f"subset{subset}" / f"1.3.{i}.mhd", vol)
    assert convert([str(root / "src")], str(root / "vs"), workers=1, progress=False).ok
    path = str(extract_pretrain(str(root / "vs"), CUBE, out_root=str(root / "ps"), workers=1, progress=False).path)
    idx = PatchStore(path).index
    assert idx[idx["split"] == "train"]["scan_id"].nunique() == TRAIN_SCANS
    return path


# ---- which cubes make a batch

def test_epoch_order_is_a_seeded_permutation_of_batches_of_different_scans():
    scans = np.repeat(np.arange(12), 32)
    order = epoch_order(scans, 6, (0, 0))
    assert sorted(order) == list(range(len(scans)))
    assert np.array_equal(order, epoch_order(scans, 6, (0, 0)))
    assert not np.array_equal(order, epoch_order(scans, 6, (0, 1)))
    assert (distinct_scans_per_batch(scans[order], 6) == 6).all()
    # a uniform permutation of 12 scans gives ~5.0 (the reason for the rule); LUNA16's 445 scans ~5.97
    uniform = epoch_order(scans, 6, (0, 0), distinct=False)
    assert sorted(uniform) == list(range(len(scans))) and distinct_scans_per_batch(scans[uniform], 6).mean() < 5.5
    # uneven scans: still different scans while enough have cubes left; fewer scans than the batch: all of them
    uneven = np.repeat(np.arange(9), [40, 3, 30, 30, 8, 30, 30, 12, 30])
    got = distinct_scans_per_batch(uneven[epoch_order(uneven, 6, (1, 0))], 6)
    assert got.mean() >= 5.5 and sorted(epoch_order(uneven, 6, (1, 0))) == list(range(len(uneven)))
    three = np.repeat(np.arange(3), 10)
    assert (distinct_scans_per_batch(three[epoch_order(three, 6, (0, 0))], 6) == 3).all()


def test_distinct_scans_per_batch_counts_complete_batches():
    assert distinct_scans_per_batch(np.array([0, 1, 1, 2, 2, 2, 7]), 3).tolist() == [2, 1]


def test_each_rank_takes_its_slots_of_every_global_batch():
    order = np.arange(20)
    parts = [rank_share(order, 6, r, 2) for r in range(2)]
    assert parts[0].tolist() == [0, 1, 2, 6, 7, 8, 12, 13, 14, 18]
    assert parts[1].tolist() == [3, 4, 5, 9, 10, 11, 15, 16, 17, 19]
    assert len(rank_share(order, 6, 2, 3)) == len(rank_share(order, 6, 0, 3)) == 6
    with pytest.raises(ValueError, match="global batch of 6 .* 4 workers"):
        rank_share(order, 6, 0, 4)


def test_loader_serves_batches_of_different_scans_the_same_on_any_number_of_ranks(many_scans):
    store = PatchStore(many_scans)
    scan_of = dict(zip(store.index["row"], store.index["scan_id"]))
    one = PatchCubes(many_scans, CubeStreamConfig(split="train", seed=3, batch_size=6), rank=0, world_size=1)
    one.set_epoch(2)
    per_batch = one.scans_per_batch()
    assert per_batch.mean() >= 5.5, per_batch  # the benchmark's figure, from the loader itself
    served = list(one.batches())
    rows = one.rank_rows()
    assert len(served) == len(rows) // 6 and all(b.shape == (6, 1, 16, 16, 16) for b in served)
    for k, batch in enumerate(served):  # what is served is what the order says, read through read_cubes
        assert torch.equal(batch, torch.from_numpy(store.read_cubes(rows[6 * k:6 * k + 6])))
    assert np.mean([len({scan_of[r] for r in rows[i:i + 6]}) for i in range(0, len(rows) // 6 * 6, 6)]) >= 5.5
    assert sorted(rows) == sorted(store.rows("train"))  # every train cube once per epoch
    # two ranks: rank r's k-th batch is its half of the k-th global batch of one rank
    halves = [PatchCubes(many_scans, CubeStreamConfig(split="train", seed=3, batch_size=6), rank=r, world_size=2)
              for r in range(2)]
    for h in halves:
        h.set_epoch(2)
    for k, (a, b) in enumerate(zip(*(h.batches() for h in halves))):
        assert a.shape[0] == b.shape[0] == 3 and torch.equal(torch.cat([a, b]), served[k])
    with pytest.raises(ValueError, match="batch_size 6 .* 4 ranks"):
        PatchCubes(many_scans, CubeStreamConfig(batch_size=6), rank=0, world_size=4)


# ---- the global batch and the optimiser

def test_global_batch_is_split_across_workers_at_the_reference_lr():
    p = paper()
    assert (p.batch_size, p.optimizer, p.lr, p.momentum, p.step_size, p.gamma) == (6, "sgd", 1.0, 0.9, 40, 0.5)
    assert per_worker_batch(6, 1) == 6 and per_worker_batch(6, 2) == 3 and per_worker_batch(6, 3) == 2
    with pytest.raises(ValueError, match=r"global batch of 6 cubes does not split evenly across 4 Ray workers"):
        per_worker_batch(6, 4)
    assert precision(p, "cuda") == "fp32" and precision(stable(), "cuda") == "bf16-autocast"
    assert precision(stable(), "cpu") == "fp32" and precision(tiny(), "cuda") == "fp32"


def test_indivisible_split_is_refused_before_ray_or_mlflow(many_scans, tmp_path, monkeypatch):
    import pipeline.cluster
    from pipeline.runtime.tracking import Tracker
    from pipeline.training.pretrain import pretrain

    def must_not_run(*a, **k):
        raise AssertionError("reached Ray or MLflow")

    monkeypatch.setattr(pipeline.cluster, "ensure_ray", must_not_run)
    monkeypatch.setattr(Tracker, "create_run", must_not_run)
    with pytest.raises(ValueError, match="global batch of 6 cubes does not split evenly across 4 Ray workers"):
        pretrain(many_scans, paper(), workers=4, tracking_uri=f"sqlite:///{tmp_path}/m.db",
                 storage_path=str(tmp_path / "ray"))
    with pytest.raises(ValueError, match="fewer than one global batch of 1000"):
        pretrain(many_scans, paper().with_overrides(batch_size=1000), workers=1,
                 tracking_uri=f"sqlite:///{tmp_path}/m.db", storage_path=str(tmp_path / "ray"))


def test_older_run_configs_still_load():
    old = {**paper().to_dict(), "val_pairs": 64, "buffer_size": 128}
    del old["val_cubes"]
    assert PretrainConfig.from_dict(old) == paper()


# ---- validation

def test_paper_validates_on_the_whole_split_recorrupted_each_epoch_reproducibly(many_scans):
    store = PatchStore(many_scans)
    n_val = int((store.index["split"] == "validation").sum())
    val = ValidationCubes(many_scans, batch_size=paper().batch_size, cubes=paper().val_cubes, seed=0)
    assert val.split == "validation" and len(val) == n_val and sorted(val.rows) == sorted(store.rows("validation"))
    assert val.n_batches == -(-n_val // 6)

    def pairs(key):
        return [(x.clone(), y.clone()) for x, y in val.pairs(key, "cpu")]

    e1, e1_again, e2 = pairs(1), pairs(1), pairs(2)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(e1, e1_again))
    assert any(not torch.equal(a[0], b[0]) for a, b in zip(e1, e2))
    fixed = pairs(FIXED_CORRUPTION)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(fixed, pairs(FIXED_CORRUPTION)))
    # the restoration is of the flipped original: targets are the cubes up to flips
    assert all(torch.equal(torch.sort(y.flatten()).values, torch.sort(torch.from_numpy(
        store.read_cubes(val.batch_rows(j))).flatten()).values) for j, (_, y) in enumerate(e1))


def test_a_fixed_validation_set_is_drawn_across_scans(many_scans):
    val = ValidationCubes(many_scans, batch_size=6, cubes=3, seed=0)
    assert len(val) == 3 and len(set(val.scans)) == VAL_SCANS
    assert tiny().val_cubes > 0 and not tiny().val_recorrupt and paper().val_cubes == 0 and paper().val_recorrupt


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_validation_gives_the_loss_of_one_process(many_scans, world):
    torch.manual_seed(0)
    model = build_model(PretrainConfig(base_channels=2))
    cpu = torch.device("cpu")
    sse, n = validation_sums(model, ValidationCubes(many_scans, batch_size=6, seed=1).pairs(4, "cpu"), cpu)
    shares = [validation_sums(model, ValidationCubes(many_scans, batch_size=6, seed=1, rank=r, world_size=world)
                              .pairs(4, "cpu"), cpu) for r in range(world)]
    assert sum(s for _, s in shares) == n == len(ValidationCubes(many_scans, batch_size=6)) * 16 ** 3
    assert sum(s for s, _ in shares) / n == pytest.approx(sse / n, rel=1e-12)
    assert all(s > 0 for s, _ in shares)  # every rank had a share


# ---- the restoration figure

def test_restoration_figure_has_one_row_per_corruption_on_fixed_cubes(many_scans):
    cubes = PatchStore(many_scans).read_cubes(np.arange(2))[:, 0]
    x, y = figure_pairs(cubes, seed=5)
    assert x.shape == y.shape == (len(CORRUPTIONS) * 2, 1, 16, 16, 16)
    x2, _ = figure_pairs(cubes, seed=5)
    assert torch.equal(x, x2)  # the same corrupted cubes every epoch of a run
    assert torch.equal(y, torch.from_numpy(np.concatenate([cubes] * len(CORRUPTIONS)))[:, None])  # no flips
    # every row is corrupted (but local shuffle: at 16 voxels a side its blocks are 1 voxel, a no-op)
    assert all(not torch.equal(x[k], y[k]) for k in range(len(x)) if CORRUPTIONS[k // 2] != "local shuffle")
    fig = restoration_figure(x, y, y, "t")
    assert len(fig.axes) == len(CORRUPTIONS) * 3 * 2
    assert [fig.axes[6 * i].get_ylabel() for i in range(len(CORRUPTIONS))] == list(CORRUPTIONS)
    import matplotlib.pyplot as plt

    plt.close(fig)
