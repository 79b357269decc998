"""``format: tfrecord``: ``tf.train.Example`` records with ``image/encoded``, ``image/class/label``,
optional ``image/object/mask`` (the feature is ``dataset.masks``; several masks are merged).

``image_id`` is ``image/key/sha256``, ``image/source_id`` or ``image/filename``
when present, else ``<file relative to the dataset>#<record index>``; a
record's ``path`` is ``<file>#<index>``.  A shard is a record range of one
file with the byte offset of its first record; records are framed and
checked by :mod:`audit.data.tfrecord` (a damaged one is an error row).
"""

from __future__ import annotations

import hashlib
import itertools
from typing import TYPE_CHECKING

from audit.data import fs
from audit.data import tfrecord as framing
from audit.data.files import DEFAULT_MAX_IMAGE_BYTES
from audit.data.formats.base import (
    DatasetFormat,
    Item,
    Shard,
    ShardIdentity,
    indexed_ids,
    label_index,
    list_files,
    rel_path,
)
from audit.data.jobspec import DatasetSpec
from audit.errors import AuditError

if TYPE_CHECKING:  # the spec module loads the model code; only the type is needed here
    from audit.data.jobspec import DatasetSpec

TFRECORD_EXTENSIONS = (".tfrecord", ".tfrecords", ".tfrec")
TF_KEY_FEATURES = ("image/key/sha256", "image/source_id", "image/filename")


class TFRecord(DatasetFormat):
    """``tf.train.Example`` records in TFRecord files (read without TensorFlow's data pipeline)."""

    name = "tfrecord"
    record_extensions = TFRECORD_EXTENSIONS

    def plan(self, ds: DatasetSpec):
        return _plan_tfrecord(ds)

    def read(self, ds: DatasetSpec, shard: Shard, classes):
        return _read_tfrecord(ds, shard, classes)

    def identity(self, ds: DatasetSpec, shard: Shard, classes) -> ShardIdentity:
        return _tfrecord_identity(ds, shard)

    def items_by_id(self, ds: DatasetSpec, ids):
        """Direct where every id is ``file#index``; else every record, in order."""
        direct = indexed_ids(ds, ids)
        if direct is None:
            yield from super().items_by_id(ds, ids)
            return
        for file, idx in direct:
            for off in _record_offset(file, idx):
                yield from _read_tfrecord(ds, Shard(0, file, idx, idx + 1, off), ds.classes)

    def record_bytes(self, file: str, index: int) -> bytes:
        ds = DatasetSpec(format=self.name, path=file)
        for off in _record_offset(file, index):
            for item in _read_tfrecord(ds, Shard(0, file, index, index + 1, off), None):
                return item.data
        raise AuditError(f"record {index} not found in {file}")


def _record_offset(file: str, idx: int):
    """The byte offset of record ``idx`` of ``file`` (nothing when the file has fewer records)."""
    for k, frame in enumerate(_tfrecord_frames(file)):
        if k == idx:
            yield frame.offset
            return


def _tfrecord_frames(file: str, start: int = 0):
    """Yield the :class:`audit.data.tfrecord.Frame` s of a file (headers and their checksums only)."""
    size = fs.size(file)
    with fs.open_input(file) as f:
        yield from framing.frames(f, size, start)


def _plan_tfrecord(ds):
    files = list_files(ds.path, TFRECORD_EXTENSIONS)
    if not files:
        raise AuditError(f"dataset: no TFRecord files (.tfrecord, .tfrecords, .tfrec) in {ds.path}")
    size, limit = ds.shard_size, ds.limit
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
    return shards, total, ds.classes


def _example_parser():
    from tensorflow.core.example import example_pb2  # deferred: TensorFlow, only for TFRecord datasets

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
    rel = rel_path(shard.source, ds.path)
    max_bytes = int(ds.max_image_bytes or DEFAULT_MAX_IMAGE_BYTES)
    size = fs.size(shard.source)
    with fs.open_input(shard.source) as f:
        done = 0
        for frame in itertools.islice(framing.frames(f, size, shard.offset), shard.size):
            idx = shard.start + done
            done += 1
            data, problem = framing.read_record(f, frame, max_bytes)
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
    label, err = label_index(lab[0] if lab else None, classes)
    masks = _feature(ex, ds.masks or "image/object/mask") or []
    item = Item(image_id=key or default_id, path=path, label=label, data=enc[0] if enc else b"", error=err)
    if not enc:
        item.error = item.error or "no image/encoded feature"
    if masks:
        item.mask_data = masks[0] if len(masks) == 1 else None
        item.extra["masks"] = masks if len(masks) > 1 else None
    return item


def _tfrecord_identity(ds, shard) -> ShardIdentity:
    """Lengths and stored data CRCs of the shard's entries (12-byte header, data, 4-byte CRC).

    The entries are walked as the reader walks them (:func:`audit.data.tfrecord.frames`:
    checked headers, a corrupt stretch is one entry), so a damaged file cannot
    make this fail or disagree with the plan.
    """
    h = hashlib.sha256()
    rel = rel_path(shard.source, ds.path)
    n = 0
    size = fs.size(shard.source)
    with fs.open_input(shard.source) as f:
        for frame in itertools.islice(framing.frames(f, size, shard.offset), shard.size):
            crc = b""
            if frame.problem is None:
                f.seek(frame.offset + 12 + frame.length)
                crc = f.read(4)
            h.update(repr((frame.length, frame.problem, crc)).encode())
            n += 1
    first = f"{rel}#{shard.start}" if n else None
    last = f"{rel}#{shard.start + n - 1}" if n else None
    return ShardIdentity(n, first, last, h.hexdigest())
