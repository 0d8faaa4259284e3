"""Opening a store: its root `zarr.json`, its `genesis.kind`, and the schema of its attributes."""

from __future__ import annotations

import json
from pathlib import Path

import storage_schemas

__all__ = ["read_genesis_attrs"]


def read_genesis_attrs(path: Path, kind: str, schema: str, error: type[Exception], hint: str = "") -> dict:
    """The `genesis` attributes of the store at `path`, checked against `schema`; `error` names what is wrong."""
    meta = path / "zarr.json"
    if not meta.is_file():
        raise error(f"{path} is not a {kind} (no zarr.json){hint}")
    try:
        attrs = json.loads(meta.read_text()).get("attributes", {})
    except json.JSONDecodeError as exc:
        raise error(f"{meta} does not parse: {exc}") from None
    found = attrs.get("genesis", {}).get("kind")
    if found != kind:
        raise error(f"{path} is a Zarr group but not a {kind} (genesis.kind is {found!r})")
    storage_schemas.validate_attrs(schema, attrs, str(path))
    return attrs["genesis"]
