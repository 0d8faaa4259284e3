"""Start a service detached from the shell that started it, and stop exactly what was started.

A service is started in its own session (so a closed terminal or an ended `ray up` shell does not take it down,
and so it and everything it forks share one process group), with its output in a log file and its pid in a
file. Stopping takes that pid only: its process group and every descendant (Ray workers and job drivers start
their own sessions, so the group alone does not cover them), never a process found by name. A pid file whose
process started after the file was written belongs to a reused pid, and is left alone.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

__all__ = ["start_detached", "start_until_ready", "read_pid", "owned_process", "running_pid", "stop_recorded",
           "process_tree", "stop_tree", "stop_trees", "alive", "log_tail", "ServiceError"]


class ServiceError(RuntimeError):
    """A service could not be started or stopped; the message names the service, the file or the option."""


def _private_open(path, flags):
    """open()'s opener for the files of a service: created 0600 (an existing file keeps its mode)."""
    return os.open(path, flags, 0o600)


def start_detached(argv: list[str], *, log: Path, pid_file: Path | None = None,
                   env: Mapping[str, str] | None = None, cwd: Path | None = None,
                   umask: int | None = None) -> subprocess.Popen:
    """Run `argv` in a new session with stdout and stderr appended to `log`; write its pid to `pid_file`. The log
    and the pid file are created 0600; `umask` (e.g. 0o077) is the process's umask (None: this process's)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab", opener=_private_open) as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                env=dict(env) if env is not None else None, cwd=cwd, start_new_session=True,
                                close_fds=True, umask=-1 if umask is None else umask)
    if pid_file is not None:
        with open(pid_file, "w", encoding="utf-8", opener=_private_open) as f:
            f.write(f"{proc.pid}\n")
    return proc


def start_until_ready(argv: list[str], *, name: str, log: Path, pid_file: Path,
                      ready: Callable[[subprocess.Popen], bool | str], timeout_s: float,
                      env: Mapping[str, str] | None = None, cwd: Path | None = None, every: float = 0.2,
                      late: str = "was not ready within", umask: int | None = None) -> subprocess.Popen:
    """`start_detached`, then wait until `ready(proc)` is True; a str from it says why the service can never
    become ready (a refused password). When it exits, refuses or is late, what was started is stopped, its pid
    file removed, and ServiceError names `name`, what went wrong and the end of its log."""
    proc = start_detached(argv, log=log, pid_file=pid_file, env=env, cwd=cwd, umask=umask)
    deadline = time.monotonic() + timeout_s
    while True:
        answer = ready(proc)
        if answer is True:
            return proc
        failed = None
        if proc.poll() is not None:
            failed = f"exited with status {proc.returncode}"
        elif isinstance(answer, str):
            failed = answer
        elif time.monotonic() > deadline:
            failed = f"{late} {timeout_s:.0f} s"
        if failed:
            stop_tree(proc.pid, grace_s=5)
            pid_file.unlink(missing_ok=True)
            raise ServiceError(f"{name} {failed}; its log {log} ends:\n{log_tail(log)}")
        time.sleep(every)


def log_tail(path: Path, lines: int = 15) -> str:
    """The last `lines` lines of a service's log, for the error that says it failed."""
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


def read_pid(pid_file: Path) -> int | None:
    try:
        text = pid_file.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    if not text.isdigit():
        raise ServiceError(f"{pid_file}: not a pid file (holds {text[:40]!r})")
    return int(text)


def owned_process(pid: int, written_at: float):
    """The psutil process `pid` if it is still the one started when its pid was recorded at `written_at`
    (a process created later holds a reused pid); None when it is gone."""
    import psutil

    try:
        proc = psutil.Process(pid)
        if proc.create_time() > written_at + 1.0 or proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return proc
    except psutil.NoSuchProcess:
        return None


def running_pid(pid_file: Path) -> int | None:
    """The pid `pid_file` records if that process still runs and is the one started when the file was written
    (not a later process that reuses the pid); else None."""
    pid = read_pid(pid_file)
    if pid is None or owned_process(pid, pid_file.stat().st_mtime) is None:
        return None
    return pid


def stop_recorded(pid_file: Path, *, grace_s: float = 15.0) -> list[int]:
    """`stop_tree` of the process `pid_file` records (when it is still that process), then remove the file.
    Returns the pids stopped (empty when none was running)."""
    pid = running_pid(pid_file)
    stopped = stop_tree(pid, grace_s=grace_s) if pid is not None else []
    pid_file.unlink(missing_ok=True)
    return stopped


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants, parents first."""
    import psutil

    try:
        proc = psutil.Process(pid)
        return [pid, *(c.pid for c in proc.children(recursive=True))]
    except psutil.NoSuchProcess:
        return []


def alive(pids: Iterable[int]) -> list[int]:
    """Those of `pids` still running (zombies count as gone: they only wait for their parent to reap them)."""
    import psutil

    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.NoSuchProcess:
            pass
    return out


def stop_tree(pid: int, *, grace_s: float = 15.0, hard: bool = False) -> list[int]:
    """Stop `pid` (a session leader started by `start_detached`), its process group and its descendants:
    SIGTERM, then SIGKILL for whatever is left after `grace_s` (`hard`: SIGKILL at once, as a node crash).
    Returns the pids that were stopped."""
    return stop_trees([pid], grace_s=grace_s, hard=hard)


def stop_trees(pids: Iterable[int], *, grace_s: float = 15.0, hard: bool = False) -> list[int]:
    """`stop_tree` of several leaders at once (a cluster's nodes stop in parallel, not one grace period each)."""
    import psutil

    leaders = [p for p in pids if alive([p])]
    trees = {p: process_tree(p) for p in leaders}
    everyone = [q for tree in trees.values() for q in tree]
    groups = []
    for p in leaders:
        try:
            if os.getpgid(p) == p:
                groups.append(p)
        except ProcessLookupError:
            pass

    def signal_all(targets: Iterable[int], sig: int) -> None:
        for g in groups:
            try:
                os.killpg(g, sig)
            except (ProcessLookupError, PermissionError):
                pass
        for q in targets:
            try:
                os.kill(q, sig)
            except (ProcessLookupError, PermissionError):
                pass

    if hard:
        signal_all(everyone, signal.SIGKILL)
    else:
        signal_all(leaders, signal.SIGTERM)  # a leader (e.g. `ray start --block`) shuts its own children down
        deadline = time.monotonic() + grace_s
        while alive(leaders) and time.monotonic() < deadline:
            time.sleep(0.2)
        # descendants that outlived their parent (or started in sessions of their own) go too
        signal_all(alive(everyone), signal.SIGTERM)
        deadline = time.monotonic() + min(grace_s, 5.0)
        while alive(everyone) and time.monotonic() < deadline:
            time.sleep(0.2)
        signal_all(alive(everyone), signal.SIGKILL)
    deadline = time.monotonic() + 10.0
    while alive(everyone) and time.monotonic() < deadline:
        time.sleep(0.1)
    for q in everyone:  # reap our own children so they do not linger as zombies
        try:
            psutil.Process(q).wait(timeout=0)
        except (psutil.NoSuchProcess, psutil.TimeoutExpired, ChildProcessError):
            pass
    return everyone
