"""obstore against fsspec/s3fs under Zarr v3, on the local S3 server: the speed side of the backend choice.

The stores run on `zarr.storage.ObjectStore` over obstore (`pipeline.storage.objects.S3Tree.zarr_store`, the
pipeline's own path) for its conditional writes, which the leases need and s3fs lacks. This measures the other
side: the same sharded int16 array, written and read through each backend against the same moto server:
  write: the whole array (one PUT per shard), MB/s of voxels;
  read: the whole array, MB/s of voxels;
  random cubes: unaligned 32 x 64 x 64 (z, y, x) crops, the pretraining cube, each touching up to 8 inner
  chunks of a shard (range reads of the shard index and chunks), one at a time: cubes/s;
  the same cubes 8 at a time (a thread pool, as a prefetching loader issues them): cubes/s.
The array is a chest-CT phantom of benchmarks/scale.py (realistic compression), with the volume store's
settings (`ConvertSettings`: 32x64x64 inner chunks, shards of 256 slices x the whole plane, Blosc zstd 1
shuffle, CRC32C on chunks and shard index). Best of --repeat runs of each figure, backends interleaved.

The server is moto (Python), so both clients wait on the same slow server: the figures compare the clients
under Zarr, not what either reaches against AWS or MinIO. Above all, moto answers a range GET by copying the
whole object and slicing it (`FakeKey.value`), so a cube's few range reads of a 50 MB shard cost 50 MB each:
the random-cube figures are the server's, O(shard size), where S3 and MinIO are O(range). Objects are kept in
the server's memory here (MOTO_S3_DEFAULT_KEY_BUFFER_SIZE 512 MB; each run's array deleted after it), which
makes those copies cheaper than from its spill files.

`--quick` runs every step on a tiny array (40 x 128 x 128, 16 x 32 x 32 cubes) in seconds: a smoke run.

    .venv/bin/python benchmarks/object_backends.py [--slices 200] [--cubes 200] [--repeat 3] [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
BACKENDS = ("obstore", "fsspec")


def phantom(slices: int, inplane: int) -> np.ndarray:
    """One scale-benchmark chest CT of `slices` x inplane x inplane."""
    from scale import PhantomSize, plan_scan, render_slab  # benchmarks/: run as a script, its folder is on sys.path

    size = PhantomSize(inplane=inplane, slices=(slices, slices))
    plan = plan_scan(0, 0, size)
    return render_slab(plan, 0, plan.shape[0])


def zarr_store(backend: str, bucket: str, prefix: str, read_only: bool):
    """Zarr's own store class for each client, with the AWS settings of the environment."""
    if backend == "obstore":
        from pipeline.storage.objects import open_tree

        return open_tree(f"s3://{bucket}").zarr_store(prefix, read_only=read_only)
    import s3fs
    from zarr.storage import FsspecStore

    from pipeline.storage.objects import s3_settings

    conf = s3_settings()
    fs = s3fs.S3FileSystem(key=conf.get("access_key_id"), secret=conf.get("secret_access_key"),
                           endpoint_url=conf.get("endpoint"), client_kwargs={"region_name": conf["region"]},
                           asynchronous=True)
    return FsspecStore(fs, path=f"{bucket}/{prefix}", read_only=read_only)


def create(store, shape: tuple[int, ...], chunks: tuple[int, ...], shard_depth: int):
    import zarr
    from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ShardingCodec

    from pipeline.volume_store.settings import ConvertSettings

    s = ConvertSettings()
    shard = (min(shard_depth, shape[0]), shape[1], shape[2])
    shard = tuple(-(-a // c) * c for a, c in zip(shard, chunks))  # whole inner chunks per shard
    sharding = ShardingCodec(chunk_shape=chunks,
                             codecs=[BytesCodec(), BloscCodec(cname=s.codec, clevel=s.clevel, shuffle=s.shuffle),
                                     Crc32cCodec()],
                             index_codecs=[BytesCodec(), Crc32cCodec()])
    return zarr.create_array(store, shape=shape, chunks=shard, dtype="int16", serializer=sharding,
                             compressors=None, fill_value=0, overwrite=True)


def cube_corners(shape, cube, n: int, seed: int) -> list[tuple[int, int, int]]:
    rng = np.random.default_rng(seed)
    return [tuple(int(rng.integers(0, s - c + 1)) for s, c in zip(shape, cube)) for _ in range(n)]


def measure(backend: str, bucket: str, data: np.ndarray, chunks, shard_depth, cube, corners, run: int) -> dict:
    import zarr

    prefix = f"{backend}-{run}"
    mb = data.nbytes / 1e6
    arr = create(zarr_store(backend, bucket, prefix, read_only=False), data.shape, chunks, shard_depth)
    t0 = time.perf_counter()
    arr[...] = data
    write = time.perf_counter() - t0
    ro = zarr.open_array(zarr_store(backend, bucket, prefix, read_only=True), mode="r")
    t0 = time.perf_counter()
    back = ro[...]
    read = time.perf_counter() - t0
    assert np.array_equal(back, data), f"{backend}: the array read back differs"

    def crop(c):
        return ro[c[0]:c[0] + cube[0], c[1]:c[1] + cube[1], c[2]:c[2] + cube[2]]

    t0 = time.perf_counter()
    for c in corners:
        crop(c)
    serial = time.perf_counter() - t0
    t0 = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(crop, corners))
    parallel = time.perf_counter() - t0
    c = corners[-1]
    assert np.array_equal(got[-1], data[c[0]:c[0] + cube[0], c[1]:c[1] + cube[1], c[2]:c[2] + cube[2]])
    from pipeline.storage.objects import open_tree

    open_tree(f"s3://{bucket}/{prefix}").delete_prefix("")  # the server holds it in memory
    return {"write_mbps": mb / write, "read_mbps": mb / read, "cubes_per_s": len(corners) / serial,
            "cubes_per_s_8": len(corners) / parallel}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slices", type=int, default=None, help="array depth (default 200; --quick 40)")
    ap.add_argument("--cubes", type=int, default=None, help="random cubes read (default 200; --quick 20)")
    ap.add_argument("--repeat", type=int, default=None, help="best of N runs (default 3; --quick 1)")
    ap.add_argument("--quick", action="store_true", help="every step on a tiny array: a smoke run, not figures")
    ap.add_argument("--out", type=Path, help="folder for object_backends.txt/.json (default benchmarks/results; "
                                             "--quick: nothing written)")
    args = ap.parse_args()
    quick = args.quick
    slices = args.slices or (40 if quick else 200)
    inplane = 128 if quick else 512
    n_cubes = args.cubes or (20 if quick else 200)
    repeat = args.repeat or (1 if quick else 3)
    cube = (16, 32, 32) if quick else (32, 64, 64)
    chunks, shard_depth = (32, 64, 64), 256
    if min(slices, n_cubes, repeat) < 1 or slices < cube[0]:
        ap.error(f"--slices must be >= {cube[0]}, --cubes and --repeat >= 1")

    from scale import LocalS3

    os.environ.setdefault("MOTO_S3_DEFAULT_KEY_BUFFER_SIZE", str(512 * 2**20))  # before LocalS3's 1 MB default
    data = phantom(slices, inplane)
    corners = cube_corners(data.shape, cube, n_cubes, seed=0)
    s3 = LocalS3()
    try:
        best: dict[str, dict] = {b: {} for b in BACKENDS}
        for run in range(repeat):
            for backend in (BACKENDS if run % 2 == 0 else BACKENDS[::-1]):  # neither always goes first
                got = measure(backend, s3.bucket, data, chunks, shard_depth, cube, corners, run)
                for k, v in got.items():
                    best[backend][k] = max(best[backend].get(k, 0.0), v)
    finally:
        s3.stop()
    import zarr

    lines = [f"object backends under zarr {zarr.__version__}: int16 array {'x'.join(map(str, data.shape))} "
             f"({data.nbytes / 1e6:.0f} MB), inner chunks {'x'.join(map(str, chunks))}, shards of {shard_depth} "
             f"slices x the plane, blosc zstd 1 shuffle + CRC32C; {n_cubes} random {'x'.join(map(str, cube))} "
             f"cubes; best of {repeat}; moto S3 server on 127.0.0.1, {os.cpu_count()} cores"
             + (" (quick: tiny array)" if quick else ""),
             f"{'':28s}{'obstore':>12s}{'fsspec/s3fs':>12s}{'obstore/fsspec':>16s}"]
    for key, label in (("write_mbps", "write whole array, MB/s"), ("read_mbps", "read whole array, MB/s"),
                       ("cubes_per_s", "random cubes, 1 at a time/s"),
                       ("cubes_per_s_8", "random cubes, 8 at a time/s")):
        a, b = best["obstore"][key], best["fsspec"][key]
        lines.append(f"{label:28s}{a:12.1f}{b:12.1f}{a / b:15.2f}x")
    text = "\n".join(lines)
    print(text)
    out = args.out.resolve() if args.out else (None if quick else REPO / "benchmarks" / "results")
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "object_backends.txt").write_text(text + "\n")
        (out / "object_backends.json").write_text(json.dumps(
            {"shape": data.shape, "chunks": chunks, "shard_depth": shard_depth, "cube": cube, "cubes": n_cubes,
             "repeat": repeat, "quick": quick, "best": best}, indent=1) + "\n")


if __name__ == "__main__":
    main()
