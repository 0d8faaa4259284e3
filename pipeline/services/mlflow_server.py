"""The MLflow tracking server of a cluster, with authentication, started detached and stopped by its pid.

MLflow's own `mlflow server` listens without authentication: anyone who reaches the port could create
experiments, delete `genesis-pretrained` or replace a model's files. This launcher runs MLflow's basic-auth app
instead, with everything under one folder ROOT:

    ROOT/mlflow-admin-password   the admin's password, generated (0600); user `admin`
    ROOT/mlflow-auth.ini         MLflow's auth config (MLFLOW_AUTH_CONFIG_PATH), holds the password (0600)
    ROOT/mlflow-auth.db          users and permissions
    ROOT/mlflow-flask-secret     the Flask secret key of the auth app's CSRF protection (0600)
    ROOT/mlflow.db               runs and registered models (unless --backend-store-uri)
    ROOT/artifacts/              artifacts, served through the server (unless --artifacts-destination)
    ROOT/mlflow.pid, mlflow.log  the server process and its output
    ROOT/mlflow.json             where it listens and how to log in (no secret: the password's file)

ROOT and every folder in it are 0700, every file 0600 (what an older launcher left readable is made so at each
start), and the server runs with umask 077: a local user who is not the service's cannot read the runs, the
artifacts or `mlflow-auth.db`'s password hashes around the login.

MLflow ships no default admin password, but a config that names none makes the server refuse to start, and a
config left at its example value would be a known password: the password is generated here and set through the
auth config, so no default credential is ever live. New experiments of a server started this way keep their
artifacts in the proxied store (`mlflow-artifacts:/`), so clients never need the server's filesystem.

Artifacts in a bucket: `--artifacts-destination s3://BUCKET/PREFIX`. The server alone talks to the bucket (MLflow's
S3 artifact repository, through boto3), with the standard AWS environment it is started with (the keys, the
region; AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL for MinIO, Ceph or moto, handed to MLflow as
MLFLOW_S3_ENDPOINT_URL unless that is set); clients upload and download through the server and need no bucket
credentials. The bucket is checked before the server starts (`pipeline.storage.objects.Tree.check`: a missing
bucket, refused keys or an endpoint that does not answer is one line, exit 2), and the keys are never written
into ROOT, the log or mlflow.json.
"""

from __future__ import annotations

import base64
import json
import os
import sys
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.runtime.errors import UsageError
from pipeline.runtime.net import binds_every_interface
from pipeline.services.private_files import PRIVATE_UMASK, ensure_secret, private_tree, read_secret, write_private
from pipeline.services.processes import ServiceError, running_pid, start_until_ready, stop_recorded

__all__ = ["MlflowServerConfig", "MlflowServer", "start_mlflow", "stop_mlflow", "server_info", "ADMIN_USER"]

ADMIN_USER = "admin"
PASSWORD_FILE, INI_FILE, AUTH_DB, SECRET_FILE = ("mlflow-admin-password", "mlflow-auth.ini", "mlflow-auth.db",
                                                 "mlflow-flask-secret")
PID_FILE, LOG_FILE, INFO_FILE = "mlflow.pid", "mlflow.log", "mlflow.json"


@dataclass(frozen=True, kw_only=True)
class MlflowServerConfig:
    root: Path
    """Folder of the server's database, auth files, artifacts (by default), pid and log."""
    host: str = "127.0.0.1"
    """Interface to listen on: the cluster's private address, or loopback (reach it through an SSH tunnel)."""
    port: int = 5000
    backend_store_uri: str | None = None
    """None: sqlite:///ROOT/mlflow.db."""
    artifacts_destination: str | None = None
    """Path or URI the server stores artifacts under (None: ROOT/artifacts)."""
    allowed_hosts: tuple[str, ...] = ()
    """Host headers accepted besides the server's own address and an SSH tunnel's (localhost:PORT)."""
    public: bool = False
    """Allow binding every interface (0.0.0.0); only behind a firewall that limits who reaches the port."""
    workers: int = 2
    """Server worker processes."""
    start_timeout_s: float = 180.0

    def __post_init__(self) -> None:
        host = self.host.strip()
        if host.startswith("[") and host.endswith("]"):  # an IPv6 literal as written in a URL
            host = host[1:-1]
        object.__setattr__(self, "host", host)
        if self.everywhere and not self.public:
            raise ValueError(f"--host {self.host or '(empty)'!r} listens on every network interface; give the "
                             f"cluster's private address (or 127.0.0.1 and an SSH tunnel), or add --public")
        if not 0 < self.port < 65536:
            raise ValueError(f"--port: must be in 1..65535, got {self.port}")
        if self.workers < 1:
            raise ValueError(f"--workers: must be >= 1, got {self.workers}")
        root = Path(self.root)
        if root.exists() and not root.is_dir():
            raise ValueError(f"--root {root}: exists and is not a folder")

    @property
    def dir(self) -> Path:
        return Path(self.root).resolve()

    @property
    def backend(self) -> str:
        return self.backend_store_uri or f"sqlite:///{self.dir / 'mlflow.db'}"

    @property
    def artifacts(self) -> str:
        dest = self.artifacts_destination
        if dest is None:
            return str(self.dir / "artifacts")
        return dest if "://" in dest else str(Path(dest).resolve())

    @property
    def everywhere(self) -> bool:
        """Whether `host` binds every interface (0.0.0.0 in any spelling, ::, a name resolving to either)."""
        return binds_every_interface(self.host)

    @property
    def probe_host(self) -> str:
        """Where this machine reaches the server (a public bind is reached on loopback)."""
        return "127.0.0.1" if self.everywhere else self.host

    @property
    def url(self) -> str:
        host = f"[{self.probe_host}]" if ":" in self.probe_host else self.probe_host
        return f"http://{host}:{self.port}"

    def hosts(self) -> list[str]:
        host = f"[{self.host}]" if ":" in self.host else self.host
        own = [f"{host}:{self.port}", f"localhost:{self.port}", f"127.0.0.1:{self.port}"]
        return list(dict.fromkeys([*own, *(h for h in self.allowed_hosts if h)]))


@dataclass(frozen=True)
class MlflowServer:
    """A running server: what `ROOT/mlflow.json` records."""
    url: str
    user: str
    password_file: str
    pid: int
    log: str
    backend_store_uri: str
    artifacts_destination: str

    @property
    def password(self) -> str:
        return read_secret(Path(self.password_file))

    def auth_header(self) -> str:
        return basic_auth(self.user, self.password)


def basic_auth(user: str, password: str) -> str:
    """The Authorization header of HTTP basic auth."""
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def _ini(config: MlflowServerConfig, password: str) -> str:
    return "\n".join([
        "[mlflow]",
        "# written by `python -m pipeline.services start-mlflow`; holds the admin password: keep it 0600",
        "default_permission = READ",
        f"database_uri = sqlite:///{config.dir / AUTH_DB}",
        f"admin_username = {ADMIN_USER}",
        f"admin_password = {password}",
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth",
        "grant_default_workspace_access = false",
        ""])


def _probe(url: str, auth: str | None, timeout: float = 5.0) -> int:
    """HTTP status of a cheap authenticated read (0: nothing answers)."""
    return http_status(f"{url}/api/2.0/mlflow/experiments/search?max_results=1",
                       {"Authorization": auth} if auth else None, timeout)


def http_status(url: str, headers: dict[str, str] | None = None, timeout: float = 3.0) -> int:
    """HTTP status of a GET (error statuses included; 0: nothing answers)."""
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code
    except OSError:
        return 0


def server_info(root: Path) -> MlflowServer | None:
    """The server ROOT/mlflow.json describes, if its process is still the one recorded; else None."""
    root = Path(root).resolve()
    info_file = root / INFO_FILE
    pid = running_pid(root / PID_FILE) if info_file.exists() else None
    if pid is None:
        return None
    info = MlflowServer(**json.loads(info_file.read_text(encoding="utf-8")))
    return info if info.pid == pid else None


def _bucket_env(artifacts: str) -> dict[str, str]:
    """What the server's environment needs for an artifact destination in a bucket (s3://), after checking the
    bucket answers with this environment's credentials; {} for a folder. UsageError (exit 2) for a destination
    that cannot be used: no bucket, missing or refused keys, an endpoint that does not answer, no boto3. Other
    schemes MLflow knows (gs://, wasbs://, ...) are handed to it as they are."""
    import importlib.util

    from pipeline.storage.objects import StorageError, open_tree

    if artifacts.split("://", 1)[0].lower() != "s3" or "://" not in artifacts:
        return {}
    try:
        open_tree(artifacts).check()
    except StorageError as err:
        raise StorageError(f"--artifacts-destination {err}") from None
    if importlib.util.find_spec("boto3") is None:
        raise UsageError(f"--artifacts-destination {artifacts}: MLflow's S3 artifact store needs boto3 in the "
                         f"server's environment (pip install boto3)")
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint and not os.environ.get("MLFLOW_S3_ENDPOINT_URL"):
        return {"MLFLOW_S3_ENDPOINT_URL": endpoint}
    return {}


def start_mlflow(config: MlflowServerConfig) -> MlflowServer:
    """Start the authenticated server detached, in its own session, and return once it answers an
    authenticated request; a server this ROOT already runs on the same address is returned as it is."""
    root = config.dir
    running = server_info(root)
    if running is not None:
        if running.url != config.url:
            raise ServiceError(f"{root / PID_FILE}: an MLflow server of this folder already runs at {running.url} "
                               f"(pid {running.pid}); stop it first (python -m pipeline.services stop-mlflow "
                               f"--root {root})")
        return running
    bucket_env = _bucket_env(config.artifacts)  # a bucket destination is usable, before anything is written
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not os.access(root, os.W_OK):
        raise ServiceError(f"--root {root}: not writable")
    # the users and password hashes, the runs and the artifacts: the service's user's only (what an older
    # launcher left readable included); the server runs with umask 077, so what it writes later is private too
    private_tree(root)
    if not config.artifacts_destination or "://" not in config.artifacts_destination:
        Path(config.artifacts).mkdir(mode=0o700, parents=True, exist_ok=True)
    if _probe(config.url, None, timeout=2.0):
        raise ServiceError(f"{config.url}: something already listens there; choose another --port")
    password = ensure_secret(root / PASSWORD_FILE, nbytes=24)
    write_private(root / INI_FILE, _ini(config, password))
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_TRACKING_URI")}
    # MLflow's GenAI job runner (a dozen huey processes) serves nothing this pipeline uses
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    env.update(bucket_env)
    env.update(MLFLOW_AUTH_CONFIG_PATH=str(root / INI_FILE),
               MLFLOW_FLASK_SERVER_SECRET_KEY=ensure_secret(root / SECRET_FILE, nbytes=32))
    argv = [sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth",
            "--host", config.host, "--port", str(config.port), "--workers", str(config.workers),
            "--backend-store-uri", config.backend, "--serve-artifacts",
            "--artifacts-destination", config.artifacts, "--allowed-hosts", ",".join(config.hosts())]
    auth = basic_auth(ADMIN_USER, password)

    def ready(_proc) -> bool | str:
        status = _probe(config.url, auth)
        if status == 401:
            return (f"refuses the admin password of {root / PASSWORD_FILE}: {root / AUTH_DB} holds an admin made "
                    f"with another one (remove {root / AUTH_DB} to start over, or restore the password file)")
        return status == 200

    proc = start_until_ready(argv, name=f"MLflow server at {config.url}", log=root / LOG_FILE,
                             pid_file=root / PID_FILE, ready=ready, timeout_s=config.start_timeout_s, env=env,
                             cwd=root, every=0.5, late="did not answer within", umask=PRIVATE_UMASK)
    server = MlflowServer(url=config.url, user=ADMIN_USER, password_file=str(root / PASSWORD_FILE), pid=proc.pid,
                          log=str(root / LOG_FILE), backend_store_uri=config.backend,
                          artifacts_destination=config.artifacts)
    write_private(root / INFO_FILE, json.dumps(asdict(server), indent=1) + "\n")
    return server


def stop_mlflow(root: Path, grace_s: float = 15.0) -> list[int]:
    """Stop the server ROOT/mlflow.pid names (its process group and descendants); returns the pids stopped
    (empty when none was running)."""
    root = Path(root).resolve()
    if not (root / PID_FILE).exists():
        return []
    stopped = stop_recorded(root / PID_FILE, grace_s=grace_s)
    (root / INFO_FILE).unlink(missing_ok=True)
    return stopped
