"""Kill -9 at any step never wedges a store (issue 9, section 5).

`genesis convert` and `genesis patches pretrain` run as real processes with two Dask workers and
are killed with SIGKILL at several steps; then no process of the killed run may survive (the
process tree is recorded before the kill and every pid checked after), and a rerun must exit 0 and
leave a store identical to an uninterrupted run's: same files, same array bytes, same catalog or
index rows (timestamps aside).

Kills are timed by what the run shows, never by sleeping: conversions by files on disk and by two
source scans that are FIFOs while the run is killed (a worker hashing one blocks, like a worker
stuck on a dead disk, so the run cannot finish before the kill; they are NIfTI files because the
driver opens MetaImage files while discovering them); extractions by `GENESIS_STOP_AT`, which makes
the driver stop itself at a named step (`pipeline.runtime.hooks.stop_point`, active with GENESIS_TEST_HOOKS=1).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow.parquet as pq
import pytest
from conftest import write_mhd

from pipeline.cli import main
from pipeline.patches.config import PretrainPatchConfig
from pipeline.patches.extract import extract_pretrain
from pipeline.storage.locks import FileLock, LockBusyError
from pipeline.volume_store.convert import convert

REPO = Path(__file__).resolve().parent.parent
N_SCANS = 8
BLOCKED = ("1.2.840.6", "1.2.840.7")  # NIfTI scans, FIFOs during a killed conversion
TINY = PretrainPatchConfig(cube_size=(16, 16, 16), per_scan=6, border_yx=4, border_z=2, min_slices=16)
TINY_ARGS = ["--size", "16,16,16", "--per-scan", "6", "--border-yx", "4", "--border-z", "2", "--min-slices", "16"]


def lungish(rng: np.random.Generator, shape=(24, 48, 48)) -> np.ndarray:
    """Air on the left half (cubes accepted there), soft tissue on the right."""
    vol = np.full(shape, 40, dtype=np.int16)
    vol[:, :, : shape[2] // 2] = -850
    return (vol + rng.normal(0, 15, shape)).astype(np.int16)


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("kill_src") / "luna"
    rng = np.random.default_rng(9)
    for i in range(N_SCANS):
        name = f"1.2.840.{i}" + (".nii" if f"1.2.840.{i}" in BLOCKED else ".mhd")
        write_mhd(src / f"subset{i % 3}" / name, lungish(rng))
    return src


@pytest.fixture(scope="module")
def reference(sources, tmp_path_factory) -> tuple[Path, Path]:
    """An uninterrupted conversion and extraction: what every killed-and-rerun store must equal."""
    root = tmp_path_factory.mktemp("kill_ref")
    summary = convert([str(sources)], str(root / "vs"), workers=1, progress=False)
    assert summary.ok and len(summary.converted) == N_SCANS
    res = extract_pretrain(str(root / "vs"), TINY, out_root=str(root / "ps"), workers=1, progress=False)
    return root / "vs", res.path


# ---- running and killing ------------------------------------------------------------------------

def _launch(args: list[str], log: Path, **env) -> subprocess.Popen:
    environ = {**os.environ, "PYTHONHASHSEED": "0", "TQDM_DISABLE": "1", **env}
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], stdout=out, stderr=subprocess.STDOUT,
                                cwd=REPO, env=environ)


def _rerun(args: list[str]) -> str:
    """The command again, to the end, as a user reruns it: its exit status must be 0; returns its stdout."""
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=REPO, capture_output=True, timeout=180,
                          env={**os.environ, "PYTHONHASHSEED": "0", "TQDM_DISABLE": "1"})
    out, err = (done.stdout.decode("utf-8", errors="replace"), done.stderr.decode("utf-8", errors="replace"))
    assert done.returncode == 0, f"the rerun exited {done.returncode}:\n{out}\n{err[-3000:]}"
    return out


def _wait_for(what: str, ready, proc: subprocess.Popen, log: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"the run ended (exit {proc.returncode}) before {what}:\n"
                        + log.read_text(encoding="utf-8", errors="replace")[-2000:])
        if time.monotonic() > deadline:
            _kill_tree(proc)
            pytest.fail(f"no sign of {what} after {timeout:.0f} s:\n"
                        + log.read_text(encoding="utf-8", errors="replace")[-2000:])
        time.sleep(0.005)


def _stopped(proc: subprocess.Popen):
    def ready() -> bool:
        try:
            return psutil.Process(proc.pid).status() == psutil.STATUS_STOPPED
        except psutil.NoSuchProcess:
            return False
    return ready


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _kill_tree(proc: subprocess.Popen) -> None:
    """Clean-up after a failed wait: the run and everything it started."""
    with contextlib.suppress(psutil.NoSuchProcess):
        for p in psutil.Process(proc.pid).children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
    proc.kill()
    proc.wait(10)


def _kill(proc: subprocess.Popen, freeze_workers: bool = False) -> list[psutil.Process]:
    """SIGKILL the driver; returns every process it had started. With `freeze_workers` they are first
    stopped (SIGSTOP): stuck workers that cannot notice anything themselves."""
    tree = psutil.Process(proc.pid).children(recursive=True)
    if freeze_workers:
        for p in tree:
            p.send_signal(signal.SIGSTOP)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(10) == -signal.SIGKILL
    return tree


def _assert_none_survive(tree: list[psutil.Process], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while (alive := [p for p in tree if _alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    if alive:
        described = [(p.pid, " ".join(p.cmdline()[:4])) for p in alive]
        for p in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        pytest.fail(f"{len(alive)} processes of the killed run outlived it by {timeout:.0f} s: {described}")


# ---- comparing stores ---------------------------------------------------------------------------

def _files(root: Path) -> dict[str, Path]:
    """The store's files by relative path; hidden top-level entries (lock, records, staging) are the writer's."""
    return {str(p.relative_to(root)): p for p in sorted(root.rglob("*"))
            if p.is_file() and not p.relative_to(root).parts[0].startswith(".")}


def _without_times(value):
    if isinstance(value, dict):
        return {k: _without_times(v) for k, v in value.items() if not k.endswith("_at")}
    if isinstance(value, list):
        return [_without_times(v) for v in value]
    return value


def _assert_same_files(got: Path, ref: Path, tables: tuple[str, ...]) -> None:
    a, b = _files(got), _files(ref)
    assert sorted(a) == sorted(b)
    for rel, path in a.items():
        if path.name == "zarr.json":
            assert _without_times(json.loads(path.read_text(encoding="utf-8"))) == \
                _without_times(json.loads(b[rel].read_text(encoding="utf-8"))), rel
        elif rel in tables:  # parquet: the rows, with any timestamps left out
            ta, tb = pq.read_table(path).to_pandas(), pq.read_table(b[rel]).to_pandas()
            keep = [c for c in ta.columns if not c.endswith("_at")]
            assert ta[keep].sort_values(keep[0]).reset_index(drop=True).equals(
                tb[keep].sort_values(keep[0]).reset_index(drop=True)), rel
        else:  # array shards and metadata: byte for byte
            assert path.read_bytes() == b[rel].read_bytes(), rel


def _assert_same_volume_store(got: Path, ref: Path) -> None:
    _assert_same_files(got, ref, tables=("catalog.parquet",))
    for leftovers in (".staging", ".trash"):
        assert not (got / leftovers).exists() or not any((got / leftovers).iterdir()), leftovers


def _assert_same_patch_store(out_root: Path, ref: Path) -> None:
    assert sorted(p.name for p in out_root.iterdir() if not p.name.endswith(".lock")) == [ref.name]
    _assert_same_files(out_root / ref.name, ref, tables=("index.parquet",))


# ---- locks --------------------------------------------------------------------------------------

def test_lock_names_its_holder_and_dies_with_it_not_with_its_forks(tmp_path):
    path = tmp_path / "store.lock"
    child = subprocess.Popen([sys.executable, "-c", (
        "import os, sys, time; from pipeline.storage.locks import FileLock\n"
        f"lock = FileLock({str(path)!r}, 'a test build').acquire()\n"
        "if os.fork() == 0:\n    time.sleep(60)\n    os._exit(0)\n"  # a forked worker must not keep the lock
        "print('held', flush=True); time.sleep(60)")], cwd=REPO, stdout=subprocess.PIPE, text=True)
    fork = None
    try:
        assert child.stdout.readline().strip() == "held"
        (fork,) = psutil.Process(child.pid).children()
        with pytest.raises(LockBusyError) as busy:
            FileLock(path, "a second build").acquire()
        assert str(path) in str(busy.value) and f"pid {child.pid}" in str(busy.value)
        assert "a test build" in str(busy.value)
        assert FileLock(path, "probe").holder()["pid"] == child.pid
        child.send_signal(signal.SIGKILL)
        child.wait(10)
        # the fork is still running, but the lock went with its owner
        assert _alive(fork) and FileLock(path, "probe").holder() is None
        with FileLock(path, "the rerun") as lock:
            assert lock.holder()["purpose"] == "the rerun" and lock.holder()["pid"] == os.getpid()
        assert FileLock(path, "probe").holder() is None and path.exists()  # released, file kept
    finally:
        child.kill()
        child.wait(10)
        if fork is not None and _alive(fork):
            fork.kill()


# ---- patch extraction ---------------------------------------------------------------------------

def test_a_live_build_holds_its_store_and_says_who(reference, tmp_path, capsys):
    vs, ref = reference
    out = tmp_path / "ps"
    args = ["patches", "pretrain", "--store", str(vs), "--out", str(out), *TINY_ARGS, "--workers", "1",
            "--no-progress"]
    with FileLock(out / f".{ref.name}.lock", "a build in another terminal"):
        capsys.readouterr()
        assert main(args) == 3  # busy, as for a volume store: one line, no traceback
        err = capsys.readouterr().err
        assert f".{ref.name}.lock" in err and f"pid {os.getpid()}" in err and "another terminal" in err
        assert "Traceback" not in err and not (out / ref.name).exists()
    assert main(args) == 0
    _assert_same_patch_store(out, ref)


@pytest.mark.parametrize("damage", ["results without parts", "torn part", "unreadable result", "no zarr.json",
                                    "complete but not renamed"])
def test_every_half_built_state_is_resumed_or_rebuilt(reference, tmp_path, damage):
    """States a kill (or an older version's kill) leaves in `.building-*`: the next run finishes the store."""
    vs, ref = reference
    out = tmp_path / "ps"
    building = out / f".building-{ref.name}"
    if damage == "complete but not renamed":
        extract_pretrain(str(vs), TINY, out_root=str(out), workers=1, progress=False)
        (out / ref.name).rename(building)
        (building / "results").mkdir()  # killed just before publishing: the scaffolding is still there
        (building / "parts").mkdir()
    else:
        (building / "results").mkdir(parents=True)
        (building / "parts").mkdir()
        (building / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group", "attributes": {}}',
                                            encoding="utf-8")
    if damage == "results without parts":
        (building / "parts").rmdir()
        (building / "results" / "000000.json").write_text('{"slot": 0, "rows": [{}]}', encoding="utf-8")
    elif damage == "torn part":
        (building / "results" / "000001.json").write_text('{"slot": 1, "rows": [{}, {}]}', encoding="utf-8")
        np.save(building / "parts" / "000001.len.npy", np.array([10, 10]))
        (building / "parts" / "000001.bin").write_bytes(b"x" * 15)
    elif damage == "unreadable result":
        (building / "results" / "000002.json").write_text('{"slot": 2, "ro', encoding="utf-8")
        (building / "results" / "000003.1f2e.tmp").write_text("{", encoding="utf-8")
    elif damage == "no zarr.json":
        (building / "zarr.json").unlink()
    res = extract_pretrain(str(vs), TINY, out_root=str(out), workers=1, progress=False)
    assert res.path == out / ref.name and not res.reused and res.n_cubes == N_SCANS * TINY.per_scan
    _assert_same_patch_store(out, ref)


@pytest.mark.slow
@pytest.mark.parametrize("step, freeze", [("patches:started", False), ("patches:result", True),
                                          ("assemble", False), ("patches:publish", False)])
def test_killed_extraction_leaves_no_process_and_reruns_to_the_same_store(reference, tmp_path, step, freeze):
    vs, ref = reference
    out = tmp_path / "ps"
    args = ["patches", "pretrain", "--store", str(vs), "--out", str(out), *TINY_ARGS, "--workers", "2",
            "--no-progress"]
    proc = _launch(args, tmp_path / "killed.log", GENESIS_STOP_AT=step)
    _wait_for(f"the driver stopping at {step}", _stopped(proc), proc, tmp_path / "killed.log")
    tree = _kill(proc, freeze_workers=freeze)
    # the build lock went with the driver, even while (frozen) workers it had forked may still be alive
    assert FileLock(out / f".{ref.name}.lock", "probe").holder() is None
    if step != "patches:publish":  # by then the cluster is closed
        assert len(tree) >= 2  # the two workers were running
    _assert_none_survive(tree)
    assert (out / f".building-{ref.name}").is_dir() and not (out / ref.name).exists()
    assert f"built patch store {out / ref.name}" in _rerun(args)
    _assert_same_patch_store(out, ref)


# ---- conversion ---------------------------------------------------------------------------------

@contextlib.contextmanager
def _blocked_scans(sources: Path, aside: Path):
    """The BLOCKED scans replaced by FIFOs: a worker reading one waits for ever. The real files wait in
    `aside` (outside the sources) and come back by rename, mtimes kept."""
    files = [next(sources.rglob(f"{sid}.nii")) for sid in BLOCKED]
    aside.mkdir()
    for f in files:
        f.rename(aside / f.name)
        os.mkfifo(f)
    try:
        yield
    finally:
        for f in files:
            f.unlink()
            (aside / f.name).rename(f)


def _records(store: Path) -> int:
    return len(list((store / ".records").glob("*.json"))) if (store / ".records").is_dir() else 0


@pytest.mark.slow
@pytest.mark.parametrize("moment, freeze", [("workers starting", False), ("mid-way", True),
                                            ("workers blocked", False)])
def test_killed_conversion_leaves_no_process_and_reruns_to_the_same_store(sources, reference, tmp_path, moment,
                                                                          freeze):
    ref_vs, _ = reference
    store = tmp_path / "vs"
    args = ["convert", str(sources), "--store", str(store), "--workers", "2", "--no-progress"]
    with _blocked_scans(sources, tmp_path / "aside"):
        proc = _launch(args, tmp_path / "killed.log")
        driver = psutil.Process(proc.pid)
        ready = {"workers starting": lambda: len(driver.children()) >= 2,
                 "mid-way": lambda: _records(store) >= 2,
                 "workers blocked": lambda: _records(store) >= N_SCANS - len(BLOCKED)}[moment]
        _wait_for(moment, ready, proc, tmp_path / "killed.log")
        tree = _kill(proc, freeze_workers=freeze)
        assert len(tree) >= 2
        _assert_none_survive(tree)
    assert FileLock(store / ".lock", "probe").holder() is None
    assert "converted" in _rerun(args)
    _assert_same_volume_store(store, ref_vs)


# ---- fine-tuning runs (issue 18, items 11 and 12) -----------------------------------------------

def test_a_killed_finetune_is_closed_by_the_next_whose_summary_names_its_own_version(ray_local, task_stores,
                                                                                    tmp_path):
    from pipeline.finetune.run import finetune
    from pipeline.runtime.tracking import Tracker

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = Tracker(uri)
    args = ["finetune", "--task", "ncs", "--patches", task_stores["ncs"], "--epochs", "1", "--tracking-uri", uri,
            "--storage-path", str(tmp_path / "ray")]
    proc = _launch(args, tmp_path / "killed.log", GENESIS_STOP_AT="finetune:run")
    _wait_for("the fine-tuning's MLflow run", _stopped(proc), proc, tmp_path / "killed.log", timeout=120)
    _kill(proc)
    exp_id = tracker.experiment_id("genesis-finetune")
    (killed,) = tracker.search_runs([exp_id])
    assert killed.info.status == "RUNNING"  # what a SIGKILL leaves
    killed_id = killed.info.run_id
    # as if killed after registering its model
    client = tracker.client
    client.create_registered_model("genesis-ncs")
    gone = client.create_model_version("genesis-ncs", source=str(tmp_path / "m1"), run_id=killed_id)

    res = finetune(task_stores["ncs"], "ncs", "scratch", epochs=1, tracking_uri=uri, storage_path=str(tmp_path / "ray"),
                   ray_address=ray_local.get_runtime_context().gcs_address)
    assert res.error is None, res.report()
    run = tracker.run(killed_id)
    assert run.info.status == "KILLED" and "interrupted: its process was killed" in run.data.tags["error"]
    assert f"pid {proc.pid} is gone from" in run.data.tags["error"]
    versions = {v.version: v for v in tracker.search_model_versions("name = 'genesis-ncs'")}
    (own,) = versions.values()  # the killed run's version is gone: `latest` can never name it
    assert own.run_id == res.mlflow_run_id
    assert res.registered_version == str(own.version)
    report = res.report()
    assert f"closed run {killed_id}" in report and f"removed genesis-ncs version {gone.version}" in report
    assert f"  model: models:/genesis-ncs/{own.version}\n" in report and "latest" not in report


def test_a_summary_never_names_a_model_its_run_did_not_register(tmp_path):
    from pipeline.finetune.leftovers import registered_version
    from pipeline.finetune.run import FinetuneResult
    from pipeline.runtime.tracking import Tracker

    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db")
    exp_id = tracker.client.create_experiment("genesis-finetune")
    other, failed = (tracker.client.create_run(exp_id).info.run_id for _ in range(2))
    tracker.client.create_registered_model("genesis-ncc")
    tracker.client.create_model_version("genesis-ncc", source=str(tmp_path / "m"), run_id=other)
    tracker.mark_failed(failed, reason="it failed")
    assert registered_version(tracker, "ncc", other) == "1" and registered_version(tracker, "ncc", failed) is None
    res = FinetuneResult(name="f", task="ncc", init="scratch", path=str(tmp_path), mlflow_run_id=failed,
                         tracking_uri=tracker.uri, registered_as="genesis-ncc", metrics={}, error="it failed",
                         registered_version=registered_version(tracker, "ncc", failed))
    assert "  model: none registered by this run" in res.report() and "models:/" not in res.report()
