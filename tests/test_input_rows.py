"""What one input row is: label types, masks by full name, ids kept once, every field in the shard identity."""

from __future__ import annotations

import helpers_jobs as h
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from audit.data import datasets, identity
from audit.data.formats import manifest
from audit.data.jobspec import DatasetSpec
from audit.errors import AuditError


def ds(fmt, path, **kw):
    d = {"format": fmt, "path": str(path), "classes": None, "masks": None, "shard_size": 4,
         "limit": None, "max_pixels": 100_000_000}
    d.update(kw)
    return DatasetSpec.from_partial(d)


def labels_of(d, classes=None):
    p = datasets.plan(d)
    items = [it for s in p.shards for it in datasets.read_shard(d, s, classes or p.classes)]
    return p, [(it.label, it.error) for it in items]


# ----------------------------------------------------------------------------
# labels of every common type
# ----------------------------------------------------------------------------


def _parquet_with_labels(path, labels):
    png = h.encode_png(h.image(1, 0)[0])
    pq.write_table(pa.table({"image": [png] * len(labels), "label": labels}), path)


def test_parquet_categorical_labels_are_class_names(tmp_path):
    import pandas as pd

    df = pd.DataFrame({"image": [h.encode_png(h.image(i, 0)[0]) for i in range(4)],
                       "label": pd.Categorical(["cat", "dog", "dog", "cat"])})
    df.to_parquet(tmp_path / "a.parquet")
    assert pa.types.is_dictionary(pq.read_schema(tmp_path / "a.parquet").field("label").type)
    p, got = labels_of(ds("parquet", tmp_path))
    assert p.classes == ["cat", "dog"]
    assert got == [(0, None), (1, None), (1, None), (0, None)]


def test_parquet_whole_float_labels_with_a_nan(tmp_path):
    _parquet_with_labels(tmp_path / "a.parquet", pa.array([0.0, 1.0, None, 1.0], pa.float64()))
    _, got = labels_of(ds("parquet", tmp_path, classes=["a", "b"]))
    assert got == [(0, None), (1, None), (None, None), (1, None)]


def test_a_fractional_float_label_is_that_row_s_error(tmp_path):
    _parquet_with_labels(tmp_path / "a.parquet", pa.array([0.5, 1.0], pa.float32()))
    _, got = labels_of(ds("parquet", tmp_path, classes=["a", "b"]))
    assert got[1] == (1, None)
    assert got[0][0] is None and "not a whole number" in got[0][1]


def test_integer_and_string_labels(tmp_path):
    (tmp_path / "i").mkdir()
    (tmp_path / "s").mkdir()
    _parquet_with_labels(tmp_path / "i" / "a.parquet", pa.array([1, 0], pa.int8()))
    _parquet_with_labels(tmp_path / "s" / "a.parquet", pa.array(["dog", "cat"]))
    assert labels_of(ds("parquet", tmp_path / "i", classes=["a", "b"]))[1] == [(1, None), (0, None)]
    p, got = labels_of(ds("parquet", tmp_path / "s"))
    assert p.classes == ["cat", "dog"] and got == [(1, None), (0, None)]


def test_another_label_type_is_one_line_naming_column_and_type(tmp_path):
    _parquet_with_labels(tmp_path / "a.parquet", pa.array([[1], [0]], pa.list_(pa.int64())))
    with pytest.raises(AuditError, match=r"column 'label' has type list<.*int64>; expected integers"):
        datasets.plan(ds("parquet", tmp_path))


def test_manifest_float_text_labels_are_indices_not_names(tmp_path):
    h.write_png(tmp_path / "a.png", h.image(1, 0)[0])
    h.write_png(tmp_path / "b.png", h.image(2, 1)[0])
    (tmp_path / "m.csv").write_text("path,label\na.png,1.0\nb.png,0.0\n")
    p, got = labels_of(ds("manifest", tmp_path / "m.csv", classes=["x", "y"]))
    assert got == [(1, None), (0, None)]
    p, _ = labels_of(ds("manifest", tmp_path / "m.csv"))
    assert p.classes is None  # "1.0" is not taken for a class name


# ----------------------------------------------------------------------------
# masks by full relative name
# ----------------------------------------------------------------------------


def test_same_stem_images_never_share_a_mask(tmp_path):
    root, masks = tmp_path / "d", tmp_path / "m"
    for name in ("img.bmp", "img.webp", "solo.png"):
        h.write_png(root / "cat" / name, h.image(3, 0)[0])  # the content does not matter here
    h.write_png(masks / "cat" / "img.png", np.full((16, 16), 255, np.uint8))
    h.write_png(masks / "cat" / "img.webp.png", np.full((16, 16), 255, np.uint8))
    h.write_png(masks / "cat" / "solo.png", np.full((16, 16), 255, np.uint8))
    d = ds("folder", root, masks=str(masks))
    items = {it.image_id: it for it in datasets.iter_items(d)}
    assert items["cat/img.bmp"].mask_file is None  # img.png is ambiguous between the two
    assert items["cat/img.webp"].mask_file.endswith("img.webp.png")
    assert items["cat/solo.png"].mask_file.endswith("solo.png")
    # the scan's loader finds the same masks as the job
    by_id = {it.image_id: it.mask_file for it in datasets._items_by_id(d, list(items))}
    assert by_id == {k: v.mask_file for k, v in items.items()}


# ----------------------------------------------------------------------------
# ids: repeated ones refused, URIs kept whole
# ----------------------------------------------------------------------------


def test_a_repeated_manifest_row_is_refused_in_one_line(tmp_path):
    for n in ("a.png", "b.png"):
        h.write_png(tmp_path / n, h.image(1, 0)[0])
    (tmp_path / "m.csv").write_text("path,label\na.png,0\nb.png,1\na.png,cat\n")
    with pytest.raises(AuditError, match=r"line 4: image 'a.png' is listed again \(first on line 2\)"):
        datasets.plan(ds("manifest", tmp_path / "m.csv"))
    (tmp_path / "k.csv").write_text("path,label,key\na.png,0,one\nb.png,1,two\na.png,1,three\n")
    assert datasets.plan(ds("manifest", tmp_path / "k.csv")).total == 3  # distinct keys: three rows


def test_a_repeated_parquet_key_is_refused(tmp_path):
    png = h.encode_png(h.image(1, 0)[0])
    pq.write_table(pa.table({"image": [png, png], "label": [0, 1], "key": ["a", "b"]}), tmp_path / "1.parquet")
    pq.write_table(pa.table({"image": [png], "label": [0], "key": ["a"]}), tmp_path / "2.parquet")
    with pytest.raises(AuditError, match=r"2.parquet row 0: key 'a' repeats \(.*1.parquet row 0\)"):
        datasets.plan(ds("parquet", tmp_path))


def test_a_uri_manifest_entry_keeps_its_scheme_as_image_id():
    item = manifest._manifest_item({"path": "s3://bucket/x/a.png", "label": "0"}, "/data", None, "mask")
    assert item.image_id == "s3://bucket/x/a.png" and item.file == "s3://bucket/x/a.png"
    assert manifest._manifest_id("sub//b.png", "") == "sub/b.png"


# ----------------------------------------------------------------------------
# the shard identity covers every field of a row
# ----------------------------------------------------------------------------


def _ident(d):
    p = datasets.plan(d)
    return identity.shard_identity(d, p.shards[0], p.classes)


@pytest.mark.parametrize("before,after,what", [
    ("a.png,0,0,0,2,2\nb.png,1,0,0,2,2\n", "a.png,0,10,10,20,20\nb.png,1,0,0,2,2\n", "box"),
    ("a.png,0,0,0,2,2\nb.png,1,0,0,2,2\n", "b.png,1,0,0,2,2\na.png,0,0,0,2,2\n", "order"),
    ("a.png,0,0,0,2,2\nb.png,1,0,0,2,2\n", "a.png,1,0,0,2,2\nb.png,1,0,0,2,2\n", "label"),
])
def test_identity_follows_box_order_and_label(tmp_path, before, after, what):
    for n in ("a.png", "b.png"):
        h.write_png(tmp_path / n, h.image(1, 0)[0])
    m = tmp_path / "m.csv"
    m.write_text("path,label,x0,y0,x1,y1\n" + before)
    d = ds("manifest", m, classes=["x", "y"])
    was = _ident(d)
    assert identity.identity_change(was, _ident(d)) is None
    m.write_text("path,label,x0,y0,x1,y1\n" + after)
    assert identity.identity_change(was, _ident(d)) is not None, what


def test_identity_follows_the_mask_file_named(tmp_path):
    h.write_png(tmp_path / "a.png", h.image(1, 0)[0])
    for n in ("m1.png", "m2.png"):
        h.write_png(tmp_path / n, np.full((16, 16), 255, np.uint8))
    m = tmp_path / "m.csv"
    m.write_text("path,label,mask\na.png,0,m1.png\n")
    d = ds("manifest", m, classes=["x", "y"])
    was = _ident(d)
    m.write_text("path,label,mask\na.png,0,m2.png\n")
    assert "input list changed" in identity.identity_change(was, _ident(d))
