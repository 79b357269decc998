"""What a shard holds: its identity, recorded at commit and checked on resume.

Shard ids are positions in a plan; the same id can hold other images after
the dataset changed (one image added to a class folder shifts every later
range of that class).  So each manifest entry records, beside the shard's
descriptor, a :class:`ShardIdentity`: the number of inputs, the first and
last ``image_id`` and a SHA-256 of the input list.  ``--resume`` recomputes
it for every committed shard from the new plan and compares
(:func:`compare`).

The input list hashed, per format (cheap: no image is read or decoded):

* folder, manifest: in row order, each item's ``image_id``, path, label,
  box coordinates and mask file name (a manifest row's label, box or mask
  edited, or two rows swapped, changes the hash);
* parquet: the ``key`` and ``label`` columns of the row range (without a
  ``key`` column the ids are positions, so the file's size is hashed too);
* tfrecord: each record's length and its stored CRC of the data (the
  record's content, read from its framing without parsing it).

Names alone miss an image replaced in place under the same name, so the
identity also holds ``content``: a SHA-256 of the size and modification time
of every file the shard reads (folder, manifest: each image and mask file;
parquet: the shard's file).  Local files: one ``stat`` each.  Objects in a
bucket: the size and last-modified time of one listing of each folder
(pyarrow's ``FileInfo`` carries no ETag; a PUT always sets a new
last-modified time).  A tfrecord's data CRCs already follow its content.
An entry committed before ``content`` was recorded is checked on the rest.
"""

from __future__ import annotations

import hashlib
import itertools
import os
from dataclasses import asdict, dataclass
from functools import lru_cache

from audit.data import datasets, fs


@dataclass(frozen=True)
class ShardIdentity:
    """What one shard holds (stored as ``identity`` in its manifest entry)."""

    count: int
    first: str | None
    last: str | None
    digest: str  # sha256 of the input list, hex
    content: str | None = None  # sha256 of the (size, mtime) of each file read, hex; None: not recorded

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> ShardIdentity | None:
        if not d:
            return None
        return cls(int(d["count"]), d.get("first"), d.get("last"), str(d["digest"]), d.get("content"))


def shard_identity(ds: dict, shard: datasets.Shard, classes=None) -> ShardIdentity:
    """The identity of ``shard`` of dataset ``ds`` (``spec["dataset"]``) as it is now."""
    fmt = ds["format"]
    if fmt == "parquet":
        return _parquet_identity(ds, shard)
    if fmt == "tfrecord":
        return _tfrecord_identity(ds, shard)
    h, files = hashlib.sha256(), hashlib.sha256()
    n, first, last = 0, None, None
    for item in datasets.read_shard(ds, shard, classes):
        # repr: ids from odd file names may hold lone surrogates that .encode() refuses
        row = (item.image_id, item.path, item.label, item.has_mask, item.error)
        extra = (item.box, item.mask_file, item.mask_error)
        # an item without box or mask hashes as before boxes were hashed: older outputs still resume
        h.update(repr(row + extra if any(x is not None for x in extra) else row).encode())
        files.update(repr((file_stat(item.file), file_stat(item.mask_file))).encode())
        first = item.image_id if first is None else first
        last = item.image_id
        n += 1
    return ShardIdentity(n, first, last, h.hexdigest(), files.hexdigest())


def file_stat(path: str | None) -> tuple:
    """(size, modification time in ns) of a local file or an object, without reading it.

    One ``os.stat`` for a local file; for an object, its entry in a cached
    listing of its folder (one request per folder, not one per object).
    A file that cannot be stat'ed gives the reason instead (its read makes an
    error row of it, and its coming back changes the identity).
    """
    if path is None:
        return ()
    if not fs.is_uri(path):
        try:
            st = os.stat(path)
        except OSError as e:
            return (type(e).__name__,)
        return (st.st_size, st.st_mtime_ns)
    folder, _, name = path.rpartition("/")
    return _object_stats(folder).get(name, ("missing",))


@lru_cache(maxsize=8)  # a shard's images share a folder or a few; a listing may hold 100k names
def _object_stats(folder: str) -> dict[str, tuple]:
    """name -> (size, mtime ns) of the objects directly in ``folder`` (one listing)."""
    from pyarrow import fs as pafs

    fsys, p = fs.resolve(folder)
    try:
        infos = fsys.get_file_info(pafs.FileSelector(p, recursive=False, allow_not_found=True))
    except OSError as e:
        fs.raise_storage(e, folder)
    return {i.base_name: (i.size, i.mtime_ns) for i in infos if i.type == pafs.FileType.File}


def clear_cache() -> None:
    """Forget the folder listings of objects (before a resume compares identities)."""
    _object_stats.cache_clear()


def _parquet_identity(ds, shard) -> ShardIdentity:

    schema = datasets.parquet_file(shard.source).schema_arrow
    cols = [c for c in ("key", "label") if c in schema.names]
    h = hashlib.sha256()
    try:
        t = datasets._parquet_rows(shard.source, shard.start, shard.stop, columns=cols or ["image"])
    except (OSError, ValueError):  # a damaged row group: the reader makes error rows of its rows
        t, cols = None, []
        h.update(b"unreadable")
    n = t.num_rows if t is not None else shard.size
    if "key" in cols:
        keys = [str(k) for k in t.column("key").to_pylist()]
    else:
        rel = datasets._rel(shard.source, ds["path"])
        keys = [f"{rel}#{shard.start + i}" for i in range(n)]
        h.update(f"size={fs.size(shard.source)}".encode())
    labels = t.column("label").to_pylist() if "label" in cols else [None] * n
    for k, lab in zip(keys, labels):
        h.update(repr((k, lab)).encode())
    content = hashlib.sha256(repr(file_stat(shard.source)).encode()).hexdigest()
    return ShardIdentity(n, keys[0] if keys else None, keys[-1] if keys else None, h.hexdigest(), content)


def _tfrecord_identity(ds, shard) -> ShardIdentity:
    """Lengths and stored data CRCs of the shard's entries (12-byte header, data, 4-byte CRC).

    The entries are walked as the reader walks them (:func:`audit.data.tfrecord.frames`:
    checked headers, a corrupt stretch is one entry), so a damaged file cannot
    make this fail or disagree with the plan.
    """
    from audit.data import tfrecord

    h = hashlib.sha256()
    rel = datasets._rel(shard.source, ds["path"])
    n = 0
    size = fs.size(shard.source)
    with fs.open_input(shard.source) as f:
        for frame in itertools.islice(tfrecord.frames(f, size, shard.offset), shard.size):
            crc = b""
            if frame.problem is None:
                f.seek(frame.offset + 12 + frame.length)
                crc = f.read(4)
            h.update(repr((frame.length, frame.problem, crc)).encode())
            n += 1
    first = f"{rel}#{shard.start}" if n else None
    last = f"{rel}#{shard.start + n - 1}" if n else None
    return ShardIdentity(n, first, last, h.hexdigest())


#: The descriptor fields a committed shard and the new plan must share.
DESCRIPTOR = ("source", "start", "stop", "offset", "end")


def compare(entry: dict, shard: datasets.Shard | None, now, job_id: str) -> str | None:
    """What changed between a committed manifest entry and the new plan's shard, or None.

    Args:
        entry: the manifest entry (``inputs`` = the descriptor it was committed
            with, ``identity`` = its :class:`ShardIdentity` as a dict).
        shard: the new plan's shard with the same id (None: no such shard now).
        now: a callable returning that shard's :class:`ShardIdentity` now;
            called only when the descriptors agree.
        job_id: the job's id; an entry of another job never matches.

    Returns:
        A short phrase for the error line (``its first image was 'a', now 'b'``).
    """
    if entry.get("job_id") and entry["job_id"] != job_id:
        return f"it was written by job {entry['job_id']}, not {job_id}"
    if shard is None:
        return "the new plan has no such shard (the dataset shrank)"
    old = entry.get("inputs") or {}
    new = shard.to_dict()
    for k in DESCRIPTOR:
        if k in old and old[k] != new[k]:
            if k in ("start", "stop"):
                return (f"it covered inputs {old['start']}-{old['stop']} of {old.get('source')}, "
                        f"now {new['start']}-{new['stop']}")
            return f"its {k} was {old[k]!r}, now {new[k]!r}"
    was = ShardIdentity.from_dict(entry.get("identity"))
    if was is None:
        return None  # an entry from before identities were recorded: the descriptor is all there is
    return identity_change(was, now())


def identity_change(was: ShardIdentity, now: ShardIdentity) -> str | None:
    """The first difference between two identities of one shard, as a phrase, or None."""
    if was.count != now.count:
        return f"it held {was.count} inputs, now {now.count}"
    if was.first != now.first:
        return f"its first image was {was.first!r}, now {now.first!r}"
    if was.last != now.last:
        return f"its last image was {was.last!r}, now {now.last!r}"
    if was.digest != now.digest:
        return (f"its input list changed (same first and last image {was.first!r}..{was.last!r}: "
                "an image inside was renamed, relabelled, added or removed)")
    if was.content is not None and now.content is not None and was.content != now.content:
        return (f"a file it reads ({was.first!r}..{was.last!r}) was replaced in place: same name, "
                "another size or modification time")
    return None
