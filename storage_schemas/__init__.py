"""Versioned contracts between the pipeline's stages.

JSON Schemas for the Zarr attributes of each store kind and Arrow schemas (as JSON field
lists, readable by people) for the Parquet tables. Writers check what they write and
readers check what they open, so a store made by another version fails loudly, naming the
store and the field, instead of being misread.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any

import jsonschema
import pyarrow as pa

__all__ = ["SchemaError", "json_schema", "validate_attrs", "arrow_schema", "check_table"]


class SchemaError(ValueError):
    """A store's attributes or table do not match the contract."""


@cache
def _load(name: str) -> dict[str, Any]:
    text = resources.files(__name__).joinpath(name).read_text(encoding="utf-8")
    return json.loads(text)


def json_schema(name: str) -> dict[str, Any]:
    """The JSON Schema `storage_schemas/<name>.schema.json`."""
    return _load(f"{name}.schema.json")


def validate_attrs(name: str, attrs: dict[str, Any], where: str) -> None:
    """Check `attrs` against the JSON Schema `name`; `where` names the store/group in errors."""
    validator = jsonschema.Draft202012Validator(json_schema(name))
    errors = sorted(validator.iter_errors(attrs), key=lambda e: list(e.absolute_path))
    if errors:
        lines = [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors[:5]]
        raise SchemaError(f"{where}: attributes do not match schema '{name}':\n  " + "\n  ".join(lines))


_ARROW_TYPES = {
    "string": pa.string(),
    "bool": pa.bool_(),
    "int8": pa.int8(),
    "int16": pa.int16(),
    "int32": pa.int32(),
    "int64": pa.int64(),
    "float32": pa.float32(),
    "float64": pa.float64(),
    "timestamp[us, UTC]": pa.timestamp("us", tz="UTC"),
    "list<int64>": pa.list_(pa.int64()),
    "list<float64>": pa.list_(pa.float64()),
    "list<string>": pa.list_(pa.string()),
}


@cache
def arrow_schema(name: str) -> pa.Schema:
    """The Arrow schema `storage_schemas/<name>.arrow.json` (fields with type and nullability)."""
    spec = _load(f"{name}.arrow.json")
    fields = []
    for f in spec["fields"]:
        if f["type"] not in _ARROW_TYPES:
            raise SchemaError(f"{name}.arrow.json: field {f['name']!r} has unknown type {f['type']!r}")
        fields.append(pa.field(f["name"], _ARROW_TYPES[f["type"]], nullable=f.get("nullable", True)))
    return pa.schema(fields, metadata={"genesis.schema": name, "genesis.schema_version": str(spec["version"])})


def check_table(name: str, table: pa.Table, where: str) -> pa.Table:
    """Check that `table` has every field of schema `name` with its type; return it cast to the schema.

    Extra columns are refused: a reader must never silently drop what a writer meant.
    """
    schema = arrow_schema(name)
    missing = [f.name for f in schema if f.name not in table.column_names]
    extra = [c for c in table.column_names if c not in schema.names]
    if missing or extra:
        raise SchemaError(f"{where}: table does not match schema '{name}': missing {missing}, unexpected {extra}")
    table = table.select(schema.names)
    for f in schema:
        col = table.column(f.name)
        if not f.nullable and col.null_count:
            raise SchemaError(f"{where}: column {f.name!r} has {col.null_count} nulls but may not be null")
    try:
        return table.cast(schema)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise SchemaError(f"{where}: table does not match schema '{name}': {exc}") from exc
