"""Scan identity and store integrity: unique ids for any file name, damaged records and shards
named and repaired, stores created without deleting anything, a lock that dies with its holder."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import ct_array, make_image, write_mhd

from pipeline.cli import main
from pipeline.patches.store import catalog_hash
from pipeline.stores_cli import show_store, verify_command
from pipeline.volume_store import (ScanNotFoundError, StoreError, StoreIntegrityError, StoreLockedError, VolumeStore,
                                   convert)
from pipeline.volume_store.store import init_store

BAD_NAME = b"scan\xff\xfe.nii.gz"  # not UTF-8


def _nifti(path: Path, arr: np.ndarray) -> None:
    sitk.WriteImage(make_image(arr), str(path))


def _ids(store) -> dict[str, str]:
    cat = VolumeStore(store).catalog()
    return dict(zip(cat["source_path"], cat["scan_id"]))


def test_names_that_sanitise_alike_and_undecodable_names_get_their_own_scans(tmp_path, rng):
    src = tmp_path / "src"
    src.mkdir()
    arrays = {"my scan.nii.gz": ct_array(rng, (16, 24, 24)), "my_scan.nii.gz": ct_array(rng, (16, 24, 24)),
              "tmp.nii.gz": ct_array(rng, (16, 24, 24))}
    for name, arr in arrays.items():
        _nifti(src / name, arr)
    os.rename(bytes(src / "tmp.nii.gz"), bytes(src) + b"/" + BAD_NAME)
    arrays[os.fsdecode(BAD_NAME)] = arrays.pop("tmp.nii.gz")
    store = tmp_path / "s"
    first = convert([str(src)], str(store), workers=1, progress=False)
    assert first.ok and len(first.converted) == 3, first.report()
    vs = VolumeStore(store)
    cat = vs.catalog().set_index("source_key")
    assert len(cat) == 3 and (cat["status"] == "ok").all() and cat.index.is_unique
    assert len(set(cat["scan_id"])) == 3 and "my_scan" in set(cat["scan_id"])  # the unchanged name stays plain
    for name, arr in arrays.items():  # every id reads its own source's voxels
        row = cat[cat["source_path"].str.endswith(name if name.isprintable() else "scan\\xff\\xfe.nii.gz")]
        assert len(row) == 1, (name, cat["source_path"].tolist())
        np.testing.assert_array_equal(vs.read_scan(row["scan_id"].iloc[0]), arr)
    assert cat["source_path"].map(lambda p: p.encode("utf-8") is not None).all()  # valid UTF-8 in Parquet
    ids = _ids(store)
    again = convert([str(src)], str(store), workers=1, progress=False)
    assert again.converted == [] and len(again.skipped) == 3 and _ids(store) == ids  # stable, nothing redone
    text = show_store(str(store))
    assert "3 scans (3 ok, 0 failed)" in text and "warning" not in text


def test_a_damaged_record_is_a_failed_row_then_reconverted(tmp_path, rng):
    arr = ct_array(rng, (16, 24, 24))
    write_mhd(tmp_path / "src" / "subset0" / "1.2.3.mhd", arr)
    store = tmp_path / "s"
    convert([str(tmp_path / "src")], str(store), workers=1, progress=False)
    (store / ".records" / "1.2.3.json").write_text('{"scan_id": "1.2.3", "status": "ok", tru', encoding="utf-8")
    vs = VolumeStore(store)
    vs.write_catalog()  # never blocked, never silently missing a row
    row = vs.catalog().set_index("scan_id").loc["1.2.3"]
    assert row["status"] == "failed" and "damaged" in row["error"] and "reconverts" in row["error"]
    out = io.StringIO()
    from pipeline.volume_store.verify import verify_store

    checks, _ = verify_store(store, progress=False, out=out)
    assert [(c.status, c.scan_id) for c in checks] == [("damaged", "1.2.3")] and "unreadable" in out.getvalue()
    summary = convert([str(tmp_path / "src")], str(store), workers=1, progress=False)
    assert summary.converted == ["1.2.3"] and any("1.2.3.json was damaged" in n for n in summary.notes)
    assert "NOTE" in summary.report()
    assert vs.catalog().set_index("scan_id").loc["1.2.3", "status"] == "ok"
    np.testing.assert_array_equal(vs.read_scan("1.2.3"), arr)


def _shard(store: Path, scan: str, level: str = "0") -> Path:
    shards = sorted(p for p in (store / "scans" / scan / level / "c").rglob("*") if p.is_file())
    return shards[0]


def test_damaged_and_missing_shards_are_named_then_repaired(tmp_path, rng, capsys):
    arrays = {f"1.2.{i}": ct_array(rng, (40, 64, 64)) for i in range(3)}
    for uid, arr in arrays.items():
        write_mhd(tmp_path / "src" / "subset0" / f"{uid}.mhd", arr)
    store = tmp_path / "s"
    convert([str(tmp_path / "src")], str(store), workers=1, progress=False)
    vs = VolumeStore(store)
    meta = json.loads((store / "scans" / "1.2.0" / "0" / "zarr.json").read_text(encoding="utf-8"))
    inner = [c["name"] for c in meta["codecs"][0]["configuration"]["codecs"]]
    assert inner[-1] == "crc32c" and meta["codecs"][0]["configuration"]["index_codecs"][-1]["name"] == "crc32c"
    hash_before = catalog_hash(vs.catalog())

    shard = _shard(store, "1.2.0")
    with open(shard, "r+b") as fh:  # 4 KB of garbage inside the level-0 shard
        fh.seek(shard.stat().st_size // 3)
        fh.write(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(StoreIntegrityError, match=rf"{store}: scan 1\.2\.0: array 0: shard c/0/0/0 .*CRC32C"):
        vs.read_scan("1.2.0")
    with pytest.raises(StoreIntegrityError, match="scan 1.2.0: array 0"):
        vs.open_scan("1.2.0")["0"][5:7, 10:20, 10:20]  # a partial read checks the chunks it reads
    _shard(store, "1.2.1", "1").unlink()  # Zarr alone would read zeros here
    with pytest.raises(StoreIntegrityError, match=r"scan 1\.2\.1: array 1: shard c/0/0/0 is missing"):
        vs.read_scan("1.2.1", level=1)

    assert verify_command(str(store), repair=False, progress=False) == 1
    out = capsys.readouterr().out
    assert "damaged   1.2.0" in out and "damaged   1.2.1" in out and "ok        1.2.2" in out and "NOT whole" in out
    (tmp_path / "src" / "subset0" / "1.2.1.raw").write_bytes(  # 1.2.1's source changed since: cannot repair
        ct_array(rng, (40, 64, 64)).tobytes())
    assert verify_command(str(store), repair=True, progress=False) == 1
    out = capsys.readouterr().out
    assert "repaired  1.2.0" in out and "failed    1.2.1" in out and "changed since" in out
    np.testing.assert_array_equal(vs.read_scan("1.2.0"), arrays["1.2.0"])
    assert not (store / "scans" / "1.2.1").exists()  # nothing left to read damaged data from
    cat = vs.catalog().set_index("scan_id")
    assert cat.loc["1.2.1", "status"] == "failed" and cat.loc["1.2.0", "status"] == "ok"
    assert verify_command(str(store), repair=False, progress=False) == 0  # consistent again
    assert "whole" in capsys.readouterr().out
    assert catalog_hash(vs.catalog()) != hash_before  # the patch-store key follows what the store holds


def test_patch_store_key_covers_content_digests(tmp_path, rng):
    write_mhd(tmp_path / "src" / "subset0" / "1.2.3.mhd", ct_array(rng, (16, 24, 24)))
    convert([str(tmp_path / "src")], str(tmp_path / "s"), workers=1, progress=False)
    cat = VolumeStore(tmp_path / "s").catalog()
    assert cat["content_digest"].str.startswith("xxh3-128:").all()
    changed = cat.copy()
    changed["content_digest"] = "xxh3-128:" + "0" * 32  # same sources and settings, other stored bytes
    assert catalog_hash(changed) != catalog_hash(cat)
    assert catalog_hash(cat.drop(columns=["content_digest"])) != catalog_hash(cat)


def test_missing_folder_unreadable_metadata_and_unknown_ids_are_clear_errors(tmp_path, rng, capsys):
    for uid in ("1.2.3", "1.2.4"):
        write_mhd(tmp_path / "src" / "subset0" / f"{uid}.mhd", ct_array(rng, (16, 24, 24)))
    store = tmp_path / "s"
    convert([str(tmp_path / "src")], str(store), workers=1, progress=False)
    vs = VolumeStore(store)
    import shutil

    shutil.rmtree(store / "scans" / "1.2.3")
    with pytest.raises(StoreIntegrityError, match=r"scan 1\.2\.3: its folder scans/1\.2\.3 is missing"):
        vs.open_scan("1.2.3")
    (store / "scans" / "1.2.4" / "0" / "zarr.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(StoreIntegrityError, match=r"scan 1\.2\.4: 0/zarr.json differs"):
        vs.open_scan("1.2.4")
    with pytest.raises(ScanNotFoundError, match="'nope' is not in"):
        vs.open_scan("nope")
    with pytest.raises(KeyError):  # still a KeyError for callers that look ids up
        vs.open_scan("nope")
    png = tmp_path / "p.png"
    assert main(["stores", "preview", str(store), "1.2.3", "--out", str(png)]) == 2
    err = capsys.readouterr().err
    assert "folder scans/1.2.3 is missing" in err and "Traceback" not in err
    assert "warning: 1 scan folders on disk but 2 ok rows" in show_store(str(store))
    assert verify_command(str(store), repair=False, progress=False) == 1
    out = capsys.readouterr().out
    assert "missing   1.2.3" in out and "damaged   1.2.4" in out
    with pytest.raises(StoreError, match="not a volume store"):
        verify_command(str(tmp_path / "src"), repair=False)


def test_store_creation_never_deletes_and_the_lock_dies_with_its_holder(tmp_path, rng):
    write_mhd(tmp_path / "src" / "subset0" / "1.2.3.mhd", ct_array(rng, (16, 24, 24)))
    store = tmp_path / "s"
    convert([str(tmp_path / "src")], str(store), workers=1, progress=False)
    before = sorted(p.relative_to(store).as_posix() for p in store.rglob("*") if p.is_file() and p.name != ".lock")
    init_store(store)  # create-if-absent: an existing store is left exactly as it is
    assert sorted(p.relative_to(store).as_posix() for p in store.rglob("*")
                  if p.is_file() and p.name != ".lock") == before
    half = tmp_path / "half"  # a creation killed after scans/ was made: completed, not refused
    (half / "scans").mkdir(parents=True)
    init_store(half)
    assert VolumeStore(half).attrs["kind"] == "volume-store"

    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pipeline.volume_store.store import lock_store; "
                               "lock_store(sys.argv[1]); print('held', flush=True); time.sleep(60)", str(store)],
        stdout=subprocess.PIPE, cwd=Path(__file__).parents[1])
    try:
        assert holder.stdout.readline().decode("utf-8").strip() == "held"
        with pytest.raises(StoreLockedError, match=rf"being written by another conversion .*pid {holder.pid}"):
            convert([str(tmp_path / "src")], str(store), workers=1, progress=False)
        holder.kill()
        holder.wait(timeout=30)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    assert convert([str(tmp_path / "src")], str(store), workers=1, progress=False).skipped == ["1.2.3"]


def test_two_conversions_racing_on_a_new_store(tmp_path, rng):
    for i in range(2):
        write_mhd(tmp_path / "src" / "subset0" / f"1.2.{i}.mhd", ct_array(rng, (16, 24, 24)))
    store = tmp_path / "new"
    cmd = [sys.executable, "-m", "pipeline.cli", "convert", str(tmp_path / "src"), "--store", str(store),
           "--workers", "1", "--no-progress"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=Path(__file__).parents[1])
             for _ in range(2)]
    results = []
    deadline = time.monotonic() + 120
    for p in procs:
        out, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
        results.append((p.returncode, err.decode("utf-8", "replace")))
    codes = sorted(c for c, _ in results)
    assert codes in ([0, 0], [0, 3]), results  # one waits its turn or is told the store is busy
    assert not any("group exists" in e.lower() or "Traceback" in e for _, e in results), results
    assert VolumeStore(store).scan_ids() == ["1.2.0", "1.2.1"]
