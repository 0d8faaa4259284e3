"""Per-task peak memory on Linux: reset the process's high-water mark, read it back after the work.

Dask workers run many tasks in one process, so the process's lifetime peak says nothing about
one task; resetting VmHWM (`/proc/self/clear_refs` = 5) before a task makes its peak readable.
"""

from __future__ import annotations

import resource

__all__ = ["reset_peak_rss", "status_kb"]


def reset_peak_rss() -> int:
    """Reset the kernel's high-water mark of this process (Linux) and return the current RSS in bytes."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass
    return status_kb("VmRSS") * 1024


def status_kb(field: str) -> int:
    """A /proc/self/status field in KiB (VmRSS, VmHWM); ru_maxrss where /proc is missing."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
