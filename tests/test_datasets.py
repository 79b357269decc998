"""Reading every dataset format, deterministic shards, robust decoding, load_images (no Ray)."""

from __future__ import annotations

import csv
from dataclasses import replace
from pathlib import Path

import cv2
import helpers_jobs as h
import numpy as np
import pytest

from audit.data import datasets, decode
from audit.data.jobspec import DatasetSpec
from audit.errors import AuditError


def ds(fmt, path, **kw):
    d = {"format": fmt, "path": str(path), "classes": None, "masks": None, "shard_size": 4,
         "limit": None, "max_pixels": 100_000_000}
    d.update(kw)
    return DatasetSpec.from_partial(d)


def loaded(d, classes=None):
    """[(image_id, label, image, mask or None)] of every item."""
    p = datasets.plan(d)
    out = []
    for s in p.shards:
        for it in datasets.read_shard(d, s, classes if classes is not None else p.classes):
            img, m, wh = datasets.load_item(it, (h.SIZE, h.SIZE), d.max_pixels)
            out.append((it.image_id, it.label, img, m, wh))
    return p, out


# ----------------------------------------------------------------------------
# decoding
# ----------------------------------------------------------------------------


def test_bad_inputs_give_reasons(tmp_path):
    expected = h.bad_files(tmp_path)
    for name, words in expected.items():
        with pytest.raises(decode.DecodeError) as e:
            decode.decode_image((tmp_path / name).read_bytes())
        assert words in str(e.value), (name, str(e.value))


def test_gray_rgba_16bit_decode_to_rgb(tmp_path):
    h.odd_files(tmp_path)
    img = h.image(7, 1)[0]
    gray = decode.decode_image((tmp_path / "gray.png").read_bytes())
    g = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
    assert gray.shape == (16, 16, 3) and gray.dtype == np.uint8
    assert np.array_equal(gray[..., 0], g) and np.array_equal(gray[..., 2], g)
    assert np.array_equal(decode.decode_image((tmp_path / "rgba.png").read_bytes()), img)
    assert np.array_equal(decode.decode_image((tmp_path / "deep16.png").read_bytes()), img)


def test_large_jpeg_is_decoded_at_a_reduced_scale_but_keeps_its_size(tmp_path):
    """A JPEG >= 2x the model input both ways: DCT-scaled decode, full size reported, box mask exact."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:300, 0:520]
    img = np.stack([x * 255 // 520, y * 255 // 300, (x + y) % 256], -1).astype(np.uint8)
    img = np.clip(cv2.GaussianBlur(img, (0, 0), 2) + rng.normal(0, 4, img.shape), 0, 255).astype(np.uint8)
    ok, buf = cv2.imencode(".jpg", img[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])
    data = buf.tobytes()
    assert [decode.jpeg_reduction(520, 300, s) for s in ((64, 64), (70, 64), (150, 100), (160, 300))] == [4, 4, 2, 1]
    reduced, wh = decode.decode_image_sized(data, reduce_to=(64, 64))
    assert wh == (520, 300) and reduced.shape == (75, 130, 3)  # 1/4 scale, still >= 64 both ways
    full = decode.decode_image(data)
    assert full.shape == (300, 520, 3)
    want = decode.resize_image(full, (64, 64)).astype(int)
    got = decode.resize_image(reduced, (64, 64)).astype(int)
    assert np.abs(got - want).mean() < 2.0 and np.abs(got - want).max() < 24
    # load_item: the full size is reported and a pixel box maps onto the model grid as before
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "big.jpg").write_bytes(data)
    (tmp_path / "m.csv").write_text("path,label,x0,y0,x1,y1\na/big.jpg,0,130,75,390,225\n")
    d = ds("manifest", tmp_path / "m.csv")
    [item] = datasets.read_shard(d, datasets.plan(d).shards[0], ["0"])
    got_img, mask, size = datasets.load_item(item, (64, 64), 10**8)
    assert size == (520, 300) and got_img.shape == (64, 64, 3)
    assert np.array_equal(mask, decode.box_to_mask((130, 75, 390, 225), (300, 520), (64, 64)))
    assert mask[16:48, 16:48].all() and not mask[:15].any() and not mask[:, :15].any()
    # a small JPEG (< 2x) and PNGs decode exactly as before
    assert decode.decode_image_sized(data, reduce_to=(200, 300))[0].shape == (300, 520, 3)


def test_header_sizes():
    img = np.zeros((7, 11, 3), np.uint8)
    for ext, fmt in ((".png", "png"), (".jpg", "jpeg"), (".bmp", "bmp"), (".tiff", "tiff"), (".webp", "webp")):
        ok, buf = cv2.imencode(ext, img)
        assert ok
        assert decode.header_size(buf.tobytes()) == (fmt, 11, 7), ext
    assert decode.header_size(b"hello") is None


def test_max_pixels_guard_before_decoding():
    data = h.encode_png(np.zeros((20, 30, 3), np.uint8))
    assert decode.decode_image(data, max_pixels=600).shape == (20, 30, 3)
    with pytest.raises(decode.DecodeError, match="20 = 600 pixels|30x20 = 600"):
        decode.decode_image(data, max_pixels=599)


def test_box_to_mask_uses_pixel_centres():
    m = decode.box_to_mask((0, 0, 16, 16), (16, 32), (8, 8))  # left half of a 32x16 image (h, w)
    assert m[:, :4].all() and not m[:, 4:].any()


# ----------------------------------------------------------------------------
# folder
# ----------------------------------------------------------------------------


def test_folder_shards_labels_masks(tmp_path):
    root, mroot = h.make_folder(tmp_path / "data", 5)
    d = ds("folder", root, masks=mroot)
    p, items = loaded(d)
    assert p.classes == ["cat", "dog"] and p.total == 10
    assert [(s.source, s.start, s.stop) for s in p.shards] == [("cat", 0, 4), ("cat", 4, 5), ("dog", 0, 4), ("dog", 4, 5)]
    assert [s.id for s in p.shards] == [0, 1, 2, 3]
    ids = [i[0] for i in items]
    assert ids == [f"cat/img_{i:03d}.png" for i in range(5)] + [f"dog/img_{i:03d}.png" for i in range(5)]
    assert [i[1] for i in items] == [0] * 5 + [1] * 5
    img, mask = h.image(1000 + 2, 1)
    _, _, got, m, wh = items[7]
    assert np.array_equal(got, img) and np.array_equal(m, mask > 0) and wh == (16, 16)
    # deterministic: planning twice gives the same shards
    assert datasets.plan(d).shards == p.shards
    # limit
    lim = datasets.plan(replace(d, limit=6))
    assert lim.total == 6 and sum(s.size for s in lim.shards) == 6


def test_folder_classes_must_cover_folders(tmp_path):
    root, _ = h.make_folder(tmp_path / "data", 1, masks=False)
    with pytest.raises(AuditError, match="folder 'dog' is not in dataset.classes"):
        datasets.plan(ds("folder", root, classes=["cat"]))
    # classes given in a different order decide the label index
    p, items = loaded(ds("folder", root, classes=["dog", "cat"]))
    assert [(i[0], i[1]) for i in items] == [("cat/img_000.png", 1), ("dog/img_000.png", 0)]


# ----------------------------------------------------------------------------
# manifest
# ----------------------------------------------------------------------------


def test_manifest_names_boxes_byte_ranges(tmp_path):
    path = h.make_manifest(tmp_path, n=10, boxes=True)
    d = ds("manifest", path, shard_size=3)
    p, items = loaded(d)
    assert p.classes == ["cat", "dog"] and p.total == 10
    assert [s.size for s in p.shards] == [3, 3, 3, 1]
    # byte ranges tile the file after the header
    assert p.shards[0].end == p.shards[1].offset and p.shards[-1].end == Path(path).stat().st_size
    assert [i[0] for i in items] == [f"images/im{i:03d}.png" for i in range(10)]
    assert [i[1] for i in items] == [i % 2 for i in range(10)]
    for k, (_, _, img, m, _) in enumerate(items):
        ref, mask = h.image(2000 + k, k % 2)
        assert np.array_equal(img, ref)
        assert np.array_equal(m, mask > 0)  # the box is exactly the square


def test_manifest_index_labels_mask_column_quotes_and_errors(tmp_path):
    path = Path(h.make_manifest(tmp_path, n=4, masks=True, names=False))
    for n in ("horse", "seven"):  # each image listed once (a repeated row is refused)
        h.write_png(tmp_path / "images" / f"{n}.png", h.image(1, 0)[0])
    with open(path, "a", newline="") as f:
        w = csv.writer(f)
        w.writerow(["images/horse.png", "horse", ""])  # unknown class name -> error row
        w.writerow(["images/missing.png", "1", ""])  # missing file -> error row
        w.writerow(["images/seven.png", "7", ""])  # index outside the classes -> error row
    # a quoted path with a comma and a newline
    odd = tmp_path / "images" / "a,b\nc.png"
    h.write_png(odd, h.image(9, 0)[0])
    with open(path, "a", newline="") as f:
        csv.writer(f).writerow(["images/a,b\nc.png", "0", ""])
    d = ds("manifest", str(path), shard_size=2, classes=["cat", "dog"])
    p = datasets.plan(d)
    assert p.total == 8 and [s.size for s in p.shards] == [2, 2, 2, 2]
    items = [it for s in p.shards for it in datasets.read_shard(d, s, p.classes)]
    assert [it.label for it in items[:4]] == [0, 1, 0, 1]
    assert all(it.has_mask for it in items[:4])
    assert items[4].error == "label 'horse' is not a class (classes: cat, dog)"
    with pytest.raises(decode.DecodeError, match="file not found"):
        datasets.load_item(items[5], (16, 16), 10**8)
    assert items[6].error == "label 7 is outside the 2 classes (0..1)"
    assert items[7].image_id == "images/a,b\nc.png"
    img, _, _ = datasets.load_item(items[7], (16, 16), 10**8)
    assert np.array_equal(img, h.image(9, 0)[0])


def test_manifest_needs_path_column(tmp_path):
    p = tmp_path / "m.csv"
    p.write_text("file,label\na.png,0\n")
    with pytest.raises(AuditError, match="needs a 'path' column"):
        datasets.plan(ds("manifest", p))


# ----------------------------------------------------------------------------
# parquet
# ----------------------------------------------------------------------------


def test_parquet_dir_keys_masks_row_groups(tmp_path):
    root = h.make_parquet(tmp_path / "pq", n=12, files=2)  # row groups of 4
    d = ds("parquet", root, shard_size=5)
    p, items = loaded(d)
    assert p.total == 12 and [s.size for s in p.shards] == [5, 1, 5, 1]  # shards stay inside a file
    assert [i[0] for i in items] == [f"rec-{i:04d}" for i in range(12)]
    for k, (_, lab, img, m, _) in enumerate(items):
        ref, mask = h.image(3000 + k, k % 2)
        assert lab == k % 2 and np.array_equal(img, ref) and np.array_equal(m, mask > 0)


def test_parquet_unreadable_file_is_one_line(tmp_path):
    root = Path(h.make_parquet(tmp_path / "pq", n=4, files=1))
    (root / "zz.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(AuditError, match=r"zz.parquet is not a readable Parquet file"):
        datasets.plan(ds("parquet", root))
    (root / "zz.parquet").write_bytes(b"")
    with pytest.raises(AuditError, match=r"zz.parquet is not a readable Parquet file"):
        datasets.plan(ds("parquet", root / "zz.parquet"))


def test_parquet_without_keys_uses_file_and_row(tmp_path):
    root = h.make_parquet(tmp_path / "pq", n=6, files=1, keys=False, masks=False)
    p, items = loaded(ds("parquet", root))
    assert [i[0] for i in items] == [f"part-0.parquet#{k}" for k in range(6)]
    assert all(i[3] is None for i in items)


# ----------------------------------------------------------------------------
# tfrecord
# ----------------------------------------------------------------------------


def test_tfrecord_records_masks_and_truncation(tmp_path):
    path = h.make_tfrecord(tmp_path / "d.tfrecord", n=7)
    d = ds("tfrecord", path, shard_size=3)
    p, items = loaded(d)
    assert p.total == 7 and [s.size for s in p.shards] == [3, 3, 1]
    assert [i[0] for i in items] == [f"d.tfrecord#{k}" for k in range(7)]
    for k, (_, lab, img, m, _) in enumerate(items):
        ref, mask = h.image(4000 + k, k % 2)
        assert lab == k % 2 and np.array_equal(img, ref) and np.array_equal(m, mask > 0)
    # a truncated file: the last record becomes an error item, nothing is dropped
    data = Path(path).read_bytes()
    cut = tmp_path / "cut.tfrecord"
    cut.write_bytes(data[:-10])
    d2 = ds("tfrecord", cut, shard_size=3)
    p2 = datasets.plan(d2)
    its = [it for s in p2.shards for it in datasets.read_shard(d2, s)]
    assert p2.total == 7 and len(its) == 7
    assert its[-1].error == "truncated TFRecord record" and its[-2].error is None


def test_tfrecord_keys(tmp_path):
    path = h.make_tfrecord(tmp_path / "k.tfrecord", n=3, keys=True, masks=False)
    ids = [it.image_id for it in datasets.iter_items(ds("tfrecord", path))]
    assert ids == ["src0", "src1", "src2"]


# ----------------------------------------------------------------------------
# reading back by id (the scan's intervention step)
# ----------------------------------------------------------------------------


def test_load_images_every_format(tmp_path):
    root, mroot = h.make_folder(tmp_path / "data", 3)
    images, masks, has = datasets.load_images(ds("folder", root, masks=mroot),
                                              ["dog/img_002.png", "cat/img_000.png"], (16, 16))
    assert np.array_equal(images[0], h.image(1002, 1)[0]) and np.array_equal(images[1], h.image(0, 0)[0])
    assert has.tolist() == [True, True] and np.array_equal(masks[0], h.image(1002, 1)[1] > 0)

    man = h.make_manifest(tmp_path / "man", n=6, boxes=True)
    images, masks, has = datasets.load_images(ds("manifest", man), ["images/im004.png"], (8, 8))
    assert images.shape == (1, 8, 8, 3) and has.tolist() == [True]
    assert np.array_equal(images[0], cv2.resize(h.image(2004, 0)[0], (8, 8), interpolation=cv2.INTER_AREA))

    pq = h.make_parquet(tmp_path / "pq", n=6, files=2)
    images, masks, has = datasets.load_images(ds("parquet", pq), ["rec-0004", "rec-0001"], (16, 16))
    assert np.array_equal(images[0], h.image(3004, 0)[0]) and np.array_equal(images[1], h.image(3001, 1)[0])
    pq2 = h.make_parquet(tmp_path / "pq2", n=4, files=1, keys=False, masks=False)
    images, masks, has = datasets.load_images(ds("parquet", pq2), ["part-0.parquet#3"], (16, 16))
    assert np.array_equal(images[0], h.image(3003, 1)[0]) and masks is None and has.tolist() == [False]

    tfr = h.make_tfrecord(tmp_path / "t.tfrecord", n=5)
    images, masks, has = datasets.load_images(ds("tfrecord", tfr), ["t.tfrecord#3"], (16, 16))
    assert np.array_equal(images[0], h.image(4003, 1)[0]) and np.array_equal(masks[0], h.image(4003, 1)[1] > 0)

    with pytest.raises(AuditError, match="'nope' is not in the dataset"):
        datasets.load_images(ds("parquet", pq), ["nope"], (16, 16))
    # a dataset moved since the job ran: one line (the scan then skips its intervention)
    with pytest.raises(AuditError, match="dataset not found: .*moved since the job ran"):
        datasets.load_images(ds("folder", tmp_path / "gone"), ["cat/img_000.png"], (16, 16))


def test_original_image_of_a_parquet_or_tfrecord_record(tmp_path):
    """The report's and audit.overlay's original: ``file#index`` read through the data layer."""
    from audit.data import query

    pq = h.make_parquet(tmp_path / "pq", n=4, files=1, keys=False, masks=False)
    got = query.original_image({"path": f"{pq}/part-0.parquet#2", "path_bytes": None})
    assert np.array_equal(got, h.image(3002, 0)[0])
    tfr = h.make_tfrecord(tmp_path / "t.tfrecord", n=3)
    assert np.array_equal(query.original_image({"path": f"{tfr}#1", "path_bytes": None}), h.image(4001, 1)[0])
    with pytest.raises(AuditError, match="record 9 not found"):
        query.original_image({"path": f"{pq}/part-0.parquet#9", "path_bytes": None})
