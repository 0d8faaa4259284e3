"""Conversion settings: everything that changes the bytes of a stored scan, hashed into its record."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

__all__ = ["ConvertSettings", "SCHEMA_VERSION"]

SCHEMA_VERSION = 1


@dataclass(frozen=True, kw_only=True)
class ConvertSettings:
    """How scans are written into a volume store.

    The codec default (Blosc zstd level 1, byte shuffle) was measured against zstd 3/5,
    bitshuffle and lz4 on CT-like int16 volumes: within 3% of the best ratio at 1.6x the
    speed of zstd 3 (see benchmarks/convert.py for the figures on the sample scans).
    """

    spacing: tuple[float, float, float] | None = None
    """Resample to this (z, y, x) spacing in mm; None keeps the source voxels unchanged."""
    chunks: tuple[int, int, int] = (32, 64, 64)
    """Inner chunk (z, y, x): one 32x64x64 training cube touches at most 8 chunks."""
    shard_depth: int = 256
    """Slices per shard; a shard spans the whole plane, so a scan is a handful of files."""
    pyramid_levels: int = 3
    """Levels including level 0; each halves y and x (and z where slices are as thin as pixels)."""
    pyramid_method: str = "nearest"
    """How levels are reduced: nearest (every 2nd voxel, OME-Zarr's default scaler, 10x cheaper)
    or mean (block average, less aliasing). Labels always use nearest."""
    codec: str = "zstd"
    clevel: int = 1
    shuffle: str = "shuffle"
    min_side: int = 8
    """Smallest accepted side in voxels; thinner volumes are refused as too small to be useful."""
    modality: str | None = None
    """Force the modality (e.g. CT for NIfTI CT without metadata); None = from the source."""
    max_scan_bytes: int = 4 * 2**30
    """Most bytes one scan may need (decoded voxels, archive members extracted to temp space);
    a scan over it is a failed row. A resource limit, not part of what is stored: kept out of
    to_dict() and the hash, so changing it reconverts nothing."""

    def __post_init__(self) -> None:
        if self.spacing is not None:
            if len(self.spacing) != 3 or any(not (0 < s < float("inf")) for s in self.spacing):
                raise ValueError(f"ConvertSettings.spacing must be three positive finite mm values (z,y,x), "
                                 f"got {self.spacing}")
        if len(self.chunks) != 3 or any(c < 1 for c in self.chunks):
            raise ValueError(f"ConvertSettings.chunks must be three positive ints, got {self.chunks}")
        if self.shard_depth < 1 or self.shard_depth % self.chunks[0]:
            raise ValueError(f"ConvertSettings.shard_depth must be a positive multiple of chunks[0]={self.chunks[0]}, "
                             f"got {self.shard_depth}")
        if not 1 <= self.pyramid_levels <= 8:
            raise ValueError(f"ConvertSettings.pyramid_levels must be in 1..8, got {self.pyramid_levels}")
        if self.pyramid_method not in ("nearest", "mean"):
            raise ValueError(f"ConvertSettings.pyramid_method must be nearest|mean, got {self.pyramid_method!r}")
        if self.codec not in ("zstd", "lz4", "lz4hc", "zlib", "blosclz"):
            raise ValueError(f"ConvertSettings.codec must be a Blosc codec name, got {self.codec!r}")
        if not 0 <= self.clevel <= 9:
            raise ValueError(f"ConvertSettings.clevel must be in 0..9, got {self.clevel}")
        if self.shuffle not in ("noshuffle", "shuffle", "bitshuffle"):
            raise ValueError(f"ConvertSettings.shuffle must be noshuffle|shuffle|bitshuffle, got {self.shuffle!r}")
        if self.min_side < 1:
            raise ValueError(f"ConvertSettings.min_side must be >= 1, got {self.min_side}")
        if isinstance(self.max_scan_bytes, bool) or not isinstance(self.max_scan_bytes, int) \
                or self.max_scan_bytes < 1:
            raise ValueError(f"ConvertSettings.max_scan_bytes must be a positive number of bytes, "
                             f"got {self.max_scan_bytes!r}")
        if self.modality is not None and not self.modality.strip():
            raise ValueError("ConvertSettings.modality must be a non-empty string or None")

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("max_scan_bytes")  # a resource limit: it does not change what gets stored
        d["schema_version"] = SCHEMA_VERSION
        return d

    @property
    def hash(self) -> str:
        text = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]
