"""What a published scan is made of: every file of its folder with its size and XXH3 digest.

The manifest is taken from the staged folder just before it is published and kept in the scan's
record; the scan's `content_digest` is a hash of the manifest. `genesis stores verify` compares
the folder with it (so a deleted shard, which Zarr would read as zeros, is caught), reads check
the metadata files against it, and patch-store keys include the digest, so a changed or repaired
scan gives a new patch store.

The folder may be on disk or under a bucket prefix: `tree_manifest` and `check_tree` take a `Tree`
(`pipeline.storage.objects`) and a prefix; `check_tree` lists the prefix once (sizes come with the
listing, so the cheap check is one LIST in a bucket, not a HEAD per object).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import xxhash

__all__ = ["folder_manifest", "content_digest", "check_folder", "file_digest", "bytes_digest", "tree_manifest",
           "check_tree"]

_BLOCK = 1 << 22


def file_digest(path: str | os.PathLike) -> str:
    """`<size>:<xxh3-64 hex>` of one file."""
    h = xxhash.xxh3_64()
    size = 0
    with open(path, "rb", buffering=0) as fh:
        while True:
            block = fh.read(_BLOCK)
            if not block:
                break
            size += len(block)
            h.update(block)
    return f"{size}:{h.hexdigest()}"


def bytes_digest(data: bytes) -> str:
    """`<size>:<xxh3-64 hex>` of bytes in memory (an object read from a bucket); equals `file_digest` of a file."""
    return f"{len(data)}:{xxhash.xxh3_64(data).hexdigest()}"


def tree_manifest(tree, prefix: str, known: dict[str, str] | None = None) -> dict[str, str]:
    """The manifest of every object under `prefix` of `tree` (relative to it). Objects in `known` (their
    digests taken as they were written) are not read again."""
    known = known or {}
    out = {}
    for info in tree.list(prefix):
        rel = info.path[len(prefix.strip("/")) + 1:] if prefix.strip("/") else info.path
        out[rel] = known[rel] if rel in known else bytes_digest(tree.read(info.path))
    return dict(sorted(out.items()))


def check_tree(tree, prefix: str, manifest: dict[str, str], full: bool = True,
               on_bytes=None) -> list[str]:
    """`check_folder` for the objects under `prefix` of `tree` (a folder on disk or a bucket prefix).

    `on_bytes(rel, data)` is called with every object read in full (the shard CRC32C checks reuse the bytes);
    it may return a phrase naming a problem."""
    if tree.local is not None and on_bytes is None:
        return check_folder(tree.local / prefix if prefix else tree.local, manifest, full)
    base = prefix.strip("/")
    listed = {(o.path[len(base) + 1:] if base else o.path): o.size for o in tree.list(base)}
    problems = []
    for rel, want in sorted(manifest.items()):
        size = listed.get(rel)
        if size is None:
            problems.append(f"{rel} missing")
            continue
        if size != int(want.split(":", 1)[0]):
            problems.append(f"{rel} has {size} bytes, {want.split(':', 1)[0]} recorded")
        elif full:
            try:
                data = tree.read(f"{base}/{rel}" if base else rel)
            except FileNotFoundError:
                problems.append(f"{rel} missing")
                continue
            extra = on_bytes(rel, data) if on_bytes is not None else None
            if extra:
                problems.append(extra)
            elif bytes_digest(data) != want:
                problems.append(f"{rel} content differs from its recorded digest")
    if full:
        problems += [f"{rel} not recorded (unexpected file)" for rel in sorted(listed) if rel not in manifest]
    return problems


def _files(folder: Path) -> list[str]:
    out = []
    for dirpath, dirnames, files in os.walk(folder):
        dirnames.sort()
        rel = Path(dirpath).relative_to(folder)
        out += [(rel / f).as_posix() for f in sorted(files)]
    return out


def folder_manifest(folder: str | os.PathLike) -> dict[str, str]:
    """{path relative to `folder` (posix): `<size>:<xxh3-64>`} for every file under it."""
    folder = Path(folder)
    return {rel: file_digest(folder / rel) for rel in _files(folder)}


def content_digest(manifest: dict[str, str]) -> str:
    return "xxh3-128:" + xxhash.xxh3_128(json.dumps(manifest, sort_keys=True).encode()).hexdigest()


def check_folder(folder: str | os.PathLike, manifest: dict[str, str], full: bool = True) -> list[str]:
    """What differs between `folder` and its manifest, one phrase per file (empty: intact).

    `full=False` compares sizes only (a stat per file: cheap enough for every rerun)."""
    folder = Path(folder)
    problems = []
    for rel, want in sorted(manifest.items()):
        path = folder / rel
        try:
            size = path.stat().st_size
        except OSError:
            problems.append(f"{rel} missing")
            continue
        if size != int(want.split(":", 1)[0]):
            problems.append(f"{rel} has {size} bytes, {want.split(':', 1)[0]} recorded")
        elif full and file_digest(path) != want:
            problems.append(f"{rel} content differs from its recorded digest")
    if full:
        problems += [f"{rel} not recorded (unexpected file)" for rel in _files(folder) if rel not in manifest]
    return problems
