"""The MLflow UI, seen in a real browser (issue 11, section 5; issue 19, section 5).

A small tracking store is written the way the pipeline writes one (pipeline.runtime.tracking's Tracker: create_run /
logger / register_model; the restoration figure of pipeline.training.pictures; a transfer grid's parent run
summarised by pipeline.transfer.summary): one pretraining run with three epochs of loss metrics and a restoration
PNG, its model registered as `genesis-pretrained` with an alias, and a transfer parent run with its child runs.
The command the pipeline prints for the UI (`ui_command`: .venv/bin/mlflow ui ..., as printed) serves it on
127.0.0.1; headless Chromium (the system's `chromium`, driven by Playwright, a fresh profile as a first visit
has) opens the pages a person checks after `make demo`, by the links the pipeline prints (`Tracker.experiment_url`,
`Tracker.run_url`) - the experiment, which must open on its runs table and not on MLflow's GenAI overview, the
run's loss charts, the PNG in the artifact viewer, the registered model with its
aliases, the transfer parent run - and the test asserts what that person looks for: the run by name, charts drawn
from the logged numbers, the artifact's picture loaded in an <img>, the alias chips, the grid's table as the parent
run's description with its summary metrics, results.md among its first artifacts.
Screenshots go to $GENESIS_TEST_ARTIFACTS/mlflow_ui (else the test's tmp folder); the test prints where.

Skips, with a one-line reason, when chromium (`.ci/run` installs it with apt-get) or Playwright (the `test` extra)
is missing.
"""

from __future__ import annotations

import os
import shlex
import shutil
import socket
import struct
import subprocess
import time
import urllib.request
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import pytest

EXPERIMENT = "genesis-pretraining"
RUN_NAME = "genesis-pretrain-ui-check"
MODEL = "genesis-pretrained"
ALIAS = "ui-check"
PICTURE = "restoration/epoch_0002.png"
GRID_EXPERIMENT = "genesis-transfer"
GRID_RUN = "transfer-tiny-ui-check"
#: the grid's fine-tunings: (task, init, label fraction, seed, test AUC)
PRE = "models:/genesis-pretrained@best"
GRID = [("ncc", "scratch", 1.0, 0, 0.71), ("ncc", "scratch", 1.0, 1, 0.73), ("ncc", PRE, 1.0, 0, 0.84),
        ("ncc", PRE, 1.0, 1, 0.86)]
#: three epochs, both losses falling
LOSSES = {"train_loss": (0.090, 0.061, 0.048), "val_loss": (0.085, 0.059, 0.050)}
#: how long one element may take to appear (a React app that fetches after loading; 2 shared cores)
WAIT_MS = 30_000
#: the server and this process stay off the network (no usage telemetry; nothing else is reachable here)
QUIET = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}


def _chromium() -> str:
    """The system Chromium (Playwright cannot download its own browser here), or skip."""
    pytest.importorskip("playwright.sync_api", reason="playwright not installed (pip install playwright)")
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if not exe:
        pytest.skip("chromium not installed (apt-get install -y chromium; .ci/run installs it)")
    return exe


def _shots_dir(tmp_path: Path) -> Path:
    root = os.environ.get("GENESIS_TEST_ARTIFACTS")
    out = Path(root) / "mlflow_ui" if root else tmp_path / "screenshots"
    out.mkdir(parents=True, exist_ok=True)
    return out


def _phantom() -> np.ndarray:
    """One 16x32x32 cube in [0, 1]: a bright ball in a smooth, mildly noisy background, so the corruptions
    show in the picture as they do on CT."""
    z, y, x = np.mgrid[:16, :32, :32].astype(np.float32)
    ball = ((z - 8) / 5) ** 2 + ((y - 14) / 9) ** 2 + ((x - 18) / 9) ** 2 < 1
    noise = np.random.default_rng(0).normal(0, 0.03, ball.shape).astype(np.float32)
    return np.clip(0.2 + 0.3 * x / 32 + 0.4 * ball + noise, 0, 1)[None]


def _log_run(uri: str, run_id: str) -> int:
    """Into the open run: params, the losses per epoch, a restoration PNG, the model registered with aliases
    `ALIAS` and (lowest val_loss) `best`; as pipeline.training.worker logs them. Returns the version."""
    import matplotlib.pyplot as plt
    import torch

    from pipeline.models.unet3d import UNet3D
    from pipeline.runtime.tracking import Tracker
    from pipeline.training.pictures import figure_pairs, restoration_figure
    from pipeline.model_io.model_format import log_model

    tracker = Tracker(uri)
    logger = tracker.logger(run_id, system_metrics=False)
    try:
        logger.log_params({"pretrain": {"preset": "tiny", "epochs": 3}})
        for epoch in range(3):
            logger.log_metrics({k: v[epoch] for k, v in LOSSES.items()}, step=epoch)
        x, y = figure_pairs(_phantom(), seed=0)
        fig = restoration_figure(x, y, (x + y) / 2, "epoch 2: validation MSE 0.05000")
        logger.log_figure(fig, PICTURE)
        plt.close(fig)
        torch.manual_seed(0)
        info = log_model(UNet3D(base_channels=4).eval())
        version = tracker.register_model(info.model_uri, MODEL, metric=LOSSES["val_loss"][-1], aliases=(ALIAS,),
                                         tags={"run_id": run_id, "preset": "tiny"})
    finally:
        logger.end()
    return int(version.version)


def _log_grid(uri: str, results: Path) -> tuple[str, dict[str, float], str]:
    """A transfer grid's parent run with one FINISHED child run per fine-tuning of `GRID` (tagged and named as
    pipeline.transfer.trial names them), its table built from MLflow by pipeline.transfer.table and the parent
    summarised as pipeline.transfer.run does (results written to `results`); returns (parent run id, summary
    metrics, the table's Markdown)."""
    from pipeline.runtime.tracking import Tracker
    from pipeline.transfer import table as T
    from pipeline.transfer.grid import Cell
    from pipeline.transfer.summary import summarise_parent_run

    tracker = Tracker(uri)
    parent = tracker.create_run(GRID_EXPERIMENT, GRID_RUN, tags={"preset": "tiny"})
    for task, init, fraction, seed, auc in GRID:
        cell = Cell(task, init, fraction, seed)
        child = tracker.create_run(GRID_EXPERIMENT, cell.name, tags={
            "mlflow.parentRunId": parent, "genesis.cell": f"{task}|{init}|{fraction}|{seed}", "task": task,
            "init": init, "label_fraction": str(fraction), "seed": str(seed), "preset": "tiny"})
        tracker.client.log_metric(child, "test_auc", auc)
        tracker.client.set_terminated(child)
    cells = T.cells_from_mlflow(tracker, parent)
    table, failed = T.results_table(cells), T.failures(cells)
    T.write_results(table, failed, cells, results)
    T.log_results(tracker, parent, results)
    markdown = T.to_markdown(table, failed)
    summary = summarise_parent_run(tracker, parent, table, markdown, results)
    tracker.client.set_terminated(parent)
    return parent, summary.metrics, markdown


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(uri: str, folder: Path, log: Path) -> tuple[subprocess.Popen, str]:
    """The MLflow UI as the pipeline's final summaries tell the user to start it (`ui_command`: the `mlflow`
    beside this Python, `ui --backend-store-uri URI --port N`, split as a POSIX shell splits the printed line), on
    127.0.0.1 with one worker, in a process group of its own (stopped through its pid)."""
    from pipeline.runtime.tracking import ui_command

    port = _free_port()
    cmd = shlex.split(ui_command(uri, port)) + ["--host", "127.0.0.1", "--workers", "1"]
    # no background job runner (one more Python process to start): the pages need none of its jobs
    env = {**os.environ, **QUIET, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with log.open("w", encoding="utf-8") as out:
        proc = subprocess.Popen(cmd, cwd=folder, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    return proc, f"http://127.0.0.1:{port}"


def _wait_up(proc: subprocess.Popen, base: str, log: Path, seconds: float = 90) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"mlflow server exited {proc.returncode}:\n{log.read_text(encoding='utf-8')}")
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise AssertionError(f"mlflow server not up in {seconds:.0f} s:\n{log.read_text(encoding='utf-8')}")


def _stop(proc: subprocess.Popen) -> None:
    """The server and its uvicorn worker: the process group this test created."""
    if proc.poll() is None:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait(timeout=15)


def _png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the PNG header."""
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", path
    return struct.unpack(">II", head[16:24])


def _line_ys(d: str) -> list[float]:
    """The y pixel of each vertex of a plotly line path `M x,y L x,y ...` (SVG: y grows downwards)."""
    return [float(p.split(",")[1]) for p in d.replace("M", " ").replace("L", " ").split()]


def test_mlflow_ui_opens_on_runs_and_shows_losses_picture_aliases_and_grid_table(tmp_path, monkeypatch):
    chromium = _chromium()
    from playwright.sync_api import expect, sync_playwright

    import mlflow

    from pipeline.runtime.tracking import EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND, Tracker

    for k, v in QUIET.items():
        monkeypatch.setenv(k, v)
    store, shots = tmp_path / "store", _shots_dir(tmp_path)
    store.mkdir()
    print(f"\nMLflow UI screenshots: {shots}")
    uri = f"sqlite:///{store / 'mlflow.db'}"
    run_id = Tracker(uri).create_run(EXPERIMENT, RUN_NAME, tags={"preset": "tiny"})  # the database exists from here
    log = tmp_path / "mlflow_server.log"
    proc, base = _start_server(uri, store, log)  # it boots while the run is logged and the browser starts
    try:
        version = _log_run(uri, run_id)
        parent, grid_metrics, grid_markdown = _log_grid(uri, tmp_path / "results")
        tracker = Tracker(uri)
        client = mlflow.MlflowClient(tracking_uri=uri)
        run = client.get_run(run_id)
        exp_id = run.info.experiment_id
        for name in (EXPERIMENT, GRID_EXPERIMENT):  # what MLflow reads as the experiment's kind
            assert client.get_experiment_by_name(name).tags.get(EXPERIMENT_KIND_TAG) == MODEL_TRAINING_KIND, name
        picture = Path(unquote(urlparse(run.info.artifact_uri).path)) / PICTURE
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, headless=True,
                                        args=["--disable-gpu", "--disable-dev-shm-usage"])
            try:
                context = browser.new_context(viewport={"width": 1400, "height": 900})
                # the MLflow Assistant panel opens itself on a first visit; closed, as after one click
                context.add_init_script("localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');"
                                        "localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1',"
                                        " 'true')")
                page = context.new_page()
                page.set_default_timeout(WAIT_MS)
                expect.set_options(timeout=WAIT_MS)
                errors: list[str] = []
                page.on("pageerror", lambda e: errors.append(str(e)))
                _wait_up(proc, base, log)

                def printed(url: str) -> str:  # a link the pipeline prints, on this test's server
                    assert url.startswith(tracker.ui_base()), url
                    return base + url[len(tracker.ui_base()):]

                # 1. the experiment, by the link the pipeline prints, in a browser that never chose a view: its
                # runs table (MLflow 3.17 opens an experiment on its GenAI overview, "Traces 0", unless the link
                # names the model-training view: pipeline.runtime.tracking.UI_VIEW_QUERY)
                page.goto(printed(tracker.experiment_url(exp_id)))
                link = page.get_by_role("link", name=RUN_NAME, exact=True)
                expect(link).to_be_visible()
                expect(page.get_by_role("heading", name="Runs", exact=True)).to_be_visible()
                for genai in ("Overview", "Traces"):
                    expect(page.get_by_role("heading", name=genai, exact=True)).to_have_count(0)
                assert run_id in (link.get_attribute("href") or "")
                expect(page.get_by_role("link", name=MODEL).first).to_be_visible()  # the run's logged model
                page.screenshot(path=str(shots / "1-run-list.png"), full_page=True)

                # 2. the run's loss charts: one per loss, drawn from the logged numbers, falling
                link.click()
                page.get_by_role("tab", name="Model metrics").click()
                for metric, values in LOSSES.items():
                    card = page.get_by_test_id("experiment-view-compare-runs-card").filter(has_text=metric)
                    expect(card.locator(".scatterlayer .point")).to_have_count(len(values))
                    ticks = [float(t) for t in card.locator(".ytick text").all_text_contents()]
                    assert min(ticks) <= min(values) + 0.01 and max(ticks) >= max(values) - 0.01, (metric, ticks)
                    assert max(ticks) <= max(values) + 0.01 and min(ticks) >= min(values) - 0.01, (metric, ticks)
                    ys = _line_ys(card.locator(".scatterlayer path.js-line").first.get_attribute("d"))
                    assert len(ys) == len(values) and ys == sorted(ys) and ys[0] < ys[-1], (metric, ys)
                page.screenshot(path=str(shots / "2-loss-charts.png"), full_page=True)

                # 3. the restoration PNG in the artifact viewer: an <img> showing the logged file, loaded
                page.goto(f"{base}/#/experiments/{exp_id}/runs/{run_id}/artifacts/{PICTURE}")
                expect(page.get_by_role("tab", name="Artifacts")).to_have_attribute("aria-selected", "true")
                img = page.locator(f"img[alt='{PICTURE}']")
                expect(img).to_be_visible()
                img.evaluate("img => img.decode()")  # resolves once the picture is loaded and decodable
                shown = tuple(img.evaluate("img => [img.naturalWidth, img.naturalHeight]"))
                assert shown == _png_size(picture), (shown, picture)
                page.screenshot(path=str(shots / "3-restoration-artifact.png"), full_page=True)

                # 4. the registered models: the alias beside the version, then both aliases on the model's page
                page.goto(f"{base}/#/models")
                row = page.get_by_role("row").filter(has=page.get_by_role("link", name=MODEL, exact=True))
                expect(row.get_by_role("status", name=ALIAS)).to_be_visible()
                expect(row.get_by_role("link", name=f"Version {version}").first).to_be_visible()
                # a first visit shows a promotion of the registry UI over the list (mounted with it): closed
                promo = page.get_by_role("dialog").filter(has_text="Model Registry UI")
                if promo.is_visible():
                    promo.get_by_role("button", name="Close").click()
                    expect(promo).to_be_hidden()
                page.screenshot(path=str(shots / "4-registered-models.png"), full_page=True)
                row.get_by_role("link", name=MODEL, exact=True).click()
                vrow = page.get_by_role("row").filter(has=page.get_by_role("link", name=f"Version {version}"))
                for alias in (ALIAS, "best"):
                    expect(vrow.get_by_role("status", name=alias, exact=True)).to_be_visible()
                expect(vrow.get_by_text(run_id)).to_be_visible()  # the run_id tag: back to the run
                page.screenshot(path=str(shots / "5-model-versions.png"), full_page=True)

                # 6. the transfer parent run, by the link the grid prints: its description is the table (rendered),
                # its metrics the best value per task and init
                page.goto(printed(tracker.run_url(parent)))
                expect(page.get_by_role("heading", name=GRID_RUN)).to_be_visible()
                first_line = grid_markdown.splitlines()[0].lstrip("# ")  # the first task's title
                expect(page.get_by_text(first_line, exact=True)).to_be_visible()  # shown before "Show more"
                page.get_by_text("Show more", exact=True).click()
                expect(page.get_by_text("Show less", exact=True)).to_be_visible()
                grid_table = page.locator("table").filter(has_text="AUC over candidates (%)")
                expect(grid_table).to_be_visible()
                for text in ("85.00 ± 1.41", "72.00 ± 1.41", "models:/genesis-pretrained@best"):
                    expect(grid_table.get_by_text(text, exact=False).first).to_be_visible()
                expect(page.get_by_text("Transfer grid: 4 fine-tunings, 4 finished, 0 failed").first).to_be_visible()
                assert grid_metrics["best/ncc/genesis-pretrained_best"] == 85.0
                for key in ("best/ncc/genesis-pretrained_best", "best/ncc/scratch"):
                    row = page.get_by_role("row").filter(has=page.get_by_text(key, exact=True))
                    expect(row).to_have_count(1)
                    expect(row).to_contain_text(f"{grid_metrics[key]:g}")
                page.screenshot(path=str(shots / "6-transfer-parent.png"), full_page=True)

                # 7. its artifacts: results.md at the top level, with the tables/ folder
                page.get_by_role("tab", name="Artifacts").click()
                expect(page.get_by_text("results.md", exact=True)).to_be_visible()  # not inside a folder
                page.screenshot(path=str(shots / "7-transfer-artifacts.png"), full_page=True)
            finally:
                browser.close()
    finally:
        _stop(proc)
    assert not errors, errors
    for name in ("1-run-list", "2-loss-charts", "3-restoration-artifact", "4-registered-models",
                 "5-model-versions", "6-transfer-parent", "7-transfer-artifacts"):
        assert (shots / f"{name}.png").stat().st_size > 10_000, name
