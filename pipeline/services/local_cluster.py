"""`make cluster-up` / `make cluster-down`: a two-node Ray cluster and an authenticated MLflow server on this one
machine, to try `ray job submit` exactly as on a lab cluster (and to test it end to end).

    CLUSTER/cluster.json     pids and connection details (0600): Ray address and dashboard, token file, MLflow URL,
                             user and password file, the shared root, each process's pid, log and temp folder
    CLUSTER/ray-token        the Ray token (0600); every node and every client reads it (RAY_AUTH_TOKEN_PATH)
    CLUSTER/mlflow/          the MLflow server's database, artifacts, auth files, pid and log (pipeline.services)
    CLUSTER/shared/          what a lab keeps on its shared filesystem: data, stores, checkpoints, results
    CLUSTER/logs/            the `ray start` output of each node

The folder and every folder in it are 0700, the files there at start 0600 (the MLflow server's root is private
the same way, pipeline.services.mlflow_server). Every process listens on 127.0.0.1 only, on ports of its own (so a Ray or an MLflow already running here is left
alone); the Ray nodes need the token (RAY_AUTH_MODE=token) and the MLflow server a password. The nodes get the
environment a lab's nodes would have: GENESIS_HOME (the checkout whose .venv runs the jobs, see
runtime_env.yaml), GENESIS_SHARED_ROOT, and MLflow credentials for the jobs' runs. `cluster-down` stops exactly
the processes recorded in cluster.json (each with its process group and descendants), never one found by name.
"""

from __future__ import annotations

import json
import os
import random
import shlex
import shutil
import socket
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from pipeline.runtime.net import connect
from pipeline.services.mlflow_server import (ADMIN_USER, PASSWORD_FILE, MlflowServerConfig, http_status,
                                             start_mlflow, stop_mlflow)
from pipeline.services.private_files import ensure_secret, private_tree, read_secret, write_private
from pipeline.services.processes import ServiceError, alive, log_tail, owned_process, start_detached, stop_trees
from pipeline.services.ray_token import ensure_ray_token, ray_auth_env

__all__ = ["LocalClusterConfig", "cluster_up", "cluster_down", "add_node", "read_cluster", "cluster_env",
           "CLUSTER_FILE", "REPO"]

CLUSTER_FILE = "cluster.json"
REPO = Path(__file__).resolve().parents[2]
"""The checkout this code runs from: GENESIS_HOME of the nodes (its .venv runs the jobs)."""
TRIAL_SLOTS = 100
"""`genesis_trial` units on the head, as on a lab's head node (pipeline/cluster.py, ray_cluster.yaml)."""
SCRUBBED_ENV = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE",
                "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
"""Settings of some other cluster the shell may carry; the nodes get this cluster's instead."""


@dataclass(frozen=True, kw_only=True)
class LocalClusterConfig:
    dir: Path = Path("cluster")
    """The cluster folder (see the module docstring)."""
    head_cpus: int = 1
    """CPUs the head declares; with `node_cpus` 1 too, two 1-CPU workers land one on each node."""
    node_cpus: int = 1
    object_store_mb: int = 256
    """Object store of each node (Ray's default takes 30% of the memory per node)."""
    mlflow_port: int | None = None
    """None: a free port."""
    dashboard_port: int | None = None
    """None: a free port."""
    artifacts_destination: str | None = None
    """Where the MLflow server keeps artifacts: None for CLUSTER/mlflow/artifacts, or s3://BUCKET/PREFIX (the
    server alone gets the AWS environment; jobs log through it, `pipeline.services.mlflow_server`)."""
    start_timeout_s: float = 240.0

    def __post_init__(self) -> None:
        for name in ("head_cpus", "node_cpus"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(self, name)}")
        if self.object_store_mb < 80:
            raise ValueError(f"--object-store-mb: Ray needs at least 80, got {self.object_store_mb}")
        for name in ("mlflow_port", "dashboard_port"):
            value = getattr(self, name)
            if value is not None and not 0 < value < 65536:
                raise ValueError(f"--{name.replace('_', '-')}: must be in 1..65535, got {value}")

    @property
    def root(self) -> Path:
        return Path(self.dir).resolve()


# --------------------------------------------------------------------------- small helpers

def _free_ports(n: int, taken: set[int] | None = None) -> list[int]:
    taken = set(taken or ())
    ports: list[int] = []
    while len(ports) < n:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in taken and port not in ports:
            ports.append(port)
    return ports


def _worker_port_range(taken: set[int]) -> tuple[int, int]:
    """200 ports for a node's worker processes, below Linux's ephemeral range (where the free ports above come
    from) and clear of Ray's default range (10002-19999) that a Ray of the same machine may use."""
    while True:
        low = random.randrange(20000, 30000, 200)
        if not any(low <= p < low + 200 for p in taken):
            return low, low + 199


def _listening(port: int) -> bool:
    return connect("127.0.0.1", port, timeout=1.0) is None


def _json(url: str, headers: dict[str, str], timeout: float = 5.0):
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout) as resp:
        return json.loads(resp.read().decode("utf-8"))


def _ray_bin() -> str:
    return str(Path(sys.executable).with_name("ray"))


def read_cluster(root: Path) -> dict:
    path = Path(root).resolve() / CLUSTER_FILE
    if not path.exists():
        raise ValueError(f"{path}: no local cluster here (start one with `make cluster-up`)")
    return json.loads(path.read_text(encoding="utf-8"))


def _write_cluster(root: Path, info: dict) -> None:
    write_private(root / CLUSTER_FILE, json.dumps(info, indent=1) + "\n")


def _record(name: str, pid: int, log: Path, **extra) -> dict:
    import psutil

    return {"name": name, "pid": pid, "create_time": psutil.Process(pid).create_time(), "log": str(log), **extra}


def _node_env(root: Path, token_file: Path, mlflow_url: str, shared: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in SCRUBBED_ENV}
    env.update(ray_auth_env(token_file))
    # the jobs' runs go to this cluster's server, as the admin (whoever holds the Ray token can run code on the
    # nodes and so read the password file anyway: the password keeps out those who only reach the port)
    env.update(GENESIS_HOME=str(REPO), GENESIS_SHARED_ROOT=str(shared), RAY_USAGE_STATS_ENABLED="0",
               MLFLOW_TRACKING_URI=mlflow_url, MLFLOW_TRACKING_USERNAME=ADMIN_USER,
               MLFLOW_TRACKING_PASSWORD=read_secret(root / "mlflow" / PASSWORD_FILE))
    # a node registers with the head's GCS within Ray's 30 s default; on a busy 2-core machine that was seen to
    # time out ("The current node timed out during startup"), so give it the time Ray's own message suggests
    env.setdefault("RAY_raylet_start_wait_time_s", "120")
    return env


def _start_node(root: Path, name: str, env: dict[str, str], *, head: bool, cpus: int, object_store_mb: int,
                gcs_port: int | None = None, dashboard_port: int | None = None,
                taken: set[int]) -> dict:
    """`ray start --block` of one node, detached in its own session; returns its record (not yet waited for)."""
    agent, agent_grpc, runtime_env, metrics, node_mgr, obj_mgr, client = _free_ports(7, taken)
    taken.update((agent, agent_grpc, runtime_env, metrics, node_mgr, obj_mgr, client))
    low, high = _worker_port_range(taken)
    taken.update(range(low, high + 1))
    # Ray's socket paths must stay under ~107 characters: a short folder in /tmp, not under the cluster folder
    temp = tempfile.mkdtemp(prefix=f"gray-{name}-", dir="/tmp")
    argv = [_ray_bin(), "start", "--block", "--node-ip-address=127.0.0.1", f"--num-cpus={cpus}", "--num-gpus=0",
            f"--object-store-memory={object_store_mb * 1024 * 1024}", f"--temp-dir={temp}",
            f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--runtime-env-agent-port={runtime_env}", f"--metrics-export-port={metrics}",
            f"--node-manager-port={node_mgr}", f"--object-manager-port={obj_mgr}",
            f"--min-worker-port={low}", f"--max-worker-port={high}", "--disable-usage-stats"]
    if head:
        argv += ["--head", f"--port={gcs_port}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                 f"--dashboard-port={dashboard_port}", f"--ray-client-server-port={client}",
                 f"--resources={json.dumps({'genesis_trial': TRIAL_SLOTS})}"]
    else:
        argv += [f"--address=127.0.0.1:{gcs_port}"]
    log = root / "logs" / f"ray-{name}.log"
    proc = start_detached(argv, log=log, env=env, cwd=root)
    return _record(name, proc.pid, log, kind="ray-node", head=head, cpus=cpus, temp_dir=temp,
                   ports={"agent": agent, "agent_grpc": agent_grpc, "runtime_env_agent": runtime_env,
                          "metrics": metrics, "node_manager": node_mgr, "object_manager": obj_mgr,
                          "workers": [low, high]})


def _token_header(token_file: Path) -> dict[str, str]:
    return {"Authorization": f"Bearer {read_secret(token_file)}"}


def _wait_for_nodes(info: dict, count: int, deadline: float, starting: set[str] | None = None) -> None:
    """Until the dashboard answers (with the token), every node's job agent listens and `count` nodes are
    alive; raises naming the node whose process ended, or what was still missing at the deadline.

    `starting`: the nodes being started (None: all). A node started earlier that ends meanwhile (a node
    killed just before its replacement is added, still exiting) is not this start's failure: it is no longer
    expected, and one node fewer is waited for."""
    headers = _token_header(Path(info["ray"]["token_file"]))
    dashboard = info["ray"]["dashboard"]
    missing = "the dashboard"
    while time.monotonic() < deadline:
        for node in info["nodes"]:
            if node["alive_expected"] and not alive([node["pid"]]):
                if starting is not None and node["name"] not in starting:
                    node["alive_expected"] = False
                    count -= 1
                    continue
                raise ServiceError(f"Ray node {node['name']} (pid {node['pid']}) exited while starting; its log "
                                   f"{node['log']} ends:\n{log_tail(Path(node['log']))}")
        if http_status(f"{dashboard}/api/version", headers) != 200:
            missing = "the dashboard"
        elif [n["name"] for n in info["nodes"] if n["alive_expected"]
              and not http_status(f"http://127.0.0.1:{n['ports']['agent']}/", timeout=2.0)]:
            missing = "a node's job agent"
        else:
            try:
                nodes = _json(f"{dashboard}/api/v0/nodes?limit=100", headers)["data"]["result"]["result"]
                up = sum(1 for n in nodes if n.get("state") == "ALIVE")
            except (OSError, KeyError, ValueError):
                up = 0
            if up >= count:
                return
            missing = f"{count - up} more node(s) to join"
        time.sleep(1.0)
    raise ServiceError(f"the local Ray cluster did not come up in time (waiting for {missing}); logs in "
                       f"{Path(info['dir']) / 'logs'}")


# --------------------------------------------------------------------------- commands

def cluster_up(config: LocalClusterConfig) -> dict:
    """Start MLflow (auth, loopback), a Ray head (token auth) and a second Ray node; returns cluster.json's
    content once all answer. A cluster already recorded in the folder and still running is refused."""
    root = config.root
    if (root / CLUSTER_FILE).exists():
        old = read_cluster(root)
        if any(_owned(p) for p in _processes(old)):
            raise ServiceError(f"{root / CLUSTER_FILE}: a local cluster of this folder is running; "
                               f"`make cluster-down` first")
        cluster_down(root)  # a stale record (after a reboot, or killed processes): clean up what it names
    # the folder holds the token, the MLflow password and database, the data: its user's only (folders 0700,
    # files 0600, what an earlier cluster left included); nothing under a 0700 folder is reachable by others
    private_tree(root)
    shared = root / "shared"
    for folder in (shared, root / "logs"):
        folder.mkdir(mode=0o700, exist_ok=True)
    token_file = ensure_ray_token(root)
    ensure_secret(root / "mlflow" / PASSWORD_FILE, nbytes=24)
    gcs_port, dash, mlflow_port = _free_ports(3, {p for p in (config.dashboard_port, config.mlflow_port) if p})
    dash, mlflow_port = config.dashboard_port or dash, config.mlflow_port or mlflow_port
    taken = {gcs_port, dash, mlflow_port}
    mlflow_url = f"http://127.0.0.1:{mlflow_port}"
    info = {"dir": str(root), "repo": str(REPO), "shared_root": str(shared), "started": time.time(),
            "ray": {"address": f"127.0.0.1:{gcs_port}", "dashboard": f"http://127.0.0.1:{dash}",
                    "token_file": str(token_file)},
            "mlflow": {"url": mlflow_url, "user": ADMIN_USER, "password_file": str(root / "mlflow" / PASSWORD_FILE),
                       "root": str(root / "mlflow"), "pid": None},
            "nodes": []}
    env = _node_env(root, token_file, mlflow_url, shared)
    deadline = time.monotonic() + config.start_timeout_s
    try:
        head = _start_node(root, "head", env, head=True, cpus=config.head_cpus, object_store_mb=config.object_store_mb,
                           gcs_port=gcs_port, dashboard_port=dash, taken=taken)
        info["nodes"].append({**head, "alive_expected": True})
        _write_cluster(root, info)  # from here on `cluster-down` can stop what was started
        while not _listening(gcs_port) and alive([head["pid"]]) and time.monotonic() < deadline:
            time.sleep(0.5)  # until the GCS listens: then a worker node can join
        node = _start_node(root, "node-1", env, head=False, cpus=config.node_cpus,
                           object_store_mb=config.object_store_mb, gcs_port=gcs_port, taken=taken)
        info["nodes"].append({**node, "alive_expected": True})
        _write_cluster(root, info)
        server = start_mlflow(MlflowServerConfig(root=root / "mlflow", host="127.0.0.1", port=mlflow_port,
                                                 workers=1, start_timeout_s=config.start_timeout_s,
                                                 artifacts_destination=config.artifacts_destination))
        info["mlflow"].update(_record("mlflow", server.pid, Path(server.log)))
        _write_cluster(root, info)
        _wait_for_nodes(info, 2, deadline)
    except BaseException:
        cluster_down(root)
        raise
    info["ready"] = time.time()
    _write_cluster(root, info)
    return info


def add_node(root: Path, cpus: int = 1, object_store_mb: int = 256, timeout_s: float = 180.0) -> dict:
    """Start one more worker node joining the running cluster (a replacement for a node that died); returns
    its record, added to cluster.json."""
    root = Path(root).resolve()
    info = read_cluster(root)
    taken = {p for n in info["nodes"] for k, p in n["ports"].items() if k != "workers"}
    taken |= {p for n in info["nodes"] for p in range(n["ports"]["workers"][0], n["ports"]["workers"][1] + 1)}
    env = _node_env(root, Path(info["ray"]["token_file"]), info["mlflow"]["url"], Path(info["shared_root"]))
    names = {n["name"] for n in info["nodes"]}
    name = next(f"node-{k}" for k in range(1, 1000) if f"node-{k}" not in names)
    gcs_port = int(info["ray"]["address"].rsplit(":", 1)[1])
    node = _start_node(root, name, env, head=False, cpus=cpus, object_store_mb=object_store_mb, gcs_port=gcs_port,
                       taken=taken)
    for n in info["nodes"]:
        n["alive_expected"] = _owned(n) is not None
    info["nodes"].append({**node, "alive_expected": True})
    _write_cluster(root, info)
    _wait_for_nodes(info, sum(n["alive_expected"] for n in info["nodes"]), time.monotonic() + timeout_s,
                    starting={name})
    _write_cluster(root, info)  # a node found gone while waiting is recorded as such
    return node


def _processes(info: dict) -> list[dict]:
    procs = list(info.get("nodes", []))
    m = info.get("mlflow") or {}
    if m.get("pid"):
        procs.append({"name": "mlflow", "pid": m["pid"], "create_time": m.get("create_time", 0.0)})
    return procs


def _owned(record: dict):
    """The process a record names, if the pid still belongs to it (same creation time)."""
    proc = owned_process(record["pid"], record.get("create_time", 0.0))
    if proc is None:
        return None
    if record.get("create_time") and abs(proc.create_time() - record["create_time"]) > 0.05:
        return None  # the pid was reused by a later process
    return proc


def cluster_down(root: Path) -> list[int]:
    """Stop every process cluster.json records (the Ray nodes and MLflow), each with its process group and
    descendants; remove the nodes' temp folders and cluster.json. Returns the pids stopped. Data, stores, the
    MLflow database, the token and the password stay for the next `cluster-up`."""
    root = Path(root).resolve()
    path = root / CLUSTER_FILE
    if not path.exists():
        return []
    info = read_cluster(root)
    # every node and the MLflow server at once; job drivers (sessions of their own) go as descendants
    stopped = stop_trees([p["pid"] for p in _processes(info) if _owned(p) is not None], grace_s=20.0)
    m = info.get("mlflow") or {}
    if m.get("root"):
        stopped += stop_mlflow(Path(m["root"]))  # its pid and info files (the process is gone already)
    for node in info.get("nodes", []):
        temp = node.get("temp_dir")
        if temp and Path(temp).name.startswith("gray-") and Path(temp).parent == Path("/tmp"):
            shutil.rmtree(temp, ignore_errors=True)
    path.unlink(missing_ok=True)
    return stopped


def cluster_env(root: Path) -> str:
    """Shell lines that point `ray job submit`, the MLflow client and our commands at this cluster."""
    info = read_cluster(root)
    m = info["mlflow"]
    values = {"RAY_API_SERVER_ADDRESS": info["ray"]["dashboard"], "RAY_AUTH_MODE": "token",
              "RAY_AUTH_TOKEN_PATH": info["ray"]["token_file"], "MLFLOW_TRACKING_URI": m["url"],
              "MLFLOW_TRACKING_USERNAME": m["user"],
              "MLFLOW_TRACKING_PASSWORD": read_secret(Path(m["password_file"])),
              "GENESIS_SHARED_ROOT": info["shared_root"]}
    lines = ["unset RAY_AUTH_TOKEN RAY_ADDRESS"]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


def describe(info: dict) -> str:
    """What `make cluster-up` prints."""
    nodes = ", ".join(f"{n['name']} (pid {n['pid']}, {n['cpus']} CPU)" for n in info["nodes"])
    m = info["mlflow"]
    where = "" if Path(info["dir"]) == Path("cluster").resolve() else f" --dir {shlex.quote(info['dir'])}"
    return "\n".join([
        f"local cluster up in {info.get('ready', time.time()) - info['started']:.0f} s: {info['dir']}/{CLUSTER_FILE}",
        f"  Ray      {info['ray']['address']}, dashboard {info['ray']['dashboard']} (token: {info['ray']['token_file']})",
        f"  nodes    {nodes}",
        f"  MLflow   {m['url']} (user {m['user']}, password in {m['password_file']}; pid {m['pid']})",
        f"  shared   {info['shared_root']}",
        f"use it from this shell:  eval \"$(.venv/bin/python -m pipeline.services env{where})\"",
        "stop it:                 make cluster-down"])
