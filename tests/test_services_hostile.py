"""Issue 18, items 7 and 8: the service launchers, as an attacker on the network or a local user would try them.

- Item 7: the guard against listening on every interface parsed the host as a string, so `0`, `000.0.0.0`, `::0`
  and `0:0:0:0:0:0:0:0` (all of them 0.0.0.0 or :: to the socket layer) started a public MLflow server. Every
  spelling the socket layer reads as the unspecified address is refused unless --public, for MLflow and Dask alike.
- Item 8: the MLflow root was 0755 with mlflow.db and mlflow-auth.db (users and password hashes) 0644: any local
  user could read around the login. After a real start, ROOT and everything in it is 0700/0600 and the server
  runs with umask 077.
"""

from __future__ import annotations

import socket
import stat
from pathlib import Path

import pytest

from pipeline.runtime.errors import UsageError
from pipeline.runtime.net import binds_every_interface
from pipeline.services.__main__ import main as services_main
from pipeline.services.mlflow_server import MlflowServerConfig, start_mlflow, stop_mlflow

#: spellings of 0.0.0.0 and :: that inet_aton / getaddrinfo accept, each a bind on every interface
EVERYWHERE = ("0", "000.0.0.0", "0x0", "0.0", "::0", "0:0:0:0:0:0:0:0", "[::]", "::ffff:0.0.0.0", "0.0.0.0", "::",
              "")
PRIVATE = ("127.0.0.1", "::1", "[::1]", "localhost", "10.1.2.3", "0177.0.0.1", "127.0.0.01")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("host", EVERYWHERE)
def test_every_spelling_of_the_unspecified_address_is_refused_without_public(host, tmp_path, capsys):
    assert binds_every_interface(host)
    with pytest.raises(ValueError, match="listens on every network interface.*--public"):
        MlflowServerConfig(root=tmp_path / "m", host=host)
    assert MlflowServerConfig(root=tmp_path / "m", host=host, public=True).probe_host == "127.0.0.1"
    # the command line: exit 2, one line, nothing created
    code = services_main(["start-mlflow", "--root", str(tmp_path / "m"), "--host", host, "--port", "5999"])
    err = capsys.readouterr().err
    assert code == 2 and "--public" in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "m").exists()
    # the Dask TLS launcher's guard is the same rule, before any certificate or process
    from pipeline.services.dask_tls import start_scheduler

    with pytest.raises(UsageError, match="listens on every network interface"):
        start_scheduler(tmp_path / "d", host)
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("host", PRIVATE)
def test_a_specific_address_is_accepted_and_reached_where_it_listens(host, tmp_path):
    assert not binds_every_interface(host)
    config = MlflowServerConfig(root=tmp_path / "m", host=host, port=5123)
    assert config.probe_host == host.strip("[]")
    assert config.url == (f"http://[{host.strip('[]')}]:5123" if ":" in host else f"http://{host}:5123")


def test_a_host_name_that_resolves_to_the_unspecified_address_is_refused(tmp_path, monkeypatch):
    """A name (an /etc/hosts entry, a DNS record) whose address is 0.0.0.0 binds every interface as well."""
    real = socket.getaddrinfo

    def resolve(host, *args, **kwargs):
        if host == "everywhere.test":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("0.0.0.0", 0))]
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    assert binds_every_interface("everywhere.test")
    with pytest.raises(ValueError, match="'everywhere.test' listens on every network interface"):
        MlflowServerConfig(root=tmp_path / "m", host="everywhere.test")
    assert not binds_every_interface("no-such-host.invalid")  # unresolvable: the server itself will fail


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def _umask(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text(encoding="utf-8").splitlines():
        if line.startswith("Umask:"):
            return int(line.split()[1], 8)
    pytest.skip("no Umask line in /proc/PID/status on this kernel")


@pytest.mark.timeout(300)
def test_mlflow_root_and_everything_in_it_are_the_service_users_only(tmp_path):
    """A root an older launcher left world-readable (0755 folder, 0644 files) is made private at start; after a
    real start the root, its folders and its files, mlflow.db and mlflow-auth.db included, are 0700/0600, and
    the server (and its workers) run with umask 077 so the artifacts they write later are private too."""
    root = tmp_path / "mlflow"
    (root / "artifacts" / "0" / "old").mkdir(parents=True)
    root.chmod(0o755)
    (root / "artifacts").chmod(0o755)
    old = root / "artifacts" / "0" / "old" / "model.bin"
    old.write_bytes(b"weights")
    old.chmod(0o644)
    server = start_mlflow(MlflowServerConfig(root=root, port=_free_port(), workers=1, start_timeout_s=180))
    try:
        names = {p.name for p in root.iterdir()}
        assert {"mlflow.db", "mlflow-auth.db", "mlflow-admin-password", "mlflow-auth.ini", "mlflow.log",
                "mlflow.pid", "mlflow.json", "artifacts"} <= names, names
        assert _mode(root) == 0o700
        loose = {str(p.relative_to(root)): oct(_mode(p)) for p in root.rglob("*")
                 if not p.is_symlink() and _mode(p) != (0o700 if p.is_dir() else 0o600)}
        assert not loose, loose
        assert _umask(server.pid) == 0o077
        import psutil

        for child in psutil.Process(server.pid).children(recursive=True):  # the server's worker processes
            assert _umask(child.pid) == 0o077, child.cmdline()
    finally:
        stop_mlflow(root)
