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
"""

from __future__ import annotations

import csv
import io
import os
import struct
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

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
    """(label index, error) for a raw label (int, digit string or class name)."""
    if raw is None or (isinstance(raw, float) and np.isnan(raw)):
        return None, None
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", "replace")
    if isinstance(raw, (int, np.integer)):
        return _in_range(int(raw), classes)
    s = str(raw).strip()
    if s == "":
        return None, None
    if classes and s in classes:
        return classes.index(s), None
    if s.lstrip("-").isdigit():
        return _in_range(int(s), classes)
    return None, f"label {s!r} is not a class" + (f" (classes: {', '.join(classes)})" if classes else "")


def _in_range(index: int, classes) -> tuple[int | None, str | None]:
    if classes and not 0 <= index < len(classes):
        return None, f"label {index} is outside the {len(classes)} classes (0..{len(classes) - 1})"
    if index < 0:
        return None, f"label {index} is negative"
    return index, None


def _files(path: str, exts) -> list[str]:
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
    return sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith((".", "_")))


def _walk_images(folder: str):
    """Image files under ``folder`` in a deterministic order (paths relative to it)."""
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        rel = os.path.relpath(root, folder)
        for f in sorted(files):
            if _is_image(f):
                yield f if rel == "." else f"{Path(rel).as_posix()}/{f}"


@lru_cache(maxsize=4)
def _class_listing(root: str, cls: str) -> tuple[str, ...]:
    return tuple(_walk_images(os.path.join(root, cls)))


def _plan_folder(ds):
    root = ds["path"]
    found = _class_dirs(root)
    if not found:
        raise AuditError(f"dataset: no class subfolders in {root} (format 'folder' expects one folder per class)")
    classes = _check_classes(found, ds.get("classes"), "folder")
    shards, total, sid = [], 0, 0
    for cls in found:
        n = sum(1 for _ in _walk_images(os.path.join(root, cls)))
        for a, b in _chunks(n, ds["shard_size"]):
            shards.append(Shard(sid, cls, a, b))
            sid += 1
        total += n
    return shards, total, classes


def _mask_for(masks_root: str | None, rel: str) -> str | None:
    if not masks_root:
        return None
    for cand in (Path(rel).with_suffix(".png").as_posix(), rel):
        p = os.path.join(masks_root, cand)
        if os.path.isfile(p):
            return p
    return None


def _read_folder(ds, shard: Shard, classes):
    root = ds["path"]
    names = _class_listing(root, shard.source)
    label = classes.index(shard.source) if classes and shard.source in classes else None
    for name in names[shard.start:shard.stop]:
        rel = f"{shard.source}/{name}"
        path = os.path.join(root, shard.source, name)
        yield Item(image_id=rel, path=path, label=label, file=path, mask_file=_mask_for(ds.get("masks"), rel))


# ----------------------------------------------------------------------------
# manifest (CSV)
# ----------------------------------------------------------------------------


def _csv_records(f, start_offset: int):
    """Yield (offset, end, raw bytes) of each CSV record (quoted newlines allowed)."""
    f.seek(start_offset)
    pos = start_offset
    buf, quotes, rec_start = [], 0, pos
    for line in f:
        if not buf:
            rec_start = pos
        buf.append(line)
        quotes += line.count(b'"')
        pos += len(line)
        if quotes % 2 == 0:
            raw = b"".join(buf)
            buf, quotes = [], 0
            if raw.strip():
                yield rec_start, pos, raw
    if buf:
        yield rec_start, pos, b"".join(buf)


def _csv_header(path: str) -> tuple[list[str], int]:
    with open(path, "rb") as f:
        first = f.readline()
        offset = f.tell()
    if first.startswith(b"\xef\xbb\xbf"):
        first = first[3:]
    cols = next(csv.reader([first.decode("utf-8", "replace")]), [])
    cols = [c.strip() for c in cols]
    if "path" not in cols:
        raise AuditError(f"dataset: manifest {path} needs a 'path' column; found: {', '.join(cols) or 'nothing'}")
    boxes = [c for c in BOX_COLUMNS if c in cols]
    if boxes and len(boxes) != 4:
        raise AuditError(f"dataset: manifest box needs all of x0, y0, x1, y1; found only {', '.join(boxes)}")
    return cols, offset


def _parse_row(raw: bytes, cols: list[str]) -> dict:
    vals = next(csv.reader([raw.decode("utf-8", "replace")]), [])
    return dict(zip(cols, vals))


def _plan_manifest(ds):
    path = ds["path"]
    cols, offset = _csv_header(path)
    size, limit = ds["shard_size"], ds.get("limit")
    has_label = "label" in cols
    li = cols.index("label") if has_label else -1
    names: set[str] = set()
    shards, n, first_off, first_row, sid = [], 0, offset, 0, 0
    end = offset
    with open(path, "rb") as f:
        for off, end, raw in _csv_records(f, offset):
            if limit and n >= limit:
                end = off
                break
            if has_label:
                # cheap: a digit label needs no CSV parsing of the whole row
                if b'"' in raw:
                    lab = _parse_row(raw, cols).get("label", "")
                else:
                    parts = raw.rstrip(b"\r\n").split(b",")
                    lab = parts[li].decode("utf-8", "replace") if li < len(parts) else ""
                lab = lab.strip()
                if lab and not lab.lstrip("-").isdigit() and lab not in names:
                    names.add(lab)
                    if len(names) > 100_000:
                        raise AuditError("dataset: more than 100000 distinct label names in the manifest")
            n += 1
            if n - first_row == size:
                shards.append(Shard(sid, path, first_row, n, first_off, end))
                sid, first_row, first_off = sid + 1, n, end
        if n > first_row:
            shards.append(Shard(sid, path, first_row, n, first_off, end))
    # explicit classes win; an unknown label name is then an error row of that image
    classes = ds.get("classes") or (sorted(names) if names else None)
    return shards, n, classes


def _manifest_item(row: dict, base: str, classes, mask_col: str) -> Item:
    p = (row.get("path") or "").strip()
    full = p if os.path.isabs(p) else os.path.normpath(os.path.join(base, p))
    key = (row.get("key") or "").strip() or Path(p).as_posix()
    label, err = _label_index(row.get("label"), classes)
    item = Item(image_id=key, path=full, label=label, file=full, error=err)
    m = (row.get(mask_col) or "").strip()
    if m:
        item.mask_file = m if os.path.isabs(m) else os.path.normpath(os.path.join(base, m))
    if all((row.get(c) or "").strip() for c in BOX_COLUMNS):
        try:
            item.box = tuple(float(row[c]) for c in BOX_COLUMNS)
        except ValueError:
            item.error = item.error or f"bad box {[row[c] for c in BOX_COLUMNS]}"
    if not p:
        item.error = "empty path in the manifest"
    return item


def _read_manifest(ds, shard: Shard, classes):
    path = shard.source
    cols, _ = _csv_header(path)
    base = os.path.dirname(path)
    mask_col = ds.get("masks") or "mask"
    with open(path, "rb") as f:
        f.seek(shard.offset)
        blob = f.read(shard.end - shard.offset)
    for n, (_, _, raw) in enumerate(_csv_records(io.BytesIO(blob), 0)):
        if n >= shard.size:
            break
        yield _manifest_item(_parse_row(raw, cols), base, classes, mask_col)


# ----------------------------------------------------------------------------
# parquet
# ----------------------------------------------------------------------------


def _plan_parquet(ds):
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    files = _files(ds["path"], (".parquet", ".pq"))
    if not files:
        raise AuditError(f"dataset: no .parquet files in {ds['path']}")
    size, limit = ds["shard_size"], ds.get("limit")
    shards, total, sid = [], 0, 0
    names: set[str] = set()
    for file in files:
        try:
            pf = pq.ParquetFile(file)
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
        if "label" in schema.names and (schema.field("label").type in ("string", "large_string")):
            col = pf.read(columns=["label"]).column("label")
            names.update(str(v) for v in pc.unique(col).to_pylist() if v is not None and not str(v).isdigit())
        for a, b in _chunks(n, size):
            shards.append(Shard(sid, file, a, b))
            sid += 1
        total += n
        if limit and total >= limit:
            break
    classes = ds.get("classes") or (sorted(names) if names else None)
    return shards, total, classes


def _parquet_rows(file: str, start: int, stop: int, columns=None):
    """Rows [start, stop) of one Parquet file, reading only the row groups that hold them."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(file)
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


def _read_parquet(ds, shard: Shard, classes):
    t = _parquet_rows(shard.source, shard.start, shard.stop)
    rel = _rel(shard.source, ds["path"])
    mask_col = ds.get("masks") or "mask"
    cols = {c: t.column(c).to_pylist() for c in t.column_names if c in ("image", "label", "key", mask_col)}
    for i in range(t.num_rows):
        idx = shard.start + i
        key = cols.get("key", [None] * t.num_rows)[i]
        label, err = _label_index(cols.get("label", [None] * t.num_rows)[i], classes)
        mask = cols.get(mask_col, [None] * t.num_rows)[i]
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


def _tfrecord_offsets(file: str):
    """Yield (offset, length or None if truncated) of each record, reading only headers."""
    size = os.path.getsize(file)
    with open(file, "rb") as f:
        pos = 0
        while pos < size:
            head = f.read(12)
            if len(head) < 12:
                yield pos, None
                return
            (n,) = struct.unpack("<Q", head[:8])
            if pos + 12 + n + 4 > size:
                yield pos, None
                return
            yield pos, n
            pos += 12 + n + 4
            f.seek(pos)


def _plan_tfrecord(ds):
    files = _files(ds["path"], TFRECORD_EXTENSIONS)
    if not files:
        raise AuditError(f"dataset: no TFRecord files (.tfrecord, .tfrecords, .tfrec) in {ds['path']}")
    size, limit = ds["shard_size"], ds.get("limit")
    shards, total, sid = [], 0, 0
    for file in files:
        k, first_off = 0, 0
        for off, _n in _tfrecord_offsets(file):
            if limit and total + k >= limit:
                break
            if k % size == 0:
                first_off = off
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
    mask_key = ds.get("masks") or "image/object/mask"
    with open(shard.source, "rb") as f:
        f.seek(shard.offset)
        for k in range(shard.size):
            idx = shard.start + k
            path = f"{shard.source}#{idx}"
            head = f.read(12)
            n = struct.unpack("<Q", head[:8])[0] if len(head) == 12 else None
            data = f.read(n) if n is not None else b""
            if n is None or len(data) < n:
                yield Item(image_id=f"{rel}#{idx}", path=path, error="truncated TFRecord record")
                return
            f.read(4)
            try:
                ex = parse(data)
            except Exception as e:  # protobuf DecodeError
                yield Item(image_id=f"{rel}#{idx}", path=path, error=f"not a tf.train.Example: {e}")
                continue
            key = None
            for kf in TF_KEY_FEATURES:
                v = _feature(ex, kf)
                if v and v[0]:
                    key = v[0].decode("utf-8", "replace") if isinstance(v[0], bytes) else str(v[0])
                    break
            enc = _feature(ex, "image/encoded")
            lab = _feature(ex, "image/class/label")
            label, err = _label_index(lab[0] if lab else None, classes)
            masks = _feature(ex, mask_key) or []
            item = Item(image_id=key or f"{rel}#{idx}", path=path, label=label,
                        data=enc[0] if enc else b"", error=err)
            if not enc:
                item.error = item.error or "no image/encoded feature"
            if masks:
                item.mask_data = masks[0] if len(masks) == 1 else None
                item.extra["masks"] = masks if len(masks) > 1 else None
            yield item


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
    if not os.path.exists(ds["path"]):
        raise AuditError(f"dataset.path: not found: {ds['path']}")
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


def fetch(item: Item) -> tuple[bytes, bytes | list | None]:
    """(image bytes, mask bytes or list of mask bytes or None); raises DecodeError for a missing file."""
    from audit.data.decode import DecodeError

    data = item.data
    if data is None and item.file is not None:
        try:
            with open(item.file, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise DecodeError(f"file not found: {item.file}") from None
        except OSError as e:
            raise DecodeError(f"cannot read {item.file}: {e.strerror}") from None
    mask = item.mask_data
    if mask is None and item.extra.get("masks"):
        mask = item.extra["masks"]
    if mask is None and item.mask_file is not None:
        try:
            with open(item.mask_file, "rb") as f:
                mask = f.read()
        except OSError as e:
            raise DecodeError(f"cannot read mask {item.mask_file}: {e.strerror or e}") from None
    return data, mask


def load_item(item: Item, size, max_pixels: int):
    """Decode one item: (image (H, W, 3) uint8 at ``size``, mask (H, W) bool or None, (w, h)).

    Raises :class:`audit.data.decode.DecodeError` with the reason.
    """
    from audit.data import decode

    if item.error:
        raise decode.DecodeError(item.error)
    data, mask_bytes = fetch(item)
    img, (w, h) = decode.decode_image_sized(data, max_pixels=max_pixels, reduce_to=size)
    mask = None
    if mask_bytes is not None:
        parts = mask_bytes if isinstance(mask_bytes, list) else [mask_bytes]
        m = None
        for part in parts:
            mk = decode.decode_mask(part, max_pixels=max_pixels)
            mk = decode.resize_mask(mk, size)
            m = mk if m is None else (m | mk)
        mask = m
    elif item.box is not None:
        mask = decode.box_to_mask(item.box, (h, w), size)
    return decode.resize_image(img, size), mask, (w, h)


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
    if not os.path.exists(ds["path"]):
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
            img, m, _ = load_item(item, (H, W), ds.get("max_pixels", 100_000_000))
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
        classes = list(ds.get("classes") or found)
        for i in ids:
            cls = i.split("/", 1)[0]
            path = os.path.join(root, i)
            yield Item(image_id=i, path=path, file=path,
                       label=classes.index(cls) if cls in classes else None,
                       mask_file=_mask_for(ds.get("masks"), i))
        return
    direct = []
    if fmt in ("parquet", "tfrecord"):
        base = Path(root).parent if Path(root).is_file() else Path(root)
        for i in ids:
            f, sep, idx = i.rpartition("#")
            if sep and idx.isdigit() and (base / f).is_file():
                direct.append((str(base / f), int(idx)))
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
    for k, (off, n) in enumerate(_tfrecord_offsets(file)):
        if k == idx:
            yield off, n
            return
