"""Patch stores: the Models Genesis sampling rule, content addressing, reuse, resume, and the loader."""

from __future__ import annotations

import json
import shutil
import time

import numpy as np
import pytest
import zarr
from conftest import write_mhd

from pipeline.cli import main
from pipeline.data import CubeStreamConfig, PatchCubes, epoch_rows
from pipeline.patches import PatchStore, PretrainPatchConfig, extract_pretrain
from pipeline.patches.sampling import Candidates, dense_fractions, hu_to_unit, sample_cubes
from pipeline.patches.splits import split_of
from pipeline.volume_store import VolumeStore, convert

TINY = PretrainPatchConfig(cube_size=(16, 16, 16), per_scan=6, border_yx=4, border_z=2, min_slices=16)


def lungish(rng, shape=(24, 48, 48)) -> np.ndarray:
    """Air-filled 'lung' on the left half (accepted), soft tissue on the right half (rejected)."""
    vol = np.full(shape, 40, dtype=np.int16)
    vol[:, :, : shape[2] // 2] = -850
    return (vol + rng.normal(0, 15, shape)).astype(np.int16)


def test_hu_window_maps_to_unit_interval():
    out = hu_to_unit(np.array([-2000, -1000, 0, 1000, 3000], dtype=np.int16), (-1000.0, 1000.0))
    np.testing.assert_allclose(out, [0, 0, 0.5, 1, 1])
    assert out.dtype == np.float32
    assert hu_to_unit(np.array([-150]), (-1000.0, 1000.0))[0] == pytest.approx(0.425)


def test_dense_fractions_match_brute_force(rng):
    hu = rng.integers(-1000, 500, size=(12, 20, 24)).astype(np.int16)
    starts = np.array([[0, 0, 0], [3, 5, 7], [4, 4, 16]])
    sizes = np.array([[4, 8, 8], [8, 10, 6], [8, 16, 8]])
    got = dense_fractions(hu, Candidates(starts=starts, sizes=sizes, scales=np.ones(3)), -150.0)
    for (z, y, x), (d, h, w), g in zip(starts, sizes, got):
        assert g == pytest.approx(np.mean(hu[z:z + d, y:y + h, x:x + w] >= -150))


def test_accepted_crops_obey_the_rule_and_are_the_windowed_voxels(rng):
    hu = lungish(rng)
    sample = sample_cubes(hu, np.random.default_rng(3), TINY)
    assert len(sample.cubes) == TINY.per_scan
    for cube, (z, y, x), (d, h, w), frac in zip(sample.cubes, sample.starts, sample.sizes, sample.fractions):
        crop = hu[z:z + d, y:y + h, x:x + w]
        assert np.mean(crop >= -150) <= 0.15 and frac == pytest.approx(np.mean(crop >= -150))
        np.testing.assert_array_equal(cube, hu_to_unit(crop, (-1000.0, 1000.0)))
    again = sample_cubes(hu, np.random.default_rng(3), TINY)
    np.testing.assert_array_equal(sample.cubes, again.cubes)


def test_dense_scan_gives_no_cubes_and_multiscale_resizes(rng):
    dense = np.full((24, 48, 48), 100, dtype=np.int16)
    assert len(sample_cubes(dense, rng, TINY).cubes) == 0
    cfg = PretrainPatchConfig(cube_size=(8, 16, 16), per_scan=20, scales=(1.0, 1.5), border_yx=0, border_z=0)
    s = sample_cubes(np.full((24, 48, 48), -900, dtype=np.int16), rng, cfg)
    assert s.cubes.shape == (20, 8, 16, 16) and set(s.scales) == {1.0, 1.5}
    assert {tuple(v) for v in s.sizes} == {(8, 16, 16), (12, 24, 24)}
    np.testing.assert_allclose(s.cubes, 0.05, atol=1e-6)


def test_splits_by_luna_subset_or_seeded_scan_draw():
    assert [split_of("a", f"subset{k}", 0, (0.7, 0.15, 0.15)) for k in range(10)] == \
        ["train"] * 5 + ["validation"] * 2 + ["test"] * 3
    ids = [f"scan{k}" for k in range(2000)]
    splits = [split_of(i, None, 7, (0.7, 0.15, 0.15)) for i in ids]
    assert splits == [split_of(i, None, 7, (0.7, 0.15, 0.15)) for i in ids]
    assert abs(splits.count("train") / 2000 - 0.7) < 0.05
    assert splits != [split_of(i, None, 8, (0.7, 0.15, 0.15)) for i in ids]


def test_invalid_config_names_the_field():
    with pytest.raises(ValueError, match="PretrainPatchConfig.scales"):
        PretrainPatchConfig(scales=(0.5,))
    with pytest.raises(ValueError, match="PretrainPatchConfig.cube_size"):
        PretrainPatchConfig(cube_size=(8, 16))


@pytest.fixture
def volume_store(tmp_path, rng):
    src = tmp_path / "luna"
    arrays = {}
    for i, subset in enumerate([0, 1, 5, 7]):
        uid = f"1.2.840.{i}"
        arrays[uid] = lungish(rng)
        write_mhd(src / f"subset{subset}" / f"{uid}.mhd", arrays[uid])
    write_mhd(src / "subset2" / "1.2.840.thin.mhd", lungish(rng, shape=(10, 48, 48)))
    store = tmp_path / "vs"
    assert convert([str(src)], str(store), workers=1, progress=False).ok
    return store, arrays


def test_extraction_store_index_and_cubes(volume_store, tmp_path):
    store, arrays = volume_store
    res = extract_pretrain(str(store), TINY, out_root=str(tmp_path / "ps"), workers=1, progress=False)
    assert not res.reused and res.n_cubes == 4 * TINY.per_scan
    assert res.skipped == [{"scan_id": "1.2.840.thin", "reason": "10 slices, fewer than min_slices=16"}]
    assert res.counts == {"train": 12, "validation": 6, "test": 6}
    ps = PatchStore(res.path)
    assert res.path.name == f"pretrain-{ps.key}" and ps.cubes.shape[1:] == (1, 16, 16, 16)
    # exactly the cubes of the index: the skipped scan leaves no empty rows behind
    assert ps.cubes.shape[0] == len(ps.index) == res.n_cubes
    idx = ps.index
    assert sorted(idx["row"]) == list(range(len(idx)))
    vs = VolumeStore(store)
    for row in idx.itertuples():
        hu = arrays[row.scan_id][row.z:row.z + row.crop_d, row.y:row.y + row.crop_h, row.x:row.x + row.crop_w]
        np.testing.assert_array_equal(ps.cubes[row.row, 0], hu_to_unit(hu, (-1000.0, 1000.0)))
        assert row.z >= 2 and row.y >= 4 and row.x >= 4 and row.z + 16 <= 22 and row.x + 16 <= 44
        g = vs.scan_attrs(row.scan_id)["genesis"]
        centre = np.array(g["origin"]) + np.array(g["spacing"]) * (np.array([row.z, row.y, row.x]) + [7.5, 7.5, 7.5])
        np.testing.assert_allclose([row.center_z_mm, row.center_y_mm, row.center_x_mm], centre)
    assert set(idx.loc[idx["scan_id"] == "1.2.840.2", "split"]) == {"validation"}
    attrs = json.loads((res.path / "zarr.json").read_text())["attributes"]["genesis"]
    assert attrs["config"]["per_scan"] == 6 and attrs["volume_store"]["path"] == str(store.resolve())


def test_same_inputs_reuse_changed_settings_make_a_new_store(volume_store, tmp_path, capsys):
    store, _ = volume_store
    first = extract_pretrain(str(store), TINY, out_root=str(tmp_path / "ps"), workers=1, progress=False)
    t0 = time.perf_counter()
    again = extract_pretrain(str(store), TINY, out_root=str(tmp_path / "ps"), workers=1, progress=False)
    assert again.reused and again.path == first.path and time.perf_counter() - t0 < 1.0
    other = extract_pretrain(str(store), PretrainPatchConfig(**{**TINY.__dict__, "seed": 1}),
                             out_root=str(tmp_path / "ps"), workers=1, progress=False)
    assert other.path != first.path and not other.reused
    code = main(["patches", "pretrain", "--store", str(store), "--out", str(tmp_path / "ps"), "--size", "16,16,16",
                 "--per-scan", "6", "--border-yx", "4", "--border-z", "2", "--min-slices", "16", "--workers", "1"])
    assert code == 0 and f"reused existing patch store {first.path}" in capsys.readouterr().out


def test_interrupted_extraction_is_invisible_and_resumes(volume_store, tmp_path):
    from pipeline.patches.extract import extract_scan

    store, _ = volume_store
    ref = extract_pretrain(str(store), TINY, out_root=str(tmp_path / "ref"), workers=1, progress=False)
    # a run killed after two scans: its building folder holds their parts and results only
    root = tmp_path / "ps"
    final = root / ref.path.name
    building = root / f".building-{ref.path.name}"
    zarr.open_group(str(building), mode="w")
    (building / "results").mkdir()
    (building / "parts").mkdir()
    ok = VolumeStore(store).catalog().query("status == 'ok'").sort_values("scan_id")
    for slot, r in enumerate(ok.head(2).itertuples()):
        extract_scan(str(store), r.scan_id, r.subset, slot, str(building), TINY)
    before = {p.name: p.stat().st_mtime_ns for p in (building / "parts").iterdir()}
    assert len(before) == 4  # two parts: encoded chunks and their sizes each
    assert main(["stores", "list", str(root)]) == 0  # the half-built store is not listed
    seen = {}
    import pipeline.patches.extract as ex

    real = ex.assemble

    def spy(group_path, *a, **k):  # the finished parts are reused, not rewritten
        seen.update({p.name: p.stat().st_mtime_ns for p in (building / "parts").iterdir() if p.name in before})
        return real(group_path, *a, **k)

    ex.assemble = spy
    try:
        res = extract_pretrain(str(store), TINY, out_root=str(root), workers=1, progress=False)
    finally:
        ex.assemble = real
    assert seen == before
    assert not res.reused and res.path == final and not building.exists()
    got = PatchStore(final)
    np.testing.assert_array_equal(got.cubes[...], PatchStore(ref.path).cubes[...])
    assert got.index.equals(PatchStore(ref.path).index)


def test_loader_shards_by_rank_and_is_seeded(volume_store, tmp_path):
    store, _ = volume_store
    res = extract_pretrain(str(store), TINY, out_root=str(tmp_path / "ps"), workers=1, progress=False)
    ps = PatchStore(res.path)
    train = set(ps.rows("train"))

    def rows_seen(rank, world, epoch=0, seed=0, buffer=4):
        ds = PatchCubes(res.path, CubeStreamConfig(split="train", seed=seed, buffer_size=buffer), rank=rank,
                        world_size=world)
        ds.set_epoch(epoch)
        cubes = [c.numpy() for c in ds]
        lookup = {ps.cubes[r].tobytes(): r for r in train}
        return [lookup[c.tobytes()] for c in cubes]

    one = rows_seen(0, 1)
    assert sorted(one) == sorted(train)  # every cube exactly once per epoch
    assert one == rows_seen(0, 1) and one != rows_seen(0, 1, epoch=1)
    a, b = rows_seen(0, 2), rows_seen(1, 2)
    assert len(a) == len(b) == len(train) // 2 and not set(a) & set(b)
    got = next(iter(PatchCubes(res.path, CubeStreamConfig(split="train"), rank=0, world_size=1)))
    assert got.shape == (1, 16, 16, 16) and got.dtype.is_floating_point


def test_epoch_rows_equal_parts_keep_shards_together():
    rows = np.concatenate([np.arange(0, 6), np.arange(12, 15), np.arange(18, 24)])
    parts = [epoch_rows(rows, 6, seed=1, epoch=0, shuffle=True, rank=r, world_size=3) for r in range(3)]
    assert [len(p) for p in parts] == [5, 5, 5]
    assert sorted(np.concatenate(parts)) == sorted(rows)
    for p in parts:  # runs of a shard stay contiguous
        assert len(set(p // 6)) <= 2


def test_show_list_and_preview(volume_store, tmp_path, capsys):
    store, _ = volume_store
    res = extract_pretrain(str(store), TINY, out_root=str(tmp_path / "ps"), workers=1, progress=False)
    assert main(["stores", "show", str(res.path)]) == 0
    out = capsys.readouterr().out
    assert f"key {res.key}" in out and "24 cubes" in out and "1.2.840.thin: 10 slices" in out
    assert main(["stores", "list", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "patch-store" in out and "volume-store" in out and "24 cubes" in out and res.key in out
    png = tmp_path / "p.png"
    assert main(["patches", "preview", str(res.path), "--out", str(png)]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 10000


def test_two_dask_workers_give_the_same_store(volume_store, tmp_path):
    store, _ = volume_store
    one = extract_pretrain(str(store), TINY, out_root=str(tmp_path / "one"), workers=1, progress=False)
    two = extract_pretrain(str(store), TINY, out_root=str(tmp_path / "two"), workers=2, progress=False)
    assert one.key == two.key
    np.testing.assert_array_equal(PatchStore(one.path).cubes[...], PatchStore(two.path).cubes[...])
    assert PatchStore(one.path).index.equals(PatchStore(two.path).index)
