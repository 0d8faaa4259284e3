"""Issue 11 sections 3-4 on one machine: `make cluster-up`'s script starts a Ray head and a second node (token auth)
and the authenticated MLflow server; the README's `ray job submit` walkthrough runs verbatim (convert -> patch
stores -> pretraining with 2 workers across the two nodes -> a transfer grid); the second node is killed during
pretraining and the job still finishes from its checkpoint; results are visible through MLflow's REST API with
the credentials and refused without; Ray refuses a wrong token; `make cluster-down`'s script leaves no process.

The fast tests at the end check the service launcher and runtime_env.yaml without starting a cluster.
"""

from __future__ import annotations

import base64
import json
import os
import re
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import psutil
import pytest
import yaml

from pipeline.services.processes import alive as _alive

REPO = Path(__file__).resolve().parents[1]
WALKTHROUGH = REPO / "pipeline" / "services" / "cluster_walkthrough.sh"
RUNTIME_ENV = REPO / "runtime_env.yaml"
PY = sys.executable
RAY = str(Path(sys.executable).with_name("ray"))
PRETRAIN_RUN, PRETRAIN_EPOCHS, TRANSFER_RUN = "pretrain-on-cluster", 2, "transfer-on-cluster"


def _clean_env(cluster: Path) -> dict[str, str]:
    """The environment of a user's shell: no Ray or MLflow settings of some other cluster, and the project's
    .venv NOT on PATH, so the jobs' `python` is the project's only because runtime_env.yaml makes it so."""
    venv_bin = {Path(sys.executable).parent.resolve(), (REPO / ".venv" / "bin").resolve()}
    path = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p and Path(p).resolve() not in venv_bin]
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_", "MLFLOW_", "GENESIS_")) and k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env.update(PATH=os.pathsep.join(path), GENESIS_CLUSTER=str(cluster), TQDM_DISABLE="1", PYTHONIOENCODING="utf-8")
    return env


def _services(*args: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "pipeline.services", *args], cwd=REPO, env=env, capture_output=True,
                          encoding="utf-8", errors="replace", timeout=timeout)


def _http(url: str, headers: dict[str, str] | None = None, data: bytes | None = None) -> tuple[int, dict | None]:
    req = urllib.request.Request(url, headers={"Content-Type": "application/json", **(headers or {})}, data=data)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            body = resp.read().decode("utf-8")
            return resp.status, (json.loads(body) if body.strip().startswith("{") else None)
    except urllib.error.HTTPError as err:
        return err.code, None


def _basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode("utf-8")).decode("ascii")}


def _mode(path: str | Path) -> int:
    return stat.S_IMODE(Path(path).stat().st_mode)


def _tree(pid: int) -> list[psutil.Process]:
    try:
        proc = psutil.Process(pid)
        return [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []




def _all_pids(info: dict) -> set[int]:
    roots = [n["pid"] for n in info["nodes"]] + [info["mlflow"]["pid"]]
    return {p.pid for r in roots for p in _tree(r)}


def _committed_checkpoints(run_dir: Path) -> int:
    """Checkpoints Ray Train's controller has registered (its snapshot), not merely written by a worker."""
    try:
        snap = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return 0
    return len(snap.get("checkpoint_results", []))


def _tail(path: Path, n: int = 60) -> str:
    return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-n:])


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_local_cluster_walkthrough_survives_a_node_and_guards_its_services(tmp_path):
    cluster = tmp_path / "cluster"
    env = _clean_env(cluster)
    t0 = time.monotonic()
    up = _services("cluster-up", "--dir", str(cluster), env=env)
    assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
    info = json.loads((cluster / "cluster.json").read_text(encoding="utf-8"))
    print(f"cluster-up: {time.monotonic() - t0:.0f} s")
    try:
        _walkthrough_and_checks(cluster, info, env, tmp_path)
    finally:
        info = json.loads((cluster / "cluster.json").read_text(encoding="utf-8")) \
            if (cluster / "cluster.json").exists() else info
        pids = _all_pids(info)
        temps = [n["temp_dir"] for n in info["nodes"]]
        down = _services("cluster-down", "--dir", str(cluster), env=env)
    assert down.returncode == 0, down.stdout + down.stderr
    assert pids and not _alive(pids), f"left running after cluster-down: {_alive(pids)}"
    assert not (cluster / "cluster.json").exists() and not any(Path(t).exists() for t in temps)
    assert (cluster / "mlflow" / "mlflow.db").exists()  # the runs outlive the cluster


def _walkthrough_and_checks(cluster: Path, info: dict, env: dict[str, str], tmp_path: Path) -> None:
    # --- what cluster-up wrote: secrets and connection details readable by the owner only, loopback only
    for path in (cluster / "cluster.json", info["ray"]["token_file"], info["mlflow"]["password_file"]):
        assert _mode(path) == 0o600, path
    # issue 18 item 8: the folders are the user's only, and the MLflow root with everything in it (0700/0600)
    for folder in (cluster, cluster / "shared", cluster / "logs", cluster / "mlflow", cluster / "mlflow" / "artifacts"):
        assert _mode(folder) == 0o700, folder
    loose = [str(p) for p in (cluster / "mlflow").rglob("*") if not p.is_symlink()
             and _mode(p) != (0o700 if p.is_dir() else 0o600)]
    assert not loose and _mode(cluster / "mlflow" / "mlflow-auth.db") == 0o600, loose
    assert {n["name"] for n in info["nodes"]} == {"head", "node-1"} and all(_alive([n["pid"]]) for n in info["nodes"])
    assert info["ray"]["dashboard"].startswith("http://127.0.0.1:") and info["mlflow"]["url"].startswith(
        "http://127.0.0.1:")
    token = Path(info["ray"]["token_file"]).read_text(encoding="utf-8").strip()
    password = Path(info["mlflow"]["password_file"]).read_text(encoding="utf-8").strip()
    assert len(token) == 64 and len(password) >= 32 and password != "password"

    # --- the Ray job API: the token opens it, a wrong or missing one does not
    dash = info["ray"]["dashboard"]
    assert _http(f"{dash}/api/jobs/", {"Authorization": f"Bearer {token}"})[0] == 200
    assert _http(f"{dash}/api/jobs/")[0] in (401, 403)
    assert _http(f"{dash}/api/jobs/", {"Authorization": "Bearer " + "0" * 64})[0] in (401, 403)
    wrong = {**env, "RAY_API_SERVER_ADDRESS": dash, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64}
    refused = subprocess.run([RAY, "job", "list"], env=wrong, capture_output=True, encoding="utf-8",
                             errors="replace", timeout=120)
    assert refused.returncode != 0 and "raysubmit_" not in refused.stdout

    # --- the README's commands, verbatim, from the repository root, with the second node killed mid-pretraining
    shared = Path(info["shared_root"])
    run_dir = shared / "ray_results" / PRETRAIN_RUN
    log = tmp_path / "walkthrough.log"
    t0 = time.monotonic()
    with open(log, "w", encoding="utf-8") as out:
        script = subprocess.Popen(["bash", "-e", "-o", "pipefail", str(WALKTHROUGH)], cwd=REPO, env=env, stdout=out,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 900
        while _committed_checkpoints(run_dir) < 1:
            assert script.poll() is None, f"the walkthrough ended (rc {script.returncode}) before pretraining " \
                                          f"committed a checkpoint:\n{_tail(log)}"
            assert time.monotonic() < deadline, f"no pretraining checkpoint in time:\n{_tail(log)}"
            time.sleep(0.5)
        node = next(n for n in info["nodes"] if n["name"] == "node-1")
        on_node = [p for p in _tree(node["pid"]) if "RayTrainWorker" in " ".join(_cmdline(p))]
        committed_at_kill = _committed_checkpoints(run_dir)
        print(f"pretraining checkpoint {committed_at_kill} committed after {time.monotonic() - t0:.0f} s; "
              f"killing node-1 (pid {node['pid']}, {len(on_node)} Ray Train worker(s) on it)")
        assert on_node, "no Ray Train worker ran on the second node: the 2 workers did not spread over both nodes"
        assert committed_at_kill < PRETRAIN_EPOCHS, "pretraining finished before the node could be killed"
        for proc in _tree(node["pid"]):  # a node crash: the whole node at once, no shutdown
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        added = _services("add-node", "--dir", str(cluster), env=env)  # its replacement joins
        assert added.returncode == 0, added.stdout + added.stderr
        rc = script.wait(timeout=max(60.0, deadline - time.monotonic()))
    finally:
        if script.poll() is None:
            os.killpg(script.pid, 9)
    print(f"walkthrough: {time.monotonic() - t0:.0f} s")
    text = log.read_text(encoding="utf-8", errors="replace")
    assert rc == 0, _tail(log, 120)
    assert text.count("succeeded") >= 5 and "No module named" not in text
    assert (shared / "transfer_results" / "results.md").exists()
    # no run wrote into Ray's temporary copy of the checkout (an experiment without an artifact location would)
    work = [p for n in info["nodes"] for p in Path(n["temp_dir"]).glob("session_*/runtime_resources/working_dir_files/*")
            if p.is_dir()]
    assert work and not [p for w in work for p in w.rglob("mlruns")] and not [p for w in work for p in w.rglob("*.db")]

    # --- results through MLflow's REST API: with the admin's credentials, and refused without
    api, auth = info["mlflow"]["url"] + "/api/2.0/mlflow", _basic(info["mlflow"]["user"], password)
    status, exp = _http(f"{api}/experiments/get-by-name?experiment_name=genesis-pretraining", auth)
    assert status == 200
    exp = exp["experiment"]
    assert exp["artifact_location"].startswith("mlflow-artifacts:")  # the server's proxied store
    status, found = _http(f"{api}/runs/search", auth, json.dumps({
        "experiment_ids": [exp["experiment_id"]], "filter": f"attributes.run_name = '{PRETRAIN_RUN}'"}).encode())
    assert status == 200 and len(found["runs"]) == 1
    run = found["runs"][0]
    assert run["info"]["status"] == "FINISHED"
    query = urllib.parse.urlencode({"run_id": run["info"]["run_id"], "metric_key": "val_loss"})
    status, history = _http(f"{api}/metrics/get-history?{query}", auth)
    steps = sorted(int(m.get("step", 0)) for m in history["metrics"])
    # every epoch done, and epoch 0 once: the restarted worker group went on from the checkpoint, not from scratch
    assert set(steps) == set(range(PRETRAIN_EPOCHS)) and steps.count(0) == 1, steps
    assert _committed_checkpoints(run_dir) >= 1
    status, model = _http(f"{api}/registered-models/get?name=genesis-pretrained", auth)
    assert status == 200 and model["registered_model"]["latest_versions"]
    assert [p for p in (cluster / "mlflow" / "artifacts").rglob("*") if p.is_file()]  # artifacts on the server
    status, tr = _http(f"{api}/experiments/get-by-name?experiment_name=genesis-transfer", auth)
    status, parents = _http(f"{api}/runs/search", auth, json.dumps({
        "experiment_ids": [tr["experiment"]["experiment_id"]],
        "filter": f"attributes.run_name = '{TRANSFER_RUN}'"}).encode())
    assert status == 200 and [r["info"]["status"] for r in parents["runs"]] == ["FINISHED"]
    parent = parents["runs"][0]["info"]["run_id"]
    status, children = _http(f"{api}/runs/search", auth, json.dumps({
        "experiment_ids": [tr["experiment"]["experiment_id"]],
        "filter": f"tags.mlflow.parentRunId = '{parent}'"}).encode())
    assert status == 200 and sorted(r["info"]["status"] for r in children["runs"]) == ["FINISHED", "FINISHED"]
    # without credentials, or with the wrong ones: nothing to read, nothing to delete
    assert _http(f"{api}/experiments/get-by-name?experiment_name=genesis-pretraining")[0] == 401
    assert _http(f"{api}/experiments/get-by-name?experiment_name=genesis-pretraining",
                 _basic("admin", "password"))[0] == 401
    assert _http(f"{api}/registered-models/delete", data=json.dumps({"name": "genesis-pretrained"}).encode())[0] == 401
    assert _http(f"{api}/registered-models/get?name=genesis-pretrained", auth)[0] == 200


def _cmdline(proc: psutil.Process) -> list[str]:
    try:
        return proc.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return []


# --------------------------------------------------------------------------- fast: no cluster


def _update_envs(env_vars: dict[str, str]) -> None:
    """What a Ray worker does to a runtime_env's env_vars before it starts (Ray 2.60's `update_envs`, called by
    RuntimeEnvContext.exec_worker): ${X} and $X are replaced by this environment's value, an unset ${X} by ""."""
    for key, value in env_vars.items():
        os.environ[key] = re.sub(r"\$\{[A-Z0-9_]+\}", "", os.path.expandvars(value))


def test_runtime_env_file_is_what_ray_accepts_and_finds_the_project_interpreter(tmp_path):
    """runtime_env.yaml passes Ray's own validation; on a node with GENESIS_HOME its interpreter and `python` are
    that checkout's .venv, and without it ~/genesis-pipeline's (ray_cluster.yaml's checkout)."""
    from ray.runtime_env import RuntimeEnv

    spec = yaml.safe_load(RUNTIME_ENV.read_text(encoding="utf-8"))
    RuntimeEnv(**spec)  # raises on an unknown or malformed field
    assert spec["working_dir"] == "."
    assert {".venv/", "demo_output/", "cluster/", ".git/"} <= set(spec["excludes"])
    for home, want in ((str(tmp_path / "checkout"), tmp_path / "checkout"), (None, Path.home() / "genesis-pipeline")):
        base = {k: v for k, v in os.environ.items() if k != "GENESIS_HOME"}
        env = {**base, "GENESIS_HOME": home} if home else base
        # Ray runs `exec <py_executable> default_worker.py ...` through bash
        exe = subprocess.run(["bash", "-c", f"echo {spec['py_executable']}"], env=env, capture_output=True,
                             encoding="utf-8").stdout.strip()
        assert exe == str(want / ".venv" / "bin" / "python")
        saved = dict(os.environ)
        try:  # the node-side expansion Ray applies to env_vars
            os.environ.clear()
            os.environ.update(env)
            _update_envs({"PATH": spec["env_vars"]["PATH"]})
            first = next(p for p in os.environ["PATH"].split(os.pathsep) if p and p != "/.venv/bin")
        finally:
            os.environ.clear()
            os.environ.update(saved)
        assert first == str(want / ".venv" / "bin")


def test_service_commands_refuse_bad_usage_in_one_line(tmp_path):
    env = _clean_env(tmp_path / "nocluster")
    public = _services("start-mlflow", "--root", str(tmp_path / "m"), "--host", "0.0.0.0", "--port", "5999", env=env)
    assert public.returncode == 2 and "--public" in public.stderr and "Traceback" not in public.stderr
    assert len(public.stderr.strip().splitlines()) == 1 and not (tmp_path / "m").exists()
    bad_port = _services("start-mlflow", "--root", str(tmp_path / "m"), "--host", "127.0.0.1", "--port", "0",
                         env=env)
    assert bad_port.returncode == 2 and "Traceback" not in bad_port.stderr
    missing = _services("env", env=env)
    assert missing.returncode == 2 and "cluster.json" in missing.stderr and "Traceback" not in missing.stderr
    assert _services("cluster-down", env=env).returncode == 0  # nothing to stop is not an error
    assert _services("stop-mlflow", "--root", str(tmp_path / "m"), env=env).returncode == 0


def test_ray_token_is_private_and_stable(tmp_path):
    env = _clean_env(tmp_path / "nocluster")
    first = _services("ray-token", "--root", str(tmp_path / "t"), env=env)
    assert first.returncode == 0
    path = Path(first.stdout.strip())
    assert path == (tmp_path / "t" / "ray-token") and _mode(path) == 0o600
    token = path.read_text(encoding="utf-8").strip()
    assert len(token) == 64 and int(token, 16) >= 0
    again = _services("ray-token", "--root", str(tmp_path / "t"), env=env)
    assert again.returncode == 0 and path.read_text(encoding="utf-8").strip() == token
    path.chmod(0o644)  # a token others could have read is not used
    leaked = _services("ray-token", "--root", str(tmp_path / "t"), env=env)
    assert leaked.returncode == 1 and "readable by others" in leaked.stderr


def test_readme_carries_the_walkthrough_verbatim():
    """The README's block between the cluster-walkthrough markers is this file's commands, so the commands the
    end-to-end test runs are the ones users read."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    start, end = "<!-- cluster-walkthrough -->", "<!-- /cluster-walkthrough -->"
    assert start in readme and end in readme, f"README.md lacks the {start} block ({WALKTHROUGH.name})"
    block = readme.split(start, 1)[1].split(end, 1)[0]
    commands = [line for line in WALKTHROUGH.read_text(encoding="utf-8").splitlines()
                if line.strip() and not line.lstrip().startswith("#")]
    in_readme = [line.strip() for line in block.splitlines()]
    missing = [c for c in commands if c.strip() not in in_readme]
    assert not missing, f"README.md's walkthrough lacks: {missing}"
