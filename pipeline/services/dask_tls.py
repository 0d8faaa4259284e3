"""Mutual TLS for the cluster's Dask: a CA of the cluster's own, one certificate it signs, and the settings that
make every Dask process (scheduler, workers, our clients) present that certificate and require it of its peers.

Why: a Dask scheduler runs whatever code it is sent. On plain TCP anyone who reaches its port can run anything
as the user it runs as; with these settings only holders of DIR/dask-key.pem complete a connection.

    DIR/ca.pem            the cluster's CA certificate, the only trust root (its private key is discarded once it
                          has signed dask.pem: nobody can sign another certificate it accepts)
    DIR/dask.pem          the certificate every scheduler, worker and client presents (serverAuth + clientAuth)
    DIR/dask-key.pem      its private key (0600): the secret that admits a process to the cluster
    DIR/dask-scheduler.pid, .log / dask-worker.pid, .log    processes `start-scheduler` / `start-worker` started

What enforces it (distributed 2026.8, `security.py` `Security._get_tls_context`, used by `comm/tcp.py`'s
TLSListener and TLSConnector): both the listening side (`ssl.Purpose.CLIENT_AUTH`) and the connecting side set
`verify_mode = ssl.CERT_REQUIRED` with ca.pem as the only CA, so the scheduler and the workers finish no TLS
handshake with a peer that shows no certificate or one ca.pem did not sign, and `require-encryption` makes them
refuse to listen or connect on plain TCP. Distributed turns `check_hostname` off (a cluster CA, peers addressed
by IP): the names in dask.pem are informational, the key is what counts.

    python -m pipeline.services.dask_tls COMMAND --root DIR [options]
        certs [--hosts H1,H2] [--days N]                       make the three files when absent
        env                                                    exports for `dask` CLIs: eval "$(...)"
        start-scheduler --host IP [--port 8786]
        start-worker --scheduler tls://IP:PORT [--host IP] [--nworkers N]
        stop                                                   the processes of DIR's pid files

Exit status: 0 done; 1 a process failed to start or stop; 2 bad usage or input (missing or unsafe files).
Our own processes find DIR through GENESIS_DASK_TLS_DIR (`client_security`, which `pipeline.cluster.dask_client`
uses for a `--dask-scheduler` address).
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import secrets
import socket
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

from pipeline.runtime.errors import UsageError
from pipeline.runtime.help_format import Parser, examples
from pipeline.runtime.net import binds_every_interface, connect, port as port_number
from pipeline.services.processes import ServiceError, log_tail, running_pid, start_until_ready, stop_recorded

__all__ = ["TLS_DIR_ENV", "ALLOW_INSECURE_ENV", "DEFAULT_PORT", "LOCAL_SCHEMES", "TlsFiles", "tls_files",
           "ensure_certs", "security", "env", "scheduler_address", "client_security", "start_scheduler",
           "start_worker", "stop", "main"]

TLS_DIR_ENV = "GENESIS_DASK_TLS_DIR"
"""Names DIR (the three files) for our processes: clients of `--dask-scheduler tls://...`."""
ALLOW_INSECURE_ENV = "GENESIS_ALLOW_INSECURE_DASK"
"""Set to 1 to connect to a plain-TCP scheduler on another machine anyway (on a network one trusts entirely)."""
DEFAULT_PORT = 8786
HTTP_PORT = 8787
"""The scheduler's HTTP server (health, metrics; the dashboard when bokeh is installed): on 127.0.0.1 only, for
an SSH tunnel (another port when taken)."""
CA_FILE, CERT_FILE, KEY_FILE = "ca.pem", "dask.pem", "dask-key.pem"
VALID_DAYS = 3650
RENEW_BEFORE = datetime.timedelta(days=1)
"""A certificate that expires within this is renewed by `certs` (at `ray up`), not kept."""
SCHEDULER, WORKER = "dask-scheduler", "dask-worker"
ENCRYPTED_SCHEMES = ("tls", "wss")
LOCAL_SCHEMES = ("inproc",)


@dataclass(frozen=True)
class TlsFiles:
    """The three files of a TLS folder."""
    ca: Path
    cert: Path
    key: Path

    @classmethod
    def of(cls, root: str | os.PathLike) -> TlsFiles:
        root = Path(root).expanduser().resolve()
        return cls(ca=root / CA_FILE, cert=root / CERT_FILE, key=root / KEY_FILE)

    def all(self) -> tuple[Path, Path, Path]:
        return self.ca, self.cert, self.key


# --------------------------------------------------------------------------- certificates

def tls_files(root: str | os.PathLike) -> TlsFiles:
    """The TLS files of `root`, checked: all present, the key readable by its owner only."""
    files = TlsFiles.of(root)
    missing = [p.name for p in files.all() if not p.is_file()]
    if missing:
        raise UsageError(f"{files.ca.parent}: no Dask TLS {', '.join(missing)}; make them with "
                         f"`python -m pipeline.services.dask_tls certs --root {files.ca.parent}` (on a `ray up` "
                         f"cluster the head makes them and syncs them to the workers)")
    mode = files.key.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise UsageError(f"{files.key}: readable by others (mode {stat.filemode(mode)}): whoever read it can run "
                         f"code on the Dask cluster; remove {CA_FILE}, {CERT_FILE} and {KEY_FILE} of "
                         f"{files.ca.parent} and run `certs` again (then resync the workers)")
    return files


def _problem(files: TlsFiles, now: datetime.datetime) -> str | None:
    """Why the present files cannot be kept (None: they can)."""
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import serialization

    try:
        ca = x509.load_pem_x509_certificate(files.ca.read_bytes())
        cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
        key = serialization.load_pem_private_key(files.key.read_bytes(), password=None)
    except (ValueError, TypeError) as err:
        return f"unreadable ({err})"
    if cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) \
            != key.public_key().public_bytes(serialization.Encoding.DER,
                                             serialization.PublicFormat.SubjectPublicKeyInfo):
        return f"{KEY_FILE} is not the key of {CERT_FILE}"
    try:
        cert.verify_directly_issued_by(ca)
    except (InvalidSignature, ValueError, TypeError) as err:  # another CA, another algorithm
        return f"{CERT_FILE} is not signed by {CA_FILE} ({type(err).__name__})"
    if min(cert.not_valid_after_utc, ca.not_valid_after_utc) < now + RENEW_BEFORE:
        return "expired or about to expire"
    return None


def _san(hosts: list[str]):
    from cryptography import x509

    names: list = []
    for host in dict.fromkeys([*hosts, "127.0.0.1", "localhost"]):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def _generate(hosts: list[str], days: int) -> tuple[bytes, bytes, bytes]:
    """(ca.pem, dask.pem, dask-key.pem) contents: a fresh CA that signs one ECDSA P-256 certificate for every role."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Genesis Pipeline"),
                          x509.NameAttribute(NameOID.COMMON_NAME, common)])

    def usage(**on: bool) -> x509.KeyUsage:
        flags = dict.fromkeys(("digital_signature", "content_commitment", "key_encipherment", "data_encipherment",
                               "key_agreement", "key_cert_sign", "crl_sign", "encipher_only", "decipher_only"), False)
        return x509.KeyUsage(**{**flags, **on})

    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)  # 5 min: clock skew
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = name(f"genesis-dask-ca-{secrets.token_hex(4)}")  # each cluster's CA its own name
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(usage(key_cert_sign=True, crl_sign=True), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(name("genesis-dask")).issuer_name(ca_name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(usage(digital_signature=True), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(_san(hosts), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    return (ca.public_bytes(pem), cert.public_bytes(pem),
            key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))


def _write_new(path: Path, data: bytes, mode: int) -> Path:
    """`data` into a new temporary file beside `path`, created with `mode` (never chmod-ed after writing)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return tmp


def ensure_certs(root: str | os.PathLike, hosts: list[str] | tuple[str, ...] = (),
                 days: int = VALID_DAYS) -> tuple[TlsFiles, str | None]:
    """The TLS files of `root`, generated when absent, incomplete, inconsistent or about to expire.

    Returns the files and why they were (re)generated (None: the present ones were kept). Present files are
    kept as they are, so rerunning `ray up` does not invalidate the workers' copies. The files appear whole:
    each is written under a temporary name and renamed, the CA last, and the set counts only when complete.
    """
    if days < 2:
        raise UsageError(f"--days: must be at least 2, got {days}")
    files = TlsFiles.of(root)
    root_dir = files.ca.parent
    if root_dir.exists() and not root_dir.is_dir():
        raise UsageError(f"--root {root_dir}: exists and is not a folder")
    root_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    present = [p.is_file() for p in files.all()]
    reason = "absent"
    if all(present):
        tls_files(root_dir)  # a key others can read is refused, not silently replaced
        reason = _problem(files, datetime.datetime.now(datetime.timezone.utc))
        if reason is None:
            return files, None
    elif any(present):
        reason = "incomplete (" + ", ".join(p.name for p, ok in zip(files.all(), present) if not ok) + " missing)"
    ca, cert, key = _generate(list(hosts), days)
    tmps = [_write_new(files.key, key, 0o600), _write_new(files.cert, cert, 0o644), _write_new(files.ca, ca, 0o644)]
    try:
        for tmp, final in zip(tmps, (files.key, files.cert, files.ca)):
            os.replace(tmp, final)
    finally:
        for tmp in tmps:
            tmp.unlink(missing_ok=True)
    return files, reason


def security(root: str | os.PathLike):
    """A `distributed.Security` that presents DIR's certificate in every role and requires encryption."""
    from distributed import Security

    files = tls_files(root)
    ca, cert, key = (str(p) for p in files.all())
    return Security(require_encryption=True, tls_ca_file=ca, tls_client_cert=cert, tls_client_key=key,
                    tls_scheduler_cert=cert, tls_scheduler_key=key, tls_worker_cert=cert, tls_worker_key=key)


def env(root: str | os.PathLike) -> dict[str, str]:
    """Dask config as environment variables: what `dask scheduler`, `dask worker` and any client started with
    them read (dask.config maps DASK_DISTRIBUTED__COMM__TLS__CA_FILE to distributed.comm.tls.ca-file)."""
    files = tls_files(root)
    out = {"DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION": "True",
           "DASK_DISTRIBUTED__COMM__DEFAULT_SCHEME": "tls",
           "DASK_DISTRIBUTED__COMM__TLS__CA_FILE": str(files.ca)}
    for role in ("SCHEDULER", "WORKER", "CLIENT"):
        out[f"DASK_DISTRIBUTED__COMM__TLS__{role}__CERT"] = str(files.cert)
        out[f"DASK_DISTRIBUTED__COMM__TLS__{role}__KEY"] = str(files.key)
    return out


# --------------------------------------------------------------------------- clients

def scheduler_address(address: str, option: str = "--dask-scheduler") -> tuple[str, str, int]:
    """(scheme, host, port) of a Dask scheduler address (host "" and port 0 for an in-process one); one line
    naming `option` when it is not one. No scheme: Dask's default (distributed.comm.default-scheme)."""
    from distributed.comm.addressing import parse_address, parse_host_port

    try:
        scheme, loc = parse_address(address, strict=False)
        if scheme in LOCAL_SCHEMES:
            return scheme, "", 0
        host, port = parse_host_port(loc, DEFAULT_PORT)
    except (ValueError, TypeError):
        raise UsageError(f"{option} {address!r}: not a Dask scheduler address (tls://HOST:PORT)") from None
    return scheme, host, int(port)


def _loopback(host: str) -> bool:
    """Whether `host` is this machine only (a name counts when every address it resolves to is loopback)."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        return False
    try:
        return bool(addresses) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)
    except ValueError:
        return False


def client_security(address: str):
    """The `security=` for a client of the scheduler at `address` (None: Dask's own config, plain on loopback).

    tls:// uses GENESIS_DASK_TLS_DIR's certificates, else those Dask's config names, else is refused: there
    would be nothing to present. A plain scheduler on another machine is refused unless
    GENESIS_ALLOW_INSECURE_DASK=1: it runs whatever code anyone who reaches it sends."""
    import dask

    scheme, host, _ = scheduler_address(address)
    if scheme in LOCAL_SCHEMES:
        return None
    if scheme in ENCRYPTED_SCHEMES:
        root = os.environ.get(TLS_DIR_ENV)
        if root:
            return security(root)
        if dask.config.get("distributed.comm.tls.ca-file", None) and \
                dask.config.get("distributed.comm.tls.client.cert", None):
            from distributed import Security

            return Security()
        raise UsageError(f"--dask-scheduler {address}: no Dask TLS certificates to connect with: set {TLS_DIR_ENV} "
                         f"to the folder of {CA_FILE}, {CERT_FILE} and {KEY_FILE} (genesis-env.sh sets it on a "
                         f"`ray up` cluster; elsewhere copy them from the head's state folder), or name them in "
                         f"Dask's config (distributed.comm.tls.*)")
    if _loopback(host) or os.environ.get(ALLOW_INSECURE_ENV) == "1":
        return None
    raise UsageError(f"--dask-scheduler {address}: a plain-TCP Dask scheduler on another machine runs any code "
                     f"anyone who reaches it sends; use the cluster's TLS scheduler (tls://HEAD:{DEFAULT_PORT}, "
                     f"certificates from `python -m pipeline.services.dask_tls certs`, {TLS_DIR_ENV} naming their "
                     f"folder), or set {ALLOW_INSECURE_ENV}=1 to accept the risk")


# --------------------------------------------------------------------------- the cluster's processes

def _running(root: Path, name: str) -> int | None:
    return running_pid(root / f"{name}.pid")


def _check_host(host: str, option: str) -> None:
    if binds_every_interface(host):
        raise UsageError(f"{option} {host or '(empty)'!r} listens on every network interface; give this node's "
                         f"private address")


def _start(root: Path, name: str, argv: list[str], ready, timeout_s: float) -> int:
    """Start `argv` detached with DIR's TLS settings; wait until `ready(proc)` holds; the pid."""
    proc = start_until_ready(argv, name=name, log=root / f"{name}.log", pid_file=root / f"{name}.pid", ready=ready,
                             timeout_s=timeout_s, env={**os.environ, **env(root)}, cwd=root)
    return proc.pid


def start_scheduler(root: str | os.PathLike, host: str, port: int = DEFAULT_PORT, timeout_s: float = 60.0) -> str:
    """`dask scheduler` on tls://HOST:PORT, no dashboard, detached (pid in DIR/dask-scheduler.pid); returns
    its address once it completes a TLS handshake with DIR's certificate. Already running: its address."""
    _check_host(host, "--host")
    files = tls_files(root)
    root = files.ca.parent
    address = f"tls://{f'[{host}]' if ':' in host else host}:{port}"
    if _running(root, SCHEDULER) is not None:
        return address
    if connect(host, port, timeout=1) is None:
        raise ServiceError(f"{host}:{port}: something already listens there; choose another --port")
    context = security(root).get_connection_args("client")["ssl_context"]

    def ready(_proc) -> bool:
        try:
            with socket.create_connection((host, port), timeout=2) as raw, context.wrap_socket(raw):
                return True
        except OSError:
            return False

    # --no-dashboard drops the dashboard app only: the HTTP server (metrics, /info pages) still starts, on every
    # interface unless given an address
    argv = [sys.executable, "-m", "dask", "scheduler", "--protocol", "tls", "--host", host, "--port", str(port),
            "--no-dashboard", "--dashboard-address", f"127.0.0.1:{HTTP_PORT}"]
    _start(root, SCHEDULER, argv, ready, timeout_s)
    return address


def start_worker(root: str | os.PathLike, scheduler: str, host: str | None = None, nworkers: int = 1,
                 death_timeout_s: float = 60.0, timeout_s: float = 120.0) -> int:
    """`dask worker SCHEDULER` (tls://) with `nworkers` single-threaded processes under a nanny (which restarts
    one that dies), listening on `host` (default: this node's address toward the scheduler), no dashboard,
    detached (pid in DIR/dask-worker.pid). Returns its pid once every process has registered. The workers end
    by themselves when their scheduler closes, or `death_timeout_s` after losing it (`ray down` stops only the
    head's processes)."""
    from distributed.comm.addressing import parse_address, parse_host_port
    from distributed.utils import get_ip

    if nworkers < 1:
        raise UsageError(f"--nworkers: must be >= 1, got {nworkers}")
    scheme, loc = parse_address(scheduler, strict=False)
    if scheme not in ENCRYPTED_SCHEMES or "://" not in scheduler:
        raise UsageError(f"--scheduler {scheduler}: expected the TLS scheduler's address, tls://HOST:PORT")
    scheduler_host, _ = parse_host_port(loc)
    host = host or get_ip(scheduler_host)
    _check_host(host, "--host")
    files = tls_files(root)
    root = files.ca.parent
    running = _running(root, WORKER)
    if running is not None:
        return running
    log = root / f"{WORKER}.log"
    registered_before = log_tail(log, 10**9).count("Registered to:")

    def ready(_proc) -> bool:
        return log_tail(log, 10**9).count("Registered to:") - registered_before >= nworkers

    argv = [sys.executable, "-m", "dask", "worker", scheduler, "--protocol", "tls", "--host", host,
            "--nworkers", str(nworkers), "--nthreads", "1", "--no-dashboard", "--dashboard-address", "127.0.0.1:0",
            "--death-timeout", f"{death_timeout_s:g}"]
    return _start(root, WORKER, argv, ready, timeout_s)


def stop(root: str | os.PathLike, grace_s: float = 15.0) -> list[int]:
    """Stop the worker and the scheduler DIR's pid files name (each process group and its descendants; a pid
    reused by another process since is left alone). Returns the pids stopped."""
    root = Path(root).expanduser().resolve()
    stopped: list[int] = []
    for name in (WORKER, SCHEDULER):
        stopped += stop_recorded(root / f"{name}.pid", grace_s=grace_s)
    return stopped


# --------------------------------------------------------------------------- command line

PROG = "python -m pipeline.services.dask_tls"


def build_parser() -> argparse.ArgumentParser:
    """The TLS launchers' command line; every option's help shows its default (`pipeline.runtime.help_format`)."""
    p = Parser(prog=PROG, description=__doc__.split("\n")[0],
               epilog=examples(f"{PROG} certs --root /shared/dask-tls --hosts 10.0.0.5,10.0.0.6",
                               f"{PROG} start-scheduler --root /shared/dask-tls --host 10.0.0.5"))
    sub = p.add_subparsers(dest="command", required=True)

    def command(name: str, text: str, *example: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=text, description=text, epilog=examples(*example))

    c = command("certs", "make DIR/ca.pem, dask.pem, dask-key.pem when absent",
                f"{PROG} certs --root /shared/dask-tls --hosts 10.0.0.5,10.0.0.6")
    c.add_argument("--hosts", default="", metavar="H1,H2",
                   help="names and addresses written into the certificate (informational; default: none)")
    c.add_argument("--days", type=int, default=VALID_DAYS, metavar="N", help="validity in days")
    e = command("env", "shell exports that give `dask` CLIs and clients DIR's TLS settings",
                f"{PROG} env --root /shared/dask-tls     # in a shell: eval \"$(...)\"")
    s = command("start-scheduler", "the TLS scheduler, detached",
                f"{PROG} start-scheduler --root /shared/dask-tls --host 10.0.0.5")
    s.add_argument("--host", required=True, metavar="IP", help="this node's private address")
    s.add_argument("--port", type=port_number, default=DEFAULT_PORT, metavar="PORT", help="port to listen on")
    w = command("start-worker", "this node's TLS workers, detached",
                f"{PROG} start-worker --root /shared/dask-tls --scheduler tls://10.0.0.5:{DEFAULT_PORT} --nworkers 4")
    w.add_argument("--scheduler", required=True, metavar="tls://HEAD:PORT", help="the scheduler to join")
    w.add_argument("--host", metavar="IP",
                   help="address to listen on (default: this node's address toward the scheduler)")
    w.add_argument("--nworkers", type=int, default=1, metavar="N", help="worker processes, one thread each")
    w.add_argument("--death-timeout", type=float, default=60.0, metavar="SECONDS",
                   help="seconds without a scheduler before exiting")
    t = command("stop", "stop the processes DIR's pid files name", f"{PROG} stop --root /shared/dask-tls")
    t.add_argument("--grace", type=float, default=15.0, metavar="SECONDS", help="seconds between SIGTERM and SIGKILL")
    for parser in (s, w):
        parser.add_argument("--timeout", type=float, default=120.0, metavar="SECONDS",
                            help="seconds to wait until it is ready")
    for parser in (c, s, w, t, e):
        parser.add_argument("--root", required=True, type=Path, metavar="DIR",
                            help="the TLS folder (also pid files and logs)")
    return p


def run(args: argparse.Namespace) -> None:
    import shlex

    if args.command == "certs":
        files, reason = ensure_certs(args.root, [h.strip() for h in args.hosts.split(",") if h.strip()], args.days)
        what = "kept" if reason is None else f"generated ({reason})"
        print(f"Dask TLS files {what}: {files.ca}, {files.cert}, {files.key}")
    elif args.command == "env":
        values = {**env(args.root), TLS_DIR_ENV: str(TlsFiles.of(args.root).ca.parent)}
        sys.stdout.write("".join(f"export {k}={shlex.quote(v)}\n" for k, v in values.items()))
    elif args.command == "start-scheduler":
        address = start_scheduler(args.root, args.host, args.port, timeout_s=args.timeout)
        print(f"Dask scheduler at {address} (pid file {TlsFiles.of(args.root).ca.parent / (SCHEDULER + '.pid')})")
    elif args.command == "start-worker":
        pid = start_worker(args.root, args.scheduler, args.host, args.nworkers, args.death_timeout, args.timeout)
        print(f"Dask worker of {args.scheduler} (pid {pid}, {args.nworkers} processes)")
    elif args.command == "stop":
        stopped = stop(args.root, grace_s=args.grace)
        print(f"stopped the Dask processes of {TlsFiles.of(args.root).ca.parent} (pids "
              f"{', '.join(map(str, stopped))})" if stopped else "no Dask process of this folder was running")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except ValueError as err:  # UsageError: bad option values, missing or unsafe files
        print(f"python -m pipeline.services.dask_tls {args.command}: error: {err}", file=sys.stderr)
        return 2
    except (ServiceError, OSError) as err:
        print(f"python -m pipeline.services.dask_tls {args.command}: failed: {str(err).strip()}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
