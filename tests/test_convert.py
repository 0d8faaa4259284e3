"""Conversion into the volume store: exact voxels, OME metadata, catalog, reruns, bad input, kills."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
import SimpleITK as sitk
import zarr
from conftest import ct_array, make_image, write_dicom_series, write_mhd

from pipeline.cli import main
from pipeline.volume_store.convert import convert
from pipeline.volume_store.settings import ConvertSettings
from pipeline.volume_store.store import VolumeStore
from pipeline.volume_store.tables import read_table

SPACING_XYZ = (0.7, 0.8, 2.5)
ORIGIN_XYZ = (-120.0, -110.0, -300.0)


def _luna(root: Path, rng, n=3, shape=(24, 40, 48)) -> dict[str, np.ndarray]:
    arrays = {}
    for i in range(n):
        uid = f"1.3.6.1.4.1.14519.5.2.1.6279.6001.{100 + i}"
        arrays[uid] = ct_array(rng, shape=shape)
        write_mhd(root / f"subset{i % 2}" / f"{uid}.mhd", arrays[uid])
    (root / "annotations.csv").write_text("seriesuid,coordX,coordY,coordZ,diameter_mm\n"
                                          f"{next(iter(arrays))},-100.5,-90.25,-280.0,6.5\n")
    (root / "candidates.csv").write_text("seriesuid,coordX,coordY,coordZ,class\n"
                                         f"{next(iter(arrays))},-100.5,-90.25,-280.0,1\n"
                                         f"{next(iter(arrays))},-80.0,-70.0,-290.0,0\n")
    return arrays


def _catalog(store) -> pd.DataFrame:
    return VolumeStore(store).catalog().set_index("scan_id")


def test_voxels_metadata_catalog_and_tables(tmp_path, rng):
    arrays = _luna(tmp_path / "luna", rng)
    store = tmp_path / "store"
    summary = convert([str(tmp_path / "luna")], str(store), workers=1, progress=False)
    assert summary.ok and sorted(summary.converted) == sorted(arrays)
    vs = VolumeStore(store)
    root_attrs = json.loads((store / "zarr.json").read_text(encoding="utf-8"))["attributes"]["genesis"]
    assert root_attrs["kind"] == "volume-store" and root_attrs["schema_version"] == 1
    for uid, arr in arrays.items():
        group = vs.open_scan(uid)
        np.testing.assert_array_equal(group["0"][...], arr)
        assert group["0"].dtype == np.int16
        ms = dict(group.attrs)["ome"]["multiscales"][0]
        assert dict(group.attrs)["ome"]["version"] == "0.5"
        assert [a["name"] for a in ms["axes"]] == ["z", "y", "x"] and ms["axes"][0]["unit"] == "millimeter"
        t0 = ms["datasets"][0]["coordinateTransformations"]
        assert t0[0]["scale"] == pytest.approx(SPACING_XYZ[::-1])
        assert t0[1]["translation"] == pytest.approx(ORIGIN_XYZ[::-1])
        assert len(ms["datasets"]) == 3  # small pyramid
        level1 = group["1"]
        assert level1.shape == (24, 20, 24)  # thick slices: only y, x halved
        assert group["0"].metadata.to_dict()["codecs"][0]["name"] == "sharding_indexed"
    cat = _catalog(store)
    assert set(cat.index) == set(arrays) and (cat["status"] == "ok").all()
    row = cat.loc[next(iter(arrays))]
    assert list(row["shape"]) == [24, 40, 48] and list(row["spacing"]) == pytest.approx([2.5, 0.8, 0.7])
    assert list(row["origin"]) == pytest.approx([-300.0, -110.0, -120.0])
    assert row["dataset"] == "luna16" and row["subset"] == "subset0" and row["source_checksum"].startswith("xxh3-128:")
    ann = read_table(store, "annotations")
    assert ann.shape == (1, 5) and ann.loc[0, "diameter_mm"] == 6.5
    assert read_table(store, "candidates")["class"].tolist() == [1, 0]


def test_rerun_skips_and_changed_source_is_reconverted(tmp_path, rng):
    arrays = _luna(tmp_path / "luna", rng, n=2)
    store = str(tmp_path / "store")
    convert([str(tmp_path / "luna")], store, workers=1, progress=False)
    again = convert([str(tmp_path / "luna")], store, workers=1, progress=False)
    assert again.converted == [] and sorted(again.skipped) == sorted(arrays)
    uid = next(iter(arrays))
    new = ct_array(rng, shape=(24, 40, 48))
    write_mhd(tmp_path / "luna" / "subset0" / f"{uid}.mhd", new)
    third = convert([str(tmp_path / "luna")], store, workers=1, progress=False)
    assert third.converted == [uid]
    np.testing.assert_array_equal(VolumeStore(store).read_scan(uid), new)
    other = convert([str(tmp_path / "luna")], store, ConvertSettings(pyramid_levels=2), workers=1, progress=False)
    assert sorted(other.converted) == sorted(arrays), "changed settings must reconvert"


def _bad_inputs(root: Path, rng) -> dict[str, str]:
    """Each bad input the issue names, beside good scans; returns scan_id -> expected reason."""
    write_mhd(root / "trunc.mhd", ct_array(rng))
    raw = root / "trunc.raw"
    raw.write_bytes(raw.read_bytes()[:1000])
    write_mhd(root / "noraw.mhd", ct_array(rng))
    (root / "noraw.raw").unlink()
    (root / "garbage.mhd").write_bytes(b"\x00\x01 this is not a header\n")
    (root / "notes.bin").write_bytes(os.urandom(300))
    (root / "fake.nii.gz").write_text("not a nifti file")
    nan = rng.random((16, 16, 16)).astype(np.float32)
    nan[3, 4, 5] = np.nan
    nan[1, 1, 1] = np.inf
    sitk.WriteImage(make_image(nan), str(root / "nan.nii.gz"))
    write_mhd(root / "tiny.mhd", ct_array(rng, shape=(2, 4, 4)))
    ds = pydicom.Dataset()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4.5.6"
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.88.11", "1.2.3.4.5.6"
    ds.SeriesInstanceUID, ds.Modality = "1.2.3.999", "SR"
    (root / "report").mkdir()
    ds.save_as(root / "report" / "sr.dcm", enforce_file_format=True)
    return {"trunc": "truncated data file trunc.raw", "noraw": "data file noraw.raw named by noraw.mhd is missing",
            "garbage": "does not parse", "notes.bin": "not a recognised image file",
            "fake": "cannot read fake.nii.gz", "nan": "2 NaN/inf voxels", "tiny": "too small",
            "1.2.3.999": "empty series"}


def test_each_bad_input_is_a_failed_row_and_good_scans_convert(tmp_path, rng, capsys):
    arrays = _luna(tmp_path / "data", rng, n=2)
    expected = _bad_inputs(tmp_path / "data", rng)
    store = tmp_path / "store"
    code = main(["convert", str(tmp_path / "data"), "--store", str(store), "--workers", "1", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 1
    cat = _catalog(store)
    assert (cat.loc[list(arrays), "status"] == "ok").all()
    for scan_id, reason in expected.items():
        assert cat.loc[scan_id, "status"] == "failed", scan_id
        assert reason in cat.loc[scan_id, "error"], (scan_id, cat.loc[scan_id, "error"])
        assert f"FAILED {scan_id}" in out
    assert f"converted 2, skipped 0 (already done), failed {len(expected)}" in out
    # failures are retried on the next run, finished scans are not touched
    again = convert([str(tmp_path / "data")], str(store), workers=1, progress=False)
    assert sorted(again.skipped) == sorted(arrays) and len(again.failed) == len(expected)


def test_exit_status_ok_and_usage(tmp_path, rng, capsys):
    _luna(tmp_path / "luna", rng, n=1)
    assert main(["convert", str(tmp_path / "luna"), "--store", str(tmp_path / "s"), "--workers", "1",
                 "--no-progress"]) == 0
    assert main(["convert", str(tmp_path / "missing"), "--store", str(tmp_path / "s")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["convert", str(tmp_path / "luna"), "--store", str(tmp_path / "s"), "--spacing", "1,2"])
    assert exc.value.code == 2


def test_second_writer_is_refused_while_store_is_locked(tmp_path, rng, capsys):
    _luna(tmp_path / "luna", rng, n=1)
    store = tmp_path / "s"
    convert([str(tmp_path / "luna")], str(store), workers=1, progress=False)
    vs = VolumeStore(store)
    lock = vs.lock()
    try:
        code = main(["convert", str(tmp_path / "luna"), "--store", str(store), "--workers", "1"])
        assert code == 3
        assert "being written by another conversion" in capsys.readouterr().err
    finally:
        vs.unlock(lock)
    assert main(["convert", str(tmp_path / "luna"), "--store", str(store), "--workers", "1", "--no-progress"]) == 0


def test_stores_show_and_preview(tmp_path, rng, capsys):
    arrays = _luna(tmp_path / "luna", rng, n=2)
    store = str(tmp_path / "s")
    convert([str(tmp_path / "luna")], store, workers=1, progress=False)
    assert main(["stores", "show", store]) == 0
    out = capsys.readouterr().out
    assert "2 scans (2 ok, 0 failed)" in out and all(uid in out for uid in arrays)
    png = tmp_path / "p.png"
    assert main(["stores", "preview", store, next(iter(arrays)), "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert main(["stores", "preview", store, "nope", "--out", str(png)]) == 2


def _store_content(store: Path) -> tuple[pd.DataFrame, dict]:
    cat = VolumeStore(store).catalog().drop(columns=["converted_at"]).sort_values("scan_id").reset_index(drop=True)
    arrays = {}
    for d in sorted((store / "scans").iterdir()):
        if d.is_dir():
            g = zarr.open_group(str(d), mode="r")
            arrays[d.name] = (json.dumps(dict(g.attrs), sort_keys=True),
                              [g[str(k)][...] for k in range(len(dict(g.attrs)["ome"]["multiscales"][0]["datasets"]))])
    return cat, arrays


def test_killed_conversion_then_rerun_equals_uninterrupted(tmp_path, rng):
    src = tmp_path / "luna"
    _luna(src, rng, n=12, shape=(96, 192, 192))  # wide enough that a busy machine still kills part-way
    ref = tmp_path / "ref"
    convert([str(src)], str(ref), workers=1, progress=False)

    store = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "convert", str(src), "--store", str(store),
                             "--workers", "1", "--no-progress"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            scans = store / "scans"
            if scans.exists() and any(p.is_dir() for p in scans.iterdir()):
                break
            if proc.poll() is not None:
                pytest.fail(f"conversion ended before it could be killed: {proc.stderr.read().decode()[-500:]}")
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    published = [p for p in (store / "scans").iterdir() if p.is_dir()]
    assert 1 <= len(published) < 12, "the kill must land part-way"
    for p in published:  # what is visible is complete
        assert (p / "zarr.json").exists() and (p / "2" / "zarr.json").exists()
    summary = convert([str(src)], str(store), workers=1, progress=False)
    assert summary.ok and len(summary.skipped) >= len(published) - 1
    assert not (store / ".staging").exists() or not any((store / ".staging").iterdir())
    cat_a, arr_a = _store_content(ref)
    cat_b, arr_b = _store_content(store)
    pd.testing.assert_frame_equal(cat_a.drop(columns=["source_path"]), cat_b.drop(columns=["source_path"]))
    assert arr_a.keys() == arr_b.keys()
    for k in arr_a:
        assert arr_a[k][0] == arr_b[k][0]
        for a, b in zip(arr_a[k][1], arr_b[k][1]):
            np.testing.assert_array_equal(a, b)


def test_two_worker_processes_match_single_worker(tmp_path, rng):
    src = tmp_path / "luna"
    arrays = _luna(src, rng, n=4)
    dicom = ct_array(rng, shape=(10, 24, 24))
    write_dicom_series(src / "dicom" / "s1", dicom, series_uid="1.2.840.99")
    one, two = tmp_path / "one", tmp_path / "two"
    convert([str(src)], str(one), workers=1, progress=False)
    summary = convert([str(src)], str(two), workers=2, progress=False)
    assert summary.ok and len(summary.converted) == 5
    _, a1 = _store_content(one)
    _, a2 = _store_content(two)
    assert a1.keys() == a2.keys() == set(arrays) | {"1.2.840.99"}
    for k in a1:
        for a, b in zip(a1[k][1], a2[k][1]):
            np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(VolumeStore(two).read_scan("1.2.840.99"), dicom)


def test_existing_dask_scheduler_and_jobs_entry_point(tmp_path, rng):
    from distributed import LocalCluster

    arrays = _luna(tmp_path / "luna", rng, n=2)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None,
                      silence_logs=40) as cluster:
        proc = subprocess.run([sys.executable, str(Path(__file__).parents[1] / "jobs" / "convert.py"),
                               str(tmp_path / "luna"), "--store", str(tmp_path / "s"), "--no-progress",
                               "--dask-scheduler", cluster.scheduler_address],
                              capture_output=True, encoding="utf-8", errors="replace", timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "converted 2, skipped 0 (already done), failed 0" in proc.stdout
    for uid, arr in arrays.items():
        np.testing.assert_array_equal(VolumeStore(tmp_path / "s").read_scan(uid), arr)


def test_stores_list_finds_volume_stores(tmp_path, rng, capsys):
    _luna(tmp_path / "luna", rng, n=1)
    convert([str(tmp_path / "luna")], str(tmp_path / "stores" / "ct"), workers=1, progress=False)
    assert main(["stores", "list", str(tmp_path / "stores")]) == 0
    out = capsys.readouterr().out
    assert "volume-store" in out and "1 scans" in out and str(tmp_path / "stores" / "ct") in out


def test_spacing_option_resamples_image_and_labels(tmp_path, rng):
    arr = ct_array(rng, shape=(20, 30, 40))
    seg = np.zeros((20, 30, 40), dtype=np.uint8)
    seg[5:15, 10:20, 10:30] = 2
    sitk.WriteImage(make_image(arr, spacing=(1.0, 1.0, 2.0)), str(tmp_path / "volume-3.nii.gz"))
    sitk.WriteImage(make_image(seg, spacing=(1.0, 1.0, 2.0)), str(tmp_path / "segmentation-3.nii.gz"))
    store = tmp_path / "s"
    assert main(["convert", str(tmp_path), "--store", str(store), "--workers", "1", "--no-progress",
                 "--spacing", "4,2,2"]) == 0
    g = VolumeStore(store).open_scan("volume-3")
    attrs = dict(g.attrs)
    assert attrs["genesis"]["spacing"] == [4.0, 2.0, 2.0] and g["0"].shape == (10, 15, 20)
    assert attrs["genesis"]["settings"]["spacing"] == [4.0, 2.0, 2.0]
    assert attrs["ome"]["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]["scale"] == [4.0, 2.0, 2.0]
    label = g["labels/segmentation/0"][...]
    assert set(np.unique(label)) == {0, 2} and label.shape == (10, 15, 20)  # nearest keeps label values
    assert g["0"].dtype == np.int16


def test_images_and_labels_are_valid_ome_zarr_05(tmp_path, rng):
    from ome_zarr_models.v05.image import Image
    from ome_zarr_models.v05.labels import Labels

    arr = ct_array(rng, shape=(16, 24, 24))
    seg = (rng.random((16, 24, 24)) > 0.7).astype(np.uint8)
    sitk.WriteImage(make_image(arr), str(tmp_path / "volume-120.nii.gz"))
    sitk.WriteImage(make_image(seg), str(tmp_path / "segmentation-120.nii.gz"))
    convert([str(tmp_path)], str(tmp_path / "s"), workers=1, progress=False)
    group = VolumeStore(tmp_path / "s").open_scan("volume-120")
    image = Image.from_zarr(group)  # validates the OME-Zarr 0.5 metadata against the specification's models
    assert [d.path for d in image.attributes.ome.multiscales[0].datasets] == ["0", "1"]  # 24 -> 12 -> (6 < 8: stop)
    labels = Labels.from_zarr(group["labels"])
    assert labels.attributes.ome.labels == ["segmentation"]
    np.testing.assert_array_equal(group["labels/segmentation/0"][...], seg)
    assert VolumeStore(tmp_path / "s").catalog().set_index("scan_id").loc["volume-120", "subset"] == "test"


def test_unreadable_file_with_a_scans_name_does_not_replace_the_scan(tmp_path, rng):
    arr = ct_array(rng)
    write_mhd(tmp_path / "src" / "subset0" / "1.2.3.mhd", arr)
    (tmp_path / "src" / "other").mkdir()
    (tmp_path / "src" / "other" / "1.2.3.bin").write_bytes(b"\x00" * 64)  # scan id '1.2.3.bin'
    (tmp_path / "src" / "other" / "1.2.3.mhd").write_text("not a header\n")
    import zipfile

    with zipfile.ZipFile(tmp_path / "src" / "other" / "evil.zip", "w") as zf:
        zf.writestr("../1.2.3.mhd", "NDims = 3\n")  # refused member, same scan id
    s = convert([str(tmp_path / "src")], str(tmp_path / "s"), workers=1, progress=False)
    cat = VolumeStore(tmp_path / "s").catalog()
    assert cat["scan_id"].is_unique  # one row per id: every source of the shared name has an id of its own
    rows = cat[cat["discovered_id"] == "1.2.3"].set_index("source_path")
    assert sorted(rows["status"]) == ["failed", "failed", "ok"], rows
    assert any("unsafe path" in e for e in rows["error"].dropna())
    sid = rows.loc[str(tmp_path / "src" / "subset0" / "1.2.3.mhd"), "scan_id"]
    np.testing.assert_array_equal(VolumeStore(tmp_path / "s").read_scan(sid), arr)
    assert not s.ok
