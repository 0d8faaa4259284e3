"""What a person sees while a run trains: one line per pretraining epoch, one line per fine-tuning of a transfer
grid, and none of Ray's own console output (Tune's status tables, its records) unless `--verbose`."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import write_mhd

from pipeline.training.progress import EpochLine, duration

ROOT = Path(__file__).resolve().parents[1]

DURATION = r"(\d+ s|\d+ min \d\d s|\d+ h \d\d min)"
EPOCH = re.compile(r"^epoch +(\d+)/(\d+)  train (\d+\.\d{5})  val (\d+\.\d{5})  (\d+(?:\.\d+)?) cubes/s  " + DURATION
                   + r"  best (\d+\.\d{5}) \(epoch (\d+)\)$")
CELL = re.compile(r"^\[ *(\d+)/(\d+) done, (\d+) running, (\d+) failed\] +(\w+) +(\S+) +(\d+)%  seed (\d+)  "
                  r"fold (\S+)  (\w+) (\d+\.\d)(  dice \d+\.\d)?  " + DURATION + "(  DEGENERATE: .+)?$")
RAY_RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+\s+(INFO|WARNING) ")
TUNE_TABLE = ("Trial status", "Current time:", "View detailed results", "tensorboard", "Trial name")


def test_epoch_line_and_durations_read_as_written():
    line = EpochLine(epoch=3, epochs=10, train_loss=0.0123, val_loss=0.0101, cubes_per_s=412.4, seconds=38.2,
                     best=0.0101, best_epoch=3)
    assert str(line) == "epoch  3/10  train 0.01230  val 0.01010  412 cubes/s  38 s  best 0.01010 (epoch 3)"
    assert EPOCH.match(str(line))
    assert [duration(s) for s in (0.4, 119, 125, 7300)] == ["0 s", "119 s", "2 min 05 s", "2 h 01 min"]


@pytest.fixture(scope="module")
def pretrain_store(tmp_path_factory):
    from pipeline.patches.config import PretrainPatchConfig
    from pipeline.patches.extract import extract_pretrain
    from pipeline.volume_store.convert import convert

    root = tmp_path_factory.mktemp("progress_pretrain")
    rng = np.random.default_rng(0)
    for i, subset in enumerate([0, 1, 2, 3, 5]):
        vol = np.full((24, 48, 48), 40, dtype=np.int16)
        vol[:, :, :28] = -850
        noisy = (vol + rng.normal(0, 10, vol.shape)).astype(np.int16)
        write_mhd(root / "src" / f"subset{subset}" / f"1.2.{i}.mhd", noisy)
    assert convert([str(root / "src")], str(root / "vs"), workers=1, progress=False).ok
    cubes = PretrainPatchConfig(cube_size=(16, 16, 16), per_scan=8, border_yx=4, border_z=2, min_slices=16)
    return str(extract_pretrain(str(root / "vs"), cubes, out_root=str(root / "ps"), workers=1, progress=False).path)


def test_pretrain_prints_one_line_per_epoch_from_the_driver(ray_local, pretrain_store, tmp_path, capsys):
    """The shared Ray runs with log_to_driver=False, so these lines can only come from the driver."""
    from pipeline.training.config import tiny
    from pipeline.training.pretrain import pretrain

    config = tiny().with_overrides(base_channels=2, batch_size=4, steps_per_epoch=4, val_cubes=8, read_block=8,
                                   figure_cubes=1, epochs=2, patience=10)
    res = pretrain(pretrain_store, config, workers=1, tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
                   storage_path=str(tmp_path / "ray"), register_as="genesis-progress-test", system_metrics=False)
    assert res.error is None, res.error
    out = capsys.readouterr().out.splitlines()
    lines = [EPOCH.match(ln) for ln in out if ln.startswith("epoch")]
    assert all(lines) and len(lines) == 2, out
    assert [(int(m[1]), int(m[2])) for m in lines] == [(1, 2), (2, 2)]
    best = min(float(m[4]) for m in lines)
    assert float(lines[-1][7]) == pytest.approx(best, abs=1e-5)
    assert float(lines[-1][4]) == pytest.approx(res.metrics["val_loss"], abs=1e-5)
    assert int(lines[-1][8]) == 1 + [float(m[4]) for m in lines].index(best)
    assert all(float(m[5]) > 0 and m[6] != "0 s" for m in lines)


def test_transfer_prints_one_line_per_finetuning_and_no_tune_table(ray_local, task_stores, tmp_path):
    """A `genesis transfer` as a user runs it (its own process, on the shared Ray): stdout and stderr together
    hold one progress line per fine-tuning naming task, init, fraction, seed and fold, and no Tune table."""
    args = [sys.executable, "-m", "pipeline.cli", "transfer", "--tasks", "ncs",
            "--patches", f"ncs={task_stores['ncs']}", "--inits", "scratch", "--seeds", "0,1", "--label-fractions", "1",
            "--epochs", "1",
            "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", "--storage-path", str(tmp_path / "ray"),
            "--results", str(tmp_path / "results"), "--ray-address", ray_local.get_runtime_context().gcs_address]
    env = {k: v for k, v in os.environ.items() if k != "GENESIS_VERBOSE"}
    done = subprocess.run(args, cwd=ROOT, capture_output=True, encoding="utf-8", errors="replace", timeout=600,
                          env={**env, "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"})
    text = done.stdout + done.stderr
    assert done.returncode == 0, text
    assert not [ln for ln in text.splitlines() if any(t in ln for t in TUNE_TABLE)], text
    ray_own = [ln for ln in text.splitlines() if RAY_RECORD.match(ln) or "(raylet)" in ln or "core_worker" in ln
               or "UserWarning" in ln or "(RayTrainWorker" in ln or "(TrainController" in ln]
    assert not ray_own, ray_own  # Ray's records and its workers' output: in its session logs only
    cells = [CELL.match(ln) for ln in text.splitlines() if ln.startswith("[")]
    assert all(cells) and len(cells) == 2, text
    assert sorted((m[5], m[6], m[7], m[8], m[9]) for m in cells) == [("ncs", "scratch", "100", "0", "-"),
                                                                      ("ncs", "scratch", "100", "1", "-")]
    assert [(int(m[1]), int(m[2]), int(m[4])) for m in cells] == [(1, 2, 0), (2, 2, 0)]
    assert {m[10] for m in cells} == {"keras_mean_iou"}


def test_raylets_worker_pool_warning_is_kept_off_a_quiet_console():
    """Ray's driver prints raylet's messages to stdout whatever log_to_driver says; the quiet stdout drops the
    worker-pool warning (it stays in raylet.out) and passes everything else, whole lines included."""
    import io

    from pipeline.cluster import _Quiet

    sink = io.StringIO()
    quiet = _Quiet(sink)
    print("\x1b[33m(raylet)\x1b[0m WARNING: 8 PYTHON worker processes have been started on node: abc with address: "
          "192.0.2.2, which is 4x the maximum expected startup concurrency (2).", file=quiet)
    print("[1/2 done, 0 running, 0 failed]  ncs  scratch  100%", file=quiet)
    print("\x1b[33m(raylet)\x1b[0m A worker died or was killed while executing a task", file=quiet)
    assert sink.getvalue().splitlines() == ["[1/2 done, 0 running, 0 failed]  ncs  scratch  100%",
                                            "\x1b[33m(raylet)\x1b[0m A worker died or was killed while executing a task"]
