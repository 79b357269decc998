"""``format: parquet``: a file or folder of Parquet files with ``image`` (encoded bytes), ``label``,
optional ``mask`` (encoded bytes) and optional ``key``.

``image_id`` is the ``key`` column when present, else ``<file relative to the
dataset>#<row>``; a record's ``path`` is ``<file>#<row>``.  A shard is a row
range of one file, read by row groups (a damaged one costs only its rows).
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

from audit.data import fs
from audit.data.files import escape_text
from audit.data.formats.base import (
    DatasetFormat,
    Item,
    Shard,
    ShardIdentity,
    chunks,
    file_stat,
    indexed_ids,
    is_number,
    label_index,
    list_files,
    rel_path,
)
from audit.errors import AuditError

if TYPE_CHECKING:  # the spec module loads the model code; only the type is needed here
    from audit.data.jobspec import DatasetSpec

EXTENSIONS = (".parquet", ".pq")


class Parquet(DatasetFormat):
    """Rows of Parquet files holding the encoded images."""

    name = "parquet"
    record_extensions = EXTENSIONS

    def plan(self, ds: DatasetSpec):
        return _plan_parquet(ds)

    def read(self, ds: DatasetSpec, shard: Shard, classes):
        return _read_parquet(ds, shard, classes)

    def identity(self, ds: DatasetSpec, shard: Shard, classes) -> ShardIdentity:
        return _parquet_identity(ds, shard)

    def items_by_id(self, ds: DatasetSpec, ids):
        """Direct where every id is ``file#row``; else every row, in order."""
        direct = indexed_ids(ds, ids)
        if direct is None:
            yield from super().items_by_id(ds, ids)
            return
        for file, idx in direct:
            yield from _read_parquet(ds, Shard(0, file, idx, idx + 1), ds.classes)

    def record_bytes(self, file: str, index: int) -> bytes:
        t = _parquet_rows(file, index, index + 1, columns=["image"])
        if t.num_rows == 0:
            raise AuditError(f"record {index} not found in {file}")
        return t.column("image")[0].as_py()


def parquet_file(file: str):
    """A ``pyarrow.parquet.ParquetFile`` of a local file or an object (read by ranges, not downloaded)."""
    import pyarrow.parquet as pq  # deferred (as below): the registry imports every format, most jobs need none

    if fs.is_uri(file):
        return pq.ParquetFile(fs.open_input(file))
    return pq.ParquetFile(file)


def _plan_parquet(ds):
    import pyarrow.compute as pc

    files = list_files(ds.path, (".parquet", ".pq"))
    if not files:
        raise AuditError(f"dataset: no .parquet files in {ds.path}")
    size, limit = ds.shard_size, ds.limit
    shards, total, sid = [], 0, 0
    names: set[str] = set()
    keys: dict[str, str] = {}
    for file in files:
        try:
            pf = parquet_file(file)
        except (OSError, ValueError) as e:  # pyarrow.ArrowInvalid is a ValueError
            raise AuditError(f"dataset: {file} is not a readable Parquet file: {' '.join(str(e).split())[:200]}") \
                from None
        schema = pf.schema_arrow
        if "image" not in schema.names:
            raise AuditError(f"dataset: {file} has no 'image' column (encoded image bytes); columns: "
                             f"{', '.join(schema.names)}")
        n = pf.metadata.num_rows
        if limit:
            n = min(n, limit - total)
        if "label" in schema.names and _label_kind(file, schema.field("label").type) == "text":
            col = pf.read(columns=["label"]).column("label")
            names.update(str(v) for v in pc.unique(col).to_pylist() if v is not None and not is_number(str(v)))
        if "key" in schema.names:
            _refuse_repeated_keys(file, pf.read(columns=["key"]).column("key").slice(0, n).to_pylist(), keys)
        for a, b in chunks(n, size):
            shards.append(Shard(sid, file, a, b))
            sid += 1
        total += n
        if limit and total >= limit:
            break
    classes = ds.classes or (sorted(names) if names else None)
    return shards, total, classes


def _refuse_repeated_keys(file: str, values: list, seen: dict) -> None:
    """Refuse a ``key`` that repeats (in this file or an earlier one): every reader must mean one row by it."""
    for row, v in enumerate(values):
        if v is None:
            continue
        k = v.decode("utf-8", "backslashreplace") if isinstance(v, bytes) else str(v)
        if k in seen:
            raise AuditError(f"dataset: {file} row {row}: key {escape_text(k)[:200]!r} repeats ({seen[k]}); "
                             "each row needs its own key")
        seen[k] = f"{file} row {row}"


def _label_kind(file: str, t) -> str:
    """"number" or "text" for a Parquet label column type; other types are refused in one line."""
    import pyarrow as pa

    if pa.types.is_dictionary(t):  # a pandas Categorical: its values decide
        t = t.value_type
    if pa.types.is_integer(t) or pa.types.is_floating(t):
        return "number"
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t) \
            or pa.types.is_large_binary(t):
        return "text"
    raise AuditError(f"dataset: {file}: column 'label' has type {t}; expected integers, whole floats, "
                     "strings, or a dictionary (categorical) of them")


def _parquet_rows(file: str, start: int, stop: int, columns=None):
    """Rows [start, stop) of one Parquet file, reading only the row groups that hold them."""

    pf = parquet_file(file)
    groups, first, pos = [], None, 0
    for g in range(pf.metadata.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        if pos + n > start and pos < stop:
            groups.append(g)
            first = pos if first is None else first
        pos += n
    if not groups:
        return pf.schema_arrow.empty_table()
    cols = [c for c in (columns or pf.schema_arrow.names) if c in pf.schema_arrow.names]
    t = pf.read_row_groups(groups, columns=cols)
    return t.slice(start - first, stop - start)


def _parquet_groups(file: str, start: int, stop: int):
    """Yield (first row, rows [first, first + n) of one row group inside [start, stop), n, problem).

    Row groups are read one at a time, so a corrupt one (a damaged page) costs
    only its own rows: its table is None and ``problem`` says why.
    """

    pf = parquet_file(file)
    pos = 0
    for g in range(pf.metadata.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        a, b = max(start, pos), min(stop, pos + n)
        if a < b:
            try:
                t = pf.read_row_group(g).slice(a - pos, b - a)
                yield a, t, b - a, None
            except (OSError, ValueError) as e:  # pyarrow.ArrowInvalid is a ValueError
                yield a, None, b - a, f"unreadable Parquet row group {g}: {' '.join(str(e).split())[:200]}"
        pos += n


def _read_parquet(ds, shard: Shard, classes):
    rel = rel_path(shard.source, ds.path)
    mask_col = ds.masks or "mask"
    for first, t, n, problem in _parquet_groups(shard.source, shard.start, shard.stop):
        if problem:
            for idx in range(first, first + n):
                yield Item(image_id=f"{rel}#{idx}", path=f"{shard.source}#{idx}", error=problem)
            continue
        cols = {c: t.column(c).to_pylist() for c in t.column_names if c in ("image", "label", "key", mask_col)}
        for i in range(n):
            idx = first + i
            key = cols.get("key", [None] * n)[i]
            label, err = label_index(cols.get("label", [None] * n)[i], classes)
            mask = cols.get(mask_col, [None] * n)[i]
            if isinstance(key, bytes):
                key = key.decode("utf-8", "backslashreplace")
            yield Item(
                image_id=str(key) if key is not None else f"{rel}#{idx}",
                path=f"{shard.source}#{idx}",
                label=label,
                data=cols["image"][i] or b"",
                mask_data=mask or None,
                error=err,
            )


def _parquet_identity(ds, shard) -> ShardIdentity:

    schema = parquet_file(shard.source).schema_arrow
    cols = [c for c in ("key", "label") if c in schema.names]
    h = hashlib.sha256()
    try:
        t = _parquet_rows(shard.source, shard.start, shard.stop, columns=cols or ["image"])
    except (OSError, ValueError):  # a damaged row group: the reader makes error rows of its rows
        t, cols = None, []
        h.update(b"unreadable")
    n = t.num_rows if t is not None else shard.size
    if "key" in cols:
        keys = [str(k) for k in t.column("key").to_pylist()]
    else:
        rel = rel_path(shard.source, ds.path)
        keys = [f"{rel}#{shard.start + i}" for i in range(n)]
        h.update(f"size={fs.size(shard.source)}".encode())
    labels = t.column("label").to_pylist() if "label" in cols else [None] * n
    for k, lab in zip(keys, labels):
        h.update(repr((k, lab)).encode())
    content = hashlib.sha256(repr(file_stat(shard.source)).encode()).hexdigest()
    return ShardIdentity(n, keys[0] if keys else None, keys[-1] if keys else None, h.hexdigest(), content)
