"""Pretraining cubes from MR (the "mr" recipe, ours): percentile intensities per scan, Otsu foreground
acceptance (a noise background included), borders scaled to small volumes and short axes padded; the recipe chosen from the store's modality, mixed stores refused; a seeded
validation share when the scans' tags give none; the CT recipe's keys unchanged. Real NIfTI written with
SimpleITK, real volume and patch stores."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import write_mhd

from pipeline.patches.config import PretrainPatchConfig, content_key, preprocessing_of
from pipeline.patches.extract import extract_pretrain
from pipeline.patches.mr_sampling import (foreground_threshold, mr_scan_region, normalise, otsu_threshold, pad,
                                          percentile_window, sample_mr_cubes)
from pipeline.patches.outcome import NoCubesError
from pipeline.patches.splits import pretrain_splits
from pipeline.patches.store import PatchStore, catalog_hash
from pipeline.runtime.errors import UsageError
from pipeline.volume_store.convert import convert
from pipeline.volume_store.settings import ConvertSettings
from pipeline.volume_store.store import VolumeStore

MR = PretrainPatchConfig(cube_size=(16, 64, 64), per_scan=4)
"""The CLI's defaults but for cube and count: border_yx 100, border_z 30, min_slices 96, recipe auto."""
TINY_CT = PretrainPatchConfig(cube_size=(16, 16, 16), per_scan=6, border_yx=4, border_z=2, min_slices=16)
GAINS = {"mr0": 1.0, "mr1": 3.0, "mr2": 1.0, "mr4": 0.5}
"""Untagged scans that the seeded scan draw (seed 0) puts all in train: the store has no validation scan."""


def mr_volume(rng: np.random.Generator, gain: float, shape=(24, 112, 112)) -> np.ndarray:
    """A head-like ellipsoid of intensities 200..1500 (brighter inside) on a 0 background, times `gain`; its
    semi-axes are 15/24, 50/112 and 46/112 of the sides."""
    z, y, x = np.mgrid[0:shape[0], 0:shape[1], 0:shape[2]]
    cz, cy, cx = ((n - 1) / 2 for n in shape)
    r = ((z - cz) / (15 * shape[0] / 24)) ** 2 + ((y - cy) / (50 * shape[1] / 112)) ** 2 \
        + ((x - cx) / (46 * shape[2] / 112)) ** 2
    tissue = 200 + 1300 * np.clip(1 - r, 0, 1) + rng.normal(0, 40, shape)
    return np.clip(np.where(r < 1, tissue, 0) * gain, 0, 32767).astype(np.int16)


def write_nifti(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((1.5, 1.5, 3.0))
    img.SetOrigin((-84.0, -90.0, -36.0))
    sitk.WriteImage(img, str(path))


@pytest.fixture(scope="module")
def mr_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("mr")
    rng = np.random.default_rng(0)
    for scan, gain in GAINS.items():
        write_nifti(root / "src" / f"{scan}.nii.gz", mr_volume(rng, gain))
    assert convert([str(root / "src")], str(root / "vs"), workers=1, progress=False).ok
    return root / "vs"


def lungish(rng, shape=(24, 48, 48)) -> np.ndarray:
    vol = np.full(shape, 40, dtype=np.int16)
    vol[:, :, : shape[2] // 2] = -850
    return (vol + rng.normal(0, 15, shape)).astype(np.int16)


@pytest.fixture(scope="module")
def ct_source(tmp_path_factory):
    """LUNA16-like CT: subsets 0, 1 (train) and 5 (validation)."""
    src = tmp_path_factory.mktemp("ct") / "luna"
    rng = np.random.default_rng(1)
    for i, subset in enumerate([0, 1, 5]):
        write_mhd(src / f"subset{subset}" / f"1.2.840.{i}.mhd", lungish(rng))
    return src


def test_mr_recipe_yields_cubes_from_a_112_by_112_volume_where_ct_yields_none(mr_store, tmp_path):
    ct = dataclasses.replace(MR, recipe="ct", min_slices=16, border_z=2)
    with pytest.raises(NoCubesError, match=r"112x112 in-plane .* lower --border-yx \(now 100\).* --recipe mr"):
        extract_pretrain(str(mr_store), ct, out_root=str(tmp_path / "ps"), workers=1, progress=False)
    with pytest.raises(NoCubesError, match=r"24 slices, fewer than min_slices=96; lower --min-slices"):
        extract_pretrain(str(mr_store), dataclasses.replace(MR, recipe="ct"), out_root=str(tmp_path / "ps"),
                         workers=1, progress=False)
    res = extract_pretrain(str(mr_store), MR, out_root=str(tmp_path / "ps"), workers=1, progress=False)
    assert res.n_cubes == 4 * MR.per_scan and not res.skipped
    ps = PatchStore(res.path)
    assert ps.attrs["recipe"]["name"] == "mr" and ps.attrs["recipe"]["modality"] == "OT"
    assert ps.attrs["config"]["recipe"] == "mr" and ps.cube_encoding == {"kind": "unit-float32"}
    assert ps.cubes.dtype == np.float32
    assert preprocessing_of(ps.attrs) == {
        "recipe": "mr", "modality": "OT", "cube_size": [16, 64, 64],
        "intensity": {"rule": "percentiles", "percentiles": [0.5, 99.5], "of": "non-zero voxels, per scan",
                      "range": [0.0, 1.0], "clip": True}}
    # each cube is exactly its crop of the scan normalised by that scan's own percentiles
    vs = VolumeStore(mr_store)
    for row in ps.index.itertuples():
        volume = vs.open_scan(row.scan_id)["0"][:]
        window, _ = percentile_window(volume, (0.5, 99.5))
        crop = normalise(volume, window)[row.z:row.z + 16, row.y:row.y + 64, row.x:row.x + 64]
        assert ps.read_cubes([row.row])[0, 0].tobytes() == crop.tobytes()
        # borders min(configured, 10% of the axis): z >= 2, y and x >= 11, and the crop ends inside the far border
        assert 2 <= row.z <= 24 - 2 - 16 and 11 <= row.y <= 112 - 11 - 64 and 11 <= row.x <= 112 - 11 - 64


def test_mr_cubes_intensity_spread_and_acceptance(mr_store, tmp_path):
    """With each scan's Otsu threshold (this phantom's dim rim falls below it: the share is 0.8 at most)."""
    strict = dataclasses.replace(MR, min_foreground=0.8, attempts_per_cube=200)
    res = extract_pretrain(str(mr_store), strict, out_root=str(tmp_path / "ps"), workers=1, progress=False)
    ps = PatchStore(res.path)
    cubes = ps.read_cubes(np.arange(len(ps)))[:, 0]
    assert cubes.min() >= 0.0 and cubes.max() <= 1.0
    index = ps.index.sort_values("row")
    thresholds = ps.attrs["recipe"]["foreground_thresholds"]
    vs = VolumeStore(mr_store)
    for scan, t in thresholds.items():  # each scan's Otsu threshold, recomputed here from the scan
        volume = vs.open_scan(scan)["0"][:]
        assert t == otsu_threshold(normalise(volume, percentile_window(volume, (0.5, 99.5))[0]))
        assert 0.05 < t < 0.6
    cut = index["scan_id"].map(thresholds).to_numpy()[:, None, None, None]
    foreground = (cubes > cut).mean(axis=(1, 2, 3))
    assert (foreground >= 0.8).all()  # every accepted cube passes the rule
    np.testing.assert_allclose(foreground, index["dense_fraction"], rtol=0, atol=1e-12)
    assert ((cubes == 0).mean(axis=(1, 2, 3)) <= 1 - 0.8).all()  # the near-0 background share is bounded
    assert 0.4 < cubes.mean() < 0.7 and cubes.std() > 0.1  # spread over the unit range, not squashed
    # per-scan percentiles: scans of gain 0.5, 1 and 3 give cubes of the same statistics
    means = {s: float(cubes[(ps.index.sort_values("row")["scan_id"] == s).to_numpy()].mean()) for s in GAINS}
    assert max(means.values()) - min(means.values()) < 0.05, means
    rng = np.random.default_rng(5)
    base = mr_volume(rng, 1.0)
    loud = (base.astype(np.float64) * 3).astype(np.int16)
    np.testing.assert_allclose(normalise(base, percentile_window(base, (0.5, 99.5))[0]),
                               normalise(loud, percentile_window(loud, (0.5, 99.5))[0]), atol=2e-3)
    # the rule is enforced, not just met: some draws were rejected
    lax = extract_pretrain(str(mr_store), dataclasses.replace(strict, min_foreground=0.0),
                           out_root=str(tmp_path / "ps"), workers=1, progress=False)
    assert PatchStore(lax.path).index["dense_fraction"].min() < 0.8
    with pytest.raises(NoCubesError, match=r"lower --min-foreground \(now 1\)"):
        extract_pretrain(str(mr_store), dataclasses.replace(MR, min_foreground=1.0, attempts_per_cube=2),
                         out_root=str(tmp_path / "ps"), workers=1, progress=False)


SMALL = {"s36": (36, 112, 112), "s24": (24, 112, 112), "s24n": (24, 48, 48)}
"""Typical small MR volumes (z, y, x) against the default 32 x 64 x 64 cube."""


def test_small_mr_volumes_yield_cubes_of_the_default_size(tmp_path):
    """Borders shrink so the crop fits (36 slices: z border min(30, 3, (36 - 32) // 2) = 2); an axis shorter than
    the cube is padded evenly with the normalised background (0), the crop then covering it whole."""
    rng = np.random.default_rng(7)
    volumes = {scan: mr_volume(rng, 1.0, shape) for scan, shape in SMALL.items() if scan != "s24n"}
    volumes["s24n"] = mr_volume(rng, 1.0, (24, 96, 96))[:, 24:72, 24:72]  # a field of view cropped to the anatomy
    for scan, volume in volumes.items():
        write_nifti(tmp_path / "src" / f"{scan}.nii.gz", volume)
    assert convert([str(tmp_path / "src")], str(tmp_path / "vs"), workers=1, progress=False).ok
    config = PretrainPatchConfig(per_scan=4)  # the CLI's defaults: cube 32x64x64, borders 100 and 30
    res = extract_pretrain(str(tmp_path / "vs"), config, out_root=str(tmp_path / "ps"), workers=1, progress=False)
    assert res.n_cubes == 3 * 4 and not res.skipped
    padded = [{"scan_id": "s24", "padding": [[4, 4], [0, 0], [0, 0]]},
              {"scan_id": "s24n", "padding": [[4, 4], [8, 8], [8, 8]]}]
    ps = PatchStore(res.path)
    assert ps.attrs["recipe"]["padded_scans"] == padded and res.padded == padded
    assert "padded 2 scans shorter than the crop" in res.report() and "s24n: [[4, 4], [8, 8], [8, 8]]" in res.report()
    thresholds = ps.attrs["recipe"]["foreground_thresholds"]
    for row in ps.index.itertuples():
        volume = volumes[row.scan_id]
        unit = normalise(volume, percentile_window(volume, (0.5, 99.5))[0])
        (pz, _), (py, _), (px, _) = {"s36": [(0, 0)] * 3, **{p["scan_id"]: p["padding"] for p in padded}}[row.scan_id]
        cube = ps.read_cubes([row.row])[0, 0]
        expected = pad(unit, ((pz, pz), (py, py), (px, px)))[row.z + pz:row.z + pz + 32, row.y + py:row.y + py + 64,
                                                              row.x + px:row.x + px + 64]
        assert cube.tobytes() == expected.tobytes()
        if row.scan_id == "s36":
            assert row.z == 2 and 11 <= row.y <= 112 - 11 - 64 and 11 <= row.x <= 112 - 11 - 64
        elif row.scan_id == "s24":
            assert row.z == -4 and 11 <= row.y <= 112 - 11 - 64  # the crop reaches 4 slices into the padding
            assert not cube[:4].any() and not cube[-4:].any()
        else:  # the one crop there is: the scan in the middle of the cube; judged on the scan's voxels alone
            assert (row.z, row.y, row.x) == (-4, -8, -8)
            assert not cube[:, :8].any() and not cube[:, :, -8:].any()
            assert row.dense_fraction == pytest.approx((unit > thresholds["s24n"]).mean(), abs=1e-12)
            assert row.dense_fraction >= config.min_foreground


def test_otsu_foreground_finds_a_small_head_in_a_noisy_field_of_view():
    """A background of |N(0, 15)| noise, not 0: the low percentile falls inside the noise, so "above 0 after
    normalising" counted 99% of the background as foreground; each scan's Otsu threshold separates them."""
    rng = np.random.default_rng(0)
    shape = (64, 160, 160)
    zz, yy, xx = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    head = (zz ** 2 + (yy / 0.4) ** 2 + (xx / 0.4) ** 2) < 1
    volume = np.where(head, 400 + 50 * rng.normal(size=shape), np.abs(rng.normal(0, 15, shape))).astype(np.float32)
    config = PretrainPatchConfig(recipe="mr")  # default cube and min_foreground 0.5
    unit = normalise(volume, percentile_window(volume, config.percentiles)[0])
    assert unit.min() == 0.0 and unit.max() == 1.0
    threshold = foreground_threshold(unit, config)
    from skimage.filters import threshold_otsu

    assert threshold == pytest.approx(float(threshold_otsu(unit)), abs=1e-6)  # an independent Otsu
    assert (unit[~head] > threshold).mean() < 1e-4 and (unit[head] > threshold).mean() > 0.999

    def head_shares(config, threshold):
        layout = mr_scan_region(shape, config)
        sample = sample_mr_cubes(pad(unit, layout.padding)[layout.region], np.random.default_rng(1), config,
                                 threshold, layout)
        starts = sample.starts + layout.offset()
        return np.array([head[z:z + d, y:y + h, x:x + w].mean() for (z, y, x), (d, h, w) in zip(starts, sample.sizes)])

    shares = head_shares(config, threshold)
    assert len(shares) == config.per_scan and shares.min() >= config.min_foreground
    fixed = dataclasses.replace(config, foreground_threshold=0.0)  # the first rule: above the low percentile
    assert foreground_threshold(unit, fixed) == 0.0 and (unit[~head] > 0).mean() > 0.9
    assert head_shares(fixed, 0.0).min() < config.min_foreground


def test_the_validation_share_is_drawn_among_scans_that_gave_cubes(tmp_path):
    """The scan the share would draw among all scans gives no cube here: the share comes from the others."""
    scans = [(s, None) for s in GAINS]
    fractions = (0.7, 0.15, 0.15)
    (blank,) = pretrain_splits(scans, 0, fractions).drawn
    rng = np.random.default_rng(4)
    for scan, gain in GAINS.items():
        volume = mr_volume(rng, gain)
        if scan == blank:  # a few equal voxels: no intensity window, no cube
            volume = np.zeros_like(volume)
            volume[10:12, 50:52, 50:52] = 500
        write_nifti(tmp_path / "src" / f"{scan}.nii.gz", volume)
    assert convert([str(tmp_path / "src")], str(tmp_path / "vs"), workers=1, progress=False).ok
    with_cubes = set(GAINS) - {blank}
    expected = pretrain_splits(scans, 0, fractions, eligible=with_cubes).drawn
    assert len(expected) == 1 and blank not in expected
    stores = []
    for out in ("ps", "again"):
        res = extract_pretrain(str(tmp_path / "vs"), MR, out_root=str(tmp_path / out), workers=1, progress=False)
        assert [s["scan_id"] for s in res.skipped] == [blank] and "percentiles of its non-zero" in res.skipped[0]["reason"]
        assert res.counts["validation"] == MR.per_scan and not res.notes
        ps = PatchStore(res.path)
        assert ps.attrs["validation"]["scans"] == list(expected)
        assert ps.attrs["validation"]["rule"] == "seeded share of the training scans"
        assert set(ps.index.loc[ps.index["split"] == "validation", "scan_id"]) == set(expected)
        stores.append(ps.index.sort_values("row")[["scan_id", "split", "z", "y", "x"]].reset_index(drop=True))
    assert stores[0].equals(stores[1])  # same seed, same scans, same cubes
    # one training scan with cubes: nothing to draw, said openly
    one = pretrain_splits(scans, 0, fractions, eligible={"mr0"})
    assert one.drawn == () and "1 training scan and no validation scan among the scans that gave cubes" in one.note


def test_auto_picks_ct_for_ct_and_the_ct_key_is_unchanged(ct_source, tmp_path):
    store = tmp_path / "vs"
    assert convert([str(ct_source)], str(store), workers=1, progress=False).ok
    res = extract_pretrain(str(store), TINY_CT, out_root=str(tmp_path / "ps"), workers=1, progress=False)
    ps = PatchStore(res.path)
    assert ps.attrs["recipe"]["name"] == "ct" and ps.attrs["config"]["recipe"] == "ct"
    assert ps.cube_encoding["kind"] == "hu-int16" and ps.attrs["validation"]["rule"] == "the scans' own tags"
    # the key of the same config before recipes existed (computed on the code before this change)
    assert content_key("0" * 64, dataclasses.replace(TINY_CT, recipe="ct")) == "f9f42f82add5dda0"
    assert content_key("0" * 64, PretrainPatchConfig(recipe="ct")) == "05f3260feeee5853"
    assert res.key == content_key(catalog_hash(VolumeStore(store).catalog()), dataclasses.replace(TINY_CT, recipe="ct"))
    explicit = extract_pretrain(str(store), dataclasses.replace(TINY_CT, recipe="ct"), out_root=str(tmp_path / "ps"),
                                workers=1, progress=False)
    assert explicit.reused and explicit.key == res.key
    # mr-only settings do not touch a CT key; an "auto" config has no key until it is resolved
    assert content_key("0" * 64, dataclasses.replace(TINY_CT, recipe="ct", min_foreground=0.9)) == "f9f42f82add5dda0"
    assert content_key("0" * 64, dataclasses.replace(TINY_CT, recipe="mr")) != "f9f42f82add5dda0"
    with pytest.raises(ValueError, match="recipe 'auto' must be resolved"):
        content_key("0" * 64, TINY_CT)
    # an explicit recipe overrides the modality's
    forced = extract_pretrain(str(store), dataclasses.replace(TINY_CT, recipe="mr"), out_root=str(tmp_path / "ps"),
                              workers=1, progress=False)
    assert PatchStore(forced.path).attrs["recipe"]["name"] == "mr" and forced.key != res.key


def test_a_mixed_store_is_refused_unless_a_modality_is_picked(ct_source, tmp_path):
    store = tmp_path / "vs"
    rng = np.random.default_rng(2)
    for scan in ("t2a", "t2b"):
        write_nifti(tmp_path / "mr" / f"{scan}.nii.gz", mr_volume(rng, 1.0))
    assert convert([str(tmp_path / "mr")], str(store), ConvertSettings(modality="T2"), workers=1, progress=False).ok
    assert convert([str(ct_source)], str(store), workers=1, progress=False).ok
    assert dict(VolumeStore(store).catalog()["modality"].value_counts()) == {"CT": 3, "T2": 2}
    with pytest.raises(UsageError, match=r"mixes modalities: CT \(3 scans\), T2 \(2 scans\); .* --modality"):
        extract_pretrain(str(store), MR, out_root=str(tmp_path / "ps"), workers=1, progress=False)
    with pytest.raises(UsageError, match=r"--modality PD matches no converted scan; the store holds CT \(3 scans\)"):
        extract_pretrain(str(store), dataclasses.replace(MR, modality="PD"), out_root=str(tmp_path / "ps"),
                         workers=1, progress=False)
    t2 = extract_pretrain(str(store), dataclasses.replace(MR, modality="t2"), out_root=str(tmp_path / "ps"),
                          workers=1, progress=False)
    ps = PatchStore(t2.path)
    assert set(ps.index["scan_id"]) == {"t2a", "t2b"}
    assert ps.attrs["recipe"]["name"] == "mr" and ps.attrs["recipe"]["modality"] == "T2"
    ct = extract_pretrain(str(store), dataclasses.replace(TINY_CT, modality="CT"), out_root=str(tmp_path / "ps"),
                          workers=1, progress=False)
    assert PatchStore(ct.path).attrs["recipe"]["name"] == "ct" and ct.n_cubes == 3 * TINY_CT.per_scan


def test_a_store_without_validation_scans_gets_a_seeded_share(mr_store, tmp_path):
    scans = [(s, None) for s in GAINS]
    first = pretrain_splits(scans, 0, (0.7, 0.15, 0.15))
    assert list(first.splits.values()).count("validation") == 1 and len(first.drawn) == 1
    assert pretrain_splits(scans, 0, (0.7, 0.15, 0.15)) == first
    tagged = [(f"s{i}", "subset0") for i in range(20)]  # every scan in one LUNA16 subset: all train by the tags
    by_seed = {seed: pretrain_splits(tagged, seed, (0.7, 0.15, 0.15)).drawn for seed in range(4)}
    assert all(len(d) == 3 for d in by_seed.values()) and len(set(by_seed.values())) > 1
    assert pretrain_splits(tagged, 2, (0.7, 0.15, 0.15)).drawn == by_seed[2]
    assert pretrain_splits([("a", "subset5"), ("b", "subset0")], 0, (0.7, 0.15, 0.15)).drawn == ()

    res = extract_pretrain(str(mr_store), MR, out_root=str(tmp_path / "ps"), workers=1, progress=False)
    ps = PatchStore(res.path)
    assert res.counts["validation"] == MR.per_scan and not res.notes
    assert ps.attrs["validation"]["rule"] == "seeded share of the training scans"
    assert ps.attrs["validation"]["scans"] == list(first.drawn)
    assert set(ps.index.loc[ps.index["split"] == "validation", "scan_id"]) == set(first.drawn)
    # the draw is part of the key: a store built before it existed (all train) is never reused for it
    key = content_key(catalog_hash(VolumeStore(mr_store).catalog()), dataclasses.replace(MR, recipe="mr",
                                                                                          modality="OT"))
    assert res.key != key


def test_one_scan_is_said_loudly(tmp_path):
    write_nifti(tmp_path / "one" / "mr0.nii.gz", mr_volume(np.random.default_rng(3), 1.0))
    assert convert([str(tmp_path / "one")], str(tmp_path / "vs"), workers=1, progress=False).ok
    res = extract_pretrain(str(tmp_path / "vs"), MR, out_root=str(tmp_path / "ps"), workers=1, progress=False)
    assert res.counts == {"train": 4, "validation": 0, "test": 0}
    assert "WARNING: " in res.report() and "validate on its training cubes" in res.report()
    ps = PatchStore(res.path)
    assert "1 training scan and no validation scan" in ps.attrs["validation"]["note"]
    again = extract_pretrain(str(tmp_path / "vs"), MR, out_root=str(tmp_path / "ps"), workers=1, progress=False)
    assert again.reused and again.notes == res.notes  # a reused store says it too

    from pipeline.training.pretrain import validation_warning

    assert "validate on its training cubes" in validation_warning(ps)


def test_genesis_pretrain_runs_on_an_mr_store_and_records_the_recipe(ray_local, mr_store, tmp_path):
    """Float32 MR cubes train as HU-int16 CT cubes do; the run records the recipe (one short Ray run)."""
    from mlflow.tracking import MlflowClient

    from pipeline.training.config import tiny
    from pipeline.training.pretrain import pretrain

    res = extract_pretrain(str(mr_store), MR, out_root=str(tmp_path / "ps"), workers=1, progress=False)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    config = tiny().with_overrides(base_channels=2, batch_size=4, epochs=1, steps_per_epoch=2, val_cubes=4,
                                   read_block=4, figure_cubes=1)
    run = pretrain(str(res.path), config, workers=1, tracking_uri=uri, storage_path=str(tmp_path / "ray"),
                   system_metrics=False)
    assert run.error is None and not run.warnings, run.report()
    assert np.isfinite(run.metrics["val_loss"]) and run.metrics["val_loss"] < 0.5
    data = MlflowClient(uri).get_run(run.mlflow_run_id).data
    assert data.params["recipe"] == "mr" and data.params["modality"] == "OT"
    assert data.params["validation.split"] == "validation"
    assert data.params["validation.rule"] == "seeded share of the training scans"
    assert data.tags["recipe"] == "mr" and "validation" not in data.tags
    # the pretrained model carries its preprocessing
    from pipeline.model_io.load import load_model

    model = load_model("models:/genesis-pretrained/1", tracking_uri=uri)
    assert model.genesis_preprocessing == {**preprocessing_of(PatchStore(res.path).attrs), "patch_store": res.key}
    assert model.genesis_preprocessing["intensity"]["rule"] == "percentiles"
