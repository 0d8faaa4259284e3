"""The direct shard writer produces arrays Zarr reads back exactly, edges and partial shards included."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from zarr.codecs import BloscCodec

from pipeline.storage.shard_writer import write_shards


@pytest.mark.parametrize("shape, chunks, shards", [
    ((300, 70, 50), (32, 64, 64), (256, 128, 64)),   # second shard cut short in z, partial chunks in y/x
    ((5, 1, 8, 16, 16), (1, 1, 8, 16, 16), (4, 1, 8, 16, 16)),  # patch-store layout
    ((33, 65, 64), (32, 64, 64), (64, 128, 64)),
])
def test_direct_shards_read_back_through_zarr(tmp_path, shape, chunks, shards):
    data = np.random.default_rng(0).integers(-1000, 3000, size=shape).astype(np.int16)
    arr = zarr.create_array(str(tmp_path / "a"), shape=shape, dtype=data.dtype, chunks=chunks, shards=shards,
                            compressors=[BloscCodec(cname="zstd", clevel=1, shuffle="shuffle", typesize=2)],
                            fill_value=0)
    write_shards(str(tmp_path / "a"), data, chunks, shards, "zstd", 1, "shuffle")
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "a"), mode="r")[...], data)
    sub = tuple(slice(1, max(2, s - 1)) for s in shape)
    np.testing.assert_array_equal(arr[sub], data[sub])


def test_checksummed_shards_read_back_and_damage_is_caught(tmp_path):
    """Arrays created with `chunk_codecs` get a CRC32C after every inner chunk; Zarr verifies them."""
    from pipeline.storage.shard_writer import chunk_codecs, chunk_crc

    data = np.random.default_rng(0).integers(-1000, 3000, size=(40, 70, 50)).astype(np.int16)
    zarr.create_array(str(tmp_path / "a"), shape=data.shape, dtype=data.dtype, chunks=(32, 64, 64),
                      shards=(64, 128, 64), compressors=chunk_codecs("zstd", 1, "shuffle", 2), fill_value=0)
    assert chunk_crc(str(tmp_path / "a"))
    plain = write_shards(str(tmp_path / "a"), data, (32, 64, 64), (64, 128, 64), "zstd", 1, "shuffle", checksum=False)
    with_crc = write_shards(str(tmp_path / "a"), data, (32, 64, 64), (64, 128, 64), "zstd", 1, "shuffle")
    assert with_crc == plain + 4 * 4  # four inner chunks, 4 bytes each
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "a"), mode="r")[...], data)
    shard = tmp_path / "a" / "c" / "0" / "0" / "0"
    raw = bytearray(shard.read_bytes())
    raw[100] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="checksum"):
        zarr.open_array(str(tmp_path / "a"), mode="r")[...]
