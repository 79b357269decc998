"""What a shard holds: its identity, recorded at commit and checked on resume.

Shard ids are positions in a plan; the same id can hold other images after
the dataset changed (one image added to a class folder shifts every later
range of that class).  So each manifest entry records, beside the shard's
descriptor, a :class:`ShardIdentity`: the number of inputs, the first and
last ``image_id`` and a SHA-256 of the input list.  ``--resume`` recomputes
it for every committed shard from the new plan and compares
(:func:`compare`).

The input list hashed, per format (cheap: no image is read or decoded; each
format's module computes it, :meth:`audit.data.formats.DatasetFormat.identity`):

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

from typing import TYPE_CHECKING

from audit.data import datasets, formats
from audit.data.formats.base import ShardIdentity, file_stat, object_stats  # noqa: F401  (public here)
from audit.data.jobspec import dataset_of

if TYPE_CHECKING:  # the spec module loads the model code; only the type is needed here
    from audit.data.jobspec import DatasetSpec


def shard_identity(ds: DatasetSpec, shard: datasets.Shard, classes=None) -> ShardIdentity:
    """The identity of ``shard`` of dataset ``ds`` (``spec.dataset``) as it is now (its format decides)."""
    ds = dataset_of(ds)
    return formats.get(ds.format).identity(ds, shard, classes)


def clear_cache() -> None:
    """Forget the folder listings of objects (before a resume compares identities)."""
    object_stats.cache_clear()


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
