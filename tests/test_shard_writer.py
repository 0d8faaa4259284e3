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
