"""``OUT/summary/images.parquet`` read in bounded memory.

The per-image table has one row per image and cue: at a million images it
no longer fits comfortably in the driver, and no reader needs all of it at
once.  Every reader here asks pyarrow for the columns it needs only and
the rows that match a filter, a batch at a time (a ``pyarrow.dataset`` scan
with column projection and a filter expression):

* :func:`batches`: the matching rows, a batch at a time;
* :func:`by_shard`: the matching rows of one shard at a time (the pass
  writes a shard's rows together, every cue of an image inside its shard);
* :func:`cue_names`: the cues the table names (one column, de-duplicated as
  it is read).

The driver holds a few batches (or one shard) of the projected columns,
whatever the size of the dataset.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from audit.data import fs
from audit.errors import AuditError


def summary_path(out, name: str):
    """``OUT/summary/<name>.parquet`` (a local Path, or a URI string)."""
    if fs.is_uri(str(out)):
        return fs.join(str(out), "summary", f"{name}.parquet")
    return Path(out) / "summary" / f"{name}.parquet"


def require(out, name: str) -> None:
    """Refuse a job output without ``summary/<name>.parquet`` (``classes``: not scanned; ``images``: no
    per-image pass), with the command that makes it.

    Raises:
        AuditError: the table is missing (or, for ``images``, empty).
    """
    if name == "classes":
        if not fs.exists(str(summary_path(out, "classes"))):
            raise AuditError(f"{out} has no summary/classes.parquet: run `audit scan {out}` first")
        return
    if rows(out) == 0:
        raise AuditError(f"{out} has no per-image evidence (summary/images.parquet): run "
                         f"`audit scan {out} --per-image` first")


def rows(out) -> int:
    """Rows of ``images.parquet`` from its footer (0 when missing); reads no data."""
    import pyarrow.parquet as pq

    path = summary_path(out, "images")
    if not fs.exists(str(path)):
        return 0
    with fs.open_input(str(path)) as src:
        return int(pq.ParquetFile(src).metadata.num_rows)


def ok_rows():
    """The filter of rows with evidence: ``status`` is not ``error``."""
    import pyarrow.compute as pc

    return pc.field("status") != "error"


BATCH = 65536  # rows per batch of a read (a row group larger than this comes in several)


def batches(out, columns: list, where=None) -> Iterator:
    """The rows of ``images.parquet`` matching ``where`` (a ``pyarrow.compute`` expression), in file order, a
    batch at a time, as pandas with ``columns`` only.

    A ``pyarrow.dataset`` scan: it reads only ``columns`` and the filter's
    columns, skips row groups whose statistics rule the filter out, and holds
    a few batches of at most :data:`BATCH` rows at a time.

    Args:
        out: the job output.
        columns: the columns wanted (those the file lacks are left out).
        where: a filter expression, or None for every row.

    Yields:
        One DataFrame per non-empty batch; nothing when the table is missing.
    """
    import pyarrow.dataset as pads

    path = summary_path(out, "images")
    if not fs.exists(str(path)):
        return
    if fs.is_uri(str(out)):
        fsys, p = fs.resolve(str(path))
        data = pads.dataset(p, format="parquet", filesystem=fsys)
    else:
        data = pads.dataset(str(path), format="parquet")
    want = [c for c in columns if c in data.schema.names]
    for b in data.to_batches(columns=want, filter=where, batch_size=BATCH, batch_readahead=2,
                             fragment_readahead=1):
        if b.num_rows:
            yield b.to_pandas()


def by_shard(out, columns: list, where=None) -> Iterator:
    """``(shard, DataFrame)`` for each shard of ``images.parquet`` in file order: the matching rows of one
    shard at a time (``columns`` plus ``shard``).  Row groups of the same shard are joined; a shard's
    rows are held until the next shard's begin."""
    import pandas as pd

    cols = list(dict.fromkeys([*columns, "shard"]))
    held, cur = [], None
    for df in batches(out, cols, where):
        for s, part in df.groupby("shard", sort=False):
            if cur is not None and s != cur:
                yield cur, pd.concat(held, ignore_index=True)
                held = []
            cur = s
            held.append(part)
    if held:
        yield cur, pd.concat(held, ignore_index=True)


def cue_names(out) -> set:
    """The cue names of ``images.parquet`` (one column read, de-duplicated as it is read)."""
    seen: set = set()
    for df in batches(out, ["cue"]):
        seen.update(str(c) for c in df["cue"].dropna().unique())
    return seen
