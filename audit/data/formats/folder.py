"""``format: folder``: one subfolder per class; optional ``masks:`` folder mirroring the image paths.

``image_id`` is the path relative to the dataset folder (``tank/0001.png``).
A shard is an index range of one class folder's listing (files sorted, then
subfolders, as ``os.walk`` gives them; an object store's listing in the same
order).
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from audit.data import fs
from audit.data.files import escape_text, unescape_path
from audit.data.formats.base import DatasetFormat, Item, Shard, check_classes, chunks, is_image
from audit.errors import AuditError

if TYPE_CHECKING:  # the spec module loads the model code; only the type is needed here
    from audit.data.jobspec import DatasetSpec


class Folder(DatasetFormat):
    """Class subfolders of images; masks in a folder of the same layout."""

    name = "folder"
    masks_is_path = True

    def check(self, ds: DatasetSpec) -> None:
        if not fs.is_dir(ds.path):
            raise AuditError(f"spec error: dataset.path: format 'folder' needs a directory, got {ds.path}")
        if ds.masks and not fs.is_dir(ds.masks):
            raise AuditError(f"spec error: dataset.masks: not a directory: {ds.masks}")

    def plan(self, ds: DatasetSpec):
        shards, total, classes = _plan_folder(ds)
        return (*_limited(shards, total, ds.limit), classes)

    def read(self, ds: DatasetSpec, shard: Shard, classes):
        return _read_folder(ds, shard, classes)

    def items_by_id(self, ds: DatasetSpec, ids):
        """Direct: an id is the image's path under the dataset folder."""
        root = ds.path
        found = _class_dirs(root)
        classes = list(ds.classes or [escape_text(c) for c in found])
        for i in ids:
            cls = i.split("/", 1)[0]
            if fs.is_uri(root):
                rel = i
            else:
                rel = i if os.path.lexists(os.path.join(root, i)) else unescape_path(i)  # a non-UTF-8 name
            path = fs.join(root, rel)
            shared = ds.masks and "/" in rel and \
                os.path.splitext(rel.split("/", 1)[1])[0] in _shared_stems(root, rel.split("/", 1)[0])
            yield Item(image_id=i, path=path, file=path,
                       label=classes.index(cls) if cls in classes else None,
                       mask_file=_mask_for(ds.masks, rel, bool(shared)))

    def clear_caches(self) -> None:
        _class_listing.cache_clear()
        _shared_stems.cache_clear()
        _mask_listing.cache_clear()


def _limited(shards, total, limit):
    """The first ``limit`` images of the plan (every class folder is planned, then cut)."""
    if not limit or total <= limit:
        return shards, total
    kept, n = [], 0
    for s in shards:
        if n >= limit:
            break
        take = min(s.size, limit - n)
        kept.append(Shard(s.id, s.source, s.start, s.start + take))
        n += take
    return kept, n


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
        names = [rel for rel, _ in fs.list_files(folder) if is_image(rel.rsplit("/", 1)[-1])]
        yield from sorted(names, key=_walk_order)
        return
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        rel = os.path.relpath(root, folder)
        for f in sorted(files):
            if is_image(f):
                yield f if rel == "." else f"{Path(rel).as_posix()}/{f}"


@lru_cache(maxsize=4)
def _class_listing(root: str, cls: str) -> tuple[str, ...]:
    return tuple(_walk_images(fs.join(root, cls)))


def _plan_folder(ds):
    root = ds.path
    found = _class_dirs(root)
    if not found:
        raise AuditError(f"dataset: no class subfolders in {root} (format 'folder' expects one folder per class)")
    classes = check_classes([escape_text(c) for c in found], ds.classes, "folder")
    shards, total, sid = [], 0, 0
    for cls in found:
        n = sum(1 for _ in _walk_images(fs.join(root, cls)))
        for a, b in chunks(n, ds.shard_size):
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
    root = ds.path
    names = _class_listing(root, shard.source)
    cls = escape_text(shard.source)  # a class folder named in bytes that are not UTF-8
    label = classes.index(cls) if classes and cls in classes else None
    shared = _shared_stems(root, shard.source) if ds.masks else frozenset()
    for name in names[shard.start:shard.stop]:
        rel = f"{shard.source}/{name}"
        path = fs.join(root, shard.source, name)
        yield Item(image_id=rel, path=path, label=label, file=path,
                   mask_file=_mask_for(ds.masks, rel, os.path.splitext(name)[0] in shared))
