"""The same images, labels and masks in every dataset format give the same records and the same scan.

Folder (masks folder), manifest (a ``mask`` column, or a box), Parquet (a
``mask`` column) and TFRecord (``image/object/mask``) hold one dataset with
one image id per image.  Each is audited by the job's own worker (in-process,
no Ray) and scanned with its causal tests: the statistics, the verdicts, the
flip rates and the tests run must agree, and every format must get the
mask-based tests (the scan decides "masked" from the data, not from a spec key).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import helpers_jobs as h
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from audit.data import datasets
from audit.engine.stats import stat_columns

CLASSES = ("cat", "dog")
N_PER_CLASS = 20  # the scan's smallest class (Config.min_images)
FORMATS = ("folder", "manifest_mask", "manifest_box", "parquet", "tfrecord", "webdataset")


def _images():
    """[(image id, class index, image, mask)]: h.image's noise with a bright square (the mask)."""
    out = []
    for c, name in enumerate(CLASSES):
        for i in range(N_PER_CLASS):
            img, mask = h.image(1000 * c + i, c)
            out.append((f"{name}/img_{i:03d}.png", c, img, mask))
    return out


def _folder(root: Path, rows) -> dict:
    for iid, _, img, mask in rows:
        h.write_png(root / "data" / iid, img)
        h.write_png(root / "masks" / iid, mask)
    return {"format": "folder", "path": str(root / "data"), "masks": str(root / "masks")}


def _manifest(root: Path, rows, boxes: bool) -> dict:
    """A CSV beside the folder's images: ``key`` keeps the folder's ids; a mask path or a box."""
    path = root / ("boxes.csv" if boxes else "manifest.csv")
    cols = ["key", "path", "label"] + (["x0", "y0", "x1", "y1"] if boxes else ["mask"])
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for iid, c, _, mask in rows:
            if boxes:
                ys, xs = np.nonzero(mask)
                extra = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
            else:
                extra = [f"masks/{iid}"]
            w.writerow([iid, f"data/{iid}", CLASSES[c], *extra])
    return {"format": "manifest", "path": str(path)}


def _parquet(root: Path, rows) -> dict:
    t = pa.table({"key": [r[0] for r in rows], "image": [h.encode_png(r[2]) for r in rows],
                  "label": [CLASSES[r[1]] for r in rows], "mask": [h.encode_mask(r[3]) for r in rows]})
    (root / "pq").mkdir()
    pq.write_table(t, root / "pq" / "part-0.parquet", row_group_size=16)
    return {"format": "parquet", "path": str(root / "pq")}


def _tfrecord(root: Path, rows) -> dict:
    import tensorflow as tf

    def b(v):
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[v]))

    path = root / "d.tfrecord"
    with tf.io.TFRecordWriter(str(path)) as w:
        for iid, c, img, mask in rows:
            f = {"image/encoded": b(h.encode_png(img)), "image/object/mask": b(h.encode_mask(mask)),
                 "image/source_id": b(iid.encode()),
                 "image/class/label": tf.train.Feature(int64_list=tf.train.Int64List(value=[c]))}
            w.write(tf.train.Example(features=tf.train.Features(feature=f)).SerializeToString())
    return {"format": "tfrecord", "path": str(path)}


def _webdataset(root: Path, rows) -> dict:
    """Tar shards: ``cat/img_000.png`` is the sample ``cat/img_000`` (a key ends at the first dot)."""
    import io
    import tarfile

    def add(tf, name, data):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))

    (root / "wds").mkdir()
    for part in range(2):
        with tarfile.open(root / "wds" / f"part-{part}.tar", "w") as tf:
            for iid, c, img, mask in rows[part::2]:
                key = iid[: -len(".png")]
                add(tf, f"{key}.png", h.encode_png(img))
                add(tf, f"{key}.cls", CLASSES[c].encode())
                add(tf, f"{key}.mask.png", h.encode_mask(mask))
    return {"format": "webdataset", "path": str(root / "wds")}


def _id(fmt: str, image_id: str) -> str:
    """The folder's id of an image (a webdataset key has no extension)."""
    return image_id + ".png" if fmt == "webdataset" else image_id


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("matrix")
    rows = _images()
    datasets_ = {"folder": _folder(root, rows), "manifest_mask": _manifest(root, rows, boxes=False),
                 "manifest_box": _manifest(root, rows, boxes=True), "parquet": _parquet(root, rows),
                 "tfrecord": _tfrecord(root, rows), "webdataset": _webdataset(root, rows)}
    return {"root": root, "rows": rows, "model": h.make_model(root / "model.keras"), "datasets": datasets_}


def _spec(ws, fmt):
    from audit.runner.spec import load_spec

    return load_spec({"model": {"path": ws["model"], "preprocess": "scale_0_1"},
                      "dataset": {**ws["datasets"][fmt], "classes": list(CLASSES), "shard_size": 16},
                      "explain": {"methods": ["gradcam++"]},
                      "resources": {"batch_size": 8, "decode_threads": 2},
                      "output": str(ws["root"] / f"out_{fmt}")})


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_reads_the_same_items(workspace, fmt):
    spec = _spec(workspace, fmt)
    d = spec.dataset
    p = datasets.plan(d)
    got = []
    for s in p.shards:
        for it in datasets.read_shard(d, s, p.classes):
            img, mask, _ = datasets.load_item(it, (h.SIZE, h.SIZE), 10**8)
            got.append((_id(fmt, it.image_id), it.label, img, mask))
    assert p.classes == list(CLASSES) and p.total == len(workspace["rows"])
    want = {r[0]: r for r in workspace["rows"]}
    assert sorted(g[0] for g in got) == sorted(want)
    for iid, label, img, mask in got:
        assert label == want[iid][1]
        np.testing.assert_array_equal(img, want[iid][2])
        np.testing.assert_array_equal(mask, want[iid][3] > 0)


def _audit(ws, fmt) -> Path:
    """OUT of ``fmt``: the records written by the job's worker (in-process) and job.json, then scanned."""
    from audit.runner.worker import AuditWorker
    from audit.scan.pipeline import scan

    spec = _spec(ws, fmt)
    p = datasets.plan(spec.dataset)
    w = AuditWorker(spec, classes=p.classes)
    info = w.setup()
    out = Path(spec.output)
    (out / "records").mkdir(parents=True)
    for s in p.shards:
        pq.write_table(w.process_shard(s, commit=False)["table"], out / "records" / f"part-{s.id:05d}.parquet")
    w.close()
    job = {"spec": spec.to_dict(), "classes": p.classes, "layers": info["layers"], "input_size": info["input_size"]}
    (out / "job.json").write_text(json.dumps(job))
    scan(out, quiet=True)
    return out


@pytest.fixture(scope="module")
def outputs(workspace):
    return {fmt: _audit(workspace, fmt) for fmt in FORMATS}


def _records(out: Path, fmt: str = "folder"):
    df = pq.read_table(out / "records").to_pandas()
    df["image_id"] = [_id(fmt, i) for i in df.image_id]
    return df.sort_values(["image_id", "layer", "method"]).reset_index(drop=True)


def _table(out: Path, name: str):
    return pq.read_table(out / "summary" / f"{name}.parquet").to_pandas()


@pytest.mark.slow
def test_the_records_agree(outputs):
    ref = _records(outputs["folder"])
    assert len(ref) == 2 * N_PER_CLASS and (ref.status == "ok").all()
    assert ref.energy_object.notna().all() and ref.pointing_hit.notna().all()  # every image has its mask
    for fmt in FORMATS[1:]:
        df = _records(outputs[fmt], fmt)
        assert df.image_id.tolist() == ref.image_id.tolist(), fmt
        assert df.label.tolist() == ref.label.tolist() and df.pred.tolist() == ref.pred.tolist(), fmt
        np.testing.assert_allclose(df.score, ref.score, rtol=1e-6, err_msg=fmt)
        for c in stat_columns():
            np.testing.assert_allclose(df[c].astype(float), ref[c].astype(float), rtol=1e-5, atol=1e-7,
                                       err_msg=f"{fmt} {c}")
        np.testing.assert_allclose(np.stack(df.cam), np.stack(ref.cam), rtol=1e-5, atol=1e-7, err_msg=fmt)


@pytest.mark.slow
def test_the_scan_agrees_and_uses_the_masks_in_every_format(outputs):
    ref_cls = _table(outputs["folder"], "classes")
    ref_iv = _table(outputs["folder"], "interventions")
    assert "object" in set(ref_iv.test), "the folder's masks must give the mask-based tests"
    for fmt in FORMATS[1:]:
        cls = _table(outputs[fmt], "classes")
        iv = _table(outputs[fmt], "interventions")
        assert "object" in set(iv.test), f"{fmt}: the causal tests ran without its masks"
        assert cls.verdict.tolist() == ref_cls.verdict.tolist(), fmt
        assert cls.evidence.tolist() == ref_cls.evidence.tolist(), fmt
        assert iv[["class_id", "test", "place", "n"]].values.tolist() == \
            ref_iv[["class_id", "test", "place", "n"]].values.tolist(), fmt
        np.testing.assert_allclose(iv.flip_rate.astype(float), ref_iv.flip_rate.astype(float), err_msg=fmt)
