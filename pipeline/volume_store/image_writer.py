"""Write one `Volume` as an OME-Zarr 0.5 multiscale image group (level 0 unchanged, small pyramid)."""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import numpy as np
import zarr

from pipeline.ingest.volume import Volume
from pipeline.storage.shard_writer import ShardSink, chunk_codecs, write_shards
from pipeline.volume_store.settings import ConvertSettings

__all__ = ["write_image", "pyramid", "downsample", "multiscales"]


def _factors(spacing: tuple[float, float, float]) -> tuple[int, int, int]:
    """Halve y and x; halve z too only when slices are about as thin as pixels (keeps voxels near-isotropic)."""
    return (2 if spacing[0] <= 1.5 * min(spacing[1], spacing[2]) else 1, 2, 2)


def downsample(arr: np.ndarray, factors: tuple[int, int, int], label: bool) -> np.ndarray:
    """Mean of each block for images (rounded back to the dtype); the block's first voxel for labels."""
    if label:
        return arr[:: factors[0], :: factors[1], :: factors[2]]
    fz, fy, fx = factors
    z, y, x = (s - s % f for s, f in zip(arr.shape, factors))
    if min(z, y, x) == 0:
        return arr[:: fz, :: fy, :: fx]
    acc = np.zeros((z // fz, y // fy, x // fx), dtype=np.float32)
    for dz in range(fz):
        for dy in range(fy):
            for dx in range(fx):
                acc += arr[dz:z:fz, dy:y:fy, dx:x:fx]
    acc *= 1.0 / (fz * fy * fx)
    if np.issubdtype(arr.dtype, np.integer):
        np.rint(acc, out=acc)
    return acc.astype(arr.dtype, copy=False)


def pyramid(volume: Volume, levels: int, min_side: int = 8,
            method: str = "nearest") -> list[tuple[np.ndarray, tuple[float, float, float]]]:
    """(array, spacing) per level; stops early when a side would fall under `min_side`."""
    out = [(volume.voxels, volume.spacing)]
    arr, spacing = volume.voxels, volume.spacing
    for _ in range(1, levels):
        f = _factors(spacing)
        if any(s // k < min_side for s, k in zip(arr.shape, f)):
            break
        arr = downsample(arr, f, label=method == "nearest")
        spacing = tuple(s * k for s, k in zip(spacing, f))  # type: ignore[assignment]
        out.append((arr, spacing))
    return out


def multiscales(name: str, levels: list[tuple[tuple[float, ...], tuple[float, ...]]]) -> list[dict]:
    """OME-Zarr 0.5 `multiscales` for levels given as (spacing, translation) in z, y, x mm."""
    return [{
        "name": name,
        "axes": [{"name": a, "type": "space", "unit": "millimeter"} for a in ("z", "y", "x")],
        "datasets": [
            {"path": str(i), "coordinateTransformations": [
                {"type": "scale", "scale": [float(v) for v in spacing]},
                {"type": "translation", "translation": [float(v) for v in translation]},
            ]}
            for i, (spacing, translation) in enumerate(levels)
        ],
    }]


def _translation(origin, spacing0, spacing) -> tuple[float, ...]:
    """Voxel centres of a mean-pooled level sit half a (new - old) voxel further along each axis."""
    return tuple(o + (s - s0) / 2 for o, s0, s in zip(origin, spacing0, spacing))


Sinks = Callable[[str], ShardSink] | None
"""`sink(array_path)` gives where the shards of the array at `array_path` (e.g. "0", "labels/seg/1", relative to
the image group) go; None: the folder of a group on a LocalStore."""


def _write_array(group: zarr.Group, name: str, data: np.ndarray, settings: ConvertSettings, sink: Sinks = None) -> int:
    chunks = tuple(min(c, s) for c, s in zip(settings.chunks, data.shape))
    shards = (min(settings.shard_depth, math.ceil(data.shape[0] / chunks[0]) * chunks[0]),
              math.ceil(data.shape[1] / chunks[1]) * chunks[1],
              math.ceil(data.shape[2] / chunks[2]) * chunks[2])
    shards = tuple(max(s, c) - max(s, c) % c for s, c in zip(shards, chunks))
    group.create_array(name, shape=data.shape, dtype=data.dtype, chunks=chunks, shards=shards,
                       compressors=chunk_codecs(settings.codec, settings.clevel, settings.shuffle, data.dtype.itemsize),
                       fill_value=0, dimension_names=("z", "y", "x"))
    path = f"{group.path}/{name}" if group.path else name
    array_dir = sink(path) if sink is not None else os.path.join(str(group.store.root), group.path, name)
    # every inner chunk and every shard index carries a CRC32C that reads verify
    return write_shards(array_dir, data, chunks, shards, settings.codec, settings.clevel, settings.shuffle,
                        checksum=True)


def write_image(group: zarr.Group, volume: Volume, settings: ConvertSettings, genesis_attrs: dict,
                sink: Sinks = None) -> int:
    """Write levels, labels and attributes into `group` (an empty group: on a LocalStore, or any Zarr store with
    `sink` saying where each array's shards go); return bytes stored."""
    levels = pyramid(volume, settings.pyramid_levels, min_side=settings.min_side, method=settings.pyramid_method)
    nearest = settings.pyramid_method == "nearest"
    stored = 0
    transforms = []
    for i, (arr, spacing) in enumerate(levels):
        stored += _write_array(group, str(i), np.ascontiguousarray(arr), settings, sink)
        transforms.append((spacing, volume.origin if nearest else _translation(volume.origin, volume.spacing, spacing)))
    if volume.labels:
        labels_group = group.create_group("labels")
        labels_group.attrs.update({"ome": {"version": "0.5", "labels": sorted(volume.labels)}})
        for name, label in sorted(volume.labels.items()):
            lg = labels_group.create_group(name)
            lt = []
            arr, spacing = label, volume.spacing
            for i in range(len(levels)):
                if i:
                    f = _factors(spacing)
                    arr = downsample(arr, f, label=True)
                    spacing = tuple(s * k for s, k in zip(spacing, f))
                stored += _write_array(lg, str(i), np.ascontiguousarray(arr), settings, sink)
                lt.append((spacing, volume.origin))  # strided: first voxel keeps its centre
            values = np.unique(label)
            attrs = {"ome": {
                "version": "0.5",
                "multiscales": multiscales(name, lt),
                "image-label": {"version": "0.5", "source": {"image": "../../"},
                                "properties": [{"label-value": int(v)} for v in values[:256]]},
            }}
            if volume.label_attrs.get(name):
                attrs["genesis"] = volume.label_attrs[name]  # e.g. LIDC nodules: readers, centroids, problems
            lg.attrs.update(attrs)
    group.attrs.update({"ome": {"version": "0.5", "multiscales": multiscales(genesis_attrs["scan_id"], transforms)},
                        "genesis": genesis_attrs})
    return stored
