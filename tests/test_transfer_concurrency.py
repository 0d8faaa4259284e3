"""Two identical transfer grids at once (issue 18, item 5), and what a killed grid leaves (item 12).

A grid takes a lease of its key in the tracking store (`pipeline.storage.leases.ExperimentLease`): a second
identical grid exits 3 naming the holder and changes nothing; a dead holder's lease (pid gone from this host,
or expired) is taken over, and the killed attempt's RUNNING child runs are closed as KILLED with their
registered versions removed. Real processes, real MLflow on SQLite, the session's local Ray.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from pipeline.runtime.tracking import Tracker
from pipeline.storage.leases import LEASE_PREFIX, ExperimentLease, Holder, LeaseBusyError

ROOT = Path(__file__).resolve().parents[1]

RACER = """
import os, sys, time
from pipeline.runtime.tracking import Tracker
from pipeline.storage.leases import ExperimentLease, LeaseBusyError
uri, exp, go, done = sys.argv[1:5]
client = Tracker.at(uri).client
print("ready", flush=True)
while not os.path.exists(go):
    time.sleep(0.001)
lease = ExperimentLease(client, exp, "grid.k", "racer")
try:
    lease.acquire()
except LeaseBusyError as err:
    print("busy:", err, flush=True)
    sys.exit(3)
print("held", flush=True)
while not os.path.exists(done):
    time.sleep(0.01)
lease.release()
"""


def _claims(tracker: Tracker, exp_id: str) -> dict[str, str]:
    return {k: v for k, v in tracker.client.get_experiment(exp_id).tags.items() if k.startswith(LEASE_PREFIX)}


def test_of_racers_started_at_once_exactly_one_holds_the_lease_and_the_others_name_it(tmp_path):
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db")
    exp_id = tracker.client.create_experiment("race")
    go, done = tmp_path / "go", tmp_path / "done"
    procs = [subprocess.Popen([sys.executable, "-c", RACER, tracker.uri, exp_id, str(go), str(done)], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    try:
        assert all(p.stdout.readline().strip() == "ready" for p in procs)
        go.touch()  # all four claim at once
        lines = {p.pid: p.stdout.readline().strip() for p in procs}
        held = [pid for pid, line in lines.items() if line == "held"]
        assert len(held) == 1, lines
        for p in procs:
            if p.pid != held[0]:
                assert p.wait(60) == 3
                assert f"is held by pid {held[0]} on " in lines[p.pid] and "(racer)" in lines[p.pid], lines[p.pid]
        assert [Holder.from_json(v).pid for v in _claims(tracker, exp_id).values()] == held
    finally:
        done.touch()
        for p in procs:
            p.wait(60)
    assert _claims(tracker, exp_id) == {}  # released


def _dead_pid() -> int:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    return gone.pid


def test_a_dead_or_expired_holder_is_taken_over_and_a_live_one_elsewhere_is_not(tmp_path):
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db")
    exp_id = tracker.client.create_experiment("grids")
    here = Holder.mine("genesis transfer", 600)
    dead_here = Holder(**{**here.__dict__, "token": "a" * 16, "pid": _dead_pid()})
    expired = Holder(**{**here.__dict__, "token": "b" * 16, "host": "elsewhere.example", "pid": 4242,
                        "expires": time.time() - 5})
    live_elsewhere = Holder(**{**here.__dict__, "token": "c" * 16, "host": "elsewhere.example", "pid": 4343})
    for h in (dead_here, expired, live_elsewhere):
        tracker.client.set_experiment_tag(exp_id, f"{LEASE_PREFIX}grid.k.{h.token}", h.to_json())

    lease = ExperimentLease(tracker.client, exp_id, "grid.k", "genesis transfer", what="transfer grid k",
                            pause_s=(0.05, 0.1))
    with pytest.raises(LeaseBusyError, match="transfer grid k is held by pid 4343 on elsewhere.example"):
        lease.acquire()
    assert len(_claims(tracker, exp_id)) == 3  # a busy attempt leaves nothing of its own

    tracker.client.delete_experiment_tag(exp_id, f"{LEASE_PREFIX}grid.k.{live_elsewhere.token}")
    taken = lease.acquire()
    try:
        reasons = {h.token: why for h, why in taken}
        assert reasons.keys() == {dead_here.token, expired.token}
        assert reasons[dead_here.token] == f"pid {dead_here.pid} is gone from {here.host}"
        assert "expired" in reasons[expired.token] and "elsewhere.example" in reasons[expired.token]
        assert [Holder.from_json(v).pid for v in _claims(tracker, exp_id).values()] == [os.getpid()]
    finally:
        lease.release()
    assert _claims(tracker, exp_id) == {}


# ---- real grids -------------------------------------------------------------------------------------------------

def _genesis(args: list[str], log: Path, **env) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-m", "pipeline.cli", "transfer", *args], cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1", **env})


def _wait(proc: subprocess.Popen, log: Path, timeout: float = 600) -> tuple[int, str]:
    try:
        code = proc.wait(timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return code, log.read_text(encoding="utf-8", errors="replace")


def test_two_identical_grids_at_once_one_exits_3_and_a_killed_holder_is_taken_over(ray_local, task_stores,
                                                                                     tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = Tracker(uri)  # the database exists before the grids start (its concurrent creation is item 6)
    args = ["--tasks", "ncs", "--patches", f"ncs={task_stores['ncs']}", "--inits", "scratch", "--seeds", "0",
            "--epochs", "1", "--tracking-uri", uri, "--storage-path", str(tmp_path / "ray"),
            "--results", str(tmp_path / "results"), "--ray-address", ray_local.get_runtime_context().gcs_address]

    a, b = _genesis(args, tmp_path / "a.log"), _genesis(args, tmp_path / "b.log")
    (code_a, out_a), (code_b, out_b) = _wait(a, tmp_path / "a.log"), _wait(b, tmp_path / "b.log")
    assert sorted([code_a, code_b]) == [0, 3], (out_a[-2000:], out_b[-2000:])
    winner, busy = (a, out_b) if code_a == 0 else (b, out_a)
    line = busy.strip().splitlines()[-1]
    assert line.startswith("genesis transfer: transfer grid ") and f"is held by pid {winner.pid} on " in line, busy
    assert "Traceback" not in busy and "fine-tunings" not in busy  # it changed nothing, started nothing

    exp_id = tracker.experiment_id("genesis-transfer")
    (parent,) = tracker.search_runs([exp_id], "tags.`genesis.grid_parent` != ''")
    children = tracker.search_runs([exp_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert [c.info.status for c in children] == ["FINISHED"]  # one fine-tuning, run once
    assert parent.info.status == "FINISHED" and parent.data.tags["genesis.attempts"] == "1"
    assert _claims(tracker, exp_id) == {}
    (kept,) = tracker.search_model_versions("name = 'genesis-ncs'")

    # a grid killed while it held the lease, whose child had registered its model before the kill
    killed = _genesis(args, tmp_path / "killed.log", GENESIS_STOP_AT="transfer:leased")
    deadline = time.monotonic() + 120
    while psutil.Process(killed.pid).status() != psutil.STATUS_STOPPED:
        assert killed.poll() is None and time.monotonic() < deadline, (tmp_path / "killed.log").read_text()
        time.sleep(0.05)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    assert [Holder.from_json(v).pid for v in _claims(tracker, exp_id).values()] == [killed.pid]
    tags = {k: v for k, v in children[0].data.tags.items() if k != "mlflow.runName"}
    orphan = tracker.client.create_run(exp_id, run_name="killed-child", tags=tags).info.run_id
    left = tracker.client.create_model_version("genesis-ncs", source=str(tmp_path / "model"), run_id=orphan)

    code, out = _wait(_genesis(args, tmp_path / "rerun.log"), tmp_path / "rerun.log")
    assert code == 0, out[-3000:]
    assert f"took over the grid's lease from pid {killed.pid} on " in out and "is gone from" in out, out[-3000:]
    assert f"closed run {orphan} (killed-child) as KILLED: interrupted" in out
    assert f"removed genesis-ncs version {left.version}, registered by that run" in out
    assert "1 fine-tunings, 1 already finished" in out
    assert tracker.run_status(orphan) == "KILLED" and "interrupted" in tracker.run(orphan).data.tags["error"]
    assert [v.version for v in tracker.search_model_versions("name = 'genesis-ncs'")] == [kept.version]
    assert tracker.run(parent.info.run_id).data.tags["genesis.attempts"] == "2"  # the killed one never got there
    assert _claims(tracker, exp_id) == {}

