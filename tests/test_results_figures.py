"""The pictures say what the numbers say: the label-efficiency figure's error bars and axis (checked in the data it
writes beside itself), published values only where comparable, a results picture sized to its table, a patch
preview over several cubes, and preview titles that are never cut."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import write_mhd

from pipeline.tasks.registry import get_task
from pipeline.transfer.table import (EFFICIENCY_COLUMNS, MIN_SPAN, failures, label_efficiency_data,
                                     label_efficiency_figure, results_table, table_figure, table_lines, write_results)

PRE = "models:/genesis-pretrained/1"
ECC = {("scratch", 1.0): [0.80, 0.82, 0.78, 0.75, 0.77, 0.74], ("scratch", 0.5): [0.70, 0.74, 0.69, 0.66, 0.71, 0.7],
       (PRE, 1.0): [0.90, 0.88, 0.91, 0.85, 0.87, 0.86], (PRE, 0.5): [0.85, 0.80, 0.86, 0.81, 0.83, 0.84]}
NCS_NOISE = {("scratch", 1.0): [0.4985], ("scratch", 0.5): [0.4985], (PRE, 1.0): [0.5029], (PRE, 0.5): [0.4990]}


def _cells(values: dict, task: str, preset: str = "paper") -> pd.DataFrame:
    """Finished cells of `task` (ECC: folds 1-3, two seeds each) recorded as the reference ran them when `preset`
    is paper (so the table declares the published value comparable), else as a tiny run."""
    rows = []
    for (init, fraction), vs in values.items():
        for k, v in enumerate(vs):
            fold = (k % 3) + 1 if task == "ecc" else pd.NA
            rows.append({"cell": f"{task}|{init}|{fraction}|{k}", "task": task, "init": init,
                         "label_fraction": fraction, "fold": fold, "seed": k // 3, "status": "FINISHED", "error": "",
                         "run_id": f"r{init[:3]}{fraction}{k}", "metric": f"test_{get_task(task).metrics[0]}",
                         "value": v, "start_time": pd.Timestamp(0, unit="ms", tz="UTC"), "preset": preset,
                         "freeze_encoder": False, "epochs": "", "store_folds": "1,2,3" if task == "ecc" else "",
                         "store_protocol": "" if preset == "paper" else "3 cases, the reference's dataset has 1018"})
    return pd.DataFrame(rows).astype({"fold": "Int64"})


def test_error_bars_are_the_sd_of_the_runs_and_the_axis_does_not_stretch_noise():
    cells = pd.concat([_cells(ECC, "ecc"), _cells(NCS_NOISE, "ncs", preset="tiny")], ignore_index=True)
    table = results_table(cells)
    data = label_efficiency_data(cells, table)
    assert list(data.columns) == EFFICIENCY_COLUMNS
    ours = data[data["series"] == "ours"].set_index(["task", "init", "label_fraction"]).sort_index()
    for (init, fraction), vs in ECC.items():
        point = ours.loc[("ecc", init, fraction)]
        pct = 100 * np.asarray(vs)
        assert point["mean"] == pytest.approx(pct.mean()) and point["n"] == 6
        assert point["error"] == pytest.approx(pct.std(ddof=1)) and point["error_kind"] == "sd over runs"
    assert (ours.loc["ncs", "error"] == 0).all()  # one run: no bar, not a made-up one
    for task, g in data.groupby("task"):
        assert g["y_max"].iloc[0] - g["y_min"].iloc[0] >= MIN_SPAN
    ncs = data[data["task"] == "ncs"]  # 49.85 .. 50.29 on a 0-100 axis: noise stays noise
    assert (ncs["y_min"].iloc[0], ncs["y_max"].iloc[0]) == (0.0, 100.0)
    fig = label_efficiency_figure(cells, table)
    for ax, task in zip(fig.axes, ("ncs", "ecc")):
        assert ax.get_title().startswith(task.upper())
        assert ax.get_ylim() == pytest.approx((0.0, 100.0))
        assert "mean ± 1 sd over runs" in ax.get_legend().get_title().get_text()


def test_published_values_are_plotted_only_where_the_table_says_comparable():
    paper = _cells(ECC, "ecc")
    table = results_table(paper)
    assert set(table.loc[table["label_fraction"] == 1.0, "comparable"]) == {"yes"}
    published = label_efficiency_data(paper, table).query("series == 'published'").set_index("init")
    pub = get_task("ecc").published
    assert published.loc["scratch", "mean"] == pytest.approx(pub.scratch[0])
    assert published.loc["scratch", "error"] == pytest.approx(pub.scratch[1])
    assert published.loc[PRE, "mean"] == pytest.approx(pub.genesis[0]) and set(published["label_fraction"]) == {1.0}
    legend = {t.get_text() for t in label_efficiency_figure(paper, table).axes[0].get_legend().get_texts()}
    assert "published scratch (MedIA 2021)" in legend and "published genesis (MedIA 2021)" in legend

    tiny = _cells(ECC, "ecc", preset="tiny")
    tiny_table = results_table(tiny)
    assert set(tiny_table.loc[tiny_table["label_fraction"] == 1.0, "comparable"]) == {"no"}
    assert (label_efficiency_data(tiny, tiny_table)["series"] == "ours").all()
    assert (label_efficiency_data(paper)["series"] == "ours").all()  # no table: nothing is declared comparable


def test_label_efficiency_csv_is_what_the_figure_plots(tmp_path):
    cells = _cells(ECC, "ecc")
    table = results_table(cells)
    paths = write_results(table, failures(cells), cells, tmp_path)
    written = pd.read_csv(paths["label_efficiency.csv"])
    expected = label_efficiency_data(cells, table)
    pd.testing.assert_frame_equal(written, expected, check_dtype=False)


def _ink(path) -> np.ndarray:
    """Pixels that are not white (text), from the written PNG."""
    from matplotlib.image import imread

    rgb = imread(path)[..., :3]
    return (rgb < 0.9).any(axis=-1)


def test_results_picture_is_sized_to_its_table(tmp_path):
    one = _cells(ECC, "ecc")
    two = pd.concat([one, _cells(NCS_NOISE, "ncs", preset="tiny")], ignore_index=True)
    heights = []
    for name, cells in (("one", one), ("two", two)):
        table = results_table(cells)
        out = tmp_path / f"{name}.png"
        table_figure(table).savefig(out, dpi=120, facecolor="white")
        ink = _ink(out)
        h, w = ink.shape
        lines = table_lines(table)
        # the height follows the line count (10.5 pt a line + 2 x 8 pt margin at 120 dpi), not a fixed canvas
        assert h == pytest.approx((len(lines) * 10.5 + 16) * 120 / 72, abs=2)
        assert w == pytest.approx((max(len(t) for t, _ in lines) * 8 * 0.602 + 16) * 120 / 72, abs=2)
        cols = np.flatnonzero(ink.any(axis=0))
        assert cols[-1] - cols[0] >= 0.9 * w  # the widest line spans the picture: no white side margins
        assert ink.any(axis=1).mean() >= 0.5  # at least half the pixel rows carry text
        assert ink.mean() >= 0.03
        heights.append(h)
    assert heights[1] > heights[0]


# --------------------------------------------------------------------------- previews


def test_case_titles_are_never_cut():
    from pipeline.patches.task_preview import TITLE_CHARS, case_title

    assert case_title("Brats18_2013_102_1") == "Brats18_2013_102_1"
    uid = "1.3.6.1.4.1.14519.5.2.1.6279.6001.133514621196892970856637620206"
    lines = case_title(uid).split("\n")
    assert "".join(lines) == uid and len(lines) > 1 and all(len(line) <= TITLE_CHARS for line in lines)


def test_task_preview_names_each_case_in_full(task_stores):
    import matplotlib.pyplot as plt

    from pipeline.patches.store import PatchStore
    from pipeline.patches.task_preview import task_preview_figure

    store = PatchStore(task_stores["lcs"])
    fig, rows = task_preview_figure(store, n_cubes=4, seed=0)
    cases = store.index.set_index("row").loc[rows, "case_id"].astype(str)
    for ax, case in zip(fig.axes[:len(rows)], cases):
        assert case in ax.get_title().replace("\n", "")
    plt.close(fig)


@pytest.fixture
def pretrain_store(tmp_path, rng):
    from pipeline.patches.config import PretrainPatchConfig
    from pipeline.patches.extract import extract_pretrain
    from pipeline.volume_store.convert import convert

    for i, subset in enumerate([0, 1, 5, 7]):
        vol = np.full((24, 48, 48), 40, dtype=np.int16)
        vol[:, :, :24] = -850
        vol = (vol + rng.normal(0, 15, vol.shape)).astype(np.int16)
        write_mhd(tmp_path / "luna" / f"subset{subset}" / f"1.2.840.{i}.mhd", vol)
    assert convert([str(tmp_path / "luna")], str(tmp_path / "vs"), workers=1, progress=False).ok
    config = PretrainPatchConfig(cube_size=(16, 16, 16), per_scan=6, border_yx=4, border_z=2, min_slices=16)
    return extract_pretrain(str(tmp_path / "vs"), config, out_root=str(tmp_path / "ps"), workers=1,
                            progress=False).path


def test_patch_preview_shows_each_corruption_on_another_cube(pretrain_store, tmp_path):
    import matplotlib.pyplot as plt

    from pipeline.patches.preview import CORRUPTION_NAMES, patch_preview_figure, preview_plan, render_patch_preview
    from pipeline.patches.store import PatchStore

    store = PatchStore(pretrain_store)
    fig, plan = patch_preview_figure(store, n_cubes=8, seed=0)
    assert len(set(plan.corrupted.tolist())) == len(CORRUPTION_NAMES) == len(plan.corrupted)
    assert set(plan.rows.tolist()) <= set(store.index["row"]) and len(set(plan.rows.tolist())) == 8
    axes = np.asarray(fig.axes).reshape(3, -1)
    originals = [np.asarray(axes[1, i].get_images()[0].get_array()) for i in range(len(CORRUPTION_NAMES))]
    for i in range(len(originals)):  # the pictures differ, not only the row numbers
        for j in range(i):
            assert not np.array_equal(originals[i], originals[j]), (i, j)
    assert [axes[1, i].get_title() for i in range(2)] == [f"original #{r}" for r in plan.corrupted[:2]]
    plt.close(fig)
    # a store smaller than the corruptions repeats cubes only as it must; the same seed draws the same cubes
    small = preview_plan(np.arange(3), 8, seed=1)
    assert sorted(set(small.corrupted.tolist())) == [0, 1, 2]
    assert np.array_equal(preview_plan(np.arange(50), 8, 4).corrupted, preview_plan(np.arange(50), 8, 4).corrupted)
    out = render_patch_preview(str(pretrain_store), str(tmp_path / "p.png"))
    assert out == str(tmp_path / "p.png") and (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
