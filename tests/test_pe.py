"""PE-CAD (ECC task): the procedural CTPA sample, its layout, and its reading by `genesis convert`."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from pipeline.cli import main
from pipeline.ingest import discover
from pipeline.patches.store import PatchStore
from pipeline.sample_data.pe import (CANDIDATE_KINDS, PE_CANDIDATES_HEADER, PE_FOLDS_HEADER, PeConfig,
                                     centre_mean_hu, read_pe_manifest, write_pe_sample)
from pipeline.volume_store.store import VolumeStore
from pipeline.volume_store.tables import read_table


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _rows(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="") as f:
        header = next(csv.reader(f))
    with open(path, newline="") as f:
        return header, list(csv.DictReader(f))


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    return write_pe_sample(tmp_path_factory.mktemp("pe") / "PE-CAD", n_scans=6, seed=3, small=True)


@pytest.fixture(scope="module")
def volumes(sample):
    return {s.case_id: sitk.ReadImage(str(sample.mhd_path(s.case_id))) for s in sample.scans}


# --- the sample ----------------------------------------------------------------------------------

def test_layout_and_tables(sample):
    names = sorted(p.name for p in sample.out_dir.iterdir())
    cases = [s.case_id for s in sample.scans]
    assert names == sorted([f"{c}.{e}" for c in cases for e in ("mhd", "raw")]
                           + ["pe_candidates.csv", "pe_folds.csv", "sample_data.json"])
    header, rows = _rows(sample.candidates_csv)
    assert tuple(header) == PE_CANDIDATES_HEADER
    assert len(rows) == len(sample.candidates)
    assert {r["case_id"] for r in rows} == set(cases)
    unknown = [r for r in rows if r["dirX"] == ""]
    assert unknown and all(r["dirY"] == r["dirZ"] == "" for r in unknown)  # lymph nodes: no vessel
    header, folds = _rows(sample.folds_csv)
    assert tuple(header) == PE_FOLDS_HEADER
    assert {r["patient_id"]: int(r["fold"]) for r in folds} == sample.folds
    assert set(sample.folds.values()) == {1, 2, 3}
    assert len(sample.folds) < len(sample.scans)  # some patients have several scans
    assert {c.kind for c in sample.candidates} == set(CANDIDATE_KINDS)
    assert read_pe_manifest(sample.out_dir).scans == sample.scans
    assert "emboli" in sample.describe() and "embolus" in sample.describe(per_candidate=True)


def test_deterministic_and_reused(sample, tmp_path):
    again = write_pe_sample(tmp_path / "b", n_scans=6, seed=3, small=True)
    assert _files(again.out_dir) == _files(sample.out_dir)
    assert write_pe_sample(tmp_path / "b", n_scans=6, seed=3, small=True).reused
    other = write_pe_sample(tmp_path / "c", n_scans=2, seed=4, small=True)
    assert _files(other.out_dir)["pe_candidates.csv"] != _files(sample.out_dir)["pe_candidates.csv"]
    assert not list(tmp_path.glob(".*partial*"))
    with pytest.raises(FileExistsError, match="remove that folder"):
        write_pe_sample(tmp_path / "b", n_scans=5, seed=3, small=True)


def test_geometry(sample, volumes):
    for scan in sample.scans:
        image = volumes[scan.case_id]
        assert image.GetSize()[::-1] == scan.shape_zyx == (64, 96, 96)  # ECC cubes are 64^3
        assert image.GetPixelID() == sitk.sitkInt16
        for c in scan.candidates:
            index_xyz = image.TransformPhysicalPointToIndex(c.coord_xyz_mm)
            assert tuple(index_xyz[::-1]) == c.index_zyx, c
            if c.direction_xyz is not None:
                assert abs(np.linalg.norm(c.direction_xyz) - 1) < 1e-3
            assert c.cube_inside == all(32 <= i <= n - 32 for i, n in zip(c.index_zyx, scan.shape_zyx))


def test_default_size_keeps_cubes_inside():
    config = PeConfig()
    assert config.shape == (128, 256, 256) and config.margin_vox == (32, 32, 32)
    with pytest.raises(ValueError, match="64"):
        PeConfig(shape=(40, 96, 96))


def _centre_means(sample, volumes) -> list[tuple[object, float, float]]:
    out = []
    for scan in sample.scans:
        vol = sitk.GetArrayFromImage(volumes[scan.case_id])
        out += [(c, centre_mean_hu(vol, c.index_zyx, scan.spacing_zyx_mm, radius_mm=1.5), scan.artery_hu)
                for c in scan.candidates]
    return out


def test_emboli_are_filling_defects_not_separable_by_threshold(sample, volumes):
    means = _centre_means(sample, volumes)
    emboli = [m for c, m, _ in means if c.label == 1]
    false = [m for c, m, _ in means if c.label == 0]
    assert emboli and false
    # darker than the enhanced lumen they sit in
    assert all(m < artery - 150 for c, m, artery in means if c.label == 1)
    # and no single HU threshold separates the classes: the ranges overlap...
    assert min(false) < max(emboli) and min(emboli) < max(false)
    # ...even a band: some false candidates (lymph nodes, vessel walls) fall inside the emboli's range
    inside = [c.kind for c, m, _ in means if c.label == 0 and min(emboli) <= m <= max(emboli)]
    assert inside, sorted(false)
    kinds = {c.kind: [] for c, _, _ in means}
    for c, m, _ in means:
        kinds[c.kind].append(m)
    assert np.mean(kinds["vein"]) < np.mean(kinds["bifurcation"])  # veins are less enhanced


# --- conversion ----------------------------------------------------------------------------------

def test_discovery(sample):
    found = discover([sample.out_dir])
    assert sorted(t.name for t in found.tables) == ["pe_candidates.csv", "pe_folds.csv"]
    by_id = {s.scan_id: s for s in found.scans}
    assert set(by_id) == {s.case_id for s in sample.scans}
    for scan in sample.scans:
        src = by_id[scan.case_id]
        assert (src.dataset, src.modality, src.subset, src.problem) == ("pe", "CT", f"fold{scan.fold}", None)
        assert src.identifiers == (("patient_id", scan.patient_id),)


def test_convert_end_to_end(sample, tmp_path):
    store = tmp_path / "store"
    assert main(["convert", str(sample.out_dir), "--store", str(store), "--workers", "1", "--no-progress"]) == 0
    vs = VolumeStore(store)
    catalog = vs.catalog().set_index("scan_id")
    for scan in sample.scans:
        row = catalog.loc[scan.case_id]
        assert tuple(row[["status", "dataset", "subset", "modality"]]) == ("ok", "pe", f"fold{scan.fold}", "CT")
        attrs = vs.scan_attrs(scan.case_id)["genesis"]
        assert attrs["source"]["identifiers"] == {"patient_id": scan.patient_id}
    cands = read_table(store, "pe_candidates")
    assert len(cands) == len(sample.candidates)
    assert list(cands.columns) == list(PE_CANDIDATES_HEADER)
    assert sorted(cands["class"].tolist()) == sorted(c.label for c in sample.candidates)
    assert cands["dirX"].isna().sum() == sum(c.direction_xyz is None for c in sample.candidates)
    assert dict(zip(*read_table(store, "pe_folds").values.T)) == sample.folds
    assert read_table(store, "candidates").empty  # LUNA16's table stays absent
    # a rerun adds nothing twice
    assert main(["convert", str(sample.out_dir), "--store", str(store), "--workers", "1", "--no-progress"]) == 0
    assert len(read_table(store, "pe_candidates")) == len(sample.candidates)


def test_read_table_absent(tmp_path):
    empty = read_table(tmp_path, "pe_candidates")
    assert empty.empty and list(empty.columns) == list(PE_CANDIDATES_HEADER)
    assert list(read_table(tmp_path, "pe_folds").columns) == list(PE_FOLDS_HEADER)


@pytest.mark.parametrize("edit, reason", [
    (lambda t: t.replace("patient_id", "patient"), "missing columns ['patient_id']"),
    (lambda t: t.replace(",1,", ",2,", 1), "class must be 0 or 1"),
    (lambda t: t.replace("\n", "\nx,y,1,2,3,0,0.5,,\n", 1), "all given or all empty"),
])
def test_malformed_candidates_named(sample, tmp_path, capsys, edit, reason):
    src = tmp_path / "PE-CAD"
    shutil.copytree(sample.out_dir, src)
    bad = src / "pe_candidates.csv"
    bad.write_text(edit(bad.read_text(encoding="utf-8")))
    store = tmp_path / "store"
    rc = main(["convert", str(src), "--store", str(store), "--workers", "1", "--no-progress"])
    out = capsys.readouterr()
    assert rc == 1
    line = next(ln for ln in (out.out + out.err).splitlines() if "pe_candidates.csv" in ln)
    assert reason in line and str(bad) in line
    assert read_table(store, "pe_candidates").empty  # nothing half-stored
    assert len(read_table(store, "pe_folds")) == len(sample.folds)
    assert (VolumeStore(store).catalog()["status"] == "ok").all()  # the scans still convert


def _with_folds(sample, root: Path, edit) -> tuple[Path, Path]:
    """A copy of the sample whose pe_folds.csv is `edit(text)`; (source folder, its pe_folds.csv)."""
    src = root / "PE-CAD"
    shutil.copytree(sample.out_dir, src)
    folds = src / "pe_folds.csv"
    folds.write_text(edit(folds.read_text(encoding="utf-8")), encoding="utf-8")
    return src, folds


def _one_patient(sample) -> str:
    """A patient sharing its fold with another (so that leaving it out leaves every fold)."""
    return next(p for p, k in sorted(sample.folds.items()) if sum(v == k for v in sample.folds.values()) > 1)


@pytest.mark.parametrize("fold, why", [("-1", "'-1'"), ("0", "'0'"), ("x", "'x'"), ("1.5", "'1.5'"), ("", "''"),
                                       ("99999999999999999999999", "'99999999999999999999999'")])
def test_folds_file_with_a_bad_fold_is_a_usage_error_before_any_work(sample, tmp_path, capsys, fold, why):
    """A fold that is not an integer >= 1 is exit 2 at convert, one line naming the file, the line and the patient;
    nothing is converted (today: exit 1 with a table problem, and the patient's scans convert without a fold)."""
    patient = _one_patient(sample)
    src, folds = _with_folds(sample, tmp_path, lambda t: t.replace(f"{patient},{sample.folds[patient]}\n",
                                                                 f"{patient},{fold}\n"))
    store = tmp_path / "store"
    rc = main(["convert", str(src), "--store", str(store), "--workers", "1", "--no-progress"])
    out = capsys.readouterr()
    (line,) = [ln for ln in out.err.splitlines() if ln.strip()]
    assert rc == 2 and str(folds) in line and f"fold {why} of patient {patient}" in line, line
    assert not store.exists()


def test_patient_in_two_folds_is_a_usage_error_before_any_work(sample, tmp_path, capsys):
    patient = _one_patient(sample)
    other = sample.folds[patient] % 3 + 1
    src, folds = _with_folds(sample, tmp_path, lambda t: t + f"{patient},{other}\n")
    store = tmp_path / "store"
    rc = main(["convert", str(src), "--store", str(store), "--workers", "1", "--no-progress"])
    (line,) = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc == 2 and str(folds) in line and f"patient {patient} is in fold {sample.folds[patient]}" in line
    assert f"and in fold {other}" in line and not store.exists()
    # the same row twice is one fact, not two folds
    src2, _ = _with_folds(sample, tmp_path / "same", lambda t: t + f"{patient},{sample.folds[patient]}\n")
    assert main(["convert", str(src2), "--store", str(tmp_path / "same_store"), "--workers", "1",
                 "--no-progress"]) == 0


def _ecc(store: Path, out: Path) -> int:
    return main(["patches", "task", "ecc", "--store", str(store), "--out", str(out), "--workers", "1",
                 "--no-progress", "--size", "32,32,32"])


def test_ecc_refuses_a_fold_beyond_its_folds_naming_patient_and_file(sample, tmp_path, capsys):
    """fold 7 of a 3-fold task: exit 2 at plan time naming the patient and the folds file, nothing built."""
    patient = _one_patient(sample)
    src, folds = _with_folds(sample, tmp_path, lambda t: t.replace(f"{patient},{sample.folds[patient]}\n",
                                                                 f"{patient},7\n"))
    store, out = tmp_path / "store", tmp_path / "ps"
    assert main(["convert", str(src), "--store", str(store), "--workers", "1", "--no-progress"]) == 0
    capsys.readouterr()
    assert _ecc(store, out) == 2
    (line,) = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert f"patient {patient} has fold 7" in line and str(folds) in line and "1..3" in line, line
    assert not out.exists() or not any(out.iterdir())


def test_ecc_refuses_a_patient_whose_scans_were_given_two_folds(sample, tmp_path, capsys):
    """Two folders of one patient's scans, converted into one store with folds files that disagree: the store has
    the patient's scans in two folds, and ECC refuses it (exit 2, the patient and both files) instead of building
    with the first case's fold."""
    by_patient: dict[str, list[str]] = {}
    for s in sample.scans:
        by_patient.setdefault(s.patient_id, []).append(s.case_id)
    patient, cases = next((p, c) for p, c in sorted(by_patient.items()) if len(c) > 1)
    halves = {"a": cases[:1], "b": [s.case_id for s in sample.scans if s.case_id not in cases[:1]]}
    files = {}
    for name, keep in halves.items():
        src = tmp_path / name
        shutil.copytree(sample.out_dir, src)
        for s in sample.scans:
            if s.case_id not in keep:
                (src / f"{s.case_id}.mhd").unlink()
                (src / f"{s.case_id}.raw").unlink()
        files[name] = src / "pe_folds.csv"
    other = sample.folds[patient] % 3 + 1
    text = files["b"].read_text(encoding="utf-8")
    files["b"].write_text(text.replace(f"{patient},{sample.folds[patient]}\n", f"{patient},{other}\n"))
    store, out = tmp_path / "store", tmp_path / "ps"
    assert main(["convert", str(tmp_path / "a"), str(tmp_path / "b"), "--store", str(store), "--workers", "1",
                 "--no-progress"]) == 1  # the merged pe_folds table contradicts itself: a table problem
    capsys.readouterr()
    assert _ecc(store, out) == 2
    (line,) = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert f"patient {patient} is in fold" in line and str(files["a"]) in line and str(files["b"]) in line, line
    assert not out.exists() or not any(out.iterdir())


def test_patient_without_a_fold_is_left_out_and_said_so(sample, tmp_path, capsys):
    """The README's rule: a patient pe_folds.csv does not list has no fold; its scans convert and ECC leaves them
    out. Both steps say so, naming the patient and the file (today convert says nothing)."""
    patient = _one_patient(sample)
    src, folds = _with_folds(sample, tmp_path, lambda t: t.replace(f"{patient},{sample.folds[patient]}\n", ""))
    store, out = tmp_path / "store", tmp_path / "ps"
    assert main(["convert", str(src), "--store", str(store), "--workers", "1", "--no-progress"]) == 0
    cases = sorted(s.case_id for s in sample.scans if s.patient_id == patient)
    said = capsys.readouterr().out
    (note,) = [ln for ln in said.splitlines() if "NOTE" in ln]
    assert f"no fold in {folds}" in note and f"{patient} ({', '.join(cases)})" in note, said
    assert _ecc(store, out) == 0
    said = capsys.readouterr().out
    for case in cases:
        assert f"{case}: patient {patient} has no fold" in said, said
    ps_index = PatchStore(next(out.glob("task-ecc-*"))).index
    assert patient not in set(ps_index["patient_id"]) and len(ps_index)


def test_directions_follow_the_vessels(sample, volumes):
    """ECC's cubes are oriented by these directions: along one, an embolus or vein stays inside its vessel
    (above 0 HU at its radius + 2 mm, either way); across it, the lung is reached."""
    from scipy import ndimage

    checked = 0
    for scan in sample.scans:
        hu = sitk.GetArrayFromImage(volumes[scan.case_id]).astype(np.float32)
        spacing = np.asarray(scan.spacing_zyx_mm)
        for c in scan.candidates:
            if c.kind not in ("embolus", "vein"):
                continue
            d = np.asarray(c.direction_xyz)[::-1]  # world (x, y, z) -> (z, y, x): identity direction matrix
            u = np.cross(d, [1.0, 0.0, 0.0])
            u /= np.linalg.norm(u)
            v = np.cross(d, u)
            reach = c.radius_mm + 2.0

            def at(offset_mm, c=c):
                return float(ndimage.map_coordinates(hu, (np.asarray(c.index_zyx) + offset_mm / spacing)[:, None],
                                                     order=1)[0])

            along = [at(k * reach * d) for k in (-1, 1)]
            across = [at(k * reach * w) for k in (-1, 1) for w in (u, v)]
            assert min(along) > 0 and min(across) < -500, (c, along, across)
            checked += 1
    assert checked >= 6


@pytest.mark.parametrize("value, shown, why", [("0.0,0.0,0.0", "(0.0, 0.0, 0.0)", "has zero length"),
                                                ("inf,0.0,0.0", "(inf, 0.0, 0.0)", "is not finite"),
                                                ("nan,nan,nan", "(nan, nan, nan)", "is not finite")])
def test_unusable_direction_is_a_usage_error_before_any_work(sample, tmp_path, capsys, value, shown, why):
    """A direction no cube can be oriented by is exit 2, one line (file, row, value), nothing converted."""
    src = tmp_path / "PE-CAD"
    shutil.copytree(sample.out_dir, src)
    bad = src / "pe_candidates.csv"
    lines = bad.read_text(encoding="utf-8").splitlines()
    n = next(i for i, ln in enumerate(lines) if i and not ln.endswith(",,"))  # a row with a direction
    fields = lines[n].split(",")
    lines[n] = ",".join(fields[:6] + [value])
    bad.write_text("\n".join(lines) + "\n", encoding="utf-8")
    store = tmp_path / "store"
    rc = main(["convert", str(src), "--store", str(store), "--workers", "1", "--no-progress"])
    out = capsys.readouterr()
    assert rc == 2
    (line,) = [ln for ln in out.err.splitlines() if ln.strip()]
    assert str(bad) in line and f"line {n + 1} (case_id {fields[0]})" in line and shown in line and why in line
    assert not store.exists()  # refused before the store is even made
