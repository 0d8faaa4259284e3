"""Opening a store: its root `zarr.json`, its `genesis.kind`, and the schema of its attributes.

The store may be a folder on disk or a prefix in a bucket: `path` is a path, an `s3://` URL or a `Tree`
(`pipeline.storage.objects`), and the root `zarr.json` is read through the tree.
"""

from __future__ import annotations

import json
import os

import storage_schemas
from pipeline.storage.objects import Tree, open_tree

__all__ = ["read_genesis_attrs"]


def read_genesis_attrs(path: "str | os.PathLike | Tree", kind: str, schema: str, error: type[Exception],
                       hint: str = "") -> dict:
    """The `genesis` attributes of the store at `path`, checked against `schema`; `error` names what is wrong."""
    tree = open_tree(path)
    where = str(path) if not isinstance(path, Tree) else tree.url
    try:
        data = tree.read("zarr.json")
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        raise error(f"{where} is not a {kind} (no zarr.json){hint}") from None
    try:
        attrs = json.loads(data.decode("utf-8", "replace")).get("attributes", {})
    except (json.JSONDecodeError, AttributeError) as exc:
        raise error(f"{where}/zarr.json does not parse: {exc}") from None
    found = attrs.get("genesis", {}).get("kind") if isinstance(attrs, dict) else None
    if found != kind:
        raise error(f"{where} is a Zarr group but not a {kind} (genesis.kind is {found!r})")
    storage_schemas.validate_attrs(schema, attrs, where)
    return attrs["genesis"]
