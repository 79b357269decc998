"""``format: webdataset``: ``.tar`` shards of samples, each ``KEY.jpg`` (or ``.png``, ...), ``KEY.cls``
and optionally ``KEY.mask.png`` (the WebDataset layout, common for large image sets in buckets).

A sample is the run of consecutive tar members that share a key (the member
name up to the first dot of its file name: ``train/000123.jpg`` has key
``train/000123`` and extension ``jpg``).  Its image is the member with an
image extension, its label the text of ``.cls`` (a class index or name), its
mask the member ending in ``dataset.masks`` (default ``mask.png``; non-zero =
object).  Other members (``.json``, ``.txt``) are ignored.

``image_id`` is the sample's key (a key that repeats anywhere in the dataset
is refused at planning); a record's ``path`` is ``<tar file>#<sample index>``.
A shard is a run of samples of one tar file with the byte offset of its first
member's header, so a worker reads only its own part of the file.
"""

from __future__ import annotations

import array
import hashlib
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from audit.data import fs
from audit.data.files import DEFAULT_MAX_IMAGE_BYTES, escape_text
from audit.data.formats.base import (
    IMAGE_EXTENSIONS,
    DatasetFormat,
    Item,
    Shard,
    ShardIdentity,
    file_stat,
    is_number,
    items_identity,
    label_index,
    list_files,
)
from audit.errors import AuditError

if TYPE_CHECKING:  # the spec module loads the model code; only the type is needed here
    from audit.data.jobspec import DatasetSpec

TAR_EXTENSIONS = (".tar",)
IMAGE_SUFFIXES = tuple(e.lstrip(".") for e in IMAGE_EXTENSIONS)
MAX_LABEL_BYTES = 1024  # a .cls member is a short text


@dataclass
class Sample:
    """The members of one sample: extension -> tar member, and where the first one's header starts."""

    key: str
    offset: int
    members: dict = field(default_factory=dict)


class WebDataset(DatasetFormat):
    """Samples in tar files, grouped by key."""

    name = "webdataset"
    record_extensions = TAR_EXTENSIONS

    def plan(self, ds: DatasetSpec):
        return _plan(ds)

    def read(self, ds: DatasetSpec, shard: Shard, classes):
        return _read(ds, shard, classes)

    def identity(self, ds: DatasetSpec, shard: Shard, classes) -> ShardIdentity:
        """The items' hash, and the tar file's (size, mtime) as the content (the items have no files)."""
        ident = items_identity(self.read(ds, shard, classes))
        content = hashlib.sha256(repr(file_stat(shard.source)).encode()).hexdigest()
        return ShardIdentity(ident.count, ident.first, ident.last, ident.digest, content)

    def record_bytes(self, file: str, index: int) -> bytes:
        with fs.open_input(file) as f:
            for k, (tf, sample) in enumerate(_samples(f, 0)):
                if k == index:
                    m = sample.members.get(_image_ext(sample))
                    if m is None:
                        break
                    return tf.extractfile(m).read()
        raise AuditError(f"record {index} not found in {file}")


def _split(name: str) -> tuple[str, str]:
    """(key, extension) of a member name: the extension starts at the first dot of the file name."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _samples(f, offset: int) -> Iterator[tuple[tarfile.TarFile, Sample]]:
    """(the open tar, each sample) from the member whose header starts at ``offset``; data is not read."""
    f.seek(offset)
    tf = tarfile.TarFile(fileobj=f, mode="r")
    current = None
    while (m := tf.next()) is not None:
        tf.members.clear()  # TarFile keeps every header it read; the driver's memory must not grow
        if not m.isfile():
            continue
        key, ext = _split(m.name)
        if not ext or key.rpartition("/")[2].startswith("."):
            continue
        if current is not None and key != current.key:
            yield tf, current
            current = None
        if current is None:
            current = Sample(key, m.offset)
        current.members.setdefault(ext, m)
    if current is not None:
        yield tf, current


def _image_ext(sample: Sample) -> str | None:
    return next((e for e in sample.members if e in IMAGE_SUFFIXES), None)


def _label_text(tf: tarfile.TarFile, sample: Sample) -> str | None:
    m = sample.members.get("cls")
    if m is None or m.size > MAX_LABEL_BYTES:
        return None
    return tf.extractfile(m).read().decode("utf-8", "replace").strip()


def _plan(ds: DatasetSpec):
    files = list_files(ds.path, TAR_EXTENSIONS)
    if not files:
        raise AuditError(f"dataset: no .tar files in {ds.path} (format 'webdataset' expects tar shards)")
    size, limit = ds.shard_size, ds.limit
    shards, total, sid = [], 0, 0
    names: set[str] = set()
    keys = array.array("q")
    for file in files:
        k, first_off = 0, 0
        try:
            with fs.open_input(file) as f:
                for tf, sample in _samples(f, 0):
                    if limit and total + k >= limit:
                        break
                    lab = _label_text(tf, sample)
                    if lab and not is_number(lab):
                        names.add(escape_text(lab))
                    keys.append(hash(sample.key))
                    if k % size == 0:
                        first_off = sample.offset
                    k += 1
                    if k % size == 0:
                        shards.append(Shard(sid, file, k - size, k, first_off))
                        sid += 1
        except tarfile.TarError as e:
            raise AuditError(f"dataset: {file} is not a readable tar file: {e}") from None
        if k % size:
            shards.append(Shard(sid, file, k - k % size, k, first_off))
            sid += 1
        total += k
        if limit and total >= limit:
            break
    _refuse_repeated_keys(ds, files, keys)
    classes = ds.classes or (sorted(names) if names else None)
    return shards, total, classes


def _refuse_repeated_keys(ds: DatasetSpec, files: list[str], keys) -> None:
    """One line naming a key that two samples share (every reader must mean one sample by an id)."""
    h = np.frombuffer(keys, np.int64) if len(keys) else np.zeros(0, np.int64)
    srt = np.sort(h)
    twice = set(srt[1:][srt[1:] == srt[:-1]].tolist())
    if not twice:
        return
    seen: dict[str, str] = {}
    for file in files:
        with fs.open_input(file) as f:
            for _, sample in _samples(f, 0):
                if hash(sample.key) not in twice:
                    continue
                if sample.key in seen:
                    raise AuditError(f"dataset: sample key {escape_text(sample.key)[:200]!r} repeats ({seen[sample.key]} "
                                     f"and {file}); each sample needs its own key")
                seen[sample.key] = file


def _read(ds: DatasetSpec, shard: Shard, classes) -> Iterator[Item]:
    max_bytes = int(ds.max_image_bytes or DEFAULT_MAX_IMAGE_BYTES)
    mask_ext = (ds.masks or "mask.png").lower().lstrip(".")
    done = 0
    with fs.open_input(shard.source) as f:
        try:
            for tf, sample in _samples(f, shard.offset):
                if done >= shard.size:
                    break
                yield _item(tf, sample, shard, shard.start + done, classes, mask_ext, max_bytes)
                done += 1
        except tarfile.TarError as e:
            problem = f"unreadable tar data: {' '.join(str(e).split())[:200]}"
            for idx in range(shard.start + done, shard.stop):
                yield Item(image_id=f"{shard.source}#{idx}", path=f"{shard.source}#{idx}", error=problem)
            return
    for idx in range(shard.start + done, shard.stop):  # the file shrank since planning
        yield Item(image_id=f"{shard.source}#{idx}", path=f"{shard.source}#{idx}",
                   error="tar sample missing (the file changed since the job was planned)")


def _item(tf, sample: Sample, shard: Shard, idx: int, classes, mask_ext: str, max_bytes: int) -> Item:
    """The :class:`Item` of one sample (its image and mask read here, within ``max_bytes``)."""
    path = f"{shard.source}#{idx}"
    label, err = label_index(_label_text(tf, sample), classes)
    item = Item(image_id=sample.key, path=path, label=label, error=err)
    ext = _image_ext(sample)
    if ext is None:
        item.error = item.error or f"no image in the sample (members: {', '.join(sorted(sample.members))[:200]})"
        return item
    m = sample.members[ext]
    if m.size > max_bytes:
        item.error = f"image member is {m.size} bytes, over dataset.max_image_bytes ({max_bytes})"
        return item
    item.data = tf.extractfile(m).read()
    mm = sample.members.get(mask_ext)
    if mm is not None:
        if mm.size > max_bytes:
            item.mask_error = f"mask member is {mm.size} bytes, over dataset.max_image_bytes ({max_bytes})"
        else:
            item.mask_data = tf.extractfile(mm).read()
    return item
