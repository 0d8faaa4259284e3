"""Issue 18, items 2 and 4: label values are checked against what each dataset documents (at conversion) and
against a task file's `labels` (at the task build), a label map without foreground is named in the build's
summary, and a candidates table with a header and no rows is named at conversion.

Real NIfTI / MetaImage files written by SimpleITK, real conversions into a real store (one Dask worker).
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from pipeline.cli import main
from pipeline.ingest.read import check_nodule_labels
from pipeline.ingest.volume import Volume
from pipeline.patches.store import PatchStore
from pipeline.patches.task_extract import extract_task
from pipeline.tasks.registry import get_task
from pipeline.volume_store.store import VolumeStore
from pipeline.volume_store.tables import read_table

SHAPE = (16, 24, 24)  # z, y, x


def _write(path, array: np.ndarray, spacing=(1.0, 1.0, 2.0)) -> None:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))


def _ct(rng: np.random.Generator) -> np.ndarray:
    ct = np.full(SHAPE, -1000, dtype=np.int16)
    ct[2:14, 3:21, 3:21] = 40 + rng.integers(-10, 10, (12, 18, 18))  # a body
    return ct


def _liver(liver: int, tumour: int = 2, dtype=np.int16) -> np.ndarray:
    seg = np.zeros(SHAPE, dtype=dtype)
    seg[4:12, 6:18, 6:18] = liver
    seg[7:9, 10:13, 10:13] = tumour
    return seg


def _convert(src, store, capsys) -> tuple[int, str]:
    rc = main(["convert", *map(str, src if isinstance(src, list) else [src]), "--store", str(store),
               "--workers", "1", "--no-progress"])
    out = capsys.readouterr()
    return rc, out.out + out.err


# ---- item 2: label values at conversion -----------------------------------------------------------

@pytest.mark.parametrize("liver, shown", [(-1, "-1"), (255, "255")])
def test_lits_label_outside_0_1_2_is_a_failed_row_naming_it(tmp_path, capsys, liver, shown):
    """LiTS documents 0 background, 1 liver, 2 tumour. Today liver = -1 converts (and the task store counts the
    liver as background) and 255 converts (counted as liver); now each is a failed row naming the value."""
    rng = np.random.default_rng(0)
    src = tmp_path / "lits"
    for k in (0, 1):
        _write(src / f"volume-{k}.nii", _ct(rng))
    _write(src / "segmentation-0.nii", _liver(1))
    _write(src / "segmentation-1.nii", _liver(liver))
    store = tmp_path / "vs"
    rc, said = _convert(src, store, capsys)
    assert rc == 1
    (line,) = [ln for ln in said.splitlines() if "FAILED" in ln]
    assert "volume-1" in line and "segmentation-1.nii" in line and f"label value {shown} " in line, line
    assert "liver" in line and "(0, 1, 2)" in line
    catalog = VolumeStore(store).catalog().set_index("scan_id")
    assert catalog.loc["volume-0", "status"] == "ok" and catalog.loc["volume-1", "status"] == "failed"


def test_lits_valid_labels_store_as_before(tmp_path, capsys):
    """A valid LiTS map converts, holds exactly its values, and carries no dataset.json description."""
    rng = np.random.default_rng(1)
    src = tmp_path / "lits"
    _write(src / "volume-3.nii", _ct(rng))
    _write(src / "segmentation-3.nii", _liver(1, dtype=np.uint8))
    store = tmp_path / "vs"
    assert _convert(src, store, capsys)[0] == 0
    vs = VolumeStore(store)
    seg = vs.open_scan("volume-3")["labels"]["segmentation"]["0"][...]
    assert sorted(np.unique(seg).tolist()) == [0, 1, 2]
    assert int((seg > 0).sum()) == int((_liver(1) > 0).sum())
    assert "dataset_json" not in vs.scan_attrs("volume-3")["genesis"]


def test_brats_label_outside_0_1_2_4_is_a_failed_row(tmp_path, capsys):
    """BraTS documents 0, 1, 2, 4 (3 unused): a seg holding 3 fails every sequence of its case; 4 converts."""
    rng = np.random.default_rng(2)
    for case, value in (("Brats18_A_1", 4), ("Brats18_B_1", 3)):
        folder = tmp_path / "brats" / case
        for seq in ("flair", "t1"):
            _write(folder / f"{case}_{seq}.nii.gz", rng.integers(0, 500, SHAPE).astype(np.int16))
        _write(folder / f"{case}_seg.nii.gz", _liver(value, tumour=1, dtype=np.uint8))
    rc, said = _convert(tmp_path / "brats", tmp_path / "vs", capsys)
    assert rc == 1
    failed = [ln for ln in said.splitlines() if "FAILED" in ln]
    assert len(failed) == 2 and all("Brats18_B_1" in ln and "label value 3 " in ln and "(0, 1, 2, 4)" in ln
                                    for ln in failed), failed
    catalog = VolumeStore(tmp_path / "vs").catalog()
    assert sorted(catalog.loc[catalog["status"] == "ok", "scan_id"]) == ["Brats18_A_1_flair", "Brats18_A_1_t1"]


def test_lidc_nodule_labels_are_0_to_n():
    """LIDC's consensus map is built here: nodule k is value k, so its values are 0..n for n nodules listed."""
    mask = np.zeros((4, 4, 4), dtype=np.uint16)
    mask[0, 0, 0], mask[1, 1, 1] = 1, 2
    nodules = {"nodules": [{"label": 1}, {"label": 2}]}

    def volume(m):
        return Volume(voxels=np.zeros((4, 4, 4), np.int16), spacing=(1.0,) * 3, origin=(0.0,) * 3,
                      direction=(1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0), source_direction=(1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0),
                      modality="CT", labels={"nodules": m}, label_attrs={"nodules": nodules})

    check_nodule_labels(volume(mask), "lidc-1")
    mask[2, 2, 2] = 3
    with pytest.raises(ValueError, match=r"lidc-1: label 'nodules' holds value 3 beyond its 2 consensus nodule\(s\) "
                                         r"\(0\.\.2\)"):
        check_nodule_labels(volume(mask), "lidc-1")


# ---- item 2: label values and foreground at the task build --------------------------------------

@pytest.fixture(scope="module")
def lits_store(tmp_path_factory):
    """Three LiTS cases: volume-0 liver + tumour, volume-1 an empty label map, volume-2 liver only."""
    root = tmp_path_factory.mktemp("lits")
    rng = np.random.default_rng(3)
    for k, seg in enumerate((_liver(1), np.zeros(SHAPE, np.int16), _liver(1, tumour=1))):
        _write(root / "src" / f"volume-{k}.nii", _ct(rng))
        _write(root / "src" / f"segmentation-{k}.nii", seg)
    assert main(["convert", str(root / "src"), "--store", str(root / "vs"), "--workers", "1", "--no-progress"]) == 0
    return root / "vs"


def _lcs(**changes):
    spec = get_task("lcs").with_overrides(cube_size=(8, 8, 8), inplane_scale=1.0,
                                          **{"sampling.per_scan": 2, "sampling.whole_volume_test": False})
    return spec.with_overrides(**changes) if changes else spec


def test_task_labels_refuse_a_case_holding_other_values(lits_store, tmp_path):
    """A task file whose labels are {background 0, liver 1} over maps holding tumour = 2: those cases are skipped
    naming the value, never cut with tumour silently counted as target; the case holding only 0/1 is built."""
    spec = _lcs(labels={"background": 0, "liver": 1})
    res = extract_task(str(lits_store), spec, out_root=str(tmp_path / "ps"), workers=1, progress=False)
    reasons = {s["scan_id"]: s["reason"] for s in res.skipped}
    assert set(reasons) == {"volume-0"}, reasons
    assert "holds value 2 that task lcs's labels do not name (0 background, 1 liver)" in reasons["volume-0"]
    assert "volume-0:" in res.report() and set(PatchStore(res.path).index["case_id"]) == {"volume-1", "volume-2"}


def test_label_map_without_foreground_is_named_in_the_summary(lits_store, tmp_path):
    """volume-1's map is all background: the build says so (a WARNING line of its report, kept in the store's
    attributes), and its cubes are all background."""
    res = extract_task(str(lits_store), _lcs(), out_root=str(tmp_path / "ps"), workers=1, progress=False)
    (warning,) = [ln for ln in res.report().splitlines() if ln.startswith("WARNING")]
    assert "case volume-1: label map 'segmentation' of scan volume-1 has no foreground (values > 0)" in warning
    ps = PatchStore(res.path)
    assert ps.attrs["warnings"] == [warning.removeprefix("WARNING: ")]
    index = ps.index
    assert (index.loc[index["case_id"] == "volume-1", "label"] == 0).all()
    assert (index.loc[index["case_id"] != "volume-1", "label"] == 1).any()


# ---- item 4: a candidates table with a header and no rows --------------------------------------

def _luna(root, rng) -> None:
    image = sitk.GetImageFromArray(_ct(rng))
    image.SetSpacing((1.0, 1.0, 2.0))
    (root / "subset0").mkdir(parents=True)
    sitk.WriteImage(image, str(root / "subset0" / "1.2.3.4.mhd"))


@pytest.mark.parametrize("layout", ["luna16", "pe", "case_csv"])
def test_candidates_with_a_header_and_no_rows_is_named_at_convert(tmp_path, capsys, layout):
    """LUNA16's candidates.csv, PE-CAD's pe_candidates.csv or one's own case_id,x,y,z,label CSV with only its header:
    today convert exits 0 and stores no table (`patches task` finds out later); now it is a table problem naming
    the file (exit 1), and the scans still convert."""
    rng = np.random.default_rng(4)
    src = tmp_path / "src"
    if layout == "luna16":
        _luna(src, rng)
        table, args = src / "candidates.csv", [src]
        table.write_text("seriesuid,coordX,coordY,coordZ,class\n")
    elif layout == "pe":
        from pipeline.sample_data.pe import PE_CANDIDATES_HEADER, write_pe_sample

        sample = write_pe_sample(src, n_scans=2, seed=5, small=True)
        table, args = sample.candidates_csv, [src]
        table.write_text(",".join(PE_CANDIDATES_HEADER) + "\n")
    else:
        _write(src / "case7.nii.gz", _ct(rng))
        table = tmp_path / "mine.csv"
        table.write_text("case_id,x,y,z,label\n")
        args = [src, table]
    rc, said = _convert(args, tmp_path / "vs", capsys)
    assert rc == 1
    (line,) = [ln for ln in said.splitlines() if "TABLE" in ln]
    assert str(table) in line and "has a header and no rows" in line, line
    assert (VolumeStore(tmp_path / "vs").catalog()["status"] == "ok").all()
    name = {"luna16": "candidates", "pe": "pe_candidates", "case_csv": "candidates"}[layout]
    assert read_table(tmp_path / "vs", name).empty
