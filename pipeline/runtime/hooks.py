"""Test-only hooks, in one place and inert in production.

Every hook does nothing unless the environment variable GENESIS_TEST_HOOKS is `1` in the process that reaches
it (tests set it in `tests/conftest.py`; Ray workers inherit it from the process that started Ray). An operator
never sets it: with it unset, a hook costs one environment lookup and no code path changes.

- `stop_point(name)`: with GENESIS_STOP_AT=name too, the process says so on stderr and stops itself (SIGSTOP) at
  that named step of a store build, so a kill test can record its process tree and kill it at exactly this step.
- `worker_started(fault, rank)`: with `fault["attempts"]` (a file), one line per Ray Train worker start, so a test
  can count the restarts of a run.
- `after_epoch(fault, rank, epoch)`: with `fault = {"rank", "epoch", "marker"}`, SIGKILLs that worker once, after
  that epoch's checkpoint (the marker file makes it happen once across restarts).

`fault` is the `fault_injection` dict a test hands to `pretrain`, `finetune` or `transfer`; production callers
leave it None.
"""

from __future__ import annotations

import os
import signal
import sys

__all__ = ["ENABLE_ENV", "STOP_AT_ENV", "enabled", "stop_point", "worker_started", "after_epoch"]

ENABLE_ENV = "GENESIS_TEST_HOOKS"
STOP_AT_ENV = "GENESIS_STOP_AT"


def enabled() -> bool:
    """Whether test hooks may act in this process."""
    return os.environ.get(ENABLE_ENV) == "1"


def stop_point(name: str) -> None:
    """A named step where kill tests freeze a build (GENESIS_STOP_AT=name)."""
    if enabled() and os.environ.get(STOP_AT_ENV) == name:
        print(f"genesis: stopped at {name} ({STOP_AT_ENV})", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGSTOP)


def worker_started(fault: dict | None, rank: int) -> None:
    """Append `rank` to the file `fault["attempts"]`, one line per worker start."""
    attempts = (fault or {}).get("attempts")
    if attempts and enabled():
        with open(attempts, "a", encoding="utf-8") as f:
            f.write(f"{rank}\n")


def after_epoch(fault: dict | None, rank: int, epoch: int) -> None:
    """SIGKILL this worker once, when it is `fault["rank"]` after epoch `fault["epoch"]`. It first waits until Ray
    Train has committed every report made so far: the controller polls workers every 2 s, so a worker killed right
    after reporting could take unregistered checkpoints with it and the test would see a restart from epoch 0
    (seen once in CI). A real crash mid-epoch comes long after the last report was committed."""
    if not fault or not enabled() or rank != fault.get("rank") or epoch != fault.get("epoch"):
        return
    if os.path.exists(fault["marker"]):
        return
    import ray.train

    ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED,
                                           timeout_s=120)
    open(fault["marker"], "w").close()
    os.kill(os.getpid(), 9)
