"""Usage errors are errors (exit 2, one line naming the option and the problem), found before Ray, Dask or an
MLflow run start; deterministic errors inside Ray Train workers end the run at once, its MLflow run FAILED."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from conftest import write_mhd

from pipeline.cli import build_parser, classify, main
from pipeline.patches.config import PretrainPatchConfig
from pipeline.patches.extract import extract_pretrain
from pipeline.cluster import dask_scheduler, max_failures, ray_cluster, ray_resources
from pipeline.runtime.errors import UsageError, deterministic_cause, failure_reason
from pipeline.runtime.paths import SHARED_ROOT_ENV, in_ray_job, output_dir, shared_path
from pipeline.runtime.tracking import MLFLOW_HTTP_RETRIES, PROBE_PATH, check_uri
from pipeline.training.config import tiny
from pipeline.volume_store.convert import convert

CUBE = PretrainPatchConfig(cube_size=(16, 16, 16), per_scan=4, border_yx=4, border_z=2, min_slices=16)


@pytest.fixture(scope="module")
def patch_store(tmp_path_factory) -> str:
    """A pretraining store of 5 small scans (subsets 0-3 train, 5 validation): 16 train cubes."""
    root = tmp_path_factory.mktemp("usage_store")
    rng = np.random.default_rng(0)
    for i, subset in enumerate([0, 1, 2, 3, 5]):
        vol = np.full((24, 40, 40), 40, dtype=np.int16)
        vol[:, :, :22] = -850
        write_mhd(root / "src" / f"subset{subset}" / f"1.2.{i}.mhd", (vol + rng.normal(0, 10, vol.shape)).astype(np.int16))
    assert convert([str(root / "src")], str(root / "vs"), workers=1, progress=False).ok
    return str(extract_pretrain(str(root / "vs"), CUBE, out_root=str(root / "ps"), workers=1, progress=False).path)


@pytest.fixture
def read_only_dir(tmp_path) -> Path:
    """A folder this process cannot write in: mode 555, or (root ignores modes) a sysfs folder."""
    if os.geteuid() == 0:
        path = Path("/sys/fs")
        if not path.is_dir():
            pytest.skip("running as root without /sys/fs: no folder root cannot write in")
        yield path
        return
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    yield ro
    ro.chmod(0o755)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one_error_line(err: str, *needles: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


_RAY_INITS: list = []


@pytest.fixture(autouse=True)
def _count_ray_inits(monkeypatch):
    """Records every `ray.init` of the test (the calls go through to Ray unchanged). The session's own Ray may
    already be up when this module runs, so "no Ray started" is "no ray.init called", not "Ray not running"."""
    import ray

    real = ray.init
    _RAY_INITS.clear()

    def counting(*args, **kwargs):
        _RAY_INITS.append(kwargs.get("address"))
        return real(*args, **kwargs)

    monkeypatch.setattr(ray, "init", counting)
    yield


def _no_ray_started():
    return not _RAY_INITS


# --------------------------------------------------------------------------- paths


def test_store_path_that_is_a_file_under_a_file_or_read_only_is_exit_2(tmp_path, read_only_dir, capsys):
    src = tmp_path / "luna" / "subset0"
    write_mhd(src / "1.2.3.mhd", np.zeros((8, 16, 16), np.int16))
    afile = tmp_path / "afile"
    afile.write_text("not a store", encoding="utf-8")
    cases = [(afile, "is a file, not a folder"), (afile / "store", "is a file, so no folder can be made under it"),
             (read_only_dir / "store", "cannot write in")]
    for store, problem in cases:
        capsys.readouterr()
        code = main(["convert", str(tmp_path / "luna"), "--store", str(store), "--workers", "1", "--no-progress"])
        assert code == 2, (store, capsys.readouterr())
        _one_error_line(capsys.readouterr().err, "genesis convert: error: --store", str(store), problem)
    assert not (read_only_dir / "store").exists()
    # the other commands that write a folder or file check it the same way
    for argv, option in ((["patches", "pretrain", "--store", str(tmp_path / "vs"), "--out", str(afile)], "--out"),
                         (["sample-data", str(afile / "x"), "--no-real"], "DIR"),
                         (["patches", "preview", str(tmp_path / "ps"), "--out", str(afile / "p.png")], "--out"),
                         (["stores", "preview", str(tmp_path / "vs"), "1.2.3", "--out", str(tmp_path)], "--out")):
        assert main(argv) == 2, argv
        _one_error_line(capsys.readouterr().err, option)


def test_read_only_storage_path_fails_before_an_mlflow_run_exists(patch_store, tmp_path, read_only_dir, capsys):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    for storage in (read_only_dir / "ray_results", tmp_path / "afile" / "ray_results"):
        (tmp_path / "afile").write_text("x", encoding="utf-8")
        t0 = time.perf_counter()
        code = main(["pretrain", "--patches", patch_store, "--tracking-uri", uri, "--storage-path", str(storage)])
        assert code == 2
        assert time.perf_counter() - t0 < 20
        _one_error_line(capsys.readouterr().err, "genesis pretrain: error: --storage-path", str(storage))
    assert not (tmp_path / "mlflow.db").exists()  # no MLflow run was created (none left RUNNING)
    assert _no_ray_started()


# --------------------------------------------------------------------------- tracking server


def test_unreachable_tracking_server_fails_in_seconds_naming_the_uri(patch_store, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    uri = f"http://127.0.0.1:{_closed_port()}"
    t0 = time.perf_counter()
    code = main(["pretrain", "--patches", patch_store, "--tracking-uri", uri, "--storage-path", str(tmp_path / "r")])
    took = time.perf_counter() - t0
    assert code == 2 and took < 20, took
    _one_error_line(capsys.readouterr().err, f"--tracking-uri {uri}", "does not answer")
    assert not (tmp_path / "r").exists() and _no_ray_started()
    # MLflow's own retries are bounded for our processes (its default: 7 retries, about 4 minutes)
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == MLFLOW_HTTP_RETRIES
    # a server that accepts the connection and never answers: refused after the probe's timeout
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        t0 = time.perf_counter()
        with pytest.raises(UsageError, match="does not answer"):
            check_uri(f"http://127.0.0.1:{silent.getsockname()[1]}", timeout=0.5)
        assert time.perf_counter() - t0 < 5
    # the same check for the commands that only talk to MLflow
    assert main(["transfer", "show", "0" * 32, "--tracking-uri", uri]) == 2
    _one_error_line(capsys.readouterr().err, "genesis transfer: error: --tracking-uri", uri)


# --------------------------------------------------------------------------- numbers and data


def test_numbers_out_of_range_are_refused_before_ray(patch_store, tmp_path, capsys):
    for argv, option in ((["pretrain", "--patches", patch_store, "--gpus-per-worker", "-1"], "--gpus-per-worker"),
                         (["pretrain", "--patches", patch_store, "--gpus-per-worker", "1.5"], "--gpus-per-worker"),
                         (["pretrain", "--patches", patch_store, "--max-failures", "-2"], "--max-failures"),
                         (["finetune", "--task", "ecc", "--patches", patch_store, "--label-fraction", "0"],
                          "--label-fraction"),
                         (["transfer", "--patches", str(tmp_path), "--gpus-per-trial", "-0.5"], "--gpus-per-trial")):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
        _one_error_line(capsys.readouterr().err, f"argument {option}")
    # the stage functions check the same, for callers that are not the command line
    from pipeline.training.pretrain import pretrain

    with pytest.raises(UsageError, match="--gpus-per-worker -1: must be >= 0"):
        pretrain(patch_store, tiny(), gpus_per_worker=-1, tracking_uri=f"sqlite:///{tmp_path}/m.db")
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="local Ray would have 0 GPU"):
            ray_resources(workers=1, gpus_per_worker=1, ray_address=None)
    assert not (tmp_path / "m.db").exists() and _no_ray_started()


def test_empty_or_too_small_patch_store_is_refused_before_ray(patch_store, tmp_path, capsys):
    import shutil

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    common = ["--tracking-uri", uri, "--storage-path", str(tmp_path / "r")]
    # 16 training cubes: a global batch of 32 is more than the store holds
    assert main(["pretrain", "--patches", patch_store, "--batch-size", "32", *common]) == 2
    _one_error_line(capsys.readouterr().err, patch_store, "16 cubes, fewer than one global batch of 32")
    # a batch of 6 does not split over 4 workers
    assert main(["pretrain", "--patches", patch_store, "--batch-size", "6", "--workers", "4", *common]) == 2
    _one_error_line(capsys.readouterr().err, "does not split evenly across 4 Ray workers")
    # an empty store: its index holds no cube
    empty = tmp_path / "empty"
    shutil.copytree(patch_store, empty)
    index = pd.read_parquet(empty / "index.parquet")
    index.iloc[:0].to_parquet(empty / "index.parquet")
    assert main(["pretrain", "--patches", str(empty), *common]) == 2
    _one_error_line(capsys.readouterr().err, "the train split has 0 cubes")
    assert not (tmp_path / "mlflow.db").exists() and _no_ray_started()


# --------------------------------------------------------------------------- Ray jobs


def test_relative_paths_inside_a_ray_job_are_refused_or_resolved_against_the_shared_root(patch_store, tmp_path,
                                                                                         monkeypatch, capsys):
    monkeypatch.setenv("RAY_JOB_SUBMISSION_ID", "raysubmit_test")
    monkeypatch.delenv(SHARED_ROOT_ENV, raising=False)
    assert in_ray_job()
    for argv, option in ((["pretrain", "--patches", patch_store, "--storage-path", "results"], "--storage-path 'results'"),
                         (["pretrain", "--patches", patch_store, "--storage-path", str(tmp_path)],
                          "--tracking-uri (default"),
                         (["convert", str(tmp_path), "--store", "vs"], "--store 'vs'"),
                         (["reproduce", "--out", "out"], "--out 'out'")):
        assert main(argv) == 2, argv
        _one_error_line(capsys.readouterr().err, option, "inside a Ray job", SHARED_ROOT_ENV)
    monkeypatch.setenv(SHARED_ROOT_ENV, str(tmp_path))
    assert output_dir("results", "--storage-path") == str(tmp_path / "results")
    assert check_uri("sqlite:///runs/mlflow.db") == f"sqlite:///{tmp_path}/runs/mlflow.db"
    assert check_uri(None) == f"sqlite:///{tmp_path}/mlflow.db"
    assert shared_path("/abs/store", "--store") == "/abs/store"
    monkeypatch.setenv(SHARED_ROOT_ENV, "relative/root")
    with pytest.raises(UsageError, match="must be an absolute path"):
        shared_path("x", "--out")
    monkeypatch.delenv("RAY_JOB_SUBMISSION_ID")
    assert not in_ray_job()
    monkeypatch.chdir(tmp_path)
    assert shared_path("x", "--out") == str(tmp_path / "x")  # outside a job: the current folder


# --------------------------------------------------------------------------- the command line


def test_exit_statuses_one_line_and_debug_traceback(tmp_path, capsys):
    assert classify(UsageError("--out x: bad")) == (2, "error: --out x: bad")
    assert classify(ValueError("bad value\nsecond line")) == (2, "error: bad value")
    assert classify(RuntimeError("the work failed")) == (1, "failed: RuntimeError: the work failed")
    code, line = classify(TypeError("a bug"))
    assert code == 1 and "TypeError: a bug" in line and "--debug" in line
    from pipeline.volume_store.errors import StoreLockedError

    assert classify(StoreLockedError("busy"))[0] == 3
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["pretrain", "--patches", str(empty)]) == 2
    _one_error_line(capsys.readouterr().err, "genesis pretrain: error:", "not a patch-store")
    for argv in (["--debug", "pretrain", "--patches", str(empty)], ["pretrain", "--debug", "--patches", str(empty)]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "Traceback" in err and err.strip().splitlines()[-1].startswith("genesis pretrain: error:")
    # argparse errors: one line and the help to read, exit 2
    with pytest.raises(SystemExit) as exc:
        main(["pretrain"])
    assert exc.value.code == 2
    _one_error_line(capsys.readouterr().err, "--patches", "genesis pretrain --help")


def test_wiring_for_store_verification_and_scan_size_limit():
    from pipeline.cli import _bytes

    assert _bytes("4G") == 4 << 30 and _bytes("512M") == 512 << 20 and _bytes("1000") == 1000
    assert _bytes("1.5GiB") == 3 << 29 and _bytes("2kb") == 2048
    for bad in ("4X", "-1G", "0", "G"):
        with pytest.raises(Exception):
            _bytes(bad)
    args = build_parser().parse_args(["convert", "src", "--store", "s", "--max-scan-bytes", "4G"])
    assert args.max_scan_bytes == 4 << 30
    args = build_parser().parse_args(["stores", "verify", "s", "--repair", "--no-progress"])
    assert (args.stores_command, args.store, args.repair, args.no_progress) == ("verify", "s", True, True)


# --------------------------------------------------------------------------- inside Ray Train


def test_failure_policy_retries_worker_deaths_but_not_deterministic_errors(tmp_path):
    """Through Ray Train's public WorkerGroupError (`worker_failures`: rank -> error): a deterministic worker error
    is named with its rank and "not retried"; a runtime error or a worker death is not deterministic. The train
    function's wrapper raises what Ray should retry, and returns (the run ends) when a peer has written a
    deterministic error; that it ends the run at once is the real Ray test below."""
    from ray.exceptions import RayActorError
    from ray.train import WorkerGroupError

    from pipeline.runtime.driver import FAILURE_KEY, EndOnDeterministicError

    def group_error(exc):
        wrapper = RuntimeError("Traceback ...")  # Ray's wrapper of a worker's error keeps it as the cause
        wrapper.__cause__ = exc
        return WorkerGroupError("boom", {1: wrapper})

    deterministic = group_error(ValueError("train split has 0 cubes"))
    assert deterministic_cause(deterministic)[0] == 1
    reason = failure_reason(deterministic)
    assert reason == "ValueError: train split has 0 cubes (worker rank 1); a deterministic error: not retried"
    assert deterministic_cause(group_error(RuntimeError("NCCL timeout"))) is None
    assert deterministic_cause(WorkerGroupError("dead", {0: RayActorError()})) is None
    assert failure_reason(group_error(OSError("disk"))).startswith("OSError: disk (worker rank 1; after the")

    def nccl_timeout(config):
        raise RuntimeError("NCCL timeout")

    failure_file = tmp_path / "failure.json"
    with pytest.raises(RuntimeError, match="NCCL timeout"):  # raised: Ray Train retries it
        EndOnDeterministicError(nccl_timeout)({FAILURE_KEY: str(failure_file)})
    failure_file.write_text(json.dumps({"reason": reason}), encoding="utf-8")
    EndOnDeterministicError(nccl_timeout)({FAILURE_KEY: str(failure_file)})  # a peer's echo: the run ends


@pytest.mark.parametrize("workers", [1, 2])
def test_deterministic_error_inside_a_worker_is_not_retried_and_fails_the_run(ray_local, patch_store, tmp_path,
                                                                              workers):
    """A store whose every cube shard has a flipped byte: the driver's checks (index, shapes) pass, every read in
    a worker fails its CRC32C the same way, so the run must end at the first failure, not after --max-failures
    restarts. With two workers the group is torn down (no peer left waiting in a collective) and a restarted
    group ends at once: each rank trained once."""
    import shutil

    from pipeline.training.pretrain import pretrain

    broken = tmp_path / "broken"
    shutil.copytree(patch_store, broken)
    shards = sorted(p for p in (broken / "cubes" / "c").rglob("*") if p.is_file())
    assert shards
    for shard in shards:
        data = bytearray(shard.read_bytes())
        data[len(data) // 3] ^= 0xFF  # inside the first cube's chunk, not the shard index at the end
        shard.write_bytes(bytes(data))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    attempts = tmp_path / "attempts.txt"
    config = tiny().with_overrides(base_channels=2, batch_size=4, steps_per_epoch=1, epochs=1, val_cubes=4,
                                   figure_cubes=1, read_block=4)
    res = pretrain(str(broken), config, workers=workers, tracking_uri=uri, storage_path=str(tmp_path / "ray"),
                   max_failures=3, system_metrics=False, register_as="genesis-usage-test",
                   fault_injection={"rank": -1, "epoch": -1, "marker": str(tmp_path / "m"), "attempts": str(attempts)})
    # one start of each rank: nothing trained again
    assert sorted(attempts.read_text(encoding="utf-8").split()) == [str(r) for r in range(workers)]
    assert res.error and "not retried" in res.error, res.error
    assert res.error.split(":")[0] in ("ValueError", "StoreIntegrityError"), res.error  # a checksum error
    run = mlflow.MlflowClient(tracking_uri=uri).get_run(res.mlflow_run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["error"] == res.error
    meta = json.loads((tmp_path / "ray" / res.name / "genesis_run.json").read_text(encoding="utf-8"))
    assert meta["mlflow_run_id"] == res.mlflow_run_id


# --------------------------------------------------------------------------- issue 9 section 6: hostile findings

REPO = Path(__file__).resolve().parents[1]


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`genesis ARGS` in a process of its own: the real exit status and everything it prints on stderr."""
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=REPO, capture_output=True,
                          encoding="utf-8", errors="replace", timeout=timeout)


def _usage_exit(argv: list[str], capsys, *needles: str) -> str:
    """`main(argv)` ends with exit status 2 and one line naming `needles` (argparse's SystemExit or a return)."""
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    assert code == 2, (argv, capsys.readouterr())
    return _one_error_line(capsys.readouterr().err, *needles)


@pytest.fixture
def http_404(tmp_path):
    """A web server that answers every path with 404: a wrong port or another service, not MLflow."""
    import functools
    import http.server
    import threading

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    (tmp_path / "www").mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(Quiet, directory=str(tmp_path / "www")))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(5)


def test_inf_and_nan_are_refused_for_every_float_option(patch_store, tmp_path, capsys):
    """Finding 1: `--gpus-per-worker inf` was an OverflowError traceback (exit 1); every float option of every
    subcommand now refuses inf and nan in one line naming it (exit 2)."""
    vs = str(Path(patch_store).parents[1] / "vs")
    cases = []
    for bad in ("inf", "nan", "-inf"):
        cases += [(["pretrain", "--patches", patch_store, "--gpus-per-worker", bad], "--gpus-per-worker"),
                  (["finetune", "--task", "ecc", "--patches", patch_store, "--gpus-per-worker", bad],
                   "--gpus-per-worker"),
                  (["finetune", "--task", "ecc", "--patches", patch_store, "--label-fraction", bad],
                   "--label-fraction"),
                  (["transfer", "--patches", str(tmp_path), "--gpus-per-trial", bad], "--gpus-per-trial"),
                  (["transfer", "--patches", str(tmp_path), "--label-fractions", f"0.5,{bad}"], "--label-fractions"),
                  (["reproduce", "--out", str(tmp_path), "--gpus-per-trial", bad], "--gpus-per-trial"),
                  (["reproduce", "--out", str(tmp_path), "--gpus-per-worker", bad], "--gpus-per-worker"),
                  (["reproduce", "--out", str(tmp_path), "--label-fractions", bad], "--label-fractions"),
                  (["convert", vs, "--store", str(tmp_path / "s"), "--max-scan-bytes", f"{bad}G"],
                   "--max-scan-bytes"),
                  (["patches", "pretrain", "--store", vs, "--scales", f"1,{bad}"], "--scales"),
                  (["patches", "task", "ecc", "--store", vs, "--negative-ratio", bad], "--negative-ratio")]
    for argv, option in cases:
        _usage_exit(argv, capsys, option)
    # seeds are integers >= 0 (NumPy refuses negative seeds deep inside a worker)
    for argv, option in ((["patches", "pretrain", "--store", vs, "--seed", "-1"], "--seed"),
                         (["transfer", "--patches", str(tmp_path), "--seeds", "0,x"], "--seeds"),
                         (["patches", "pretrain", "--store", vs, "--border-yx", "-3"], "--border-yx")):
        _usage_exit(argv, capsys, option)
    assert not (tmp_path / "s").exists() and _no_ray_started()
    # the real command: its exit status, and nothing on stderr but the one line
    proc = _cli("pretrain", "--patches", patch_store, "--gpus-per-worker", "inf")
    assert proc.returncode == 2, proc.stderr
    _one_error_line(proc.stderr, "argument --gpus-per-worker", "'inf'")


def test_max_failures_minus_one_is_documented_as_retry_forever(patch_store, tmp_path, capsys):
    """Finding 2: -1 (Ray's unlimited restarts) was accepted undocumented; --help now says what it means, and
    anything below it is refused in one line."""
    for command in (["pretrain"], ["finetune"], ["transfer"]):
        with pytest.raises(SystemExit) as exc:
            main([*command, "--help"])
        assert exc.value.code == 0
        text = " ".join(capsys.readouterr().out.split())
        assert "--max-failures MAX_FAILURES" in text and "-1 retries forever" in text, (command, text)
    assert build_parser().parse_args(["pretrain", "--patches", "p", "--max-failures", "-1"]).max_failures == -1
    _usage_exit(["pretrain", "--patches", patch_store, "--max-failures", "-2"], capsys, "argument --max-failures",
                "-1 to retry forever")
    assert max_failures(-1) == -1
    with pytest.raises(UsageError, match="--max-failures -5: must be >= 0 restarts, or -1 to retry forever"):
        ray_resources(workers=1, gpus_per_worker=0, ray_address=None, failures=-5)


def test_ray_address_where_nothing_listens_fails_in_seconds_naming_it(patch_store, tmp_path, capsys, monkeypatch):
    """Finding 3: `--ray-address 127.0.0.1:9` retried the GCS for minutes; the address is probed first."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    closed = _closed_port()
    for address in (f"127.0.0.1:{closed}", f"ray://127.0.0.1:{closed}", f"localhost:{closed}"):
        with pytest.raises(UsageError, match=f"--ray-address {address}: no Ray cluster answers"):
            ray_resources(workers=1, gpus_per_worker=0, ray_address=address)
    with pytest.raises(UsageError, match="not a Ray address"):
        ray_cluster("127.0.0.1:notaport")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    for argv in (["pretrain", "--patches", patch_store, "--tracking-uri", uri],
                 ["finetune", "--task", "ecc", "--patches", patch_store, "--tracking-uri", uri],
                 ["transfer", "--patches", str(tmp_path), "--tracking-uri", uri]):
        t0 = time.perf_counter()
        _usage_exit([*argv, "--ray-address", f"127.0.0.1:{closed}", "--storage-path", str(tmp_path / "r")], capsys,
                    f"--ray-address 127.0.0.1:{closed}", "no Ray cluster answers", "connection refused")
        assert time.perf_counter() - t0 < 15
    # RAY_ADDRESS (what `ray job submit` sets, and users export) is probed the same way, and named
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{closed}")
    _usage_exit(["pretrain", "--patches", patch_store, "--tracking-uri", uri], capsys,
                f"RAY_ADDRESS 127.0.0.1:{closed}: no Ray cluster answers")
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "r").exists() and _no_ray_started()
    # something listening passes (a Ray head's GCS port accepts the connection)
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen(1)
        ray_cluster(f"127.0.0.1:{listening.getsockname()[1]}")
    monkeypatch.setenv("RAY_ADDRESS", "auto")  # Ray's to resolve
    ray_cluster(None)


def test_tracking_scheme_experiment_name_and_non_mlflow_server_are_usage_errors(patch_store, tmp_path, capsys,
                                                                               http_404):
    """Finding 4: `--tracking-uri ftp://x` and `--experiment ""` were exit 1 "failed: MlflowException" after the
    MLflow run was attempted; a web server that is not MLflow passed the probe."""
    with pytest.raises(UsageError, match="answers HTTP but is not an MLflow tracking server"):
        check_uri(http_404)
    with pytest.raises(UsageError, match="no tracking store for the scheme 'ftp'"):
        check_uri("ftp://x")
    common = ["--storage-path", str(tmp_path / "r")]
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    _usage_exit(["pretrain", "--patches", patch_store, "--tracking-uri", "ftp://x", *common], capsys,
                "genesis pretrain: error: --tracking-uri ftp://x", "no tracking store", "sqlite")
    for command in (["pretrain", "--patches", patch_store], ["finetune", "--task", "ecc", "--patches", patch_store],
                    ["transfer", "--patches", str(tmp_path)]):
        _usage_exit([*command, "--tracking-uri", uri, "--experiment", "", *common], capsys, "--experiment ''")
        _usage_exit([*command, "--tracking-uri", uri, "--experiment", "   ", *common], capsys, "--experiment")
    assert not (tmp_path / "mlflow.db").exists()
    line = _usage_exit(["pretrain", "--patches", patch_store, "--tracking-uri", http_404, *common], capsys,
                       f"--tracking-uri {http_404}", "answers HTTP but is not an MLflow tracking server")
    assert f"GET {PROBE_PATH}: 404" in line  # the MLflow REST path the probe asks
    assert not (tmp_path / "r").exists() and _no_ray_started()
    # registered schemes MLflow reaches otherwise pass unprobed
    assert check_uri("postgresql://user@127.0.0.1:1/db") == "postgresql://user@127.0.0.1:1/db"


SEARCH_PATH = "/api/2.0/mlflow/experiments/search?max_results=1"


def _http_status(url: str, credentials: tuple[str, str] | None = None) -> tuple[int, bytes]:
    """(HTTP status, body) of a GET, with Basic credentials when given."""
    import base64
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url)
    if credentials:
        token = base64.b64encode(":".join(credentials).encode("utf-8")).decode("ascii")
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def test_authenticated_mlflow_server_needs_credentials_at_the_probe(tmp_path, monkeypatch):
    """An MLflow server with authentication (pipeline.services' launcher) answers 401 to its API without
    credentials and 200 with them; /health is open. Without credentials, or with refused ones, the probe is a
    usage error naming MLFLOW_TRACKING_USERNAME/PASSWORD (found before any work, not after training); the right
    credentials pass."""
    from pipeline.services.mlflow_server import MlflowServerConfig, start_mlflow, stop_mlflow

    server = start_mlflow(MlflowServerConfig(root=tmp_path / "mlflow", port=_closed_port(), workers=1,
                                             start_timeout_s=90))
    try:
        assert _http_status(server.url + SEARCH_PATH)[0] == 401
        with pytest.raises(UsageError, match="HTTP 401.*MLFLOW_TRACKING_USERNAME"):
            check_uri(server.url)
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", server.user)
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", server.password)
        status, body = _http_status(server.url + SEARCH_PATH, (server.user, server.password))
        assert status == 200 and body.lstrip().startswith(b"{")
        assert check_uri(server.url + "/") == server.url + "/"
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "wrong")
        with pytest.raises(UsageError, match="refuses the credentials"):
            check_uri(server.url)
    finally:
        stop_mlflow(tmp_path / "mlflow")


def test_convert_spacing_must_be_finite_and_is_named_as_the_option(tmp_path, capsys):
    """Finding 5: `--spacing inf,1,1` made a store whose every scan failed (exit 1); `nan,1,1` was reported as
    `ConvertSettings.spacing`. Both are refused before anything, naming --spacing."""
    src = tmp_path / "luna" / "subset0"
    write_mhd(src / "1.2.3.mhd", np.zeros((8, 16, 16), np.int16))
    for bad in ("inf,1,1", "nan,1,1", "1,1,-inf", "1,nan,1"):
        line = _usage_exit(["convert", str(tmp_path / "luna"), "--store", str(tmp_path / "s"), "--workers", "1",
                            "--no-progress", "--spacing", bad], capsys, "argument --spacing", bad)
        assert "ConvertSettings" not in line
    assert not (tmp_path / "s").exists()


def test_dask_scheduler_where_nothing_listens_fails_in_seconds_naming_it(patch_store, tmp_path, capsys):
    """Finding 6: `convert --dask-scheduler tcp://127.0.0.1:9` waited Dask's 30 s connect timeout, then exit 1."""
    address = f"tcp://127.0.0.1:{_closed_port()}"
    with pytest.raises(UsageError, match=f"--dask-scheduler {address}: no Dask scheduler answers"):
        dask_scheduler(address)
    vs = str(Path(patch_store).parents[1] / "vs")
    for argv in (["convert", vs, "--store", str(tmp_path / "s")],
                 ["patches", "pretrain", "--store", vs, "--out", str(tmp_path / "ps")],
                 ["patches", "task", "ecc", "--store", vs, "--out", str(tmp_path / "ps")]):
        t0 = time.perf_counter()
        _usage_exit([*argv, "--no-progress", "--dask-scheduler", address], capsys,
                    f"--dask-scheduler {address}", "connection refused")
        assert time.perf_counter() - t0 < 10
    assert not (tmp_path / "s").exists() and not (tmp_path / "ps").exists()
    # the context manager itself (callers that are not the command line) says the same
    from pipeline.cluster import dask_client

    with pytest.raises(UsageError, match="no Dask scheduler answers"):
        with dask_client(1, address):
            pass


def test_stores_list_of_a_missing_folder_or_a_file_is_exit_2(tmp_path, capsys):
    """Finding 7: `stores list nonexist` and `stores list afile` said "no stores under ..." with exit 0."""
    (tmp_path / "afile").write_text("x", encoding="utf-8")
    _usage_exit(["stores", "list", str(tmp_path / "nonexist")], capsys, "ROOT", "nonexist", "no such folder")
    _usage_exit(["stores", "list", str(tmp_path / "afile")], capsys, "ROOT", "afile", "is a file, not a folder")
    assert main(["stores", "list", str(tmp_path)]) == 0


def test_damaged_store_build_is_one_line_leaves_no_building_folder_and_a_missing_catalog_is_named(patch_store,
                                                                                                  tmp_path, capsys):
    """Finding 8: a build from a damaged store printed Dask's "Compute Failed ... Traceback" before the clear
    line and left its `.building-*` folder; without catalog.parquet it said "no acceptable cubes in any of the 0
    scans" (exit 1)."""
    import shutil

    vs = Path(patch_store).parents[1] / "vs"
    damaged = tmp_path / "damaged"
    shutil.copytree(vs, damaged)
    shard = sorted(damaged.glob("scans/*/0/c/0/0/0"))[2]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    out = tmp_path / "ps"
    size = ["--size", "16,16,16", "--per-scan", "4", "--border-yx", "4", "--border-z", "2", "--min-slices", "16"]
    # the real command with two worker processes: all it prints on stderr (pytest would take the log records)
    proc = _cli("patches", "pretrain", "--store", str(damaged), "--out", str(out), *size, "--workers", "2",
                "--no-progress")
    assert proc.returncode == 2, proc.stderr
    assert "Compute Failed" not in proc.stderr
    _one_error_line(proc.stderr, "genesis patches pretrain: error:", str(damaged), "CRC32C")
    assert not list(out.glob(".building-*")), list(out.iterdir())  # nothing a rerun could resume
    # a run that stops for a reason a rerun need not meet again keeps it (kills: tests/test_kill_recovery.py)
    from pipeline.patches.site import discard_on_deterministic_error

    keep = tmp_path / ".building-keep"
    keep.mkdir()
    with pytest.raises(OSError):
        with discard_on_deterministic_error(keep):
            raise OSError("disk full")
    assert keep.is_dir()
    # the volume store without its catalog: named, with the repair to run (exit 2), for both kinds of build
    (damaged / "catalog.parquet").unlink()
    for argv in (["patches", "pretrain", "--store", str(damaged), "--out", str(out), "--workers", "1", *size],
                 ["patches", "task", "ecc", "--store", str(damaged), "--out", str(out), "--workers", "1"]):
        _usage_exit([*argv, "--no-progress"], capsys, f"{damaged}: its catalog.parquet is missing",
                    f"genesis stores verify {damaged} --repair")
    assert not list(out.glob(".building-*"))


# --------------------------------------------------------------------------- issue 15: folds, seeds, splits files

@pytest.mark.parametrize("command, option, default", [
    (["transfer"], "--test-fold", "default: every fold the task's store holds"),
    (["transfer"], "--seeds", "default 0,1,2"),
    (["finetune"], "--test-fold", "default: the store's first fold, 1"),
    (["reproduce"], "--test-fold", "default: every fold"),
    (["patches", "task"], "--splits", "default: the task's split rule"),
])
def test_fold_seed_and_splits_options_have_a_help_line_with_their_default(command, option, default, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*command, "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps the help
    assert option in text and default in text, text
    if option == "--splits":
        assert "case_id,split" in text and "splits_final.json" in text and "store's key" in text
    args = build_parser().parse_args([*command, *(["--task", "ecc", "--patches", "p"] if command == ["finetune"]
                                                  else ["ecc", "--store", "s"] if command[0] == "patches" else [])])
    assert args.seeds == (0, 1, 2) if option == "--seeds" else True


def test_test_fold_zero_and_a_malformed_splits_file_are_exit_2_before_anything_starts(patch_store, tmp_path, capsys):
    for argv in (["transfer", "--patches", str(tmp_path), "--test-fold", "0"],
                 ["finetune", "--task", "ecc", "--patches", patch_store, "--test-fold", "0"],
                 ["reproduce", "--out", str(tmp_path), "--test-fold", "x"]):
        line = _usage_exit(argv, capsys, "--test-fold")
        assert "unrecognized" not in line, line
    bad = tmp_path / "splits.csv"
    bad.write_text("patient,fold\nx,1\n", encoding="utf-8")
    out = tmp_path / "stores"
    volumes = str(Path(patch_store).parents[1] / "vs")
    assert main(["patches", "task", "ncc", "--store", volumes, "--out", str(out), "--splits", str(bad)]) == 2
    _one_error_line(capsys.readouterr().err, "genesis patches task: error: splits file", "splits.csv", "case_id")
    assert not any(out.glob("task-*")) and _no_ray_started()


# --------------------------------------------------------------------------- issue 18, items 13 and 14


def _tiny_luna(root: Path) -> Path:
    """DATA/luna16/subset0 with one small scan: enough for `reproduce --data DATA --tasks ncc` to reach convert."""
    write_mhd(root / "luna16" / "subset0" / "1.2.3.mhd", np.zeros((16, 24, 24), np.int16))
    return root


def test_an_empty_task_list_is_exit_2_never_every_task(tmp_path, capsys):
    """Item 13: `reproduce --tasks ""` ran every task (transfer: exit 2); `--tasks ,` too."""
    for tasks in ("", ",", " , "):
        _usage_exit(["reproduce", "--out", str(tmp_path / "out"), "--tasks", tasks], capsys, "--tasks", "names no task")
        _usage_exit(["transfer", "--patches", str(tmp_path), "--tasks", tasks], capsys, "--tasks", "names no task")
    assert not (tmp_path / "out").exists() and _no_ray_started()


def test_reproduce_into_a_busy_out_is_exit_3_naming_the_holder_before_any_work(tmp_path, capsys):
    """Item 13: a second reproduce into an OUT another one is writing exits 3 (the README's busy status) at once,
    naming the holder; before, it ran into the first one's stores and exited 1."""
    from pipeline.storage.locks import FileLock
    from pipeline.volume_store.store import lock_store

    data, out = _tiny_luna(tmp_path / "data"), tmp_path / "out"
    argv = ["reproduce", "--data", str(data), "--out", str(out), "--tasks", "ncc", "--workers", "1",
            "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"]
    # held as another reproduce holds it (and its store, which the old code ran into)
    store_lock = lock_store(out / "volume_store")  # taken (lock_store acquires)
    try:
        with FileLock(out / ".reproduce.lock", "genesis reproduce into OUT"):
            assert main(argv) == 3
    finally:
        store_lock.release()
    _one_error_line(capsys.readouterr().err, "genesis reproduce:", ".reproduce.lock", f"pid {os.getpid()}")
    assert not (out / "volume_store" / "zarr.json").exists() and _no_ray_started()


def test_a_reproduce_step_that_meets_a_busy_store_ends_reproduce_with_exit_3(tmp_path, capsys):
    """Item 13: a step's own status is reproduce's (a conversion another process is writing: 3, not 1)."""
    from pipeline.volume_store.store import lock_store

    data, out = _tiny_luna(tmp_path / "data"), tmp_path / "out"
    store_lock = lock_store(out / "volume_store")  # another conversion writing it
    try:
        code = main(["reproduce", "--data", str(data), "--out", str(out), "--tasks", "ncc", "--workers", "1",
                     "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"])
    finally:
        store_lock.release()
    err = capsys.readouterr().err
    assert code == 3, err
    assert "being written by another conversion" in err and "exited 3" in err and "Traceback" not in err
    assert _no_ray_started()


def test_unknown_or_empty_channels_are_exit_2_naming_them_and_the_known_sequences(tmp_path, capsys):
    """Item 13: `patches task bms --channels flair,bogus` (or `,`) read every case, skipped them all and exited 1
    "RuntimeError"; now exit 2 before any work, naming the bad channel and the sequences the store holds."""
    import SimpleITK as sitk

    from pipeline.volume_store.convert import convert

    case = tmp_path / "brats" / "HGG" / "Brats18_T_1"
    case.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for seq in ("flair", "t1", "t1ce", "t2"):
        img = rng.integers(0, 500, (16, 24, 24)).astype(np.int16)
        sitk.WriteImage(sitk.GetImageFromArray(img), str(case / f"Brats18_T_1_{seq}.nii.gz"))
    seg = np.zeros((16, 24, 24), np.uint8)
    seg[5:10, 8:14, 8:14] = 2
    sitk.WriteImage(sitk.GetImageFromArray(seg), str(case / "Brats18_T_1_seg.nii.gz"))
    store, out = tmp_path / "vs", tmp_path / "ps"
    assert convert([str(tmp_path / "brats")], str(store), workers=1, progress=False).ok
    base = ["patches", "task", "bms", "--store", str(store), "--out", str(out), "--workers", "1", "--no-progress"]
    line = _usage_exit([*base, "--channels", "flair,bogus"], capsys, "--channels", "bogus")
    assert "known: flair, t1, t1ce, t2" in line and "RuntimeError" not in line
    for bad in (",", "flair,,t2", ""):
        _usage_exit([*base, "--channels", bad], capsys, "--channels", "empty sequence name")
    _usage_exit([*base, "--channels", "flair,FLAIR"], capsys, "--channels", "flair named twice")
    assert not any(out.glob("task-*")) and not any(out.glob(".building-*"))


def test_a_far_candidate_is_named_with_readable_numbers(tmp_path, capsys):
    """Item 14: a candidate at x = 1e308 mm was reported as a 300-digit voxel index, the shape as
    (np.int64(40), ...)."""
    scan = "1.2.840.1"
    write_mhd(tmp_path / "luna" / "subset0" / f"{scan}.mhd", np.full((40, 48, 48), -500, np.int16))
    (tmp_path / "luna" / "candidates.csv").write_text(
        f"seriesuid,coordX,coordY,coordZ,class\n{scan},1e308,-100,-250,1\n{scan},-110,-100,-250,0\n",
        encoding="utf-8")
    store = tmp_path / "vs"
    assert main(["convert", str(tmp_path / "luna"), "--store", str(store), "--workers", "1", "--no-progress"]) == 0
    capsys.readouterr()
    code = main(["patches", "task", "ncc", "--store", str(store), "--out", str(tmp_path / "ps"), "--workers", "1",
                 "--no-progress"])
    out = capsys.readouterr()
    text = out.out + out.err
    row = next(line for line in text.splitlines() if "1e+308" in line)
    assert "outside the volume of shape (40, 48, 48)" in row, row
    assert "np.int64" not in text and not any(len(word) > 40 for word in row.split()), row
    assert code in (1, 2)


def test_weights_import_never_advises_weights_only_false(tmp_path, capsys):
    """Item 14: a refused checkpoint quoted torch's advice to re-run with weights_only=False (which would run the
    file's code). Every way a file is refused names it in one line without that advice."""
    import collections
    import datetime

    import torch

    from pipeline.model_io.load import load_model

    files = {"object.pt": None, "garbage.pt": b"not a torch file" * 8, "empty.pt": b""}
    torch.save({"state_dict": collections.OrderedDict(w=torch.zeros(1)), "saved": datetime.date(2020, 1, 1)},
               tmp_path / "object.pt")
    for name, content in files.items():
        if content is not None:
            (tmp_path / name).write_bytes(content)
    zipped = (tmp_path / "object.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(zipped[:len(zipped) // 2])
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    for name in ("object.pt", "garbage.pt", "empty.pt", "truncated.pt"):
        path = str(tmp_path / name)
        assert main(["weights", "import", path, "--name", "x", "--tracking-uri", uri]) == 2
        err = capsys.readouterr().err
        line = err.strip().splitlines()[-1]  # (MLflow may log its database's creation above it)
        assert line.startswith("genesis weights import: error:") and name in line, err
        assert "False" not in err and "\x1b" not in err and "Traceback" not in err, err
        for uri_form in (path, f"official:{path}"):
            with pytest.raises(ValueError) as exc:
                load_model(uri_form)
            assert "False" not in str(exc.value) and name in str(exc.value), exc.value
        if name == "object.pt":
            assert "refused" in line and "datetime.date" in line, line


def test_load_model_from_the_registry_never_creates_a_tracking_store(tmp_path, monkeypatch):
    """Item 14: `load_model('models:/...')` without a tracking URI created ./mlflow.db, then said the model was
    not found; it names the missing tracking URI instead, and a named SQLite file that does not exist too."""
    from pipeline.model_io.load import load_model, load_model_state

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"no tracking URI given.*mlflow\.db.*MLFLOW_TRACKING_URI.*tracking_uri="):
        load_model("models:/genesis-ncc@champion")
    with pytest.raises(ValueError, match="no tracking URI given"):
        load_model_state(None, "models:/genesis-pretrained/1")
    with pytest.raises(ValueError, match=r"tracking_uri 'sqlite:///elsewhere/m\.db': no MLflow database"):
        load_model("runs:/0123/model", tracking_uri="sqlite:///elsewhere/m.db")
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "elsewhere").exists()


def test_a_closed_stdout_is_a_quiet_exit(patch_store, tmp_path):
    """Item 14: `genesis stores show STORE | head` ended with "failed: BrokenPipeError" on stderr. A reader that
    goes away ends the command quietly with 141 (128 + SIGPIPE, what a shell reports for such a command)."""
    vs = str(Path(patch_store).parents[1] / "vs")
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "stores", "show", vs], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before the command prints anything
    err = proc.stderr.read().decode("utf-8", "replace")
    assert proc.wait(timeout=120) == 141, err
    assert err.strip() == "", err


def test_stores_verify_repair_of_a_busy_store_is_exit_3(patch_store, tmp_path, capsys):
    """Item 13: `stores verify --repair` on a store another process writes exited 1; busy is 3, one line."""
    from pipeline.volume_store.store import lock_store

    vs = str(Path(patch_store).parents[1] / "vs")
    store_lock = lock_store(vs)
    try:
        assert main(["stores", "verify", vs, "--repair", "--no-progress"]) == 3
    finally:
        store_lock.release()
    _one_error_line(capsys.readouterr().err, "genesis stores verify:", "being written by another conversion")


def test_a_stdout_the_shell_closed_is_no_error(tmp_path):
    """`genesis ... >&-` leaves Python without a stdout (sys.stdout is None): the command still does its work and
    ends without "unexpected error AttributeError"."""
    genesis = str(Path(sys.executable).with_name("genesis"))
    done = subprocess.run(["bash", "-c", f"'{genesis}' stores list '{tmp_path}' >&-"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and "Error" not in done.stderr, done.stderr
