"""Patch stores: the Models Genesis sampling rule, content addressing, reuse, resume, and the loader."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import zarr
from conftest import write_mhd

from pipeline.cli import main
from pipeline.data import CubeStreamConfig, PatchCubes
from pipeline.patches.config import PretrainPatchConfig
from pipeline.patches.extract import extract_pretrain
from pipeline.patches.store import PatchStore
from pipeline.patches.encoding import choose_encoding, decode_cubes, encode_cubes
from pipeline.patches.sampling import hu_to_unit, sample_cubes, voxel_scores
from pipeline.patches.splits import split_of
from pipeline.volume_store.convert import convert
from pipeline.volume_store.store import VolumeStore

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


def reference_score(hu: np.ndarray, z: int, y: int, x: int, d: int, h: int, w: int) -> float:
    """The reference's score sum of a crop: 1 per voxel >= -150 HU, 0.5 when only the next slice is."""
    dense = hu[z:z + d + 1, y:y + h, x:x + w] >= -150
    return float(dense[:d].sum() + 0.5 * (~dense[:d] & dense[1:]).sum())


def test_accepted_crops_obey_the_rule_and_are_the_windowed_voxels(rng):
    hu = lungish(rng)
    sample = sample_cubes(hu, np.random.default_rng(3), TINY)
    assert len(sample.cubes) == TINY.per_scan
    for cube, (z, y, x), (d, h, w), frac in zip(sample.cubes, sample.starts, sample.sizes, sample.fractions):
        score = reference_score(hu, z, y, x, d, h, w)
        assert score <= 0.15 * d * h * w and frac == pytest.approx(score / (d * h * w))
        assert z + d + TINY.lookahead <= hu.shape[0]  # the look-ahead window fits in the region
        np.testing.assert_array_equal(cube, hu_to_unit(hu[z:z + d, y:y + h, x:x + w], (-1000.0, 1000.0)))
    again = sample_cubes(hu, np.random.default_rng(3), TINY)
    np.testing.assert_array_equal(sample.cubes, again.cubes)
    assert voxel_scores(hu >= -150, 3).shape[0] == hu.shape[0] - 1


def test_dense_scan_gives_no_cubes_and_multiscale_resizes_in_plane(rng):
    dense = np.full((24, 48, 48), 100, dtype=np.int16)
    assert len(sample_cubes(dense, rng, TINY).cubes) == 0
    cfg = PretrainPatchConfig(cube_size=(8, 16, 16), per_scan=20, scales=(1.0, 1.5), border_yx=0, border_z=0)
    s = sample_cubes(np.full((24, 48, 48), -900, dtype=np.int16), rng, cfg)
    assert s.cubes.shape == (20, 8, 16, 16) and set(s.scales) == {1.0, 1.5}
    assert {tuple(v) for v in s.sizes} == {(8, 16, 16), (8, 24, 24)}  # the reference: depth never resized
    np.testing.assert_allclose(s.cubes, 0.05, atol=1e-6)


def test_hu_int16_round_trip_is_bit_identical():
    """Every integer HU (and beyond the window) decodes to exactly the float32 the sampler computes."""
    hu = np.arange(-3000, 3001, dtype=np.int16).reshape(1, 1, 1, -1)
    unit = hu_to_unit(hu, (-1000.0, 1000.0))
    enc = choose_encoding(PretrainPatchConfig(), ["int16"])
    stored = encode_cubes(unit, enc)
    assert stored.dtype == np.int16 and stored.min() == -1000 and stored.max() == 1000
    assert decode_cubes(stored, enc).tobytes() == unit.tobytes()
    with pytest.raises(ValueError, match="not clipped integer HU"):
        encode_cubes(unit + np.float32(1e-4), enc)
    # resized cubes, float volumes and other windows stay float32 (exact too)
    assert choose_encoding(PretrainPatchConfig(scales=(1.0, 1.5)), ["int16"])["kind"] == "unit-float32"
    assert choose_encoding(PretrainPatchConfig(), ["int16", "float32"])["kind"] == "unit-float32"
    assert choose_encoding(PretrainPatchConfig(hu_window=(-1000.5, 1000.0)), ["int16"])["kind"] == "unit-float32"
    assert choose_encoding(PretrainPatchConfig(cube_encoding="float32"), ["int16"])["kind"] == "unit-float32"
    with pytest.raises(ValueError, match="unknown cube encoding"):
        decode_cubes(stored, {"kind": "hu-int8"})


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
    with pytest.raises(ValueError, match="PretrainPatchConfig.scale_axes"):
        PretrainPatchConfig(scale_axes="z")
    with pytest.raises(ValueError, match="PretrainPatchConfig.lookahead"):
        PretrainPatchConfig(lookahead=1)
    with pytest.raises(ValueError, match="PretrainPatchConfig.cube_encoding"):
        PretrainPatchConfig(cube_encoding="uint8")
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
    assert [s["scan_id"] for s in res.skipped] == ["1.2.840.thin"]
    assert res.skipped[0]["reason"].startswith("10 slices, fewer than min_slices=16; lower --min-slices")
    assert res.counts == {"train": 12, "validation": 6, "test": 6}
    ps = PatchStore(res.path)
    assert res.path.name == f"pretrain-{ps.key}" and ps.cubes.shape[1:] == (1, 16, 16, 16)
    assert ps.cubes.dtype == np.int16 and ps.cube_encoding["kind"] == "hu-int16"
    # exactly the cubes of the index: the skipped scan leaves no empty rows behind
    assert ps.cubes.shape[0] == len(ps.index) == res.n_cubes
    idx = ps.index
    assert sorted(idx["row"]) == list(range(len(idx)))
    vs = VolumeStore(store)
    for row in idx.itertuples():
        hu = arrays[row.scan_id][row.z:row.z + row.crop_d, row.y:row.y + row.crop_h, row.x:row.x + row.crop_w]
        assert ps.read_cubes([row.row])[0, 0].tobytes() == hu_to_unit(hu, (-1000.0, 1000.0)).tobytes()
        # the reference's ranges: z in [2, 24 - 16 - 3 - 1 - 2], y and x in [4, 48 - 16 - 1 - 4]
        assert 2 <= row.z <= 2 and 4 <= row.y <= 27 and 4 <= row.x <= 27
        g = vs.scan_attrs(row.scan_id)["genesis"]
        centre = np.array(g["origin"]) + np.array(g["spacing"]) * (np.array([row.z, row.y, row.x]) + [7.5, 7.5, 7.5])
        np.testing.assert_allclose([row.center_z_mm, row.center_y_mm, row.center_x_mm], centre)
    assert set(idx.loc[idx["scan_id"] == "1.2.840.2", "split"]) == {"validation"}
    attrs = json.loads((res.path / "zarr.json").read_text(encoding="utf-8"))["attributes"]["genesis"]
    assert attrs["config"]["per_scan"] == 6 and attrs["volume_store"]["path"] == str(store.resolve())
    assert attrs["schema_version"] == 2 and attrs["store_format"] == 2
    assert attrs["cube_encoding"]["kind"] == "hu-int16" and attrs["cube_encoding"]["hu_window"] == [-1000, 1000]
    rows = np.array([5, 0, 17, 5])  # any order, repeats: decoded float32 (N, 1, D, H, W)
    got = ps.read_cubes(rows)
    assert got.dtype == np.float32 and got.shape == (4, 1, 16, 16, 16)
    np.testing.assert_array_equal(got, hu_to_unit(ps.read(rows), (-1000.0, 1000.0)))


def _cubes_bytes(path) -> int:
    return sum(f.stat().st_size for f in (path / "cubes").rglob("*") if f.is_file())


def test_int16_store_is_lean_and_decodes_to_the_float32_store(volume_store, tmp_path):
    store, _ = volume_store
    new = extract_pretrain(str(store), TINY, out_root=str(tmp_path / "ps"), workers=1, progress=False)
    old = extract_pretrain(str(store), PretrainPatchConfig(**{**TINY.__dict__, "cube_encoding": "float32"}),
                           out_root=str(tmp_path / "ps"), workers=1, progress=False)
    a, b = PatchStore(new.path), PatchStore(old.path)
    assert a.key != b.key and b.cubes.dtype == np.float32 and b.cube_encoding == {"kind": "unit-float32"}
    rows = np.arange(len(a))
    assert a.read_cubes(rows).tobytes() == b.read_cubes(rows).tobytes() == b.read(rows).tobytes()
    assert a.index.equals(b.index)
    ratio = _cubes_bytes(new.path) / _cubes_bytes(old.path)
    assert ratio <= 0.55, f"int16 store is {ratio:.2f} of the float32 one"


def test_format_1_float32_stores_still_read(volume_store, tmp_path):
    """A store written before cube encodings existed (schema_version 1, no cube_encoding) reads as float32."""
    store, _ = volume_store
    res = extract_pretrain(str(store), PretrainPatchConfig(**{**TINY.__dict__, "cube_encoding": "float32"}),
                           out_root=str(tmp_path / "ps"), workers=1, progress=False)
    meta = json.loads((res.path / "zarr.json").read_text(encoding="utf-8"))
    g = meta["attributes"]["genesis"]
    for k in ("store_format", "cube_encoding"):
        del g[k]
    g["schema_version"] = 1
    (res.path / "zarr.json").write_text(json.dumps(meta))
    ps = PatchStore(res.path)
    assert ps.cube_encoding == {"kind": "unit-float32"}
    np.testing.assert_array_equal(ps.read_cubes([3, 1]), ps.cubes[[3, 1]])


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
        extract_scan(str(store), r.scan_id, r.subset, slot, str(building), TINY,
                     encoding=choose_encoding(TINY, ["int16"]))
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
        lookup = {ps.read_cubes([r])[0].tobytes(): r for r in train}
        return [lookup[c.tobytes()] for c in cubes]

    one = rows_seen(0, 1)
    assert sorted(one) == sorted(train)  # every cube exactly once per epoch
    assert one == rows_seen(0, 1) and one != rows_seen(0, 1, epoch=1)
    a, b = rows_seen(0, 2), rows_seen(1, 2)
    assert len(a) == len(b) == len(train) // 2 and not set(a) & set(b)
    got = next(iter(PatchCubes(res.path, CubeStreamConfig(split="train"), rank=0, world_size=1)))
    assert got.shape == (1, 16, 16, 16) and got.dtype.is_floating_point


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


def test_a_damaged_patch_store_cube_is_an_error_not_garbage(volume_store, tmp_path):
    """Patch stores are shared for months: a flipped byte in a cube's chunk raises (CRC32C), it never reads
    back as different voxels."""
    store, _ = volume_store
    res = extract_pretrain(str(store), TINY, out_root=str(tmp_path / "ps"), workers=1, progress=False)
    ps = PatchStore(res.path)
    intact = ps.read_cubes(np.arange(len(ps.index)))
    shard = next(p for p in sorted((res.path / "cubes" / "c").rglob("*")) if p.is_file())
    data = bytearray(shard.read_bytes())
    data[40] ^= 0xFF  # inside the first cube's compressed chunk (the index sits at the shard's end)
    shard.write_bytes(bytes(data))
    with pytest.raises(Exception, match="(?i)crc|checksum"):
        PatchStore(res.path).read_cubes(np.arange(len(ps.index)))
    assert intact.shape[0] == len(ps.index)
