"""Storage helpers shared by the stores: direct Zarr v3 shard writing (CRC32C on every chunk and index)."""
