"""Files only their owner may read (0600): tokens, passwords, keys, connection details that carry them.

Created with the mode set at open (never written first and chmod-ed after), and never rewritten when present,
so a cluster restarted on the same folder keeps its token and its MLflow password. A service's whole folder (the
MLflow launcher's ROOT, the local cluster's folder) is made private by `private_tree`: the folder and every folder
in it 0700, every file 0600, and the service started with umask 077 (`PRIVATE_UMASK`) so what it writes later is
private too.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

__all__ = ["write_private", "ensure_secret", "read_secret", "private_tree", "PRIVATE_UMASK"]

PRIVATE_UMASK = 0o077
"""The umask of a service's processes: files 0600 and folders 0700 whatever mode they ask for."""


def write_private(path: Path, text: str) -> None:
    """(Re)write `path` with mode 0600, atomically (a reader sees the old or the new text, never a part)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_secret(path: Path) -> str:
    """The secret in `path`; refuses a file others may read (someone else could have it too)."""
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise PermissionError(f"{path}: readable by others (mode {stat.filemode(mode)}); chmod 600 it or remove it "
                              f"to have a new one generated")
    value = path.read_text(encoding="utf-8").strip()
    if not value:
        raise ValueError(f"{path}: empty; remove it to have a new one generated")
    return value


def ensure_secret(path: Path, nbytes: int = 32) -> str:
    """The secret in `path`, generated (`nbytes` random bytes as hex) into a new 0600 file when absent."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process made it first: use theirs
            return read_secret(path)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(secrets.token_hex(nbytes) + "\n")
    return read_secret(path)


def private_tree(root: Path) -> None:
    """Create `root` if missing and make it and everything under it its owner's only: folders 0700, files 0600
    (the execute bits of a file are kept for its owner). Symbolic links are not followed. A path whose mode
    cannot be changed (another user's) raises PermissionError naming it."""
    root = Path(root)
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    _private(root, 0o700)
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            _private(Path(folder) / name, 0o700)
        for name in files:
            _private(Path(folder) / name, 0o600)


def _private(path: Path, mode: int) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:  # removed meanwhile (a server rotating a file)
        return
    if stat.S_ISLNK(st.st_mode):
        return
    want = mode | (st.st_mode & stat.S_IXUSR if stat.S_ISREG(st.st_mode) else 0)
    if stat.S_IMODE(st.st_mode) == want:
        return
    try:
        os.chmod(path, want)  # not a link: checked just above
    except FileNotFoundError:
        return
    except PermissionError as err:
        raise PermissionError(f"{path}: cannot make it private (mode {stat.filemode(st.st_mode)}, owner uid "
                              f"{st.st_uid}): {err.strerror}") from None
