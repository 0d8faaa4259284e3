"""`ray job submit` of jobs/pretrain.py against a local Ray head with token auth, started and stopped here."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest

from test_pretrain import patch_store  # noqa: F401  (the session fixture)

REPO = Path(__file__).resolve().parents[1]
RAY = Path(sys.executable).with_name("ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head():
    """A Ray head of our own (token auth, own ports and temp dir), stopped through its own process group."""
    tmp = tempfile.mkdtemp(prefix="rayh-", dir="/tmp")  # short: Ray's socket paths have a length limit
    ports = set()
    while len(ports) < 9:  # every port of our own: a Ray of the test session may hold the defaults
        ports.add(_free_port())
    port, dash, agent, agent_grpc, runtime_env, metrics, node_mgr, obj_mgr, client = sorted(ports)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),
           "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen([str(RAY), "start", "--head", "--block", f"--port={port}", "--num-cpus=2",
                             "--include-dashboard=true", f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1",
                             f"--temp-dir={tmp}", "--disable-usage-stats",
                             f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
                             f"--runtime-env-agent-port={runtime_env}", f"--metrics-export-port={metrics}",
                             f"--node-manager-port={node_mgr}", f"--object-manager-port={obj_mgr}",
                             f"--ray-client-server-port={client}", "--min-worker-port=21000",
                             "--max-worker-port=21999"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"{url}/api/version", timeout=2)
                break
            except urllib.error.HTTPError:  # 401 without the token: the dashboard is up
                break
            except OSError:
                if head.poll() is not None:
                    pytest.fail("ray start --head exited early")
                time.sleep(1)
        else:
            pytest.fail("the Ray dashboard did not come up")
        yield url, env
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(head.pid, sig)
            except ProcessLookupError:
                break
            try:
                head.wait(timeout=20)
                time.sleep(2)
            except subprocess.TimeoutExpired:
                continue


def test_ray_job_submit_runs_pretraining(ray_head, patch_store, tmp_path):  # noqa: F811
    url, env = ray_head
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cmd = [str(RAY), "job", "submit", "--address", url, "--", sys.executable, str(REPO / "jobs" / "pretrain.py"),
           "--patches", patch_store, "--preset", "tiny", "--epochs", "2", "--workers", "2",
           "--tracking-uri", uri, "--storage-path", str(tmp_path / "ray_results"), "--name", "job-run"]
    for _ in range(10):  # the job agent needs a few seconds after the dashboard is up
        proc = subprocess.run(cmd, env=env, capture_output=True, encoding="utf-8", errors="replace", timeout=600)
        if "No available agent" not in proc.stdout + proc.stderr:
            break
        time.sleep(3)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "succeeded" in (proc.stdout + proc.stderr).lower()
    client = mlflow.MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("genesis-pretraining").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED" and runs[0].info.run_name == "job-run"
    assert len(client.get_metric_history(runs[0].info.run_id, "val_loss")) == 2
    # without the token the cluster refuses the job
    no_token = {k: v for k, v in env.items() if k != "RAY_AUTH_TOKEN"}
    no_token["RAY_AUTH_TOKEN_PATH"] = str(tmp_path / "empty-token")
    (tmp_path / "empty-token").write_text("wrong-token")
    refused = subprocess.run([str(RAY), "job", "list", "--address", url], env=no_token, capture_output=True,
                             encoding="utf-8", errors="replace", timeout=120)
    assert refused.returncode != 0
