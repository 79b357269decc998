"""Sharded datasets: the public entry points over the formats of :mod:`audit.data.formats`.

Planning (:func:`plan`) runs in the driver and never holds per-image objects
for the whole dataset: it streams over the dataset once and emits small
:class:`Shard` descriptors.  Workers turn a descriptor into :class:`Item` s
with :func:`read_shard`.  Sharding is deterministic: the same dataset and
``shard_size`` always give the same shards, so ``--resume`` can skip committed
ones.  What a descriptor holds, and how ``image_id`` is made (stable across
runs), is each format's own business: see the module of each format
(``folder``, ``manifest``, ``parquet``, ``tfrecord``, ``webdataset``).

Every path may be an object-storage URI (``s3://``, ``gs://``, ``abfs://``;
see :mod:`audit.data.fs`): the dataset, its masks, manifest entries.  A
local path keeps its own branch (special files refused, size limits,
non-UTF-8 names); a URI is listed once per planning and read object by object
through one filesystem per bucket.
"""

from __future__ import annotations

import numpy as np

from audit.data import decode, formats, fs
from audit.data.decode import DecodeError
from audit.data.files import DEFAULT_MAX_IMAGE_BYTES, check_size, escape_text, read_regular_file
from audit.data.formats.base import IMAGE_EXTENSIONS, Item, Plan, Shard  # noqa: F401  (the public names)
from audit.data.formats.manifest import BOX_COLUMNS  # noqa: F401
from audit.data.formats.parquet import parquet_file  # noqa: F401
from audit.data.formats.tfrecord import TF_KEY_FEATURES, TFRECORD_EXTENSIONS  # noqa: F401
from audit.data.jobspec import DatasetSpec, dataset_of
from audit.errors import AuditError


def plan(ds: DatasetSpec) -> Plan:
    """Shard descriptors of a dataset (``spec.dataset``), in order.

    Raises:
        AuditError: the dataset is missing, empty or malformed (one line).
        TypeError: ``ds`` is not a :class:`DatasetSpec` (or a :class:`JobSpec`).
    """
    ds = dataset_of(ds)
    if not fs.exists(ds.path):
        raise fs.not_found(ds.path, "dataset.path")
    shards, total, classes = formats.get(ds.format).plan(ds)
    return Plan(shards=shards, total=total, classes=list(classes) if classes else None)


def read_shard(ds: DatasetSpec, shard: Shard, classes=None):
    """The :class:`Item` s of one shard, in order."""
    ds = dataset_of(ds)
    return formats.get(ds.format).read(ds, shard, classes)


def fetch(item: Item, max_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> bytes:
    """The encoded image bytes of an item (read from its file if need be).

    Raises:
        DecodeError: the file is missing, not a regular file, or larger than ``max_bytes``.
    """
    if item.data is not None:
        check_size(len(item.data), max_bytes)
        return item.data
    if item.file is None:
        raise DecodeError("no image data")
    if fs.is_uri(item.file):
        return read_object(item.file, max_bytes)
    return read_regular_file(item.file, max_bytes)


def read_object(uri: str, max_bytes: int, what: str = "file") -> bytes:
    """The bytes of one object, at most ``max_bytes`` (the store's client retries transient errors).

    Raises:
        DecodeError: missing, refused, or larger than ``max_bytes``; the text names why.
    """
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


def iter_items(ds: DatasetSpec, classes=None):
    """Every item of the dataset, shard by shard (for small tools and tests)."""
    p = plan(ds)
    for s in p.shards:
        yield from read_shard(ds, s, classes if classes is not None else p.classes)


def load_images(spec, image_ids, size):
    """Read images back by ``image_id`` from the dataset of a :class:`JobSpec` (or of its :class:`DatasetSpec`).

    Returns ``(images (N, H, W, 3) uint8 RGB at size, masks (N, H, W) bool or None,
    has_mask (N,) bool)`` in the order of ``image_ids``.  Used by the scan's
    intervention step.  An id that is not in the dataset, or an image that no
    longer decodes, is an :class:`AuditError`.
    """
    ds = dataset_of(spec)
    if not fs.exists(ds.path):
        raise AuditError(f"dataset not found: {ds.path} (moved since the job ran?)")
    try:
        return _load_images(ds, image_ids, size)
    except OSError as e:
        raise AuditError(f"cannot read the dataset {ds.path}: {e.strerror or e}") from None


def _load_images(ds, image_ids, size):
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
            img, m, _ = load_item(item, (H, W), ds.max_pixels, max_bytes=ds.max_image_bytes,
                                  resize_masks=bool(ds.resize_masks))
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
        raise AuditError(f"image_id {missing[0]!r} is not in the dataset {ds.path} ({len(missing)} missing)")
    return images, (masks if has.any() else None), has



def _items_by_id(ds, ids):
    """Items for the given ids, through the format (direct access where the id says where)."""
    ds = dataset_of(ds)
    return formats.get(ds.format).items_by_id(ds, ids)


def indexed_image_bytes(file: str, index: int, format_name: str | None = None) -> bytes:
    """The encoded image of record ``index`` of a Parquet, TFRecord or tar file (``path`` ``file#index``).

    Args:
        file, index: the record.
        format_name: the job's ``dataset.format`` when known (it reads its own
            files whatever their names); None: the format is told by the file name.

    Raises:
        AuditError: the file has no such record, or is of no format that stores records so.
    """
    known = formats.FORMATS.get(format_name) if format_name else None
    fmt = known if known is not None and known.record_extensions else formats.of_record_file(file)
    if fmt is None:
        raise AuditError(f"image not found: {file}#{index}")
    return fmt.record_bytes(file, index)
