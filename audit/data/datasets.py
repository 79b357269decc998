"""Sharded datasets: folder, manifest (CSV), Parquet and TFRecord.

Planning (:func:`plan`) runs in the driver and never holds per-image objects
for the whole dataset: it streams over the dataset once and emits small
:class:`Shard` descriptors (a class folder and an index range; a byte range of
the CSV; a row range of one Parquet file; a byte offset and record count of
one TFRecord file).  Workers turn a descriptor into :class:`Item` s with
:func:`read_shard`.  Sharding is deterministic: the same dataset and
``shard_size`` always give the same shards, so ``--resume`` can skip committed
ones.

``image_id`` is stable across runs:

* folder: the path relative to the dataset folder (``tank/0001.png``);
* manifest: the ``key`` column when present, else the ``path`` as written;
* parquet: the ``key`` column when present, else ``<file relative to the
  dataset>#<row>``;
* tfrecord: ``image/key/sha256``, ``image/source_id`` or ``image/filename``
  when present, else ``<file relative to the dataset>#<record index>``.

Relative paths in a manifest are relative to the CSV file.

Every path may be an object-storage URI (``s3://``, ``gs://``, ``abfs://``;
see :mod:`audit.data.fs`): the dataset, its masks, manifest entries.  A
local path keeps its own branch (special files refused, size limits,
non-UTF-8 names); a URI is listed once per planning and read object by object
through one filesystem per bucket.
"""

from __future__ import annotations

import array
import csv
import io
import itertools
import os
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

from audit.data import fs, tfrecord
from audit.data.files import DEFAULT_MAX_IMAGE_BYTES, escape_text, raw_bytes, unescape_path
from audit.errors import AuditError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm",
                    ".pbm", ".jp2")
TFRECORD_EXTENSIONS = (".tfrecord", ".tfrecords", ".tfrec")
BOX_COLUMNS = ("x0", "y0", "x1", "y1")
TF_KEY_FEATURES = ("image/key/sha256", "image/source_id", "image/filename")


@dataclass(frozen=True)
class Shard:
    """One unit of work and of output: a small, picklable descriptor."""

    id: int
    source: str  # class name (folder) or file (manifest, parquet, tfrecord)
    start: int  # first index (row / record / position in the class listing)
    stop: int  # one past the last
    offset: int = 0  # byte offset (manifest: of the first row; tfrecord: of the first record)
    end: int = 0  # byte end (manifest)

    @property
    def size(self) -> int:
        return self.stop - self.start

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Item:
    """One input image of a shard; bytes are read lazily (in the decode threads)."""

    image_id: str
    path: str
    label: int | None = None
    data: bytes | None = None  # encoded image (parquet, tfrecord)
    file: str | None = None  # image file to read (folder, manifest)
    mask_data: bytes | None = None
    mask_file: str | None = None
    box: tuple | None = None  # (x0, y0, x1, y1) pixels of the original image
    error: str | None = None  # known bad before decoding (e.g. unknown label)
    extra: dict = field(default_factory=dict)
    mask_error: str | None = None  # why the image is audited without its mask (set by load_item)
    path_bytes: bytes | None = None  # the exact path when it is not valid UTF-8

    def __post_init__(self):
        # ids and paths are stored as text: a file name that is not UTF-8 is escaped
        # (\xNN) and its exact bytes kept in path_bytes; ``file`` stays openable
        if self.path_bytes is None:
            self.path_bytes = raw_bytes(self.path)
        self.path = escape_text(self.path)
        self.image_id = escape_text(self.image_id)

    @property
    def has_mask(self) -> bool:
        return self.mask_data is not None or self.mask_file is not None or self.box is not None


@dataclass
class Plan:
    shards: list[Shard]
    total: int  # images
    classes: list[str] | None


# ----------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield start, min(n, start + size)


def _label_index(raw, classes) -> tuple[int | None, str | None]:
    """(label index, error) for a raw label: an integer, a whole float, a digit string or a class name."""
    if raw is None or (isinstance(raw, (float, np.floating)) and np.isnan(raw)):
        return None, None
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", "replace")
    if isinstance(raw, (bool, np.bool_)):
        return None, f"label {raw!r} is a boolean, not a class index or name"
    if isinstance(raw, (int, np.integer)):
        return _in_range(int(raw), classes)
    if isinstance(raw, (float, np.floating)):
        return _whole(float(raw), classes)
    s = str(raw).strip()
    if s == "":
        return None, None
    if classes and s in classes:
        return classes.index(s), None
    if s.lstrip("-").isdigit():
        return _in_range(int(s), classes)
    try:
        return _whole(float(s), classes)  # "1.0": a float column written as text
    except ValueError:
        pass
    return None, f"label {s!r} is not a class" + (f" (classes: {', '.join(classes)})" if classes else "")


def _whole(value: float, classes) -> tuple[int | None, str | None]:
    if not np.isfinite(value) or value != int(value):
        return None, f"label {value!r} is not a whole number (a class index)"
    return _in_range(int(value), classes)


def _in_range(index: int, classes) -> tuple[int | None, str | None]:
    if classes and not 0 <= index < len(classes):
        return None, f"label {index} is outside the {len(classes)} classes (0..{len(classes) - 1})"
    if index < 0:
        return None, f"label {index} is negative"
    return index, None


def _files(path: str, exts) -> list[str]:
    if fs.is_uri(path):
        if fs.is_file(path):
            return [path]
        return [fs.join(path, rel) for rel, _ in fs.list_files(path)
                if rel.lower().endswith(exts) and not any(part.startswith((".", "_")) for part in rel.split("/"))]
    p = Path(path)
    if p.is_file():
        return [str(p)]
    out = []
    for root, dirs, files in os.walk(p):
        dirs[:] = sorted(d for d in dirs if not d.startswith((".", "_")))
        out += [os.path.join(root, f) for f in sorted(files)
                if f.lower().endswith(exts) and not f.startswith((".", "_"))]
    return out


def _rel(file: str, root: str) -> str:
    if fs.is_uri(root):
        return fs.relpath(file, fs.dirname(root) if fs.is_file(root) else root)
    r = Path(root)
    base = r.parent if r.is_file() else r
    return Path(os.path.relpath(file, base)).as_posix()


def _check_classes(found: list[str], classes, what: str) -> list[str]:
    if not classes:
        return sorted(found)
    extra = [c for c in found if c not in classes]
    if extra:
        raise AuditError(
            f"dataset: {what} {extra[0]!r} is not in dataset.classes ({', '.join(classes)})"
        )
    return list(classes)


# ----------------------------------------------------------------------------
# folder
# ----------------------------------------------------------------------------


def _class_dirs(root: str) -> list[str]:
    if fs.is_uri(root):
        return [d for d in fs.list_dirs(root) if not d.startswith((".", "_"))]
    return sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith((".", "_")))


def _walk_order(rel: str) -> tuple:
    """Sort key giving ``os.walk``'s order: a folder's files (sorted), then its subfolders (sorted)."""
    *dirs, name = rel.split("/")
    return tuple((1, d) for d in dirs) + ((0, name),)


def _walk_images(folder: str):
    """Image files under ``folder`` in a deterministic order (paths relative to it)."""
    if fs.is_uri(folder):  # one listing of the prefix; the same order as the local walk
        names = [rel for rel, _ in fs.list_files(folder) if _is_image(rel.rsplit("/", 1)[-1])]
        yield from sorted(names, key=_walk_order)
        return
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        rel = os.path.relpath(root, folder)
        for f in sorted(files):
            if _is_image(f):
                yield f if rel == "." else f"{Path(rel).as_posix()}/{f}"


@lru_cache(maxsize=4)
def _class_listing(root: str, cls: str) -> tuple[str, ...]:
    return tuple(_walk_images(fs.join(root, cls)))


def _plan_folder(ds):
    root = ds["path"]
    found = _class_dirs(root)
    if not found:
        raise AuditError(f"dataset: no class subfolders in {root} (format 'folder' expects one folder per class)")
    classes = _check_classes([escape_text(c) for c in found], ds.get("classes"), "folder")
    shards, total, sid = [], 0, 0
    for cls in found:
        n = sum(1 for _ in _walk_images(fs.join(root, cls)))
        for a, b in _chunks(n, ds["shard_size"]):
            shards.append(Shard(sid, cls, a, b))
            sid += 1
        total += n
    return shards, total, classes


def _mask_for(masks_root: str | None, rel: str, shared_stem: bool = False) -> str | None:
    """The mask file of image ``rel`` under ``masks_root``, or None.

    Candidates, by full relative name first: ``rel`` itself, ``rel + ".png"``
    (``a/img.bmp.png``), then ``a/img.png`` unless another image of that
    folder has the same stem (``img.bmp`` and ``img.webp`` never share a mask).
    """
    if not masks_root:
        return None
    cands = [rel, rel + ".png"]
    if not shared_stem:
        cands.append(Path(rel).with_suffix(".png").as_posix())
    if fs.is_uri(masks_root):  # one listing of the masks per process, not a request per image
        names = _mask_listing(masks_root)
        for cand in cands:
            if cand in names:
                return fs.join(masks_root, cand)
        return None
    for cand in cands:
        p = os.path.join(masks_root, cand)
        if os.path.lexists(p):  # a special file or a dangling link: its mask_error says so
            return p
    return None


@lru_cache(maxsize=4)
def _shared_stems(root: str, cls: str) -> frozenset:
    """Relative names (without extension) that two or more images of the class folder share."""
    seen, shared = set(), set()
    for name in _class_listing(root, cls):
        stem = os.path.splitext(name)[0]
        (shared if stem in seen else seen).add(stem)
    return frozenset(shared)


@lru_cache(maxsize=4)
def _mask_listing(masks_root: str) -> frozenset:
    return frozenset(rel for rel, _ in fs.list_files(masks_root))


def _read_folder(ds, shard: Shard, classes):
    root = ds["path"]
    names = _class_listing(root, shard.source)
    cls = escape_text(shard.source)  # a class folder named in bytes that are not UTF-8
    label = classes.index(cls) if classes and cls in classes else None
    shared = _shared_stems(root, shard.source) if ds.get("masks") else frozenset()
    for name in names[shard.start:shard.stop]:
        rel = f"{shard.source}/{name}"
        path = fs.join(root, shard.source, name)
        yield Item(image_id=rel, path=path, label=label, file=path,
                   mask_file=_mask_for(ds.get("masks"), rel, os.path.splitext(name)[0] in shared))


# ----------------------------------------------------------------------------
# manifest (CSV)
# ----------------------------------------------------------------------------


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
    path = ds["path"]
    cols, offset = _csv_header(path)
    size, limit = ds["shard_size"], ds.get("limit")
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
            if lab and lab not in names and not _is_number(lab):
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
    classes = ds.get("classes") or (sorted(names) if names else None)
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
    label, err = _label_index(escape_text(row.get("label") or ""), classes)
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
    mask_col = ds.get("masks") or "mask"
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


# ----------------------------------------------------------------------------
# parquet
# ----------------------------------------------------------------------------


def parquet_file(file: str):
    """A ``pyarrow.parquet.ParquetFile`` of a local file or an object (read by ranges, not downloaded)."""
    import pyarrow.parquet as pq

    if fs.is_uri(file):
        return pq.ParquetFile(fs.open_input(file))
    return pq.ParquetFile(file)


def _plan_parquet(ds):
    import pyarrow.compute as pc

    files = _files(ds["path"], (".parquet", ".pq"))
    if not files:
        raise AuditError(f"dataset: no .parquet files in {ds['path']}")
    size, limit = ds["shard_size"], ds.get("limit")
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
            names.update(str(v) for v in pc.unique(col).to_pylist() if v is not None and not _is_number(str(v)))
        if "key" in schema.names:
            _refuse_repeated_keys(file, pf.read(columns=["key"]).column("key").slice(0, n).to_pylist(), keys)
        for a, b in _chunks(n, size):
            shards.append(Shard(sid, file, a, b))
            sid += 1
        total += n
        if limit and total >= limit:
            break
    classes = ds.get("classes") or (sorted(names) if names else None)
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


def _is_number(text: str) -> bool:
    """True for a label written as a number ("3", "-1", "1.0"): an index, not a class name."""
    try:
        float(text)
    except ValueError:
        return False
    return True


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
    rel = _rel(shard.source, ds["path"])
    mask_col = ds.get("masks") or "mask"
    for first, t, n, problem in _parquet_groups(shard.source, shard.start, shard.stop):
        if problem:
            for idx in range(first, first + n):
                yield Item(image_id=f"{rel}#{idx}", path=f"{shard.source}#{idx}", error=problem)
            continue
        cols = {c: t.column(c).to_pylist() for c in t.column_names if c in ("image", "label", "key", mask_col)}
        for i in range(n):
            idx = first + i
            key = cols.get("key", [None] * n)[i]
            label, err = _label_index(cols.get("label", [None] * n)[i], classes)
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


# ----------------------------------------------------------------------------
# tfrecord
# ----------------------------------------------------------------------------


def _tfrecord_frames(file: str, start: int = 0):
    """Yield the :class:`audit.data.tfrecord.Frame` s of a file (headers and their checksums only)."""
    size = fs.size(file)
    with fs.open_input(file) as f:
        yield from tfrecord.frames(f, size, start)


def _plan_tfrecord(ds):
    files = _files(ds["path"], TFRECORD_EXTENSIONS)
    if not files:
        raise AuditError(f"dataset: no TFRecord files (.tfrecord, .tfrecords, .tfrec) in {ds['path']}")
    size, limit = ds["shard_size"], ds.get("limit")
    shards, total, sid = [], 0, 0
    for file in files:
        k, first_off = 0, 0
        for frame in _tfrecord_frames(file):
            if limit and total + k >= limit:
                break
            if k % size == 0:
                first_off = frame.offset
            k += 1
            if k % size == 0:
                shards.append(Shard(sid, file, k - size, k, first_off))
                sid += 1
        if k % size:
            shards.append(Shard(sid, file, k - k % size, k, first_off))
            sid += 1
        total += k
        if limit and total >= limit:
            break
    return shards, total, ds.get("classes")


def _example_parser():
    from tensorflow.core.example import example_pb2

    return example_pb2.Example.FromString


def _feature(ex, key):
    f = ex.features.feature.get(key)
    if f is None:
        return None
    kind = f.WhichOneof("kind")
    vals = getattr(f, kind).value if kind else []
    return list(vals)


def _read_tfrecord(ds, shard: Shard, classes):
    parse = _example_parser()
    rel = _rel(shard.source, ds["path"])
    max_bytes = int(ds.get("max_image_bytes") or DEFAULT_MAX_IMAGE_BYTES)
    size = fs.size(shard.source)
    with fs.open_input(shard.source) as f:
        done = 0
        for frame in itertools.islice(tfrecord.frames(f, size, shard.offset), shard.size):
            idx = shard.start + done
            done += 1
            data, problem = tfrecord.read_record(f, frame, max_bytes)
            if problem:
                yield Item(image_id=f"{rel}#{idx}", path=f"{shard.source}#{idx}", error=problem)
                continue
            yield _example_item(parse, data, ds, classes, f"{rel}#{idx}", f"{shard.source}#{idx}")
    for idx in range(shard.start + done, shard.stop):  # the file shrank since planning: rows all the same
        yield Item(image_id=f"{rel}#{idx}", path=f"{shard.source}#{idx}",
                   error="TFRecord record missing (the file changed since the job was planned)")


def _example_item(parse, data: bytes, ds, classes, default_id: str, path: str) -> Item:
    """The :class:`Item` of one ``tf.train.Example`` record."""
    try:
        ex = parse(data)
    except Exception as e:  # noqa: BLE001 - protobuf's DecodeError (its module path varies)
        return Item(image_id=default_id, path=path, error=f"not a tf.train.Example: {e}")
    key = None
    for kf in TF_KEY_FEATURES:
        v = _feature(ex, kf)
        if v and v[0]:
            key = v[0].decode("utf-8", "backslashreplace") if isinstance(v[0], bytes) else str(v[0])
            break
    enc = _feature(ex, "image/encoded")
    lab = _feature(ex, "image/class/label")
    label, err = _label_index(lab[0] if lab else None, classes)
    masks = _feature(ex, ds.get("masks") or "image/object/mask") or []
    item = Item(image_id=key or default_id, path=path, label=label, data=enc[0] if enc else b"", error=err)
    if not enc:
        item.error = item.error or "no image/encoded feature"
    if masks:
        item.mask_data = masks[0] if len(masks) == 1 else None
        item.extra["masks"] = masks if len(masks) > 1 else None
    return item


# ----------------------------------------------------------------------------
# public
# ----------------------------------------------------------------------------

_PLANNERS = {"folder": _plan_folder, "manifest": _plan_manifest, "parquet": _plan_parquet,
             "tfrecord": _plan_tfrecord}
_READERS = {"folder": _read_folder, "manifest": _read_manifest, "parquet": _read_parquet,
            "tfrecord": _read_tfrecord}


def plan(ds: dict) -> Plan:
    """Shard descriptors of a dataset (``spec["dataset"]``), in order."""
    fmt = ds["format"]
    if not fs.exists(ds["path"]):
        raise fs.not_found(ds["path"], "dataset.path")
    shards, total, classes = _PLANNERS[fmt](ds)
    limit = ds.get("limit")
    if fmt == "folder" and limit and total > limit:
        kept, n = [], 0
        for s in shards:
            if n >= limit:
                break
            take = min(s.size, limit - n)
            kept.append(Shard(s.id, s.source, s.start, s.start + take))
            n += take
        shards, total = kept, n
    return Plan(shards=shards, total=total, classes=list(classes) if classes else None)


def read_shard(ds: dict, shard: Shard, classes=None):
    """The :class:`Item` s of one shard, in order."""
    return _READERS[ds["format"]](ds, shard, classes)


def fetch(item: Item, max_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> bytes:
    """The encoded image bytes of an item (read from its file if need be).

    Raises:
        DecodeError: the file is missing, not a regular file, or larger than ``max_bytes``.
    """
    from audit.data.files import check_size, read_regular_file

    if item.data is not None:
        check_size(len(item.data), max_bytes)
        return item.data
    if item.file is None:
        from audit.data.decode import DecodeError

        raise DecodeError("no image data")
    if fs.is_uri(item.file):
        return read_object(item.file, max_bytes)
    return read_regular_file(item.file, max_bytes)


def read_object(uri: str, max_bytes: int, what: str = "file") -> bytes:
    """The bytes of one object, at most ``max_bytes`` (the store's client retries transient errors).

    Raises:
        DecodeError: missing, refused, or larger than ``max_bytes``; the text names why.
    """
    from audit.data.decode import DecodeError
    from audit.data.files import check_size

    try:
        return fs.read_bytes(uri, max_bytes)
    except FileNotFoundError:
        raise DecodeError(f"{what} not found: {uri}") from None
    except ValueError as e:  # larger than max_bytes, refused before reading
        check_size(int(e.args[0]), max_bytes, what)
        raise
    except (OSError, AuditError) as e:
        raise DecodeError(f"cannot read {what} {uri}: {' '.join(str(e).split())[:300]}") from None


def load_item(item: Item, size, max_pixels: int, *, max_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
              resize_masks: bool = False):
    """Decode one item: (image (H, W, 3) uint8 at ``size``, mask (H, W) bool or None, (w, h)).

    A mask that cannot be used (missing, unreadable, not an image, or not the
    image's size while ``resize_masks`` is false) does not fail the image: the
    mask is None and ``item.mask_error`` says why.

    Args:
        item: the input.
        size: (H, W) of the model input.
        max_pixels: images (and masks) whose header claims more pixels are refused.
        max_bytes: the largest image or mask file read (``dataset.max_image_bytes``).
        resize_masks: stretch a mask of another size than its image (else refuse the mask).

    Raises:
        audit.data.decode.DecodeError: the image cannot be audited; ``str(e)`` is the reason.
    """
    from audit.data import decode

    if item.error:
        raise decode.DecodeError(item.error)
    data = fetch(item, max_bytes)
    img, (w, h) = decode.decode_image_sized(data, max_pixels=max_pixels, reduce_to=size)
    mask = None
    try:
        mask = _load_mask(item, (h, w), size, max_pixels, max_bytes, resize_masks)
    except decode.DecodeError as e:
        item.mask_error = escape_text(str(e))
    return decode.resize_image(img, size), mask, (w, h)


def _load_mask(item: Item, image_hw, size, max_pixels: int, max_bytes: int, resize_masks: bool):
    """The item's object region as an (H, W) bool mask at ``size``, or None; DecodeError if unusable."""
    from audit.data import decode
    from audit.data.files import check_size, read_regular_file

    if item.mask_data is not None or item.extra.get("masks"):
        parts = [item.mask_data] if item.mask_data is not None else list(item.extra["masks"])
        for part in parts:
            check_size(len(part), max_bytes, "mask")
    elif item.mask_file is not None and fs.is_uri(item.mask_file):
        parts = [read_object(item.mask_file, max_bytes, "mask")]
    elif item.mask_file is not None:
        parts = [read_regular_file(item.mask_file, max_bytes, "mask")]
    elif item.box is not None:
        return decode.box_to_mask(item.box, image_hw, size)
    else:
        return None
    m = None
    for part in parts:
        mk = decode.decode_mask(part, max_pixels=max_pixels)
        if mk.shape[:2] != tuple(image_hw) and not resize_masks:
            raise decode.DecodeError(
                f"mask is {mk.shape[1]}x{mk.shape[0]} but the image is {image_hw[1]}x{image_hw[0]}; "
                "set dataset.resize_masks: true to stretch masks to their image")
        mk = decode.resize_mask(mk, size)
        m = mk if m is None else (m | mk)
    return m


def iter_items(ds: dict, classes=None):
    """Every item of the dataset, shard by shard (for small tools and tests)."""
    p = plan(ds)
    for s in p.shards:
        yield from read_shard(ds, s, classes if classes is not None else p.classes)


def load_images(spec: dict, image_ids, size):
    """Read images back by ``image_id`` from the dataset of a resolved spec (``job.json["spec"]``).

    Returns ``(images (N, H, W, 3) uint8 RGB at size, masks (N, H, W) bool or None,
    has_mask (N,) bool)`` in the order of ``image_ids``.  Used by the scan's
    intervention step.  An id that is not in the dataset, or an image that no
    longer decodes, is an :class:`AuditError`.
    """
    ds = spec.get("dataset", spec)
    if not fs.exists(ds["path"]):
        raise AuditError(f"dataset not found: {ds['path']} (moved since the job ran?)")
    try:
        return _load_images(ds, image_ids, size)
    except OSError as e:
        raise AuditError(f"cannot read the dataset {ds['path']}: {e.strerror or e}") from None


def _load_images(ds, image_ids, size):
    from audit.data.decode import DecodeError

    ids = [str(i) for i in image_ids]
    want = {i: k for k, i in enumerate(ids)}
    H, W = int(size[0]), int(size[1])
    images = np.zeros((len(ids), H, W, 3), np.uint8)
    masks = np.zeros((len(ids), H, W), bool)
    has = np.zeros(len(ids), bool)
    found = set()
    for item in _items_by_id(ds, ids):
        k = want.get(item.image_id)
        if k is None or item.image_id in found:
            continue
        try:
            img, m, _ = load_item(item, (H, W), ds.get("max_pixels", 100_000_000),
                                  max_bytes=ds.get("max_image_bytes") or DEFAULT_MAX_IMAGE_BYTES,
                                  resize_masks=bool(ds.get("resize_masks")))
        except DecodeError as e:
            raise AuditError(f"cannot load image {item.image_id}: {e}") from None
        images[k] = img
        if m is not None:
            masks[k], has[k] = m, True
        found.add(item.image_id)
        if len(found) == len(want):
            break
    missing = [i for i in ids if i not in found]
    if missing:
        raise AuditError(f"image_id {missing[0]!r} is not in the dataset {ds['path']} ({len(missing)} missing)")
    return images, (masks if has.any() else None), has


def _items_by_id(ds, ids):
    """Items for the given ids: direct access where the id says where, else a scan."""
    fmt = ds["format"]
    root = ds["path"]
    if fmt == "folder":
        found = _class_dirs(root)
        classes = list(ds.get("classes") or [escape_text(c) for c in found])
        for i in ids:
            cls = i.split("/", 1)[0]
            if fs.is_uri(root):
                rel = i
            else:
                rel = i if os.path.lexists(os.path.join(root, i)) else unescape_path(i)  # a non-UTF-8 name
            path = fs.join(root, rel)
            shared = ds.get("masks") and "/" in rel and \
                os.path.splitext(rel.split("/", 1)[1])[0] in _shared_stems(root, rel.split("/", 1)[0])
            yield Item(image_id=i, path=path, file=path,
                       label=classes.index(cls) if cls in classes else None,
                       mask_file=_mask_for(ds.get("masks"), rel, bool(shared)))
        return
    direct = []
    if fmt in ("parquet", "tfrecord"):
        base = fs.dirname(root) if fs.is_file(root) else root
        for i in ids:
            f, sep, idx = i.rpartition("#")
            if sep and idx.isdigit() and fs.is_file(fs.join(base, f)):
                direct.append((fs.join(base, f), int(idx)))
            else:
                direct = None
                break
    if direct:
        for file, idx in direct:
            if fmt == "parquet":
                yield from _read_parquet(ds, Shard(0, file, idx, idx + 1), ds.get("classes"))
            else:
                for off, _ in _skip_records(file, idx):
                    yield from _read_tfrecord(ds, Shard(0, file, idx, idx + 1, off), ds.get("classes"))
        return
    yield from iter_items({**ds, "limit": None})


def _skip_records(file, idx):
    for k, frame in enumerate(_tfrecord_frames(file)):
        if k == idx:
            yield frame.offset, frame.length
            return


def indexed_image_bytes(file: str, index: int) -> bytes:
    """The encoded image of record ``index`` of a Parquet or TFRecord file (``path`` ``file#index``).

    Raises:
        AuditError: the file has no such record.
    """
    if file.lower().endswith((".parquet", ".pq")):
        t = _parquet_rows(file, index, index + 1, columns=["image"])
        if t.num_rows == 0:
            raise AuditError(f"record {index} not found in {file}")
        return t.column("image")[0].as_py()
    ds = {"format": "tfrecord", "path": file}
    items = list(_items_by_id(ds, [f"{Path(file).name}#{index}"]))
    if not items:
        raise AuditError(f"record {index} not found in {file}")
    return items[0].data
