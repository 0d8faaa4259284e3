"""The volume store in a bucket (issue 20): `genesis convert` and `genesis stores show|verify|list|preview` on
`s3://BUCKET/PREFIX` behave as on disk, with the same guarantees.

Every test talks HTTP to the session's moto server (tests/s3_server.py, a real S3 API on 127.0.0.1); nothing of
S3, Zarr or Dask is mocked. Processes are real `python -m pipeline.cli` runs where exit codes, kills and a
second writer matter; the AWS variables of the session reach them through the environment.

- converting into a bucket gives what converting to disk gives: the same scan ids, voxels (every level),
  manifests, content digests and catalog rows;
- a conversion SIGKILLed after its first scan's record or in the middle of a scan's objects, then rerun, equals
  an uninterrupted one, and leaves no object that no record accounts for;
- a reconversion (changed --spacing, changed source) SIGKILLed in the middle of a scan's objects leaves the
  committed version committed and readable with its old voxels (each version has its own prefix,
  scans/<id>@<8 hex>, committed by the record naming it); a reader that opened it before reads old voxels, and
  once the rerun has committed the new version, an error saying to open it again; `verify --repair` killed the
  same way leaves the scan as it was; a commit over a record changed by another writer is refused;
- a second writer exits 3 naming the first; the lease of a SIGKILLed writer is taken over at once (same host),
  an expired lease of another host too, a live one of another host is not;
- a flipped byte in one shard object is named by `stores verify` (scan, array, shard) and by a read, and
  `--repair` reconverts it;
- bad locations (no bucket, unknown scheme, missing bucket, no credentials, dead endpoint) are one line,
  exit 2, with nothing written.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from conftest import write_mhd

from pipeline.storage.objects import open_tree
from pipeline.volume_store.convert import convert
from pipeline.volume_store.errors import StoreIntegrityError
from pipeline.volume_store.store import VolumeStore, version_of

REPO = Path(__file__).resolve().parent.parent
N_SCANS = 4


def _phantom(rng: np.random.Generator, shape=(24, 48, 48)) -> np.ndarray:
    vol = np.full(shape, 40, dtype=np.int16)
    vol[:, :, : shape[2] // 2] = -850
    return (vol + rng.normal(0, 15, shape)).astype(np.int16)


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("s3_src") / "luna"
    rng = np.random.default_rng(20)
    for i in range(N_SCANS):
        write_mhd(src / f"subset{i % 2}" / f"1.3.6.{i}.mhd", _phantom(rng))
    return src


@pytest.fixture(scope="module")
def local_store(sources, tmp_path_factory) -> Path:
    """The same sources converted to disk: what every bucket store must equal."""
    root = tmp_path_factory.mktemp("s3_ref") / "vs"
    summary = convert([str(sources)], str(root), workers=1, progress=False)
    assert summary.ok and len(summary.converted) == N_SCANS, summary.report()
    return root


# ---- helpers --------------------------------------------------------------------------------------

def _genesis(*args: str, env: dict | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=REPO, capture_output=True,
                          timeout=timeout, env={**os.environ, "TQDM_DISABLE": "1", **(env or {})})
    done.out = done.stdout.decode("utf-8", errors="replace")  # type: ignore[attr-defined]
    done.err = done.stderr.decode("utf-8", errors="replace")  # type: ignore[attr-defined]
    return done


def _keys(s3_server, bucket: str, prefix: str = "") -> list[str]:
    client = s3_server.client()
    keys = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys += [o["Key"] for o in page.get("Contents", [])]
    return sorted(keys)


def _rows(store: VolumeStore) -> list[dict]:
    """Catalog rows without what differs between two conversions of the same sources (time, size on disk, and the
    folder: in a bucket each version's own prefix, scans/<id>@<8 hex>)."""
    cat = store.catalog()
    for sid, path in zip(cat["scan_id"], cat["path"]):
        assert path is None or path == f"scans/{sid}" or (
            version_of(path[len("scans/"):]) == sid and len(path) == len(f"scans/{sid}@") + 8), path
    return json.loads(cat.drop(columns=["converted_at", "path"]).to_json(orient="records"))


def _same_store(got: VolumeStore, want: VolumeStore) -> None:
    """Same scan ids, catalog rows, manifests, content digests and voxels of every array."""
    assert got.scan_ids() == want.scan_ids() and len(want.scan_ids()) == N_SCANS
    assert _rows(got) == _rows(want)
    for sid in want.scan_ids():
        a, b = got.read_record(sid), want.read_record(sid)
        assert a["files"] == b["files"] and a["content_digest"] == b["content_digest"], sid
        ga, gb = got.open_scan(sid), want.open_scan(sid)
        levels = sorted(k for k in gb.array_keys())
        assert sorted(ga.array_keys()) == levels and len(levels) >= 2
        for level in levels:
            np.testing.assert_array_equal(ga[level][...], gb[level][...])


def _orphans(store: VolumeStore) -> list[str]:
    """Objects under scans/ that no ok record's manifest accounts for."""
    accounted = {"scans/zarr.json"}
    for rec in store.records():
        if rec.get("status") == "ok":
            accounted |= {f"{store.scan_rel(rec['scan_id'], rec)}/{f}" for f in rec["files"]}
    return [o.path for o in store.tree.list("scans") if o.path not in accounted]


def _versions(store: VolumeStore, scan_id: str) -> list[str]:
    """The folders under scans/ that hold a version of `scan_id` (committed or not)."""
    return [n for n in store.tree.listdir("scans") if version_of(n) == scan_id]


# ---- conversion ------------------------------------------------------------------------------------

def test_convert_into_a_bucket_equals_converting_to_disk(sources, local_store, bucket, s3_server, tmp_path):
    url = f"s3://{bucket}/stores/vol"
    summary = convert([str(sources)], url, workers=1, progress=False)
    assert summary.ok and len(summary.converted) == N_SCANS, summary.report()
    remote = VolumeStore(url)
    assert remote.root == url and remote.url == url and not remote.is_local
    _same_store(remote, VolumeStore(local_store))
    assert not _orphans(remote)
    assert "stores/vol/.lock" not in _keys(s3_server, bucket)  # the lease is released at the end
    assert not (Path.cwd() / "s3:").exists()

    again = convert([str(sources)], url, workers=2, progress=False)  # a rerun skips every scan
    assert again.ok and len(again.skipped) == N_SCANS and not again.converted

    shown = _genesis("stores", "show", url)
    assert shown.returncode == 0, shown.err
    assert f"volume store {url}: {N_SCANS} scans ({N_SCANS} ok, 0 failed)" in shown.out
    assert "warning" not in shown.out and "1.3.6.0" in shown.out
    listed = _genesis("stores", "list", f"s3://{bucket}")
    assert listed.returncode == 0, listed.err
    assert url in listed.out and f"{N_SCANS} scans" in listed.out
    verified = _genesis("stores", "verify", url, "--no-progress")
    assert verified.returncode == 0, verified.out + verified.err
    assert f"{url}: {N_SCANS} ok; whole" in verified.out
    png = tmp_path / "p.png"
    preview = _genesis("stores", "preview", url, "1.3.6.1", "--out", str(png))
    assert preview.returncode == 0 and png.stat().st_size > 1000, preview.err


# ---- killed and rerun ------------------------------------------------------------------------------

def _stopped(proc: subprocess.Popen) -> bool:
    """Whether a process of the run stopped itself at its GENESIS_STOP_AT step (the task's: with one worker, the
    driver's own; a Dask worker process with more)."""
    try:
        run = psutil.Process(proc.pid)
        return any(p.status() == psutil.STATUS_STOPPED for p in [run, *run.children(recursive=True)])
    except psutil.NoSuchProcess:
        return False


def _kill_all(proc: subprocess.Popen) -> None:
    """SIGKILL the run and every process it started; none may survive."""
    try:
        tree = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    proc.kill()
    proc.wait(10)
    for p in tree:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    gone, alive = psutil.wait_procs(tree, timeout=10)
    assert not alive, [p.pid for p in alive]


@pytest.mark.parametrize("step,workers", [("convert:record", 1), ("convert:objects", 1), ("convert:objects", 2)])
def test_a_conversion_killed_and_rerun_equals_an_uninterrupted_one(step, workers, sources, local_store, bucket,
                                                                    tmp_path):
    """convert:record - SIGKILLed right after the first scan's record (its commit); convert:objects - in the middle
    of a scan, its first array written and nothing committed (with 2 workers, the other worker's scan may be
    anywhere). The rerun takes over the dead writer's lease at once (its pid is gone from this host), removes the
    uncommitted objects and finishes."""
    url = f"s3://{bucket}/vol"
    log = tmp_path / "killed.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "convert", str(sources), "--store", url,
                                 "--workers", str(workers), "--no-progress"], cwd=REPO, stdout=out,
                                stderr=subprocess.STDOUT,
                                env={**os.environ, "TQDM_DISABLE": "1", "GENESIS_STOP_AT": step})
    try:
        deadline = time.monotonic() + 120
        while not _stopped(proc):
            assert proc.poll() is None, log.read_text(encoding="utf-8", errors="replace")[-3000:]
            assert time.monotonic() < deadline, log.read_text(encoding="utf-8", errors="replace")[-3000:]
            time.sleep(0.02)
    finally:
        _kill_all(proc)
    store = VolumeStore(url)
    committed = [r for r in store.records() if r.get("status") == "ok"]
    if step == "convert:record":
        assert len(committed) == 1 and not _orphans(store)
    else:  # half-written objects, never read: no record, no scan for readers
        assert len(committed) < N_SCANS and _orphans(store)
        half = version_of(_orphans(store)[0].split("/")[1])
        assert half not in {r["scan_id"] for r in committed}
        with pytest.raises(KeyError, match="is not in"):
            store.open_scan(half)
    assert store.tree.exists(".lock")  # the dead writer's lease is still there

    rerun = _genesis("convert", str(sources), "--store", url, "--workers", "1", "--no-progress")
    assert rerun.returncode == 0, rerun.out + rerun.err
    if step == "convert:objects":
        assert "removed the uncommitted objects of" in rerun.out
    _same_store(VolumeStore(url), VolumeStore(local_store))
    assert not _orphans(VolumeStore(url)) and not store.tree.exists(".lock")


# ---- one writer ------------------------------------------------------------------------------------

def test_a_second_writer_exits_3_naming_the_first_and_a_killed_writers_lease_is_taken_over(sources, bucket):
    url = f"s3://{bucket}/vol"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pipeline.volume_store.store import lock_store; "
                               "lock_store(sys.argv[1]); print('held', flush=True); time.sleep(120)", url],
        stdout=subprocess.PIPE, cwd=REPO)
    try:
        assert holder.stdout.readline().decode("utf-8").strip() == "held"
        second = _genesis("convert", str(sources), "--store", url, "--workers", "1", "--no-progress")
        assert second.returncode == 3, second.out + second.err
        line = [ln for ln in second.err.splitlines() if ln.strip()]
        assert len(line) == 1 and f"pid {holder.pid} on {socket.gethostname()}" in line[0], second.err
        assert "being written by another conversion" in line[0] and url in line[0]
        assert not any(k for k in open_tree(url).listdir("") if k not in (".lock", "scans", "zarr.json"))
        holder.send_signal(signal.SIGKILL)  # dies holding the lease: no release, no expiry yet
        holder.wait(timeout=30)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    t0 = time.monotonic()
    summary = convert([str(sources)], url, workers=1, progress=False)
    assert summary.ok and len(summary.converted) == N_SCANS, summary.report()
    assert time.monotonic() - t0 < 60  # taken over at once, not after the lease's expiry


def test_an_expired_lease_of_another_host_is_taken_over_a_live_one_is_not(sources, bucket):
    from pipeline.storage.leases import Holder

    url = f"s3://{bucket}/vol"
    tree = open_tree(url)

    def lease(expires: float) -> None:
        tree.write(".lock", Holder(token="0123456789abcdef", host="other-host.example", pid=4242,
                                   purpose="writing the volume store", since="2026-12-07T08:00:00+00:00",
                                   expires=expires).to_json().encode())

    lease(time.time() + 600)  # renewed a moment ago by a writer on another machine
    busy = _genesis("convert", str(sources), "--store", url, "--workers", "1", "--no-progress")
    assert busy.returncode == 3 and "pid 4242 on other-host.example" in busy.err, busy.out + busy.err
    lease(time.time() - 5)  # not renewed past its expiry: that writer is dead
    summary = convert([str(sources)], url, workers=1, progress=False)
    assert summary.ok and len(summary.converted) == N_SCANS, summary.report()
    assert not tree.exists(".lock")


# ---- damage ----------------------------------------------------------------------------------------

def test_a_flipped_byte_in_one_object_is_named_by_verify_and_repaired(sources, bucket, s3_server):
    url = f"s3://{bucket}/vol"
    assert convert([str(sources)], url, workers=1, progress=False).ok
    key = f"vol/{VolumeStore(url).scan_rel('1.3.6.2')}/0/c/0/0/0"
    client = s3_server.client()
    data = bytearray(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    data[len(data) // 3] ^= 0x10  # inside an inner chunk's compressed bytes
    client.put_object(Bucket=bucket, Key=key, Body=bytes(data))
    client.delete_object(Bucket=bucket, Key=f"vol/{VolumeStore(url).scan_rel('1.3.6.3')}/1/c/0/0/0")  # zeros to Zarr
    client.put_object(Bucket=bucket, Key="vol/scans/stray/zarr.json", Body=b"{}")  # no record accounts for it

    with pytest.raises(StoreIntegrityError, match=rf"{url}: scan 1\.3\.6\.2: array 0: shard c/0/0/0 .*CRC32C"):
        VolumeStore(url).read_scan("1.3.6.2")
    with pytest.raises(StoreIntegrityError, match=r"scan 1\.3\.6\.3: array 1: shard c/0/0/0 is missing"):
        VolumeStore(url).read_scan("1.3.6.3", level=1)
    VolumeStore(url).read_scan("1.3.6.1")  # the others read as ever

    found = _genesis("stores", "verify", url, "--no-progress")
    assert found.returncode == 1, found.out + found.err
    assert "damaged   1.3.6.2  array 0: shard c/0/0/0 inner chunk" in found.out, found.out
    assert "fails its CRC32C checksum" in found.out and "NOT whole" in found.out
    assert "damaged   1.3.6.3  1/c/0/0/0 missing" in found.out, found.out
    assert "scans/stray is a folder no ok record accounts for" in found.out
    assert sum(ln.startswith("ok ") for ln in found.out.splitlines()) == N_SCANS - 2

    repaired = _genesis("stores", "verify", url, "--repair", "--no-progress")
    assert repaired.returncode == 0, repaired.out + repaired.err
    assert "repaired  1.3.6.2  reconverted from" in repaired.out and "repaired  1.3.6.3  reconverted from" in \
        repaired.out and "removed   scans/stray" in repaired.out, repaired.out
    clean = _genesis("stores", "verify", url, "--no-progress")
    assert clean.returncode == 0 and f"{N_SCANS} ok; whole" in clean.out, clean.out
    assert _keys(s3_server, bucket, key) == []  # the damaged version is gone, replaced by a new one
    assert bytes(data) != client.get_object(Bucket=bucket, Key=f"vol/{VolumeStore(url).scan_rel('1.3.6.2')}/0/c/0/0/0")[
        "Body"].read()
    assert not _orphans(VolumeStore(url))


# ---- bad locations ---------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


NO_KEYS = {"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/creds",
           "AWS_CONFIG_FILE": "/nonexistent/config", "AWS_EC2_METADATA_DISABLED": "true"}


@pytest.mark.parametrize("case", ["no bucket", "unknown scheme", "missing bucket", "no credentials", "dead endpoint"])
def test_a_location_that_cannot_be_used_is_one_line_exit_2_before_anything_is_written(case, sources, bucket,
                                                                                         s3_server):
    url, env, needle = {
        "no bucket": ("s3:///vol", {}, "no bucket name"),
        "unknown scheme": (f"gs://{bucket}/vol", {}, "unknown scheme 'gs://'"),
        "missing bucket": ("s3://no-such-bucket-genesis/vol", {}, "bucket 'no-such-bucket-genesis' does not exist"),
        "no credentials": (f"s3://{bucket}/vol", NO_KEYS, "no S3 credentials"),
        "dead endpoint": ("s3://genesis-dead-endpoint/vol", {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{_free_port()}"},
                          "does not answer"),
    }[case]
    for args in (["convert", str(sources), "--store", url, "--workers", "1", "--no-progress"],
                 ["stores", "show", url], ["stores", "verify", url, "--no-progress"]):
        t0 = time.monotonic()
        done = _genesis(*args, env=env)
        lines = [ln for ln in done.err.splitlines() if ln.strip()]
        assert done.returncode == 2 and len(lines) == 1 and "Traceback" not in done.err, (args, done.err)
        assert needle in lines[0] and "genesis-test-secret" not in lines[0], (args, lines[0])
        assert time.monotonic() - t0 < 30, (args, "said in seconds")
    assert _keys(s3_server, bucket) == []  # nothing written


# ---- a server that checks keys and policies --------------------------------------------------------

@pytest.fixture(scope="module")
def strict_s3(tmp_path_factory):
    """A second moto server that authenticates every request (moto's `/moto-api/reset-auth`) once a user with a
    policy and keys exists: wrong keys are refused, and the policy can deny writes under one prefix. Its own
    server, so the session's stays keyless. Yields (endpoint, bucket, the user's keys, set_policy)."""
    import urllib.request

    import boto3
    from s3_server import S3Server, new_bucket

    endpoint = f"http://127.0.0.1:{_free_port()}"
    server = S3Server(endpoint)
    try:
        bucket = new_bucket(server)
        iam = boto3.client("iam", endpoint_url=endpoint, aws_access_key_id="setup", aws_secret_access_key="setup",
                           region_name="us-east-1")
        iam.create_user(UserName="genesis-writer")
        keys = iam.create_access_key(UserName="genesis-writer")["AccessKey"]
        env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": keys["AccessKeyId"],
               "AWS_SECRET_ACCESS_KEY": keys["SecretAccessKey"]}

        def set_policy(denied_prefix: str | None) -> None:
            statements = [{"Effect": "Allow", "Action": ["s3:*", "iam:*"], "Resource": "*"}]  # iam: to change it
            if denied_prefix:
                statements.append({"Effect": "Deny", "Action": "s3:PutObject",
                                   "Resource": f"arn:aws:s3:::{bucket}/{denied_prefix}*"})
            boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id=env[
                "AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"]).put_user_policy(
                UserName="genesis-writer", PolicyName="genesis",
                PolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": statements}))

        set_policy(None)
        request = urllib.request.Request(f"{endpoint}/moto-api/reset-auth", data=b"0", method="POST",
                                         headers={"Content-Type": "text/plain"})
        urllib.request.urlopen(request, timeout=10).read()  # from now on every request is authenticated
        yield endpoint, bucket, env, set_policy
    finally:
        server.stop()


def test_wrong_keys_are_one_line_exit_2_with_nothing_written(strict_s3, sources):
    endpoint, bucket, env, _ = strict_s3
    url = f"s3://{bucket}/wrong-keys"
    for wrong in ({**env, "AWS_SECRET_ACCESS_KEY": "not-the-secret"},
                  {**env, "AWS_ACCESS_KEY_ID": "AKIANOSUCHKEY0000000"}):
        for args in (["convert", str(sources), "--store", url, "--workers", "1", "--no-progress"],
                     ["stores", "show", url], ["stores", "verify", url, "--no-progress"]):
            done = _genesis(*args, env=wrong)
            lines = [ln for ln in done.err.splitlines() if ln.strip()]
            assert done.returncode == 2 and len(lines) == 1, (args, done.err)
            assert "the S3 credentials were refused" in lines[0] and "not-the-secret" not in lines[0], lines[0]
    assert not open_tree_with(env, url).list("")


def open_tree_with(env: dict, url: str):
    """The tree at `url` as a client with `env`'s endpoint and keys sees it."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        tree = open_tree(url)
        tree.list("")  # the client is made now, with these settings
        return tree
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_a_write_denied_mid_scan_fails_that_scan_only_and_keeps_what_was_committed(strict_s3, sources,
                                                                                    local_store):
    """The bucket refuses the writes of one scan's level 1 (its level 0 already written): that scan is a failed
    row, its written objects are removed, the other scans are committed; allowed again, a rerun completes it."""
    endpoint, bucket, env, set_policy = strict_s3
    url = f"s3://{bucket}/denied"
    set_policy("denied/scans/1.3.6.2@*/1/")  # level 1 of any version of 1.3.6.2
    try:
        done = _genesis("convert", str(sources), "--store", url, "--workers", "1", "--no-progress", env=env)
    finally:
        set_policy(None)
    assert done.returncode == 1, done.out + done.err
    assert "converted 3, skipped 0 (already done), failed 1" in done.out, done.out
    assert "FAILED 1.3.6.2" in done.out and "privileges" in done.out, done.out
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        store = VolumeStore(url)
        cat = store.catalog().set_index("scan_id")
        assert cat.loc["1.3.6.2", "status"] == "failed" and (cat["status"] == "ok").sum() == 3
        assert not _orphans(store) and not _versions(store, "1.3.6.2")
        rerun = _genesis("convert", str(sources), "--store", url, "--workers", "1", "--no-progress", env=env)
        assert rerun.returncode == 0 and "converted 1, skipped 3" in rerun.out, rerun.out + rerun.err
        _same_store(VolumeStore(url), VolumeStore(local_store))
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_a_writer_whose_lease_was_taken_over_commits_nothing(sources, bucket):
    """A writer that stopped renewing (a paused VM) and whose lease another writer took over must not touch the
    store: its scan task neither writes objects nor a record, failed or ok."""
    from pipeline.ingest import discover
    from pipeline.storage.leases import Holder
    from pipeline.volume_store.convert_task import convert_scan
    from pipeline.volume_store.settings import ConvertSettings
    from pipeline.volume_store.store import init_store, lock_store

    url = f"s3://{bucket}/vol"
    init_store(url)
    lock = lock_store(url)
    try:
        # taken over behind its back (as after a pause longer than the lease); its next renewal would fail
        open_tree(url).write(".lock", Holder.mine("writing the volume store", 600).to_json().encode())
        source = discover([str(sources)]).scans[0]
        res = convert_scan(source, url, ConvertSettings(), lock.token)
    finally:
        lock.release()
    assert res["status"] == "failed" and "no longer held by this conversion" in res["error"]
    assert not VolumeStore(url).record_files() and not _versions(VolumeStore(url), source.scan_id)
    assert open_tree(url).exists(".lock")  # the new holder's lease is left alone


# ---- a reconversion never destroys the committed version ------------------------------------------

def _stopped_run(args: list[str], step: str, log: Path) -> subprocess.Popen:
    """`genesis ARGS` started with GENESIS_STOP_AT=`step`, returned once a process of it stopped there."""
    out = open(log, "wb")
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], cwd=REPO, stdout=out,
                            stderr=subprocess.STDOUT, env={**os.environ, "TQDM_DISABLE": "1", "GENESIS_STOP_AT": step})
    out.close()
    try:
        deadline = time.monotonic() + 120
        while not _stopped(proc):
            assert proc.poll() is None, log.read_text(encoding="utf-8", errors="replace")[-3000:]
            assert time.monotonic() < deadline, log.read_text(encoding="utf-8", errors="replace")[-3000:]
            time.sleep(0.02)
    except BaseException:
        _kill_all(proc)
        raise
    return proc


def _levels(store: VolumeStore, sid: str) -> dict[str, np.ndarray]:
    group = store.open_scan(sid)
    return {k: group[k][...] for k in sorted(group.array_keys())}


@pytest.mark.parametrize("change", ["spacing", "source"])
def test_a_reconversion_killed_before_its_commit_keeps_the_old_version_committed_and_readable(
        change, sources, bucket, tmp_path):
    """Scan versions live under prefixes of their own and the record is the commit: a reconversion SIGKILLed after
    the first array of its first scan leaves every scan's record and objects as they were (old voxels, for a new
    reader and for one that opened the scan before), the rerun commits the new versions - equal to converting the
    same sources with the same settings to disk - and leaves no object no record names; the old reader then gets an
    error saying to open the scan again, never a mix of the two versions."""
    import shutil

    from pipeline.volume_store.settings import ConvertSettings

    src = tmp_path / "src"
    shutil.copytree(sources, src)
    url = f"s3://{bucket}/vol"
    assert convert([str(src)], url, workers=1, progress=False).ok
    store = VolumeStore(url)
    before = {r["scan_id"]: r for r in store.records()}
    old = {sid: _levels(store, sid) for sid in before}
    readers = {sid: store.open_scan(sid)["0"] for sid in before}  # opened before the reconversion
    args = ["convert", str(src), "--store", url, "--workers", "1", "--no-progress"]
    settings = ConvertSettings()
    if change == "spacing":
        args += ["--spacing", "2,1,1"]
        settings = ConvertSettings(spacing=(2.0, 1.0, 1.0))
        changed = set(before)
    else:
        target = next(src.rglob("1.3.6.1.mhd"))
        write_mhd(target, _phantom(np.random.default_rng(7)))
        changed = {"1.3.6.1"}

    proc = _stopped_run(args, "convert:objects", tmp_path / "killed.log")
    try:  # stopped half-way through a new version: everything committed reads as before
        half = [o for o in _orphans(VolumeStore(url))]
        assert half and {version_of(o.split("/")[1]) for o in half} <= changed
        for sid, rec in before.items():
            assert VolumeStore(url).read_record(sid) == rec
            np.testing.assert_array_equal(readers[sid][...], old[sid]["0"])
    finally:
        _kill_all(proc)
    store = VolumeStore(url)
    assert {r["scan_id"]: r for r in store.records()} == before
    for sid in before:
        got = _levels(store, sid)
        assert got.keys() == old[sid].keys()
        for level in got:
            np.testing.assert_array_equal(got[level], old[sid][level])
        np.testing.assert_array_equal(readers[sid][...], old[sid]["0"])
    assert _genesis("stores", "verify", url, "--no-progress").returncode == 1  # the half-written version: stray
    shown = _genesis("stores", "show", url)
    assert shown.returncode == 0 and f"{N_SCANS} scans ({N_SCANS} ok, 0 failed)" in shown.out, shown.err
    assert "warning: 1 scan folders no ok row names" in shown.out, shown.out

    rerun = _genesis(*args)
    assert rerun.returncode == 0, rerun.out + rerun.err
    assert "removed the uncommitted objects of 1 scan(s)" in rerun.out, rerun.out
    assert f"converted {len(changed)}, skipped {len(before) - len(changed)}" in rerun.out, rerun.out
    reference = tmp_path / "ref"
    assert convert([str(src)], str(reference), settings=settings, workers=1, progress=False).ok
    store = VolumeStore(url)
    _same_store(store, VolumeStore(reference))
    assert not _orphans(store) and all(len(_versions(store, sid)) == 1 for sid in before)
    for sid in before:
        rec = store.read_record(sid)
        assert (rec["path"] != before[sid]["path"]) == (sid in changed)
        if sid in changed:
            with pytest.raises(StoreIntegrityError, match=rf"scan {sid}: array 0: shard c/0/0/0 is missing .*"
                                                          r"converted again since it was opened, open it again"):
                readers[sid][...]
        else:
            np.testing.assert_array_equal(readers[sid][...], old[sid]["0"])
    verified = _genesis("stores", "verify", url, "--no-progress")
    assert verified.returncode == 0 and f"{N_SCANS} ok; whole" in verified.out, verified.out


def test_a_repair_killed_before_its_commit_leaves_the_scan_as_it_was(sources, bucket, s3_server, tmp_path):
    """`verify --repair` reconverts a damaged scan as a new version: killed half-way, the scan keeps its record (still
    named damaged, never missing or half-replaced); the next repair mends it and removes the stray version."""
    url = f"s3://{bucket}/vol"
    assert convert([str(sources)], url, workers=1, progress=False).ok
    rel = VolumeStore(url).scan_rel("1.3.6.2")
    s3_server.client().delete_object(Bucket=bucket, Key=f"vol/{rel}/1/c/0/0/0")
    rec = VolumeStore(url).read_record("1.3.6.2")
    proc = _stopped_run(["stores", "verify", url, "--repair", "--no-progress"], "convert:objects",
                        tmp_path / "repair.log")
    _kill_all(proc)
    store = VolumeStore(url)
    assert store.read_record("1.3.6.2") == rec and len(_versions(store, "1.3.6.2")) == 2
    found = _genesis("stores", "verify", url, "--no-progress")
    assert found.returncode == 1 and "damaged   1.3.6.2  1/c/0/0/0 missing" in found.out, found.out
    assert "is a folder no ok record accounts for" in found.out, found.out
    repaired = _genesis("stores", "verify", url, "--repair", "--no-progress")
    assert repaired.returncode == 0 and "repaired  1.3.6.2" in repaired.out, repaired.out + repaired.err
    store = VolumeStore(url)
    assert not _orphans(store) and _versions(store, "1.3.6.2") == [store.scan_rel("1.3.6.2").split("/")[1]]
    assert store.scan_rel("1.3.6.2") != rel
    clean = _genesis("stores", "verify", url, "--no-progress")
    assert clean.returncode == 0 and f"{N_SCANS} ok; whole" in clean.out, clean.out


def test_a_commit_over_a_record_another_writer_changed_is_refused(sources, bucket):
    """The record is written If-Match the record read before writing (If-None-Match when there was none): a writer
    whose lease was taken over after its last check cannot replace the newer writer's commit."""
    url = f"s3://{bucket}/vol"
    assert convert([str(sources)], url, workers=1, progress=False).ok
    store = VolumeStore(url)
    rec, etag = store.read_record_versioned("1.3.6.0")
    assert rec == store.read_record("1.3.6.0") and etag
    newer = {**rec, "converted_at": "2026-12-07T10:00:00+00:00"}
    assert store.commit_record(newer, etag)  # the newer writer commits
    stale = {**rec, "path": "scans/1.3.6.0@0badc0de"}
    assert not store.commit_record(stale, etag) and not store.commit_record(stale, None)
    assert store.read_record("1.3.6.0") == newer
    assert store.read_record_versioned("no-such-scan") == (None, None)
