"""Resource limits for untrusted archives: a per-scan byte ceiling and bounded zip extraction.

A zip member's declared size costs nothing to read, and a 5 MB archive can declare (or hide)
gigabytes. So every member is checked against its header's expected byte count and the
ceiling before a byte is extracted, and the copy itself counts bytes as it goes: a member
whose declared size lies is cut off at the limit, its partial file removed, the scan failed.
"""

from __future__ import annotations

import os
import zipfile

__all__ = ["DEFAULT_MAX_SCAN_BYTES", "LimitError", "human_bytes", "check_ceiling", "copy_member"]

DEFAULT_MAX_SCAN_BYTES = 4 * 2**30
"""4 GiB: a generous ceiling for one CT scan (a 1024x1024x1000 int16 volume is 2 GiB)."""

_CHUNK = 1 << 22


class LimitError(ValueError):
    """A scan needs more bytes than its header or the per-scan ceiling allow."""


def human_bytes(n: int) -> str:
    """1536 -> '1.5 KiB' (with the exact count in messages where it matters)."""
    value = float(n)
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} bytes" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} bytes"  # pragma: no cover


def check_ceiling(what: str, n: int, max_scan_bytes: int) -> None:
    """Refuse `n` bytes for one scan when it is over the per-scan ceiling."""
    if n > max_scan_bytes:
        raise LimitError(f"{what} needs {n} bytes ({human_bytes(n)}), over the per-scan limit of "
                         f"{max_scan_bytes} bytes ({human_bytes(max_scan_bytes)}; --max-scan-bytes)")


def copy_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, target: str, limit: int) -> int:
    """Extract one member to `target`, streaming, and stop as soon as more than `limit` bytes
    come out (whatever the member declared); the partial file is removed on any failure."""
    written = 0
    try:
        with zf.open(info) as src, open(target, "xb") as dst:
            while chunk := src.read(min(_CHUNK, limit - written + 1)):
                written += len(chunk)
                if written > limit:
                    raise LimitError(f"member {info.filename!r} of {os.path.basename(zf.filename or '')} "
                                     f"produced more than {limit} bytes ({human_bytes(limit)}), more than it "
                                     f"declared or the scan may use; extraction stopped")
                dst.write(chunk)
    except BaseException:
        try:
            os.unlink(target)
        except OSError:
            pass
        raise
    return written
