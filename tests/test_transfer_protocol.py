"""Issue 15, the transfer grid's protocol: folds as a grid dimension (every fold by default, `--test-fold` picks
one, the fold recorded on each child run), seeds 0,1,2 and "n<2", the table pooling folds x seeds beside published
values it is comparable with (or "not comparable (why)", each with its source and "unverified"), the `best` alias
that never moves across stores, presets or widths, and runs that name the command that made them."""

from __future__ import annotations

import math
import os

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.tasks.registry import get_task
from pipeline.transfer.grid import GridConfig, cells_of, folds_of, grid_key
from pipeline.transfer.table import cells_from_mlflow, failures, results_table, to_markdown, write_results

TASK_CUBE = (16, 32, 32)
PRE = "models:/genesis-pretrained/1"


@pytest.fixture(scope="module")
def ecc_store(tmp_path_factory) -> str:
    """One ECC task store of the PE sample (6 scans, 4 patients): it holds folds 1, 2 and 3."""
    from pipeline.patches.task_extract import extract_task
    from pipeline.sample_data.datasets import write_sample
    from pipeline.volume_store.convert import convert

    root = tmp_path_factory.mktemp("ecc_folds")
    write_sample("pe", root / "pe", n_scans=6, small=True, seed=0)
    assert convert([str(root / "pe")], str(root / "vs"), workers=1, progress=False).ok
    spec = get_task("ecc").with_overrides(cube_size=TASK_CUBE)
    return str(extract_task(str(root / "vs"), spec, out_root=str(root / "ps"), workers=1, progress=False).path)


def _client(uri):
    import mlflow

    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


# --------------------------------------------------------------------------- folds and seeds in the grid

def test_fold_based_task_runs_every_fold_and_test_fold_picks_one():
    grid = GridConfig(tasks=("ncc", "ecc"), inits=("scratch", PRE))
    assert grid.seeds == (0, 1, 2)  # the default grid has a t-test
    held = {"ncc": (), "ecc": (1, 2, 3)}
    folds = folds_of(grid, held)
    assert folds == {"ncc": (None,), "ecc": (1, 2, 3)}
    cells = cells_of(grid, {"ncc": "k0", "ecc": "k1"}, folds)
    ecc = [c for c in cells if c.task == "ecc"]
    assert len(ecc) == 2 * 3 * 3 and len({c.key for c in cells}) == len(cells) == 6 + 18
    assert {(c.init, c.fold, c.seed) for c in ecc} == {(i, k, s) for i in grid.inits for k in (1, 2, 3)
                                                       for s in (0, 1, 2)}
    assert {c.fold for c in cells if c.task == "ncc"} == {None}
    assert next(c for c in ecc if (c.init, c.fold, c.seed) == ("scratch", 2, 0)).name == "ecc-scratch-f1-s0-k2"
    # a task without folds keeps its keys; the fold is part of a fold cell's key
    plain = cells_of(grid, {"ncc": "k0", "ecc": "k1"})
    assert [c.key for c in cells if c.task == "ncc"] == [c.key for c in plain if c.task == "ncc"]

    one = GridConfig(tasks=("ncc", "ecc"), inits=("scratch", PRE), test_fold=2)
    assert folds_of(one, held) == {"ncc": (None,), "ecc": (2,)}
    picked = cells_of(one, {"ncc": "k0", "ecc": "k1"}, folds_of(one, held))
    assert {c.fold for c in picked if c.task == "ecc"} == {2} and len(picked) == 6 + 6
    assert grid_key(picked) != grid_key(cells)

    with pytest.raises(ValueError, match=r"--test-fold 4: .*holds folds 1, 2, 3"):
        folds_of(GridConfig(tasks=("ecc",), test_fold=4), held)
    with pytest.raises(ValueError, match="no task of the grid"):
        folds_of(GridConfig(tasks=("ncc",), test_fold=1), held)
    with pytest.raises(ValueError, match="test_fold"):
        GridConfig(tasks=("ecc",), test_fold=0)


def test_test_fold_the_store_lacks_is_exit_2_naming_its_folds_and_nothing_is_recorded(ecc_store, tmp_path, capsys):
    from pipeline.cli import main

    db = tmp_path / "mlflow.db"
    code = main(["transfer", "--tasks", "ecc", "--patches", f"ecc={ecc_store}", "--test-fold", "4",
                 "--tracking-uri", f"sqlite:///{db}", "--storage-path", str(tmp_path / "ray")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "holds folds 1, 2, 3" in err[0] and "Traceback" not in err[0], err
    if db.exists():  # the tracking probe may create the database: no run in it
        client = _client(f"sqlite:///{db}")
        assert all(not client.search_runs([e.experiment_id]) for e in client.search_experiments())


def test_prepare_opens_the_fold_view_and_refuses_a_fold_the_store_lacks(ecc_store):
    from pipeline.finetune.run import prepare
    from pipeline.patches.store import PatchStore

    store = PatchStore(ecc_store)
    assert store.folds == (1, 2, 3)
    for k in store.folds:
        prep = prepare(ecc_store, "ecc", fold=k, epochs=1)
        view = store.for_fold(k)
        assert prep.fold == k and prep.loop_config(init="scratch", tracking_uri="u", run_id="r")["fold"] == k
        assert sorted(prep.train_rows) == sorted(view.fraction_rows(1.0).tolist())
        assert sorted(prep.val_rows) == sorted(view.rows("validation").tolist())
        test_patients = set(view.scans.loc[view.scans["split"] == "test", "patient_id"])
        idx = view.index.set_index("row")
        assert test_patients and not test_patients & set(idx.loc[prep.train_rows, "patient_id"])
    with pytest.raises(ValueError, match="holds folds 1, 2, 3, not fold 5"):
        prepare(ecc_store, "ecc", fold=5)
    with pytest.raises(ValueError, match="choose the test fold"):
        prepare(ecc_store, "ecc")


# --------------------------------------------------------------------------- child runs: fold and provenance

def _settings(uri, parent, facts=None):
    return {"tracking_uri": uri, "parent_run_id": parent, "grid_key": "g" * 16, "experiment": "genesis-transfer",
            "preset": "paper", "freeze_encoder": False, "epochs": None, "launched_by": "demo.py",
            "stores": {"ecc": facts or {"store_folds": "1,2,3", "store_cases": 117, "store_protocol": ""}}}


def test_child_runs_record_fold_and_the_command_that_made_them(ecc_store, tmp_path, monkeypatch):
    """The environment names an earlier stage of the same process (the demo's leak): the runs still say
    `genesis transfer`; the fold is a tag and a param; the table reads the fold and the store's record back."""
    from pipeline.transfer.run import _parent_run
    from pipeline.transfer.trial import create_child_run

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("GENESIS_ENTRY_POINT", "genesis pretrain")
    grid = GridConfig(tasks=("ecc",), inits=("scratch",), seeds=(0,))
    parent, attempt = _parent_run(uri, "genesis-transfer", "k" * 16, grid, None)
    monkeypatch.setenv("GENESIS_ENTRY_POINT", "genesis stores list")
    cells = cells_of(grid, {"ecc": "s" * 16}, {"ecc": (1, 2, 3)})
    ids = [create_child_run(c, _settings(uri, parent)) for c in cells]
    client = _client(uri)
    tags = client.get_run(parent).data.tags
    assert attempt == 1 and tags["genesis.entry_point"] == tags["mlflow.source.name"] == "genesis transfer"
    for cell, run_id in zip(cells, ids):
        run = client.get_run(run_id)
        assert run.data.tags["genesis.entry_point"] == run.data.tags["mlflow.source.name"] == "genesis transfer"
        assert run.data.tags["genesis.launched_by"] == "demo.py"
        assert run.data.tags["fold"] == run.data.params["fold"] == str(cell.fold)
        assert run.data.tags["store_folds"] == "1,2,3" and run.data.tags["store_cases"] == "117"
        client.log_metric(run_id, "test_auc", 0.5 + cell.fold / 10)
        client.set_terminated(run_id, "FINISHED")
    read = cells_from_mlflow(uri, parent)
    assert read["fold"].tolist() == [1, 2, 3] and read["value"].tolist() == pytest.approx([0.6, 0.7, 0.8])
    assert (read["store_protocol"] == "").all() and (read["store_folds"] == "1,2,3").all()


def test_finetune_run_names_genesis_finetune_and_defaults_to_fold_1(ecc_store, tmp_path, monkeypatch):
    """`genesis finetune` of a fold-based store: one fine-tuning, test fold 1 unless --test-fold says another.
    Ray is replaced by a failure so that only the MLflow run is made."""
    import pipeline.cluster
    from pipeline.finetune.run import finetune

    def no_ray(*args, **kwargs):
        raise RuntimeError("no Ray in this test")

    monkeypatch.setattr(pipeline.cluster, "ensure_ray", no_ray)
    monkeypatch.setenv("GENESIS_ENTRY_POINT", "genesis stores list")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = _client(uri)
    for test_fold, expected in ((None, "1"), (3, "3")):
        res = finetune(ecc_store, "ecc", tracking_uri=uri, storage_path=str(tmp_path / "ray"), epochs=1,
                       test_fold=test_fold)
        assert res.error and "no Ray" in res.error
        tags = client.get_run(res.mlflow_run_id).data.tags
        assert tags["genesis.entry_point"] == tags["mlflow.source.name"] == "genesis finetune"
        assert tags["fold"] == expected


def test_cli_restores_the_entry_point_after_each_command(monkeypatch, capsys):
    """One process running several commands (the demo, `genesis reproduce`) keeps its own entry point between
    them: no command's name leaks into the next stage's runs."""
    from pipeline.cli import main
    from pipeline.runtime.tracking import ENTRY_POINT_ENV

    monkeypatch.setenv(ENTRY_POINT_ENV, "genesis reproduce")
    assert main(["tasks", "list"]) == 0
    assert os.environ[ENTRY_POINT_ENV] == "genesis reproduce"
    monkeypatch.delenv(ENTRY_POINT_ENV)
    assert main(["tasks", "show", "nosuchtask"]) == 2
    assert ENTRY_POINT_ENV not in os.environ
    capsys.readouterr()


# --------------------------------------------------------------------------- the table

SCRATCH = {1: [0.80, 0.82, 0.78], 2: [0.75, 0.77, 0.74], 3: [0.84, 0.83, 0.86]}
PRETRAINED = {1: [0.90, 0.88, 0.91], 2: [0.85, 0.87, 0.86], 3: [0.93, 0.92, 0.90]}


def _cell(task, init, fold, seed, value, *, fraction=1.0, status="FINISHED", preset="paper", protocol="",
          store_folds="1,2,3", epochs="", dice=math.nan, dice_sd=math.nan, error=""):
    return {"cell": f"{task}|{init}|{fraction}|{fold}|{seed}", "task": task, "init": init, "label_fraction": fraction,
            "fold": fold, "seed": seed, "status": status, "error": error, "run_id": f"r{fold}{seed}{init[:3]}",
            "metric": f"test_{get_task(task).metrics[0]}", "value": value, "dice": dice, "dice_sd": dice_sd,
            "start_time": pd.Timestamp(1_700_000_000_000, unit="ms", tz="UTC"), "preset": preset,
            "freeze_encoder": False, "epochs": epochs, "store_folds": store_folds, "store_protocol": protocol}


def _ecc_cells(**kw) -> pd.DataFrame:
    rows = [_cell("ecc", init, k, s, v, **kw) for init, by_fold in (("scratch", SCRATCH), (PRE, PRETRAINED))
            for k, values in by_fold.items() for s, v in enumerate(values)]
    return pd.DataFrame(rows).astype({"fold": "Int64"})


def _row(table, init, fraction=1.0):
    hit = table[(table.init == init) & (table.label_fraction == fraction)]
    assert len(hit) == 1
    return hit.iloc[0]


def test_table_pools_folds_x_seeds_and_cells_csv_keeps_each_fold(tmp_path):
    from scipy import stats

    cells = _ecc_cells()
    table = results_table(cells)
    for init, by_fold in (("scratch", SCRATCH), (PRE, PRETRAINED)):
        pooled = [100 * v for values in by_fold.values() for v in values]
        r = _row(table, init)
        assert r["n"] == 9 and r["folds"] == "1,2,3"
        assert r["mean"] == pytest.approx(np.mean(pooled)) and r["sd"] == pytest.approx(np.std(pooled, ddof=1))
    p = stats.ttest_ind([100 * v for vs in PRETRAINED.values() for v in vs],
                        [100 * v for vs in SCRATCH.values() for v in vs]).pvalue
    assert _row(table, PRE)["p_vs_baseline"] == pytest.approx(p)
    paths = write_results(table, failures(cells), cells, tmp_path)
    written = pd.read_csv(paths["cells.csv"])
    assert len(written) == 18 and sorted(set(written["fold"])) == [1, 2, 3]
    per_fold = written[written["init"] == PRE].groupby("fold")["value"].mean()
    assert per_fold.to_dict() == pytest.approx({k: np.mean(v) for k, v in PRETRAINED.items()})
    assert pd.read_csv(paths["results.csv"])["n"].tolist() == [9, 9]


def test_p_value_says_n_lt_2_when_a_side_has_fewer_than_two_runs():
    cells = pd.DataFrame([_cell("ncc", "scratch", pd.NA, 0, 0.8, store_folds=""),
                          _cell("ncc", "scratch", pd.NA, 1, 0.82, store_folds=""),
                          _cell("ncc", PRE, pd.NA, 0, 0.9, store_folds=""),
                          _cell("ncc", "scratch", pd.NA, 0, 0.7, fraction=0.5, store_folds=""),
                          _cell("ncc", PRE, pd.NA, 0, 0.9, fraction=0.5, store_folds=""),
                          _cell("ncc", PRE, pd.NA, 1, 0.8, fraction=0.5, store_folds="")])
    md = to_markdown(results_table(cells), failures(cells))
    rows = {tuple(c.strip() for c in line.split("|")[1:3]): [c.strip() for c in line.split("|")[1:-1]]
            for line in md.splitlines() if line.startswith("| ") and "---" not in line and "init" not in line}
    p_col = [c.strip() for c in next(line for line in md.splitlines() if line.startswith("| init")).split("|")[1:-1]] \
        .index("p vs scratch")
    assert rows[(PRE, "100%")][p_col] == "n<2"      # one pretrained run
    assert rows[(PRE, "50%")][p_col] == "n<2"       # two pretrained runs, one scratch run
    assert rows[("scratch", "100%")][p_col] == "-"  # the baseline itself


def test_published_value_stands_beside_ours_only_when_computed_the_same_way():
    pub = get_task("ecc").published
    sources, unverified = dict(pub.sources), tuple(pub.unverified)
    assert set(sources) >= {"scratch", "medicalnet", "genesis"} and all(sources.values())

    same = results_table(_ecc_cells())
    md = to_markdown(same, failures(_ecc_cells()))
    for init, kind in (("scratch", "scratch"), (PRE, "genesis")):
        r = _row(same, init)
        assert r["comparable"] == "yes" and r["not_comparable"] == ""
        assert r["published_source"] == sources[kind] and bool(r["published_unverified"]) == (kind in unverified)
        value = f"{pub.__getattribute__(kind)[0]:.2f} ± {pub.__getattribute__(kind)[1]:.2f}"
        line = next(x for x in md.splitlines() if x.startswith(f"| {init} | 100% |"))
        assert value in line and ("(unverified)" in line) == (kind in unverified)
        listed = next(x for x in md.splitlines() if x.startswith(f"- ECC {kind} "))
        assert value in listed and sources[kind][:40] in listed and ("unverified" in listed) == (kind in unverified)

    cases = {"tiny preset, not paper": dict(preset="tiny"), "epochs capped at 2": dict(epochs="2"),
             "6 patients, the reference's dataset has 117": dict(protocol="6 patients, the reference's dataset "
                                                                          "has 117 (PE-CAD patients (3 folds of 39))")}
    for reason, kw in cases.items():
        table = results_table(_ecc_cells(**kw))
        r = _row(table, PRE)
        assert r["comparable"] == "no" and reason in r["not_comparable"]
        line = next(x for x in to_markdown(table, failures(_ecc_cells(**kw))).splitlines()
                    if x.startswith(f"| {PRE} | 100% |"))
        assert f"not comparable ({reason}" in line and f"{pub.genesis[0]:.2f}" not in line

    # a fold that gave no value: the row no longer pools every fold
    lost = _ecc_cells()
    lost.loc[(lost["init"] == PRE) & (lost["fold"] == 2), ["status", "value"]] = ["FAILED", math.nan]
    r = _row(results_table(lost), PRE)
    assert r["comparable"] == "no" and "folds 1,3 of 1,2,3" in r["not_comparable"] and r["failed"] == 3
    # below full labels the paper published nothing
    half = results_table(_ecc_cells(fraction=0.5))
    assert _row(half, PRE, 0.5)["comparable"] == "" and math.isnan(_row(half, PRE, 0.5)["published_mean"])


def test_whole_volume_rows_report_the_paper_metric_and_per_case_dice():
    dice = {0: (0.70, 0.10), 1: (0.74, 0.12), 2: (0.72, 0.08)}
    cells = pd.DataFrame([_cell("lcs", "scratch", pd.NA, s, 0.8 + s / 100, store_folds="", dice=m, dice_sd=sd)
                          for s, (m, sd) in dice.items()])
    table = results_table(cells)
    r = table.iloc[0]
    means, sds = np.array([m for m, _ in dice.values()]), np.array([sd for _, sd in dice.values()])
    assert r["dice_mean"] == pytest.approx(100 * means.mean())
    assert r["dice_sd"] == pytest.approx(100 * math.sqrt(np.mean(sds ** 2) + np.var(means)))
    assert r["metric"] == "Keras mean_iou" and r["unit"] == "volume"
    header = next(x for x in to_markdown(table, failures(cells)).splitlines() if x.startswith("| init"))
    assert "Keras mean_iou over whole volumes, pooled (%)" in header and "Dice per case (%)" in header
    assert "published Keras mean_iou (%)" in header
    ncs = results_table(pd.DataFrame([_cell("ncs", "scratch", pd.NA, 0, 0.8, store_folds="", dice=0.5)]))
    assert ncs.iloc[0]["dice_mean"] == pytest.approx(50.0) and ncs.iloc[0]["unit"] == "cube"  # per cube, for NCS
    md = to_markdown(ncs, failures(ncs.iloc[:0]))
    assert "Dice per case" not in md and "Dice per cube (%), mean ± sd over cubes" in md
    ncc = results_table(pd.DataFrame([_cell("ncc", "scratch", pd.NA, 0, 0.8, store_folds="")]))
    assert "Dice" not in to_markdown(ncc, failures(ncc.iloc[:0]))  # a classifier has none


def test_store_differences_split_cubes_and_dataset(ecc_store, tmp_path):
    from pipeline.patches.store import PatchStore
    from pipeline.transfer.protocol import store_cases, store_differences

    store = PatchStore(ecc_store)
    reasons = store_differences(store, "ecc")
    assert store_cases(store, "ecc") == 4
    assert any(r.startswith("4 patients, the reference's dataset has 117") for r in reasons)
    assert any(r.startswith("cubes 16x32x32") for r in reasons)
    assert not any("split" in r for r in reasons)  # the registry's fold rule

    class Fake:
        """A store as the reference's: the registry's split, cube and 117 patients."""
        attrs = {"config": {"task": {"split": get_task("ecc").to_dict()["split"]}},
                 "cube_shape": list(get_task("ecc").cube_size)}
        scans = pd.DataFrame({"case_id": [f"c{i}" for i in range(117)], "patient_id": [f"p{i}" for i in range(117)]})

    assert store_differences(Fake(), "ecc") == []
    Fake.attrs = {**Fake.attrs, "config": {"task": {"split": {"kind": "file", "path": "/x/splits.csv"}}}}
    assert store_differences(Fake(), "ecc") == ["splits from the file splits.csv, not the reference's rule"]


# --------------------------------------------------------------------------- the best alias

def test_best_moves_only_within_one_store_preset_and_width(tmp_path):
    from pipeline.models.unet3d import UNet3D
    from pipeline.runtime.tracking import RunLogger, Tracker, best_alias_of
    from pipeline.model_io.model_format import log_model

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = _client(uri)
    uris = {}
    for width in (4, 8):
        run_id = Tracker.at(uri).create_run("genesis-pretraining", f"w{width}")
        logger = RunLogger(uri, run_id, system_metrics=False)
        torch.manual_seed(0)
        uris[width] = log_model(UNet3D(base_channels=width).eval()).model_uri
        logger.end()
    a, b = "a" * 64, "b" * 64
    name = "genesis-pretrained"

    def register(width, store, preset, loss):
        return Tracker.at(uri).register_model(uris[width], name, metric=loss,
                                              tags={"patch_store": store, "preset": preset}).version

    def alias(a_name):
        return client.get_model_version_by_alias(name, a_name).version

    v1 = register(4, a, "tiny", 0.5)
    assert alias("best") == v1 == alias(best_alias_of(a, "tiny", 4)) == alias("best-aaaaaaaa-tiny-w4")
    assert client.get_model_version(name, v1).tags["width"] == "4"
    v2 = register(4, b, "tiny", 0.1)  # lower loss on another store: its own group alias, not best
    assert alias("best") == v1 and alias(best_alias_of(b, "tiny", 4)) == v2
    v3 = register(4, a, "tiny", 0.3)  # same store, preset, width and better: best moves
    assert alias("best") == v3 == alias(best_alias_of(a, "tiny", 4))
    v4 = register(4, a, "tiny", 0.9)  # worse: nothing moves
    assert alias("best") == v3 == alias(best_alias_of(a, "tiny", 4)) != v4
    v5 = register(4, a, "paper", 0.01)  # another preset
    v6 = register(8, a, "tiny", 0.01)  # another width
    assert alias("best") == v3
    assert alias(best_alias_of(a, "paper", 4)) == v5 and alias(best_alias_of(a, "tiny", 8)) == v6
    assert client.get_model_version(name, v6).tags["best_alias"] == "best-aaaaaaaa-tiny-w8"
