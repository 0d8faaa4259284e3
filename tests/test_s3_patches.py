"""Patch stores in a bucket (a real S3 API: moto's server on 127.0.0.1, tests/s3_server.py): built from a volume
store into `s3://`, equal to the same build on disk; damage named on read and by verify; a SIGKILLed build leaves
nothing readable and its rerun completes; the loader streams the same batches from the bucket as from disk."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pytest
from conftest import write_mhd

from pipeline.data import CubeStreamConfig, PatchCubes
from pipeline.patches.config import PretrainPatchConfig
from pipeline.patches.extract import extract_pretrain
from pipeline.patches.store import PatchStore, PatchStoreError
from pipeline.volume_store.convert import convert
from pipeline.volume_store.errors import StoreIntegrityError

REPO = Path(__file__).resolve().parent.parent
TINY = PretrainPatchConfig(cube_size=(16, 16, 16), per_scan=6, border_yx=4, border_z=2, min_slices=16)


def lungish(rng, shape=(24, 40, 40)) -> np.ndarray:
    vol = np.full(shape, 40, dtype=np.int16)
    vol[:, :, : shape[2] // 2] = -850
    return (vol + rng.normal(0, 15, shape)).astype(np.int16)


@pytest.fixture
def volume_store(tmp_path, rng) -> Path:
    """Four small lung-like scans in LUNA16 subsets (train, validation, test splits), converted on disk."""
    for i, subset in enumerate([0, 1, 5, 7]):
        write_mhd(tmp_path / "luna" / f"subset{subset}" / f"1.2.840.{i}.mhd", lungish(rng))
    assert convert([str(tmp_path / "luna")], str(tmp_path / "vs"), workers=1, progress=False).ok
    return tmp_path / "vs"


def _objects(s3_server, bucket: str, prefix: str = "") -> dict[str, bytes]:
    client = s3_server.client()
    keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
            for o in page.get("Contents", [])]
    return {k: client.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}


def _local_objects(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_pretraining_store_in_a_bucket_equals_the_one_on_disk(volume_store, tmp_path, s3_server, bucket):
    local = extract_pretrain(str(volume_store), TINY, out_root=str(tmp_path / "ps"), workers=1, progress=False)
    url = f"s3://{bucket}/patches"
    res = extract_pretrain(str(volume_store), TINY, out_root=url, workers=2, progress=False)
    assert not res.reused and res.key == local.key and res.path == f"{url}/pretrain-{local.key}"
    assert res.n_cubes == local.n_cubes == 4 * TINY.per_scan and res.counts == local.counts
    # the bucket holds the store and nothing else: no scaffolding, no lease, no temporary object
    objects = _objects(s3_server, bucket)
    assert all(k.startswith(f"patches/pretrain-{local.key}/") for k in objects), sorted(objects)
    on_disk = _local_objects(Path(local.path))
    stored = {k.split("/", 2)[2]: v for k, v in objects.items()}
    assert sorted(stored) == sorted(on_disk)
    shards = [k for k in stored if k.startswith("cubes/c/")]
    assert len(shards) == 4 and all(stored[k] == on_disk[k] for k in shards + ["cubes/zarr.json"])  # byte for byte
    ps, ref = PatchStore(res.path), PatchStore(local.path)
    assert ps.url == res.path and ps.path == res.path and ref.path == local.path and ps.key == ref.key
    rows = np.random.default_rng(0).permutation(len(ref))
    np.testing.assert_array_equal(ps.read_cubes(rows), ref.read_cubes(rows))
    np.testing.assert_array_equal(ps.cubes[...], ref.cubes[...])
    pd.testing.assert_frame_equal(ps.index, ref.index)
    assert [s for s, _, _ in ps.verify()] == ["ok", "ok"]
    again = extract_pretrain(str(volume_store), TINY, out_root=url, workers=1, progress=False)
    assert again.reused and again.path == res.path  # reuse is a lookup in the bucket


def test_loader_streams_the_same_batches_from_the_bucket(volume_store, tmp_path, bucket):
    local = extract_pretrain(str(volume_store), TINY, out_root=str(tmp_path / "ps"), workers=1, progress=False)
    remote = extract_pretrain(str(volume_store), TINY, out_root=f"s3://{bucket}/ps", workers=1, progress=False)
    for config in (CubeStreamConfig(split="train", batch_size=4, buffer_size=8, seed=3),
                   CubeStreamConfig(split="all", batch_size=6, shuffle=False)):
        for rank in (0, 1) if config.split == "train" else (0,):
            world = 2 if config.split == "train" else 1
            a, b = (PatchCubes(p, config, rank=rank, world_size=world) for p in (local.path, remote.path))
            a.set_epoch(1)
            b.set_epoch(1)
            got, want = list(b.batches()), list(a.batches())
            assert len(got) == len(want) > 0
            for x, y in zip(got, want):
                assert x.dtype == y.dtype and np.array_equal(x.numpy(), y.numpy())


def test_a_flipped_byte_in_a_bucket_shard_is_named_on_read_and_by_verify(volume_store, s3_server, bucket):
    res = extract_pretrain(str(volume_store), TINY, out_root=f"s3://{bucket}/ps", workers=1, progress=False)
    client = s3_server.client()
    key = f"ps/{Path(res.path).name}/cubes/c/1/0/0/0/0"
    data = bytearray(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    data[40] ^= 0xFF  # inside the shard's first cube (the index sits at its end)
    client.put_object(Bucket=bucket, Key=key, Body=bytes(data))
    ps = PatchStore(res.path)
    ps.read_cubes(np.arange(6))  # shard 0 is intact
    with pytest.raises(StoreIntegrityError, match=rf"{res.path}: array cubes: shard c/1/0/0/0/0 inner chunk 0 fails "
                                                  r"its CRC32C checksum.*genesis patches pretrain"):
        ps.read_cubes(np.array([7, 6]))
    status = {part: (s, detail) for s, part, detail in PatchStore(res.path).verify()}
    assert status["cubes"] == ("damaged", "shard c/1/0/0/0/0 inner chunk 0 fails its CRC32C checksum")
    assert status["index.parquet"][0] == "ok"
    client.delete_object(Bucket=bucket, Key=key)
    with pytest.raises(StoreIntegrityError, match=r"shard c/1/0/0/0/0 is missing"):
        PatchStore(res.path).read_cubes(np.arange(12))  # never zeros
    assert PatchStore(res.path).verify()[1] == ("damaged", "cubes", "shard c/1/0/0/0/0 is missing")


def test_task_store_in_a_bucket(tmp_path, rng, s3_server, bucket):
    """One classification task (NCC), tiny: the same store as on disk, cubes, index and case table."""
    from pipeline.patches.task_extract import extract_task
    from pipeline.tasks.registry import get_task

    rows = []
    for i, subset in enumerate([0, 1, 2, 5, 7, 8]):
        uid = f"1.2.840.{i}"
        arr = (np.full((24, 32, 32), -850) + rng.normal(0, 10, (24, 32, 32))).astype(np.int16)
        arr[12, 16, 10 + i] = 400
        write_mhd(tmp_path / "luna" / f"subset{subset}" / f"{uid}.mhd", arr, spacing=(1.0, 1.0, 1.0),
                  origin=(0.0, 0.0, 0.0))
        rows += [{"seriesuid": uid, "coordX": 10.0 + i, "coordY": 16.0, "coordZ": 12.0, "class": 1},
                 {"seriesuid": uid, "coordX": 8.0, "coordY": 8.0, "coordZ": 8.0, "class": 0}]
    pd.DataFrame(rows).to_csv(tmp_path / "luna" / "candidates.csv", index=False)
    assert convert([str(tmp_path / "luna")], str(tmp_path / "vs"), workers=1, progress=False).ok
    spec = get_task("ncc").with_overrides(cube_size=(8, 16, 16))
    spec = dataclasses.replace(spec, sampling=dataclasses.replace(spec.sampling, negatives_per_positive=None))
    local = extract_task(str(tmp_path / "vs"), spec, out_root=str(tmp_path / "ps"), workers=1, progress=False)
    res = extract_task(str(tmp_path / "vs"), spec, out_root=f"s3://{bucket}/ps", workers=1, progress=False)
    assert res.key == local.key and res.n_cubes == local.n_cubes == 12 and not res.reused
    ps, ref = PatchStore(res.path), PatchStore(local.path)
    assert ps.purpose == "classification" and ps.task_spec().name == "ncc"
    np.testing.assert_array_equal(ps.read_cubes(np.arange(12)[::-1]), ref.read_cubes(np.arange(12)[::-1]))
    pd.testing.assert_frame_equal(ps.index, ref.index)
    pd.testing.assert_frame_equal(ps.scans, ref.scans)
    assert all(s == "ok" for s, _, _ in ps.verify())
    assert all(k.startswith(f"ps/{Path(res.path).name}/") for k in _objects(s3_server, bucket))
    assert extract_task(str(tmp_path / "vs"), spec, out_root=f"s3://{bucket}/ps", workers=1, progress=False).reused


def _stopped(proc: subprocess.Popen) -> bool:
    try:
        return psutil.Process(proc.pid).status() == psutil.STATUS_STOPPED
    except psutil.NoSuchProcess:
        return False


def test_a_killed_build_in_a_bucket_is_never_read_and_its_rerun_completes(volume_store, tmp_path, s3_server,
                                                                          bucket):
    """SIGKILLed after its first shard is in the bucket: no commit object, so no store; the rerun reclaims the
    prefix (the killed run's lease is taken over: its holder is dead) and builds the same store."""
    ref = extract_pretrain(str(volume_store), TINY, out_root=str(tmp_path / "ref"), workers=1, progress=False)
    url = f"s3://{bucket}/ps"
    script = ("import sys; from pipeline.patches.extract import extract_pretrain; from pipeline.patches.config import "
              "PretrainPatchConfig as C; extract_pretrain(sys.argv[1], C(cube_size=(16, 16, 16), per_scan=6, "
              "border_yx=4, border_z=2, min_slices=16), out_root=sys.argv[2], workers=1, progress=False)")
    log = tmp_path / "killed.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-c", script, str(volume_store), url], cwd=REPO, stdout=out,
                                stderr=subprocess.STDOUT, env={**os.environ, "GENESIS_STOP_AT": "assemble"})
    try:
        deadline = time.monotonic() + 120
        while not _stopped(proc):
            assert proc.poll() is None, log.read_text(encoding="utf-8", errors="replace")[-2000:]
            assert time.monotonic() < deadline, "the build never reached its first assembled shard"
            time.sleep(0.02)
        children = psutil.Process(proc.pid).children(recursive=True)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        with contextlib.suppress(psutil.NoSuchProcess, NameError):
            for p in children:
                p.kill()
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    name = Path(ref.path).name
    left = _objects(s3_server, bucket)
    assert any(k.startswith(f"ps/{name}/cubes/c/") for k in left), sorted(left)  # a shard was written...
    assert f"ps/{name}/zarr.json" not in left and f"ps/.{name}.lock" in left  # ...but nothing committed
    with pytest.raises(PatchStoreError, match="no zarr.json"):
        PatchStore(f"{url}/{name}")
    res = extract_pretrain(str(volume_store), TINY, out_root=url, workers=1, progress=False)
    assert not res.reused and res.key == ref.key
    assert all(k.startswith(f"ps/{name}/") for k in _objects(s3_server, bucket))
    ps = PatchStore(res.path)
    rows = np.arange(len(ps))
    np.testing.assert_array_equal(ps.read_cubes(rows), PatchStore(ref.path).read_cubes(rows))
    assert all(s == "ok" for s, _, _ in ps.verify())


def test_volume_store_and_patch_store_both_in_a_bucket(volume_store, tmp_path, s3_server, bucket):
    """Converted into the bucket and extracted from there (the default root: `patch_stores` beside the volume
    store): the same key and the same cubes as the whole pipeline on disk."""
    local = extract_pretrain(str(volume_store), TINY, out_root=str(tmp_path / "ps"), workers=1, progress=False)
    assert convert([str(tmp_path / "luna")], f"s3://{bucket}/data/vs", workers=1, progress=False).ok
    res = extract_pretrain(f"s3://{bucket}/data/vs", TINY, workers=2, progress=False)
    assert res.path == f"s3://{bucket}/data/patch_stores/pretrain-{local.key}" and res.key == local.key
    ps, ref = PatchStore(res.path), PatchStore(local.path)
    assert ps.attrs["volume_store"]["path"] == f"s3://{bucket}/data/vs"
    np.testing.assert_array_equal(ps.read_cubes(np.arange(len(ref))), ref.read_cubes(np.arange(len(ref))))
    pd.testing.assert_frame_equal(ps.index, ref.index)
