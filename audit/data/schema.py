"""Arrow schemas built from the JSON files in ``schemas/`` (the source of truth)."""

from __future__ import annotations

import pyarrow as pa

from audit.data import resources
from audit.engine.stats import stat_columns  # noqa: F401  (the records' statistic columns)

SCHEMA_VERSION = "1"

_TYPES = {
    "string": pa.string(),
    "binary": pa.binary(),
    "int32": pa.int32(),
    "int64": pa.int64(),
    "float32": pa.float32(),
    "float64": pa.float64(),
    "bool": pa.bool_(),
    "list<float32>": pa.list_(pa.float32()),
    "list<string>": pa.list_(pa.string()),
}


def arrow_schema(name: str, extra: dict | None = None) -> pa.Schema:
    """The Arrow schema of ``schemas/<name>.schema.json`` plus ``extra`` columns."""
    table = resources.schema(name)
    fields = [pa.field(c["name"], _TYPES[c["type"]]) for c in table["columns"]]
    for col, typ in (extra or {}).items():
        fields.append(pa.field(col, _TYPES[typ]))
    return pa.schema(fields)


def records_schema(regions=()) -> pa.Schema:
    """Schema of the records table, with one ``energy_<region>`` column per region."""
    return arrow_schema("records", {f"energy_{r}": "float32" for r in regions})
