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
from pipeline.volume_store.convert import convert
from pipeline.volume_store.errors import ScanNotFoundError, StoreError, StoreIntegrityError, StoreLockedError
from pipeline.volume_store.store import VolumeStore
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


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _canon(cat) -> bool:
    return all(os.path.isabs(p) and "/./" not in p and "//" not in p for p in cat["source_path"])


def test_a_source_is_one_scan_however_its_path_is_spelled_and_wherever_convert_runs(tmp_path, rng, monkeypatch,
                                                                                     capsys):
    """Finding 1: ids came from the path as typed, so `src` then `$PWD/src/` (or another cwd) stored every
    scan twice under new ids, and records held cwd-relative paths that repair could not find elsewhere."""
    data = tmp_path / "data"
    arrays = {"my scan": ct_array(rng, (16, 24, 24)), "my_scan": ct_array(rng, (16, 24, 24))}
    for name, arr in arrays.items():
        _nifti(write_mhd(data / "c3" / "tmp.mhd", arr).parent / f"{name}.nii.gz", arr)
    for p in (data / "c3").glob("tmp.*"):
        p.unlink()
    arrays["1.2.3"] = ct_array(rng, (16, 24, 24))
    write_mhd(data / "subset0" / "1.2.3.mhd", arrays["1.2.3"])
    (tmp_path / "alias").symlink_to(data, target_is_directory=True)  # the same folder under another name
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path)
    first = convert(["data/c3", "data/subset0"], "st", workers=1, progress=False)
    assert first.ok and len(first.converted) == 3, first.report()
    cat = VolumeStore(tmp_path / "st").catalog()
    assert _canon(cat) and cat["scan_id"].is_unique
    ids = _ids(tmp_path / "st")
    assert ids[str(data / "subset0" / "1.2.3.mhd")] == "1.2.3"
    for spelled, cwd in (([f"{data}/c3/", "alias/subset0"], tmp_path),  # absolute with a slash; through a link
                         (["../data/c3", "../alias/./subset0"], tmp_path / "elsewhere")):
        monkeypatch.chdir(cwd)
        again = convert(spelled, str(tmp_path / "st"), workers=1, progress=False)
        assert again.ok and again.converted == [] and len(again.skipped) == 3, again.report()
        assert _ids(tmp_path / "st") == ids
    assert sorted(p.name for p in (tmp_path / "st" / "scans").iterdir() if p.is_dir()) == sorted(ids.values())
    assert "stores verify" in again.report()  # a skip is a size check; the report says where content is checked

    monkeypatch.chdir(tmp_path / "elsewhere")  # repair works from anywhere: records hold absolute paths
    _flip(_shard(tmp_path / "st", "1.2.3"), 100)
    assert verify_command(str(tmp_path / "st"), repair=True, progress=False) == 0
    out = capsys.readouterr().out
    assert f"repaired  1.2.3  reconverted from {data / 'subset0' / '1.2.3.mhd'}" in out
    np.testing.assert_array_equal(VolumeStore(tmp_path / "st").read_scan("1.2.3"), arrays["1.2.3"])


def test_records_of_older_versions_with_relative_paths_are_recognised(tmp_path, rng, monkeypatch, capsys):
    """Finding 1, migration: a store written with cwd-relative paths keeps its ids when its sources are given
    another way, and repair says the source is not found (not that it changed) from another folder."""
    for uid in ("1.2.3", "1.2.4"):
        write_mhd(tmp_path / "data" / "subset0" / f"{uid}.mhd", ct_array(rng, (16, 24, 24)))
    (tmp_path / "elsewhere").mkdir()
    store = tmp_path / "st"
    monkeypatch.chdir(tmp_path)
    convert(["data"], str(store), workers=1, progress=False)
    for rec_path in (store / ".records").glob("*.json"):  # what an older version wrote: paths as typed
        rec = json.loads(rec_path.read_text(encoding="utf-8"))
        rel = os.path.relpath(rec["source_path"])
        rec["source_path"] = rec["source"]["source_path"] = rel
        rec["source"]["files"] = [os.path.relpath(f) for f in rec["source"]["files"]]
        rec["source_key"] = "0123456789abcdef"
        rec_path.write_text(json.dumps(rec), encoding="utf-8")
    VolumeStore(store).write_catalog()
    assert not _canon(VolumeStore(store).catalog())

    monkeypatch.chdir(tmp_path / "elsewhere")
    _flip(_shard(store, "1.2.4"), 100)
    assert verify_command(str(store), repair=True, progress=False) == 1
    out = capsys.readouterr().out
    assert "failed    1.2.4  its source data/subset0/1.2.4.mhd is not there (recorded relative" in out
    assert "changed since" not in out

    monkeypatch.chdir(tmp_path)
    again = convert([str(tmp_path / "data")], str(store), workers=1, progress=False)  # absolute this time
    assert again.ok and again.skipped == ["1.2.3"] and again.converted == ["1.2.4"], again.report()
    cat = VolumeStore(store).catalog()
    assert sorted(cat["scan_id"]) == ["1.2.3", "1.2.4"] and (cat["status"] == "ok").all() and _canon(cat)


def test_sources_sharing_a_name_each_get_an_id_and_identical_copies_are_stored_once(tmp_path, rng):
    """Finding 2: p1/CT + p2/CT, s.nrrd + s.nii.gz + s.mhd, x.nii.gz beside x.zip!x.nii.gz and two members of one
    name in a zip all converted but one ("duplicate scan_id"), with several catalog rows per id."""
    src = tmp_path / "src"
    arrays: dict[str, np.ndarray] = {}

    def put(rel: str) -> None:
        arrays[rel] = ct_array(rng, (16, 24, 24))
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (write_mhd if rel.endswith(".mhd") else _nifti)(src / rel, arrays[rel])

    for rel in ("p1/CT.nii.gz", "p2/CT.nii.gz", "s.nrrd", "s.nii.gz", "s.mhd", "x.nii.gz", "tmp/dup/y.nii.gz",
                "tmp/dup2/y.nii.gz", "tmp/x.nii.gz", "luna/subset0/1.2.3.mhd"):
        put(rel)
    import shutil
    import zipfile

    with zipfile.ZipFile(src / "x.zip", "w") as zf:
        for rel in ("tmp/x.nii.gz", "tmp/dup/y.nii.gz", "tmp/dup2/y.nii.gz"):
            zf.write(src / rel, rel[4:])
            arrays[f"x.zip!{rel[4:]}"] = arrays.pop(rel)
    shutil.rmtree(src / "tmp")
    with zipfile.ZipFile(src / "luna" / "subset0.zip", "w") as zf:  # the same series again, zipped
        for ext in (".mhd", ".raw"):
            zf.write(src / "luna" / "subset0" / f"1.2.3{ext}", f"subset0/1.2.3{ext}")
    store = tmp_path / "st"
    s = convert([str(src)], str(store), workers=1, progress=False)
    vs = VolumeStore(store)
    cat = vs.catalog()
    assert cat["scan_id"].is_unique, cat[["scan_id", "source_path"]]
    by_path = cat.set_index("source_path")
    for rel, arr in arrays.items():
        row = by_path.loc[str(src / rel)]
        assert row["status"] == "ok", (rel, row["error"])
        name = row["discovered_id"]
        if name != "1.2.3":  # every source of a shared name gets the suffix, none keeps the plain name
            assert row["scan_id"].startswith(f"{name}-") and len(row["scan_id"]) == len(name) + 9, row["scan_id"]
        np.testing.assert_array_equal(vs.read_scan(row["scan_id"]), arr, err_msg=rel)
    copy = by_path.loc[f"{src}/luna/subset0.zip!subset0/1.2.3.mhd"]  # identical bytes: one scan, reported
    assert copy["status"] == "failed" and copy["scan_id"].startswith("1.2.3-") and copy["discovered_id"] == "1.2.3"
    assert f"same content as {src}/luna/subset0/1.2.3.mhd (scan 1.2.3)" in copy["error"]
    assert [f[0] for f in s.failed] == [copy["scan_id"]]
    ids = _ids(store)
    again = convert([str(src)], str(store), workers=1, progress=False)
    assert again.converted == [] and len(again.skipped) == len(arrays) and _ids(store) == ids

    from pipeline.ingest import discover
    from pipeline.volume_store.scan_ids import assign_scan_ids, canonical_source

    scans = [canonical_source(x) for x in discover([str(src)]).scans]  # whichever order they are found in
    forward = {a.source.source_path: a.key for a in assign_scan_ids(scans, {})}
    assert forward == {a.source.source_path: a.key for a in assign_scan_ids(scans[::-1], {})} == ids


def test_candidates_join_scans_by_their_discovered_name(tmp_path, rng):
    """Finding 2, LUNA16: a seriesuid whose scan id got a suffix (another file of that name) still gets its
    candidates.csv rows; the join used scan_id and lost them."""
    import dataclasses

    import pandas as pd

    from pipeline.patches.task_plan import plan_task
    from pipeline.tasks import get_task

    src = tmp_path / "luna"
    write_mhd(src / "subset0" / "1.2.840.7.mhd", ct_array(rng, (16, 24, 24)))
    _nifti(write_mhd(src / "derived" / "t.mhd", ct_array(rng, (16, 24, 24))).parent / "1.2.840.7.nii.gz",
           ct_array(rng, (16, 24, 24)))
    pd.DataFrame([{"seriesuid": "1.2.840.7", "coordX": 0.0, "coordY": 0.0, "coordZ": 0.0, "class": c}
                  for c in (1, 0)]).to_csv(src / "candidates.csv", index=False)
    store = tmp_path / "st"
    convert([str(src)], str(store), workers=1, progress=False)
    cat = VolumeStore(store).catalog().set_index("source_path")
    luna_id = cat.loc[str(src / "subset0" / "1.2.840.7.mhd"), "scan_id"]
    assert luna_id.startswith("1.2.840.7-")
    spec = get_task("ncc")
    spec = dataclasses.replace(spec, sampling=dataclasses.replace(spec.sampling, negatives_per_positive=None))
    plan = plan_task(VolumeStore(store), spec, seed=0)
    assert plan.candidates_without_scan == 0
    assert [(c["case_id"], c["scan_ids"], len(c["candidates"])) for c in plan.cases] == [("1.2.840.7", [luna_id], 2)]
    assert [s["scan_id"] for s in plan.skipped] == [cat.loc[str(src / "derived" / "1.2.840.7.nii.gz"), "scan_id"]]


def test_patch_store_damage_is_named_and_verified(tmp_path, rng, capsys):
    """Finding 3: a deleted cubes shard read back as constant cubes, a flipped byte raised a bare checksum
    error, and `stores verify` refused patch stores."""
    from pipeline.patches.config import PretrainPatchConfig
    from pipeline.patches.extract import extract_pretrain
    from pipeline.patches.store import PatchStore

    for i in range(2):
        vol = np.full((24, 48, 48), 40, dtype=np.int16)
        vol[:, :, :24] = -850
        write_mhd(tmp_path / "luna" / "subset0" / f"1.2.{i}.mhd", (vol + rng.normal(0, 15, vol.shape)).astype(np.int16))
    convert([str(tmp_path / "luna")], str(tmp_path / "vs"), workers=1, progress=False)
    cfg = PretrainPatchConfig(cube_size=(16, 16, 16), per_scan=6, border_yx=4, border_z=2, min_slices=16)
    res = extract_pretrain(str(tmp_path / "vs"), cfg, out_root=str(tmp_path / "ps"), workers=1, progress=False)
    path = res.path
    shards = sorted(p.relative_to(path / "cubes").as_posix() for p in (path / "cubes" / "c").rglob("*") if p.is_file())
    assert shards == ["c/0/0/0/0/0", "c/1/0/0/0/0"] and len(PatchStore(path)) == 12
    assert verify_command(str(path), repair=False, progress=False) == 0
    assert "whole" in capsys.readouterr().out

    (path / "cubes" / "c" / "1" / "0" / "0" / "0" / "0").unlink()
    with pytest.raises(StoreIntegrityError, match=rf"{path}: array cubes: shard c/1/0/0/0/0 is missing"):
        PatchStore(path).read_cubes(np.arange(12))
    PatchStore(path).read_cubes(np.arange(6))  # the intact shard still reads
    _flip(path / "cubes" / "c" / "0" / "0" / "0" / "0" / "0", 40)
    with pytest.raises(StoreIntegrityError, match=rf"{path}: array cubes: shard c/0/0/0/0/0 .*CRC32C.*genesis "
                                                  r"patches pretrain"):
        PatchStore(path).read_cubes([0])
    assert verify_command(str(path), repair=True, progress=False) == 1
    out = capsys.readouterr().out
    assert "damaged   cubes  shard c/0/0/0/0/0 inner chunk 0 fails its CRC32C checksum; shard c/1/0/0/0/0 is " \
           "missing" in out and "ok        index.parquet" in out
    assert "NOT whole" in out and "not repaired in place" in out
    assert main(["stores", "verify", str(path), "--no-progress"]) == 1
    assert "Traceback" not in capsys.readouterr().err


def test_verify_checks_the_stores_own_group_metadata(tmp_path, rng, capsys):
    """Finding 4: `scans/zarr.json` deleted and verify said the store was whole."""
    write_mhd(tmp_path / "src" / "subset0" / "1.2.3.mhd", ct_array(rng, (16, 24, 24)))
    store = tmp_path / "st"
    convert([str(tmp_path / "src")], str(store), workers=1, progress=False)
    (store / "scans" / "zarr.json").unlink()
    assert verify_command(str(store), repair=False, progress=False) == 1
    out = capsys.readouterr().out
    assert "store     scans/zarr.json is missing" in out and "NOT whole" in out
    assert verify_command(str(store), repair=True, progress=False) == 0
    assert "repaired  scans/zarr.json" in capsys.readouterr().out
    import zarr

    assert zarr.open_group(str(store), mode="r")["scans"]["1.2.3"]["0"].shape == (16, 24, 24)
    assert verify_command(str(store), repair=False, progress=False) == 0


def test_a_rerun_skip_is_a_size_check_and_verify_is_the_content_check(tmp_path, rng):
    """Finding 5: a flipped byte in a shard index is not seen by the rerun's stat-per-file skip (by design,
    for speed); the rerun's report says so and names `stores verify`, which finds it."""
    write_mhd(tmp_path / "src" / "subset0" / "1.2.3.mhd", ct_array(rng, (16, 24, 24)))
    store = tmp_path / "st"
    convert([str(tmp_path / "src")], str(store), workers=1, progress=False)
    _flip(_shard(store, "1.2.3"), -20)  # inside the shard index
    again = convert([str(tmp_path / "src")], str(store), workers=1, progress=False)
    assert again.skipped == ["1.2.3"]
    assert "checks their content" in again.report() and f"genesis stores verify {store}" in again.report()
    out = io.StringIO()
    from pipeline.volume_store.verify import verify_store

    checks, _ = verify_store(store, progress=False, out=out)
    assert [(c.status, c.scan_id) for c in checks] == [("damaged", "1.2.3")]


def test_a_nii_gz_beside_a_nii_of_the_same_stem_gets_its_own_voxels(tmp_path, rng):
    """ITK asked for `s.nii.gz` reads `s.nii` when both exist: each must still read back its own voxels."""
    src = tmp_path / "src"
    src.mkdir()
    plain, gz = ct_array(rng), ct_array(rng)
    sitk.WriteImage(make_image(plain), str(src / "s.nii"))
    sitk.WriteImage(make_image(gz), str(src / "s.nii.gz"))
    assert convert([str(src)], str(tmp_path / "store"), workers=1, progress=False).ok
    store = VolumeStore(tmp_path / "store")
    ids = _ids(tmp_path / "store")
    np.testing.assert_array_equal(store.read_scan(ids[str(src / "s.nii")]), plain)
    np.testing.assert_array_equal(store.read_scan(ids[str(src / "s.nii.gz")]), gz)
