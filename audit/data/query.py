"""Querying a job's output: records as pandas, heatmaps, overlays.

The records are plain Parquet (``OUT/records/part-*.parquet``): DuckDB
(``SELECT * FROM 'OUT/records/*.parquet'``) and Polars
(``pl.scan_parquet('OUT/records/*.parquet')``) read them as is.  OUT may be
a URI (``s3://bucket/results/job``): only the objects named by manifest
entries are read (:func:`committed_files` lists them for DuckDB and Polars).

>>> import audit
>>> df = audit.load("results/tank-sky", columns=["image_id", "label", "energy_object"],
...                 filters=[("method", "=", "gradcam"), ("status", "=", "ok")])
>>> row = audit.load("results/tank-sky").iloc[0]
>>> audit.heatmap(row, size=224).shape      # (224, 224) float32 in [0, 1]
>>> audit.overlay(row)                       # uint8 RGB, JET heatmap over the original image
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from audit.data import datasets, decode, fs, io
from audit.data.jobspec import read_job_record
from audit.engine.overlay import overlay_image
from audit.engine.stats import normalize, resize_map
from audit.errors import AuditError

__all__ = ["load", "heatmap", "overlay", "records_dataset"]


def _records_dir(out):
    if fs.is_uri(str(out)):
        if fs.list_files(fs.join(str(out), "records"), recursive=False):
            return fs.join(str(out), "records")
        if any(rel.endswith(".parquet") for rel, _ in fs.list_files(str(out), recursive=False)):
            return str(out)
        raise fs.not_found(str(out)) if not fs.exists(str(out)) else AuditError(
            f"{out} is not a job output (no records/ folder); run `audit run SPEC.yaml` first")
    p = Path(out)
    if (p / "records").is_dir():
        return p / "records"
    if p.is_dir() and any(p.glob("*.parquet")):
        return p
    raise AuditError(f"{out} is not a job output (no records/ folder); run `audit run SPEC.yaml` first")


def committed_files(out) -> list[str] | None:
    """The Parquet files of the committed shards of a job output, in shard order.

    None when ``out`` has no ``_manifest/`` (a plain folder of Parquet files:
    every file is read).  Part files without a manifest entry (a shard being
    written, or one whose commit was lost) are left out.

    Raises:
        AuditError: a part file disagrees with its manifest entry (size or row
            count: truncated or replaced), named in one line.
    """
    p = str(out) if fs.is_uri(str(out)) else Path(out)
    if not io.has_manifest(p):
        return None
    entries = io.manifest_entries(p)
    if not entries:
        raise AuditError(f"{out} has no committed shards yet (no entries in {io.MANIFEST}/); "
                         "wait for the job, or run it with --resume")
    files = []
    for sid in sorted(entries):
        problem = io.part_problem(p, entries[sid])
        if problem:
            raise AuditError(f"{out}: shard {sid}'s {io.RECORDS}/{entries[sid].get('file')} {problem}; "
                             "it is not committed: rerun the job with --resume to redo it")
        files.append(fs.join(str(p), io.RECORDS, entries[sid]["file"]))
    return files


RECORD_KEYS = ("image_id", "status")  # columns every records file has


def records_dataset(out):
    """The records as a ``pyarrow.dataset.Dataset`` (lazy; filters and columns pushed down).

    Only committed shards are read (:func:`committed_files`).

    Raises:
        AuditError: ``out`` is not a job output (no records, or Parquet files
            without the records' columns, such as a Parquet dataset folder).
    """
    import pyarrow.dataset as pads

    folder = _records_dir(out)
    files = committed_files(out)
    if fs.is_uri(str(out)):  # one filesystem for the bucket, paths inside it
        fsys, _ = fs.resolve(str(folder))
        paths = [fs.split(f).path for f in files] if files is not None else fs.split(str(folder)).path
        try:
            ds = pads.dataset(paths, format="parquet", filesystem=fsys)
        except OSError as e:
            fs.raise_storage(e, str(out))
    else:
        ds = pads.dataset(files if files is not None else str(folder), format="parquet")
    missing = [c for c in RECORD_KEYS if c not in ds.schema.names]
    if missing:
        raise AuditError(f"{out} is not a job output: the Parquet files in {folder} have no {missing[0]!r} "
                         "column (a dataset folder?); give the `output` folder of an audit job")
    return ds


def _expression(filters):
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    if filters is None or isinstance(filters, pc.Expression):
        return filters
    try:
        return pq.filters_to_expression(filters)
    except (TypeError, ValueError) as e:
        raise AuditError(
            f"filters must be a pyarrow expression or a list of (column, op, value) tuples: {e}"
        ) from None


def load(out, columns=None, filters=None):
    """The records of a job output as a pandas DataFrame.

    Only committed shards are read; columns and filters are pushed down to the
    Parquet scan (row groups are skipped).

    Args:
        out: the job output folder (``OUT``, holding ``records/``), or a folder
            of Parquet files.
        columns: the columns to read (default all; docs/jobs.md lists them).
        filters: a ``pyarrow.compute`` expression (``pc.field("label") == 1``)
            or DNF tuples as in ``pandas.read_parquet`` (``[("status", "=", "ok")]``).

    Returns:
        A ``pandas.DataFrame``, one row per (image, layer, method) record.

    Raises:
        AuditError: ``out`` is not a job output, a column does not exist, a
            filter is malformed or names a bad column/type, or a committed
            part file disagrees with its manifest entry.
    """
    ds = records_dataset(out)
    if columns is not None:
        columns = list(columns)
        missing = [c for c in columns if c not in ds.schema.names]
        if missing:
            raise AuditError(f"no column {missing[0]!r} in the records; columns: {', '.join(ds.schema.names)}")
    try:
        table = ds.to_table(columns=columns, filter=_expression(filters))
    except Exception as e:  # ArrowInvalid / ArrowTypeError: a bad column or type in a filter
        if type(e).__module__.startswith("pyarrow"):
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            if filters is None:
                raise AuditError(f"cannot read the records of {out}: {first}") from None
            raise AuditError(f"bad filter {filters!r}: {first}") from None
        raise
    df = table.to_pandas()
    # where the rows came from: heatmap() and overlay() read the columns a row lacks from there
    df.attrs[SOURCE] = {"out": str(out), "filters": filters}
    return df


SOURCE = "audit.records"  # DataFrame.attrs key set by load()
MAP_COLUMNS = ("status", "cam", "cam_h", "cam_w")
IMAGE_COLUMNS = ("path", "path_bytes")  # path_bytes only where the records have it
KEY_COLUMNS = ("image_id", "layer", "method")


def _has(row, key) -> bool:
    try:
        return key in (row.index if hasattr(row, "index") and not isinstance(row, dict) else row)
    except TypeError:
        return False


def with_columns(row, needed):
    """``row`` with the columns ``needed`` read back from its job output when :func:`load` left them out.

    Args:
        row: a row of :func:`load`'s DataFrame (or of any frame made from it that
            kept its index, e.g. ``df[df.energy_object < 0.2]``), or a dict.
        needed: the column names the caller reads.

    Returns:
        ``row`` itself when it has them all, else a dict of its values plus the missing ones.

    Raises:
        AuditError: the row cannot be traced back to its record (a dict, or a
            frame whose index was reset); the message names the columns to load.
    """
    missing = [c for c in needed if not _has(row, c)]
    if not missing:
        return row
    src = getattr(row, "attrs", {}).get(SOURCE)
    pos = getattr(row, "name", None)
    hint = (f"the record has no {', '.join(missing)} column; load them too: "
            f"audit.load(OUT, columns=[..., {', '.join(repr(c) for c in missing)}])")
    if src is None or not isinstance(pos, (int, np.integer)):
        raise AuditError(hint)
    ds = records_dataset(src["out"])
    keys = ds.to_table(columns=list(KEY_COLUMNS), filter=_expression(src["filters"]))
    if not 0 <= pos < keys.num_rows:
        raise AuditError(hint)
    key = {k: keys.column(k)[int(pos)].as_py() for k in KEY_COLUMNS}
    if any(_has(row, k) and row[k] != v for k, v in key.items()):  # the frame's index no longer is load()'s
        raise AuditError(hint)
    import pyarrow.compute as pc

    where = (pc.field("image_id") == key["image_id"]) & (pc.field("layer") == key["layer"]) & \
        (pc.field("method") == key["method"])
    wanted = [c for c in missing if c in ds.schema.names]
    found = ds.to_table(columns=wanted, filter=where).slice(0, 1).to_pylist()
    if not found:
        raise AuditError(hint)
    return {**dict(row.items()), **key, **found[0]}


def _get(row, key, default=None):
    try:
        v = row[key]
    except (KeyError, IndexError, TypeError):
        return default
    return default if v is None else v


def _size(size):
    if size is None:
        return None
    if isinstance(size, (int, np.integer)):
        return int(size), int(size)
    h, w = size
    return int(h), int(w)


def raw_map(row) -> np.ndarray:
    """The raw map of a record (``cam`` reshaped to ``cam_h x cam_w``)."""
    row = with_columns(row, MAP_COLUMNS)
    status = _get(row, "status")
    cam = _get(row, "cam")
    if status == "error" or cam is None:
        raise AuditError(f"record {_get(row, 'image_id')!r} has no map (status={status}: {_get(row, 'error')})")
    h, w = int(_get(row, "cam_h")), int(_get(row, "cam_w"))
    return np.asarray(cam, np.float32).reshape(h, w)


def heatmap(row, size=None) -> np.ndarray:
    """The normalised heatmap of a record.

    Args:
        row: one record: a row of :func:`load`'s DataFrame (columns it lacks,
            ``cam``, ``cam_h``, ``cam_w``, ``status``, are read from the output),
            or a dict with them.
        size: None (the layer's resolution), an int (square) or (H, W).

    Returns:
        (h, w) or ``size`` float32 array in [0, 1]: the map after ReLU divided
        by its maximum (all zero for a flat map), bilinearly resized.

    Raises:
        AuditError: the record has no map (``status=error``), or it lacks the
            map's columns and cannot be traced back to the output.
    """
    m = normalize(raw_map(row))
    s = _size(size)
    return resize_map(m, s) if s else m


def _job_format(row) -> str | None:
    """The ``dataset.format`` of the job a row of :func:`load` came from (its ``job.json``), else None."""
    src = getattr(row, "attrs", {}).get(SOURCE)
    if src is None:
        return None
    rec = read_job_record(src["out"])
    return rec.spec.dataset.format if rec is not None and rec.spec is not None else None


def original_image(row) -> np.ndarray:
    """The original image of a record (uint8 RGB), from its file or its Parquet/TFRecord/tar record.

    A row of :func:`load` reads a record of its job's dataset format (from the
    job's ``job.json``); a dict row is read by the format its file name tells.
    """
    return _original(with_columns(row, IMAGE_COLUMNS), _job_format(row))


def _original(row, format_name: str | None) -> np.ndarray:
    path = str(_get(row, "path", ""))
    raw = _get(row, "path_bytes")
    if isinstance(raw, bytes) and raw:  # a file name that is not UTF-8: `path` is its escaped text
        path = os.fsdecode(raw)
    if not path:
        raise AuditError("the record has no path")
    if fs.is_file(path):
        data = fs.read_bytes(path)
    else:
        file, sep, idx = path.rpartition("#")
        if not (sep and idx.isdigit() and fs.is_file(file)):
            raise AuditError(f"image not found: {path}")
        data = datasets.indexed_image_bytes(file, int(idx), format_name)
    try:
        return decode.decode_image(data)
    except decode.DecodeError as e:
        raise AuditError(f"cannot decode {path}: {e}") from None


def overlay(row, alpha: float = 0.4) -> np.ndarray:
    """The record's heatmap in the JET colour map over its original image.

    Args:
        row: one record (see :func:`heatmap`) whose ``path`` still points at
            the image (a file, or ``file#index`` of a Parquet/TFRecord dataset).
        alpha: opacity of the heatmap (0: only the image, 1: only the heatmap).

    Returns:
        (H, W, 3) uint8 RGB at the original image's size.

    Raises:
        AuditError: the record has no map, or its image cannot be found or read.
    """
    job_format = _job_format(row)  # before with_columns: the dict it may return has no source
    row = with_columns(row, (*MAP_COLUMNS, *IMAGE_COLUMNS))
    img = _original(row, job_format)
    return overlay_image(img, heatmap(row), alpha=alpha)
