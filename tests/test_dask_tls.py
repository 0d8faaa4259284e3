"""Mutual-TLS Dask (issue 11): the scheduler and workers of a `ray up` cluster, as real processes on 127.0.0.1.

`python -m pipeline.services.dask_tls` makes the certificates and starts a real `dask scheduler` and `dask worker`
(detached, each in its own session with a pid file) as deploy/ray/genesis-env.sh does on the head and on a
worker node, with 127.0.0.1 as the private address and the worker's copy of the certificates in a folder of its
own (what cluster_synced_files makes). A client holding the certificate runs tasks; a plain-TCP client, a TLS
client without a certificate and one whose certificate another CA signed are refused by the scheduler itself
(its log says why); `genesis convert --dask-scheduler tls://...` converts through it; stopping the head's
scheduler (`ray down`) ends the worker's processes too, and nothing survives.
"""

from __future__ import annotations

import os
import shlex
import shutil
import socket
import ssl
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import pipeline.cluster
from conftest import ct_array, write_mhd
from pipeline.runtime.errors import UsageError
from pipeline.services.dask_tls import client_security, ensure_certs, env, main, security
from pipeline.services.processes import alive as _alive

HOST = "127.0.0.1"
CLUSTER_PY_HAS_TLS = hasattr(pipeline.cluster, "client_security")
NEEDS_CLUSTER_PY = pytest.mark.skipif(
    not CLUSTER_PY_HAS_TLS, reason="pipeline/cluster.py's dask_client does not use "
                                   "pipeline.services.dask_tls.client_security yet (issue 11: the change is in the "
                                   "Dask TLS helper's report)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _tree(pid: int) -> list[int]:
    import psutil

    try:
        return [pid, *(c.pid for c in psutil.Process(pid).children(recursive=True))]
    except psutil.NoSuchProcess:
        return []




def _listening(pids) -> set[tuple[str, int]]:
    import psutil

    out = set()
    for pid in pids:
        try:
            out |= {(c.laddr.ip, c.laddr.port) for c in psutil.Process(pid).net_connections("inet")
                    if c.status == psutil.CONN_LISTEN}
        except psutil.NoSuchProcess:
            pass
    return out


def _pid(root: Path, name: str) -> int:
    return int((root / f"{name}.pid").read_text(encoding="utf-8"))


def _log(root: Path, name: str) -> str:
    return (root / f"{name}.log").read_text(encoding="utf-8", errors="replace")


class Cluster:
    def __init__(self, head: Path, node: Path, port: int):
        self.head, self.node, self.port = head, node, port
        self.address = f"tls://{HOST}:{port}"

    def pids(self) -> list[int]:
        return [q for root, name in ((self.head, "dask-scheduler"), (self.node, "dask-worker"))
                if (root / f"{name}.pid").exists() for q in _tree(_pid(root, name))]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A head (certificates, scheduler) and a worker node (a copy of the three files, one worker process)."""
    head, node = tmp_path_factory.mktemp("head-state"), tmp_path_factory.mktemp("node-state")
    assert main(["certs", "--root", str(head), "--hosts", HOST]) == 0
    for name in ("ca.pem", "dask.pem", "dask-key.pem"):  # what cluster_synced_files does (rsync -a keeps modes)
        shutil.copy2(head / name, node / name)
    c = Cluster(head, node, _free_port())
    leaders: list[int] = []
    started: list[int] = []
    try:
        assert main(["start-scheduler", "--root", str(head), "--host", HOST, "--port", str(c.port),
                     "--timeout", "60"]) == 0
        leaders.append(_pid(head, "dask-scheduler"))
        assert main(["start-worker", "--root", str(node), "--scheduler", c.address, "--host", HOST,
                     "--nworkers", "1", "--death-timeout", "20", "--timeout", "60"]) == 0
        leaders.append(_pid(node, "dask-worker"))
        started = c.pids()
        yield c
    finally:
        main(["stop", "--root", str(node), "--grace", "5"])
        main(["stop", "--root", str(head), "--grace", "5"])
        for pid in _alive(leaders):  # never reached when stop works; then by process group, by pid
            os.killpg(pid, 9)
    assert _alive(started) == []


# --------------------------------------------------------------------------- certificates and settings

def test_certificates_made_once_key_private_ca_key_discarded(tmp_path, capsys):
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID

    root = tmp_path / "tls"
    assert main(["certs", "--root", str(root), "--hosts", "10.0.0.1,head.lab"]) == 0
    assert "generated (absent)" in capsys.readouterr().out
    assert sorted(p.name for p in root.iterdir()) == ["ca.pem", "dask-key.pem", "dask.pem"]  # no CA key kept
    assert stat.S_IMODE((root / "dask-key.pem").stat().st_mode) == 0o600
    ca = x509.load_pem_x509_certificate((root / "ca.pem").read_bytes())
    cert = x509.load_pem_x509_certificate((root / "dask.pem").read_bytes())
    cert.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}  # every role
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(v) for v in san.get_values_for_type(x509.IPAddress)} == {"10.0.0.1", "127.0.0.1"}
    assert set(san.get_values_for_type(x509.DNSName)) == {"head.lab", "localhost"}

    before = {p.name: p.read_bytes() for p in root.iterdir()}
    assert main(["certs", "--root", str(root)]) == 0  # a second `ray up`: the workers' copies stay valid
    assert "kept" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in root.iterdir()} == before

    (root / "ca.pem").unlink()  # an incomplete set is replaced as a whole
    files, reason = ensure_certs(root)
    assert reason == "incomplete (ca.pem missing)"
    assert (root / "dask.pem").read_bytes() != before["dask.pem"]
    x509.load_pem_x509_certificate(files.cert.read_bytes()).verify_directly_issued_by(
        x509.load_pem_x509_certificate(files.ca.read_bytes()))

    (root / "dask-key.pem").chmod(0o644)  # a key others could read is refused, never used or silently replaced
    assert main(["certs", "--root", str(root)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "dask-key.pem: readable by others" in err
    with pytest.raises(UsageError, match="readable by others"):
        security(root)
    with pytest.raises(UsageError, match=r"no Dask TLS ca.pem, dask.pem, dask-key.pem"):
        security(tmp_path / "empty")


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def test_env_gives_dask_the_same_settings_as_security(tmp_path, capsys):
    import dask
    from distributed import Security

    root = tmp_path / "tls"
    ensure_certs(root)
    variables = env(root)
    assert variables["DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION"] == "True"
    # what `dask scheduler`/`dask worker` started with these variables read, through dask's own env parsing
    with dask.config.set(_flatten(dask.config.collect_env(variables))):
        from_env = Security()
    ours = security(root)
    for field in ("require_encryption", "tls_ca_file", "tls_client_cert", "tls_client_key", "tls_scheduler_cert",
                  "tls_scheduler_key", "tls_worker_cert", "tls_worker_key"):
        assert getattr(from_env, field) == getattr(ours, field), field
    assert ours.require_encryption is True and ours.tls_ca_file == str(root.resolve() / "ca.pem")
    assert ours.get_listen_args("scheduler")["ssl_context"].verify_mode == ssl.CERT_REQUIRED

    assert main(["env", "--root", str(root)]) == 0  # eval "$(python -m pipeline.services.dask_tls env --root DIR)"
    lines = capsys.readouterr().out.splitlines()
    exported = dict(shlex.split(line)[1].split("=", 1) for line in lines)
    assert exported == {**variables, "GENESIS_DASK_TLS_DIR": str(root.resolve())}


def test_client_policy_tls_needs_certificates_plain_tcp_only_on_loopback(tmp_path, monkeypatch):
    import dask

    root = tmp_path / "tls"
    ensure_certs(root)
    monkeypatch.delenv("GENESIS_DASK_TLS_DIR", raising=False)
    monkeypatch.delenv("GENESIS_ALLOW_INSECURE_DASK", raising=False)
    no_tls_config = {"distributed.comm.tls.ca-file": None, "distributed.comm.tls.client.cert": None}
    with dask.config.set(no_tls_config):
        with pytest.raises(UsageError, match="no Dask TLS certificates to connect with: set GENESIS_DASK_TLS_DIR"):
            client_security("tls://10.1.2.3:8786")
    with dask.config.set({"distributed.comm.tls.ca-file": str(root / "ca.pem"),
                          "distributed.comm.tls.client.cert": str(root / "dask.pem"),
                          "distributed.comm.tls.client.key": str(root / "dask-key.pem")}):
        assert client_security("tls://10.1.2.3:8786").tls_client_cert == str(root / "dask.pem")  # Dask's config
    monkeypatch.setenv("GENESIS_DASK_TLS_DIR", str(root))
    sec = client_security("tls://10.1.2.3:8786")
    assert sec.require_encryption and sec.tls_client_key == str(root.resolve() / "dask-key.pem")

    for address in ("tcp://10.1.2.3:8786", "10.1.2.3:8786", "tcp://head.invalid:8786"):
        with pytest.raises(UsageError, match="plain-TCP Dask scheduler on another machine"):
            client_security(address)
    for address in ("tcp://127.0.0.1:8786", "tcp://localhost:8786", "tcp://[::1]:8786", "inproc://1.2.3.4/5/6"):
        assert client_security(address) is None, address
    monkeypatch.setenv("GENESIS_ALLOW_INSECURE_DASK", "1")
    assert client_security("tcp://10.1.2.3:8786") is None


# --------------------------------------------------------------------------- the real scheduler and worker

def test_client_with_the_certificate_runs_tasks_and_everything_listens_on_the_private_address(cluster, monkeypatch):
    from distributed import Client

    monkeypatch.setenv("GENESIS_DASK_TLS_DIR", str(cluster.node))  # how a job's driver finds the certificates
    with Client(cluster.address, security=client_security(cluster.address), timeout=30) as client:
        assert client.submit(sum, [1, 2, 3]).result(timeout=30) == 6
        workers = client.scheduler_info()["workers"]
    assert len(workers) == 1 and all(w.startswith(f"tls://{HOST}:") for w in workers)
    sockets = _listening(cluster.pids())
    assert (HOST, cluster.port) in sockets and len(sockets) >= 4  # scheduler, its HTTP server, nanny, worker
    assert {ip for ip, _ in sockets} == {HOST}, sockets  # the HTTP servers too: nothing on 0.0.0.0


def test_clients_without_the_certificate_are_refused_by_the_scheduler(cluster, tmp_path):
    from distributed import Client, Security

    with pytest.raises(OSError):  # plain TCP: no TLS handshake, no connection
        Client(f"tcp://{HOST}:{cluster.port}", security=Security(), timeout=5)

    trusting = ssl.create_default_context(cafile=str(cluster.head / "ca.pem"))
    trusting.check_hostname = False
    with pytest.raises((ssl.SSLError, ConnectionResetError)):  # TLS, trusting our CA, but no certificate
        with socket.create_connection((HOST, cluster.port), timeout=5) as raw, trusting.wrap_socket(raw) as tls:
            tls.sendall(b"hello")
            tls.recv(16)  # TLS 1.3: the server's verdict arrives after the client's handshake

    other = tmp_path / "other-cluster"
    ensure_certs(other)  # a certificate of the same shape that another CA signed
    trusting.load_cert_chain(str(other / "dask.pem"), str(other / "dask-key.pem"))
    with pytest.raises((ssl.SSLError, ConnectionResetError)):
        with socket.create_connection((HOST, cluster.port), timeout=5) as raw, trusting.wrap_socket(raw) as tls:
            tls.sendall(b"hello")
            tls.recv(16)
    with pytest.raises(OSError, match="TLS certificate does not match"):
        Client(cluster.address, security=security(other), timeout=5)

    log = _log(cluster.head, "dask-scheduler")  # the scheduler refused each, and said why
    assert "peer did not return a certificate" in log
    assert log.count("certificate verify failed") + log.count("unknown ca") >= 1
    with Client(cluster.address, security=security(cluster.node), timeout=30) as client:  # still serving us
        assert client.submit(pow, 2, 10).result(timeout=30) == 1024
        assert len(client.scheduler_info()["workers"]) == 1  # no stranger joined as a worker


@NEEDS_CLUSTER_PY
def test_genesis_convert_through_the_tls_scheduler(cluster, tmp_path, monkeypatch, capsys):
    from pipeline.cli import main as genesis
    from pipeline.volume_store.store import VolumeStore

    rng = np.random.default_rng(11)
    arrays = {}
    for i in range(2):
        uid = f"1.3.6.1.4.1.14519.5.2.1.6279.6001.{200 + i}"
        arrays[uid] = ct_array(rng, shape=(16, 24, 32))
        write_mhd(tmp_path / "luna" / "subset0" / f"{uid}.mhd", arrays[uid])
    store = tmp_path / "store"
    log_before = len(_log(cluster.head, "dask-scheduler"))
    child_env = {**os.environ, "GENESIS_DASK_TLS_DIR": str(cluster.node), "LC_ALL": "C"}
    child_env.pop("GENESIS_ALLOW_INSECURE_DASK", None)
    proc = subprocess.run([str(Path(sys.executable).parent / "genesis"), "convert", str(tmp_path / "luna"),
                           "--store", str(store), "--no-progress", "--dask-scheduler", cluster.address],
                          env=child_env, capture_output=True, encoding="utf-8", errors="replace", timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "converted 2, skipped 0 (already done), failed 0" in proc.stdout
    for uid, arr in arrays.items():
        np.testing.assert_array_equal(VolumeStore(store).read_scan(uid), arr)
    log = _log(cluster.head, "dask-scheduler")
    assert "Receive client connection" in log[log_before:]  # converted by the cluster's scheduler, not locally
    assert log.count("Register worker") == 1

    # the same command line without certificates, or at a plain scheduler elsewhere: one line, exit 2, no traceback
    monkeypatch.delenv("GENESIS_DASK_TLS_DIR", raising=False)
    monkeypatch.delenv("GENESIS_ALLOW_INSECURE_DASK", raising=False)
    monkeypatch.setenv("GENESIS_ENTRY_POINT", "")  # genesis main sets it
    for address, said in ((cluster.address, "set GENESIS_DASK_TLS_DIR"),
                          ("tcp://192.0.2.1:8786", "plain-TCP Dask scheduler on another machine")):
        code = genesis(["convert", str(tmp_path / "luna"), "--store", str(tmp_path / "s2"), "--no-progress",
                        "--dask-scheduler", address])
        err = capsys.readouterr().err
        assert code == 2 and said in err and len(err.strip().splitlines()) == 1, err


@NEEDS_CLUSTER_PY
def test_local_clusters_listen_on_loopback_only():
    """Without --dask-scheduler: the in-process cluster (one worker) and the process cluster open sockets on
    127.0.0.1 only, their HTTP servers included (before the fix the in-process one served HTTP on 0.0.0.0)."""
    from pipeline.cluster import dask_client

    for workers in (1, 2):
        with dask_client(workers, None) as client:
            assert client.submit(sum, [2, 3]).result(timeout=30) == 5
            me = os.getpid()
            sockets = _listening(_tree(me))
        assert sockets and {ip for ip, _ in sockets} <= {HOST, "::1"}, (workers, sockets)


def test_ray_down_on_the_head_ends_the_workers_and_stop_leaves_nothing(cluster, capsys):
    """Last: uses up the module's cluster. `ray down` runs `stop` on the head only; the worker node's
    processes exit on their own once the scheduler is gone; `stop` there then finds nothing left to stop."""
    worker_pids = _tree(_pid(cluster.node, "dask-worker"))
    scheduler_pids = _tree(_pid(cluster.head, "dask-scheduler"))
    assert len(worker_pids) >= 2 and scheduler_pids  # the nanny and its worker process

    assert main(["stop", "--root", str(cluster.head), "--grace", "10"]) == 0
    assert "stopped the Dask processes" in capsys.readouterr().out
    assert _alive(scheduler_pids) == [] and not (cluster.head / "dask-scheduler.pid").exists()
    deadline = time.monotonic() + 25
    while _alive(worker_pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _alive(worker_pids) == [], _log(cluster.node, "dask-worker")[-2000:]

    assert main(["stop", "--root", str(cluster.node)]) == 0
    assert "no Dask process of this folder was running" in capsys.readouterr().out
    assert not (cluster.node / "dask-worker.pid").exists()
