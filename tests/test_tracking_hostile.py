"""Issue 18, items 6, 10, 11 and 13 (finetune without credentials): the tracking store at its edges.

- 6: three processes opening a new SQLite tracking file at once all succeed (its creation is done once, under a
  lock beside it);
- 11: a corrupted `mlflow.db` (garbage, truncated) is exit 2 naming the file, at the preflight;
- 13: an authenticating MLflow server without (or with wrong) credentials is exit 2 naming
  MLFLOW_TRACKING_USERNAME/PASSWORD, at the preflight;
- 10: a full disk while a Ray Train worker logs its model is one line naming the file and its filesystem, not
  retried, the MLflow run FAILED, no logged model PENDING and no version registered.
Real processes, a real SQLite file, a real MLflow server with authentication, real Ray, a real file-size limit.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import one_line_error

from pipeline.runtime.errors import UsageError
from pipeline.runtime.tracking import Tracker, check_uri

ROOT = Path(__file__).resolve().parents[1]
GENESIS = [sys.executable, "-m", "pipeline.cli"]


def _genesis(*args: str, env: dict | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([*GENESIS, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})




# --------------------------------------------------------------------------- item 6: concurrent first use

OPEN_AND_RUN = """
import sys, time
from pathlib import Path
from pipeline.runtime.tracking import Tracker, check_uri
import mlflow.store.tracking.sqlalchemy_store  # imported before the start signal: the openings coincide
go = Path(sys.argv[2])
Path(sys.argv[2] + "." + sys.argv[3]).touch()  # ready
while not go.exists():
    time.sleep(0.01)
tracker = Tracker(check_uri(sys.argv[1]))
print(tracker.create_run("race", "run-" + sys.argv[3]))
"""


def test_three_processes_creating_one_new_sqlite_store_at_once_all_succeed(tmp_path):
    """Three processes (what three `genesis weights import` or `transfer` started together do) open a new
    mlflow.db at the same moment: MLflow's schema migration used to run three times at once and two of them
    exited 1 with "duplicate column name: step". Now all three create their run."""
    db, go = tmp_path / "mlflow.db", tmp_path / "go"
    uri = f"sqlite:///{db}"
    procs = [subprocess.Popen([sys.executable, "-c", OPEN_AND_RUN, uri, str(go), str(i)], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(3)]
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not all((tmp_path / f"go.{i}").exists() or procs[i].poll() is not None
                                                  for i in range(3)):
        time.sleep(0.05)
    go.touch()
    outs = [p.communicate(timeout=240) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
        assert "duplicate column" not in err
    run_ids = {out.strip().splitlines()[-1] for out, _ in outs}
    assert len(run_ids) == 3
    tracker = Tracker(check_uri(uri))
    assert {r.info.run_id for r in tracker.search_runs([tracker.experiment_id("race")])} == run_ids
    assert (tmp_path / "mlflow.db.lock").exists()  # the lock beside the database (never deleted: see FileLock)


# --------------------------------------------------------------------------- item 11: a corrupted database


def _corrupted(tmp_path: Path) -> dict[str, Path]:
    """A real database made by the preflight, then broken in the three ways a disk or a user breaks one."""
    good = tmp_path / "good.db"
    Tracker(check_uri(f"sqlite:///{good}")).create_run("x", "r")
    data = good.read_bytes()
    out = {"garbage": tmp_path / "garbage.db", "truncated": tmp_path / "truncated.db",
           "header only": tmp_path / "header.db"}
    out["garbage"].write_bytes(os.urandom(8192))
    out["truncated"].write_bytes(data[: len(data) // 2])
    out["header only"].write_bytes(data[:100])
    return out


def test_corrupted_mlflow_db_is_exit_2_naming_the_file_before_any_work(tmp_path):
    """A garbage or truncated mlflow.db was found only after training (48 s, then 9 tracebacks): the preflight
    reads it now, and the commands say so in one line, exit 2, naming the file."""
    broken = _corrupted(tmp_path)
    for kind, db in broken.items():
        before = db.read_bytes()
        with pytest.raises(UsageError, match=f"{db}: {db} is not a readable MLflow database"):
            check_uri(f"sqlite:///{db}")
        assert db.read_bytes() == before, kind  # nothing written into it
    # the command line, in its own processes (a stage's preflight: the tracking URI checked first)
    db = broken["truncated"]
    t0 = time.perf_counter()
    done = _genesis("weights", "import", str(tmp_path / "none.pt"), "--name", "x", "--tracking-uri", f"sqlite:///{db}")
    assert done.returncode == 2, done.stderr
    one_line_error(done.stderr, "genesis weights import: error: --tracking-uri", str(db), "not a readable MLflow database")
    done = _genesis("transfer", "show", "0" * 32, "--tracking-uri", f"sqlite:///{broken['garbage']}")
    assert done.returncode == 2, done.stderr
    one_line_error(done.stderr, str(broken["garbage"]), "not a readable MLflow database")
    assert time.perf_counter() - t0 < 120


# --------------------------------------------------------------------------- item 13: a login asked for


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_authenticated_server_without_credentials_is_exit_2_naming_the_variables(tmp_path, monkeypatch):
    """`genesis finetune` against the authenticated server without credentials exited 1 (HTTP 401) at its first
    MLflow call. The preflight (`check_uri`, which finetune, pretrain, transfer and weights import call before
    Ray or an MLflow run) now refuses it: exit 2 naming MLFLOW_TRACKING_USERNAME/PASSWORD; wrong credentials are
    named as such; the right ones pass."""
    from pipeline.services.mlflow_server import MlflowServerConfig, start_mlflow, stop_mlflow

    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    server = start_mlflow(MlflowServerConfig(root=tmp_path / "mlflow", port=_closed_port(), workers=1,
                                             start_timeout_s=120))
    try:
        with pytest.raises(UsageError, match="asks for a login \\(HTTP 401\\); set MLFLOW_TRACKING_USERNAME and "
                                             "MLFLOW_TRACKING_PASSWORD"):
            check_uri(server.url)
        clean = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
        done = subprocess.run([*GENESIS, "weights", "import", str(tmp_path / "none.pt"), "--name", "x",
                               "--tracking-uri", server.url], cwd=ROOT, capture_output=True, text=True, timeout=240,
                              env=clean)
        assert done.returncode == 2, done.stderr
        one_line_error(done.stderr, f"--tracking-uri {server.url}", "HTTP 401", "MLFLOW_TRACKING_USERNAME")
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", server.user)
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "wrong")
        with pytest.raises(UsageError, match="refuses the credentials in MLFLOW_TRACKING_USERNAME and "
                                             "MLFLOW_TRACKING_PASSWORD"):
            check_uri(server.url)
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", server.password)
        assert check_uri(server.url) == server.url
    finally:
        stop_mlflow(tmp_path / "mlflow")


# --------------------------------------------------------------------------- item 10: a full disk


def test_full_disk_while_a_worker_logs_its_model_is_one_line_not_retried_run_failed_no_model_left(tmp_path):
    """A full disk while MLflow logs printed 367 lines and 9 tracebacks (every retry filled it again) and left the
    run RUNNING. Here the Ray Train worker's writes are limited by RLIMIT_FSIZE (the kernel refuses writes beyond
    the limit with EFBIG, as a full filesystem refuses them with ENOSPC) just before it logs its model, as the
    workers of `pretrain` and `finetune` log theirs last. Required: the fit is not retried, its error is one line
    "disk full: <file> (filesystem ...)", the MLflow run is FAILED with that cause, no logged model is left
    PENDING and no version is registered from the run."""
    import resource

    from pipeline.console import classify
    from pipeline.runtime import driver

    uri = check_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    tracker = Tracker(uri)
    run_id = tracker.create_run("full-disk", "r")
    attempts = tmp_path / "attempts"
    limit = (tmp_path / "mlflow.db").stat().st_size + 2 ** 20  # room for the database; none for the weights

    def train_fn(config: dict) -> None:
        import ray.train

        from pipeline.model_io.model_format import log_model
        from pipeline.models.unet3d import UNet3D
        import tempfile

        from pipeline.runtime.errors import full_disk_names
        from pipeline.runtime.tracking import Tracker, record_failure

        with open(config["attempts"], "a", encoding="utf-8") as f:
            f.write("attempt\n")
        tracker = Tracker.at(config["uri"])
        logger = tracker.logger(config["run_id"], system_metrics=False)
        logger.log_metrics({"val_loss": 0.5}, step=0)
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        # Python ignores SIGXFSZ from its start: a write past the limit fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (config["limit"], hard))
        try:
            with full_disk_names(tempfile.gettempdir()):  # as the workers do: MLflow stages the model there
                info = log_model(UNet3D(base_channels=8).eval())  # 4.8 MB of weights
            tracker.register_model(info.model_uri, "genesis-full-disk", tags={"run_id": config["run_id"]})
            logger.end()
        except Exception as exc:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
            if ray.train.get_context().get_world_rank() == 0:
                record_failure(config["uri"], config["run_id"], exc)  # what the pretrain and finetune workers do
            raise
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))

    def work() -> driver.Outcome:
        return driver.fit(train_fn, {"uri": uri, "run_id": run_id, "attempts": str(attempts), "limit": limit},
                          name="full-disk", storage=str(tmp_path / "ray_results"), workers=1, gpus_per_worker=0,
                          max_failures=2)

    outcome = driver.recorded(tracker, run_id, work)
    assert outcome.error is not None and outcome.error.startswith("disk full: "), outcome.error
    assert "File too large" in outcome.error and "(filesystem /" in outcome.error and "\n" not in outcome.error
    assert attempts.read_text().count("attempt") == 1  # not retried: a retry fills the same disk again
    run = tracker.run(run_id)
    assert run.info.status == "FAILED" and run.data.tags["error"].startswith("disk full: ")
    import sqlite3

    from mlflow.entities import LoggedModelStatus

    with sqlite3.connect(tmp_path / "mlflow.db") as con:  # every logged model, whatever MLflow's search shows
        statuses = [LoggedModelStatus.from_int(r[0]) for r in con.execute("SELECT status FROM logged_models")]
    assert LoggedModelStatus.PENDING not in statuses, statuses
    assert not tracker.search_model_versions(f"run_id = '{run_id}'")
    # the one line a command ends with, for the same error met outside Ray (console.classify)
    import errno

    code, line = classify(OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "mlartifacts" / "x")))
    assert code == 1 and line.startswith(f"failed: disk full: {tmp_path}") and "filesystem /" in line


def test_a_failed_run_leaves_no_pending_logged_model_and_no_registered_version(tmp_path):
    """What a run that failed while logging its model leaves in the store (the hostile run found a model PENDING
    after a full disk): its logged model still PENDING, and a version registered from it just before the failure.
    Marking the run FAILED (what the driver and the workers do) finalises the model as FAILED and deletes the
    version; a FINISHED run's models are never touched."""
    from mlflow.entities import LoggedModelStatus

    tracker = Tracker(check_uri(f"sqlite:///{tmp_path / 'mlflow.db'}"))
    failed, finished = tracker.create_run("e", "failed"), tracker.create_run("e", "finished")
    exp = tracker.experiment_id("e")
    models = {}
    tracker.client.create_registered_model("genesis-x")
    for run_id in (failed, finished):
        model = tracker.client.create_logged_model(exp, source_run_id=run_id)  # PENDING until finalised
        assert model.status == LoggedModelStatus.PENDING
        tracker.client.create_model_version("genesis-x", f"models:/{model.model_id}", run_id=run_id)
        models[run_id] = model.model_id
    tracker.client.set_terminated(finished, "FINISHED")
    tracker.mark_failed(failed, reason="disk full: /x (filesystem /: No space left on device); not retried")
    tracker.mark_failed(finished, reason="a note")  # FINISHED stays FINISHED, its model and version kept
    assert tracker.run_status(failed) == "FAILED" and tracker.run_status(finished) == "FINISHED"
    assert tracker.client.get_logged_model(models[failed]).status == LoggedModelStatus.FAILED
    assert tracker.client.get_logged_model(models[finished]).status == LoggedModelStatus.PENDING
    assert not tracker.search_model_versions(f"run_id = '{failed}'")
    assert [str(v.version) for v in tracker.search_model_versions(f"run_id = '{finished}'")] == ["2"]
