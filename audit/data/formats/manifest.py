"""``format: manifest``: a CSV with ``path`` (relative to the CSV), ``label``, optional ``mask`` or a box.

``image_id`` is the ``key`` column when present, else the ``path`` as written
(a URI kept whole).  A shard is a byte range of the CSV (quoted newlines
allowed), so a worker reads only its own rows.  A box is ``x0,y0,x1,y1`` in
pixels of the original image; the mask column's name is ``dataset.masks``
(default ``mask``).
"""

from __future__ import annotations

import array
import csv
import io
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from audit.data import fs
from audit.data.files import escape_text
from audit.data.formats.base import DatasetFormat, Item, Shard, is_number, label_index
from audit.errors import AuditError

if TYPE_CHECKING:  # the spec module loads the model code; only the type is needed here
    from audit.data.jobspec import DatasetSpec

BOX_COLUMNS = ("x0", "y0", "x1", "y1")


class Manifest(DatasetFormat):
    """Rows of a CSV file; the images, masks and boxes it names."""

    name = "manifest"

    def check(self, ds: DatasetSpec) -> None:
        if not fs.is_file(ds.path):
            raise AuditError(f"spec error: dataset.path: format 'manifest' needs a CSV file, got {ds.path}")

    def plan(self, ds: DatasetSpec):
        return _plan_manifest(ds)

    def read(self, ds: DatasetSpec, shard: Shard, classes):
        return _read_manifest(ds, shard, classes)


def _csv_records(f, start_offset: int, first_line: int = 0):
    """Yield (offset, end, raw bytes, line) of each CSV record (quoted newlines allowed).

    ``line`` counts from ``first_line`` (the line number of the byte at ``start_offset``).
    """
    f.seek(start_offset)
    pos, line = start_offset, first_line
    buf, quotes, rec_start, rec_line = [], 0, pos, line
    for text in f:
        if not buf:
            rec_start, rec_line = pos, line
        buf.append(text)
        quotes += text.count(b'"')
        pos += len(text)
        line += 1
        if quotes % 2 == 0:
            raw = b"".join(buf)
            buf, quotes = [], 0
            if raw.strip():
                yield rec_start, pos, raw, rec_line
    if buf:
        yield rec_start, pos, b"".join(buf), rec_line


def _open_csv(path: str):
    """The CSV as a binary file that iterates by line (an object is read whole into memory)."""
    if fs.is_uri(path):
        return io.BytesIO(fs.read_bytes(path))
    return open(path, "rb")


def _csv_header(path: str) -> tuple[list[str], int]:
    with _open_csv(path) as f:
        first = f.readline()
        offset = f.tell()
    if first.startswith(b"\xef\xbb\xbf"):
        first = first[3:]
    try:
        text = first.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is None or "\x00" in text:
        raise AuditError(f"dataset: manifest {path} is not a CSV text file (its first line is not UTF-8 "
                         "text; expected a header such as path,label)")
    cols = [c.strip() for c in next(csv.reader([text]), [])]
    if "path" not in cols:
        found = ", ".join(cols)
        raise AuditError(f"dataset: manifest {path} needs a 'path' column; found: "
                         f"{(found[:200] + '...' if len(found) > 200 else found) or 'nothing'}")
    boxes = [c for c in BOX_COLUMNS if c in cols]
    if boxes and len(boxes) != 4:
        raise AuditError(f"dataset: manifest box needs all of x0, y0, x1, y1; found only {', '.join(boxes)}")
    return cols, offset


def _parse_row(raw: bytes, cols: list[str]) -> dict:
    """One CSV record as {column: text}; bytes that are not UTF-8 survive as surrogate escapes.

    Raises ``csv.Error`` for a record the csv module refuses (e.g. a field over its size limit).
    """
    vals = next(csv.reader([raw.decode("utf-8", "surrogateescape")], strict=True), [])
    return dict(zip(cols, vals))


def _check_record(path: str, line: int, raw: bytes, cols: list[str]) -> None:
    """Refuse a record the reader could not parse, naming the manifest and line (planning only)."""
    if raw.count(b'"') % 2:
        raise AuditError(f"dataset: manifest {path} line {line}: a quote is never closed (a stray \" in "
                         "this row?); quote the whole field and double quotes inside it (\"\")")
    try:
        _parse_row(raw, cols)
    except csv.Error as e:
        raise AuditError(f"dataset: manifest {path} line {line}: not valid CSV: {e}") from None


def _field_text(raw: bytes, cols: list[str], name: str) -> str:
    """One field of a CSV record as text ("" when the column is absent)."""
    if name not in cols:
        return ""
    if b'"' in raw:
        return _parse_row(raw, cols).get(name, "")
    parts = raw.rstrip(b"\r\n").split(b",")  # cheap: no CSV parsing for a plain row
    i = cols.index(name)
    return parts[i].decode("utf-8", "surrogateescape") if i < len(parts) else ""


def _manifest_id(path_text: str, key_text: str) -> str:
    """A manifest row's ``image_id``: its ``key``, else its path as written (a URI kept whole)."""
    key, p = key_text.strip(), path_text.strip()
    if key:
        return key
    return p if fs.is_uri(p) else Path(p).as_posix()


def _plan_manifest(ds):
    path = ds.path
    cols, offset = _csv_header(path)
    size, limit = ds.shard_size, ds.limit
    names: set[str] = set()
    ids = array.array("q")  # 8 bytes per row: hashes of the image ids, to refuse a repeated one
    shards, n, first_off, first_row, sid = [], 0, offset, 0, 0
    end = offset
    with _open_csv(path) as f:
        for off, end, raw, line in _csv_records(f, offset, first_line=2):  # the header is line 1
            if limit and n >= limit:
                end = off
                break
            if b'"' in raw:
                _check_record(path, line, raw, cols)
            lab = escape_text(_field_text(raw, cols, "label").strip())
            if lab and lab not in names and not is_number(lab):
                names.add(lab)
                if len(names) > 100_000:
                    raise AuditError("dataset: more than 100000 distinct label names in the manifest")
            ids.append(hash(_manifest_id(_field_text(raw, cols, "path"), _field_text(raw, cols, "key"))))
            n += 1
            if n - first_row == size:
                shards.append(Shard(sid, path, first_row, n, first_off, end))
                sid, first_row, first_off = sid + 1, n, end
        if n > first_row:
            shards.append(Shard(sid, path, first_row, n, first_off, end))
    _refuse_repeats(path, cols, offset, ids)
    # explicit classes win; an unknown label name is then an error row of that image
    classes = ds.classes or (sorted(names) if names else None)
    return shards, n, classes


def _refuse_repeats(path: str, cols: list[str], offset: int, ids) -> None:
    """One line naming a repeated ``image_id`` of a manifest (and both its lines), if any.

    Every reader (the job, ``--resume``, the scan's image loader) must mean the
    same row by an id, so a manifest that lists one image twice is refused.
    """
    h = np.frombuffer(ids, np.int64) if len(ids) else np.zeros(0, np.int64)
    srt = np.sort(h)
    twice = set(srt[1:][srt[1:] == srt[:-1]].tolist())
    if not twice:
        return
    seen: dict[str, int] = {}
    with _open_csv(path) as f:
        for _, _, raw, line in _csv_records(f, offset, first_line=2):
            i = _manifest_id(_field_text(raw, cols, "path"), _field_text(raw, cols, "key"))
            if hash(i) not in twice:
                continue
            if i in seen:
                raise AuditError(f"dataset: manifest {path} line {line}: image {escape_text(i)[:200]!r} is "
                                 f"listed again (first on line {seen[i]}); list each image once, or give the "
                                 "rows distinct values in a 'key' column")
            seen[i] = line


def _manifest_item(row: dict, base: str, classes, mask_col: str) -> Item:
    p = (row.get("path") or "").strip()
    full = _manifest_path(p, base)
    key = _manifest_id(p, row.get("key") or "")
    label, err = label_index(escape_text(row.get("label") or ""), classes)
    item = Item(image_id=key, path=full, label=label, file=full, error=err)
    m = (row.get(mask_col) or "").strip()
    if m:
        item.mask_file = _manifest_path(m, base)
    if all((row.get(c) or "").strip() for c in BOX_COLUMNS):
        try:
            item.box = tuple(float(row[c]) for c in BOX_COLUMNS)
        except ValueError:  # the image is still audited, without an object region
            item.mask_error = escape_text(f"bad box {[row[c] for c in BOX_COLUMNS]}")
    if not p:
        item.error = "empty path in the manifest"
    return item


def _manifest_path(p: str, base: str) -> str:
    """A manifest entry as a path: a URI or absolute path as written, else relative to the CSV's folder."""
    if fs.is_uri(p) or os.path.isabs(p):
        return p
    if fs.is_uri(base):
        return fs.join(base, p)
    return os.path.normpath(os.path.join(base, p))


def _read_manifest(ds, shard: Shard, classes):
    path = shard.source
    cols, _ = _csv_header(path)
    base = fs.dirname(path)
    mask_col = ds.masks or "mask"
    with fs.open_input(path) as f:  # only this shard's byte range
        f.seek(shard.offset)
        blob = f.read(shard.end - shard.offset)
    for n, (_, _, raw, _) in enumerate(_csv_records(io.BytesIO(blob), 0)):
        if n >= shard.size:
            break
        try:
            row = _parse_row(raw, cols)
        except csv.Error as e:  # planning refuses such a manifest; this is for one changed since
            yield Item(image_id=f"{Path(path).name}#{shard.start + n}", path=path, error=f"not valid CSV: {e}")
            continue
        yield _manifest_item(row, base, classes, mask_col)
