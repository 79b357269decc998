"""What every dataset format shares: shard and item descriptors, the format interface, label parsing.

A dataset format is one module of :mod:`audit.data.formats` with one
:class:`DatasetFormat` subclass; the registry in ``__init__`` maps the
``dataset.format`` name of a job spec to it.  A format says how to

* ``check`` a spec's ``dataset`` section before anything runs (one line per mistake);
* ``plan`` the dataset into small, picklable :class:`Shard` descriptors
  (streaming, never holding an object per image for the whole dataset);
* ``read`` one shard's :class:`Item` s (bytes read lazily where it can);
* give a shard's ``identity`` (what ``--resume`` compares);
* find items again by ``image_id`` (``items_by_id``: the scan's image loader);
* read one record's image back from the ``path`` stored in the records
  (``record_bytes``: the report's and ``audit.overlay``'s originals).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from audit.data import fs
from audit.data.files import escape_text, raw_bytes
from audit.data.jobspec import dataset_of
from audit.errors import AuditError

if TYPE_CHECKING:  # the spec module loads the model code; only the type is needed here
    from audit.data.jobspec import DatasetSpec

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm",
                    ".pbm", ".jp2")


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


# ----------------------------------------------------------------------------
# the interface
# ----------------------------------------------------------------------------


class DatasetFormat:
    """One dataset format (a subclass per module of :mod:`audit.data.formats`).

    ``ds`` below is a job spec's ``dataset`` section (a dict with ``format``,
    ``path``, ``classes``, ``masks``, ``shard_size``, ``limit``, ...).
    """

    name: ClassVar[str] = ""
    #: ``dataset.masks`` names a folder (resolved against the spec's directory) rather than a column/feature
    masks_is_path: ClassVar[bool] = False
    #: file name endings whose records are stored as ``file#index`` paths (see :meth:`record_bytes`)
    record_extensions: ClassVar[tuple] = ()

    def check(self, ds: DatasetSpec) -> None:
        """Checks of ``ds`` the schema cannot express (the path exists: already checked).

        Raises:
            AuditError: one line starting ``spec error: dataset...``.
        """

    def plan(self, ds: DatasetSpec) -> tuple[list[Shard], int, list | None]:
        """(shards in order, number of images, class names or None); deterministic for the same data."""
        raise NotImplementedError

    def read(self, ds: DatasetSpec, shard: Shard, classes) -> Iterator[Item]:
        """The items of one shard, in order (one per input: an unreadable input is an item with ``error``)."""
        raise NotImplementedError

    def identity(self, ds: DatasetSpec, shard: Shard, classes) -> ShardIdentity:
        """What ``shard`` holds now: by default a hash of its items and the (size, mtime) of their files."""
        return items_identity(self.read(ds, shard, classes))

    def items_by_id(self, ds: DatasetSpec, ids: list[str]) -> Iterator[Item]:
        """Items for ``ids`` (others may come too): by default every item of the dataset, in order."""
        ds = replace(dataset_of(ds), limit=None)
        shards, _, classes = self.plan(ds)
        for s in shards:
            yield from self.read(ds, s, classes)

    def record_bytes(self, file: str, index: int) -> bytes:
        """The encoded image of record ``index`` of ``file`` (a records ``path`` ``file#index``).

        Raises:
            AuditError: the file has no such record, or the format stores no such paths.
        """
        raise AuditError(f"{file}#{index}: format {self.name} stores no indexed records")

    def clear_caches(self) -> None:
        """Forget listings cached in this process (before ``--resume`` compares identities)."""


# ----------------------------------------------------------------------------
# helpers shared by the formats
# ----------------------------------------------------------------------------


def is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def chunks(n: int, size: int):
    for start in range(0, n, size):
        yield start, min(n, start + size)


def label_index(raw, classes) -> tuple[int | None, str | None]:
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


def list_files(path: str, exts) -> list[str]:
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


def rel_path(file: str, root: str) -> str:
    if fs.is_uri(root):
        return fs.relpath(file, fs.dirname(root) if fs.is_file(root) else root)
    r = Path(root)
    base = r.parent if r.is_file() else r
    return Path(os.path.relpath(file, base)).as_posix()


def check_classes(found: list[str], classes, what: str) -> list[str]:
    if not classes:
        return sorted(found)
    extra = [c for c in found if c not in classes]
    if extra:
        raise AuditError(
            f"dataset: {what} {extra[0]!r} is not in dataset.classes ({', '.join(classes)})"
        )
    return list(classes)


def indexed_ids(ds: DatasetSpec, ids) -> list[tuple[str, int]] | None:
    """[(file, index)] when every id is ``<file relative to the dataset>#<index>`` of a file that exists."""
    root = ds.path
    base = fs.dirname(root) if fs.is_file(root) else root
    direct = []
    for i in ids:
        f, sep, idx = i.rpartition("#")
        if not (sep and idx.isdigit() and fs.is_file(fs.join(base, f))):
            return None
        direct.append((fs.join(base, f), int(idx)))
    return direct or None


def is_number(text: str) -> bool:
    """True for a label written as a number ("3", "-1", "1.0"): an index, not a class name."""
    try:
        float(text)
    except ValueError:
        return False
    return True


# ----------------------------------------------------------------------------
# identities
# ----------------------------------------------------------------------------


def items_identity(items) -> ShardIdentity:
    """The identity of a shard from its items: ids, paths, labels, boxes, mask names, file stats."""
    h, files = hashlib.sha256(), hashlib.sha256()
    n, first, last = 0, None, None
    for item in items:
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
    return object_stats(folder).get(name, ("missing",))


@lru_cache(maxsize=8)  # a shard's images share a folder or a few; a listing may hold 100k names
def object_stats(folder: str) -> dict[str, tuple]:
    """name -> (size, mtime ns) of the objects directly in ``folder`` (one listing)."""
    from pyarrow import fs as pafs  # deferred: only for objects in a bucket

    fsys, p = fs.resolve(folder)
    try:
        infos = fsys.get_file_info(pafs.FileSelector(p, recursive=False, allow_not_found=True))
    except OSError as e:
        fs.raise_storage(e, folder)
    return {i.base_name: (i.size, i.mtime_ns) for i in infos if i.type == pafs.FileType.File}
