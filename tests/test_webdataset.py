"""``format: webdataset``: tar shards of KEY.png + KEY.cls (+ KEY.mask.png), as one more format module."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import helpers_jobs as h
import numpy as np
import pytest

from audit.data import datasets, formats, identity, query, resources
from audit.data.jobspec import DatasetSpec
from audit.errors import AuditError


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def make_tars(root: Path, n: int = 10, per_tar: int = 5, names: bool = True, masks: bool = True,
              extra: bool = True) -> str:
    """root/shard-K.tar with samples 'sample-NNNN': image, label (class name or index), optional mask."""
    root.mkdir(parents=True, exist_ok=True)
    for t in range(0, n, per_tar):
        with tarfile.open(root / f"shard-{t // per_tar}.tar", "w") as tf:
            for i in range(t, min(n, t + per_tar)):
                img, mask = h.image(5000 + i, i % 2)
                key = f"sample-{i:04d}"
                _add(tf, f"{key}.png", h.encode_png(img))
                _add(tf, f"{key}.cls", (["cat", "dog"][i % 2] if names else str(i % 2)).encode())
                if masks:
                    _add(tf, f"{key}.mask.png", h.encode_mask(mask))
                if extra:
                    _add(tf, f"{key}.json", b'{"note": "ignored"}')
    return str(root)


def ds(path, **kw):
    d = {"format": "webdataset", "path": str(path), "classes": None, "masks": None, "shard_size": 3,
         "limit": None, "max_pixels": 10**8}
    d.update(kw)
    return DatasetSpec.from_partial(d)


def test_the_format_is_registered_and_in_the_schema():
    enum = resources.schema("job")["properties"]["dataset"]["properties"]["format"]["enum"]
    assert enum == list(formats.FORMATS) and "webdataset" in enum
    with pytest.raises(AuditError, match="unknown dataset format 'zip'"):
        formats.get("zip")


def test_plan_and_read_every_sample(tmp_path):
    root = make_tars(tmp_path / "wds", n=10, per_tar=5)
    d = ds(root)
    p = datasets.plan(d)
    assert p.total == 10 and p.classes == ["cat", "dog"]
    assert [(Path(s.source).name, s.start, s.stop) for s in p.shards] == [
        ("shard-0.tar", 0, 3), ("shard-0.tar", 3, 5), ("shard-1.tar", 0, 3), ("shard-1.tar", 3, 5)]
    got = []
    for s in p.shards:  # each shard starts at its own byte offset
        for it in datasets.read_shard(d, s, p.classes):
            img, mask, wh = datasets.load_item(it, (h.SIZE, h.SIZE), 10**8)
            got.append((it.image_id, it.path, it.label, img, mask))
    assert [g[0] for g in got] == [f"sample-{i:04d}" for i in range(10)]
    assert got[7][1] == f"{root}/shard-1.tar#2"
    for i, (_, _, label, img, mask) in enumerate(got):
        ref, ref_mask = h.image(5000 + i, i % 2)
        assert label == i % 2
        np.testing.assert_array_equal(img, ref)
        np.testing.assert_array_equal(mask, ref_mask > 0)


def test_index_labels_limit_and_no_masks(tmp_path):
    root = make_tars(tmp_path / "wds", n=7, per_tar=7, names=False, masks=False, extra=False)
    p = datasets.plan(ds(root, limit=4))
    assert p.total == 4 and p.classes is None and [s.size for s in p.shards] == [3, 1]
    items = list(datasets.iter_items(ds(root), classes=["a", "b"]))
    assert [it.label for it in items] == [0, 1, 0, 1, 0, 1, 0] and not any(it.has_mask for it in items)


def test_bad_samples_are_error_rows_and_repeated_keys_refused(tmp_path):
    root = tmp_path / "bad"
    root.mkdir()
    with tarfile.open(root / "a.tar", "w") as tf:
        _add(tf, "x.png", h.encode_png(h.image(1, 0)[0]))
        _add(tf, "x.cls", b"7")  # outside the two classes
        _add(tf, "y.cls", b"0")  # no image
        _add(tf, "z.png", b"not a png")
    items = list(datasets.iter_items(ds(root), classes=["a", "b"]))
    assert [it.image_id for it in items] == ["x", "y", "z"]
    assert "outside the 2 classes" in items[0].error and "no image in the sample" in items[1].error
    with pytest.raises(Exception, match="decode|image"):
        datasets.load_item(items[2], (h.SIZE, h.SIZE), 10**8)
    with tarfile.open(root / "b.tar", "w") as tf:
        _add(tf, "x.png", h.encode_png(h.image(2, 0)[0]))
    with pytest.raises(AuditError, match="sample key 'x' repeats"):
        datasets.plan(ds(root))
    (root / "c.tar").write_bytes(b"\0" * 10 + b"junk" * 200)
    (root / "b.tar").unlink()
    with pytest.raises(AuditError, match="c.tar is not a readable tar file"):
        datasets.plan(ds(root))


def test_identity_follows_labels_and_content(tmp_path):
    root = make_tars(tmp_path / "wds", n=4, per_tar=4)
    d = ds(root, shard_size=4)
    p = datasets.plan(d)
    before = identity.shard_identity(d, p.shards[0], p.classes)
    assert before == identity.shard_identity(d, p.shards[0], p.classes)
    assert (before.count, before.first, before.last) == (4, "sample-0000", "sample-0003")
    make_tars(tmp_path / "wds", n=4, per_tar=4, names=False)  # labels as indices: the same classes
    again = identity.shard_identity(d, p.shards[0], p.classes)
    assert again.digest == before.digest and again.content != before.content  # the file was rewritten
    assert identity.identity_change(before, again) is not None


def test_original_image_and_load_by_id(tmp_path):
    root = make_tars(tmp_path / "wds", n=6, per_tar=3)
    np.testing.assert_array_equal(query.original_image({"path": f"{root}/shard-1.tar#1", "path_bytes": None}), h.image(5004, 0)[0])
    with pytest.raises(AuditError, match="record 9 not found"):
        query.original_image({"path": f"{root}/shard-1.tar#9", "path_bytes": None})
    images, masks, has = datasets.load_images(ds(root), ["sample-0005", "sample-0000"], (16, 16))
    np.testing.assert_array_equal(images[0], h.image(5005, 1)[0])
    np.testing.assert_array_equal(masks[1], h.image(5000, 0)[1] > 0)
    assert has.tolist() == [True, True]


def test_a_loaded_row_reads_its_image_by_the_job_s_format(tmp_path):
    """audit.load's rows find their original through job.json (read_job_record): a tar not named .tar."""
    import pandas as pd

    from audit.data import io as audit_io
    from audit.data.jobspec import JobSpec

    root = Path(make_tars(tmp_path / "wds", n=6, per_tar=3))
    odd = root / "shard-1.bin"
    (root / "shard-1.tar").rename(odd)
    row = {"path": f"{odd}#1", "path_bytes": None}
    with pytest.raises(AuditError, match="image not found"):  # a dict row: the name tells no format
        query.original_image(row)
    out = tmp_path / "out"
    out.mkdir()
    spec = JobSpec.from_partial({"dataset": {"format": "webdataset", "path": str(root)}, "output": str(out)})
    audit_io.atomic_write_json(audit_io.job_path(out), {"job_id": "j", "spec": spec.to_dict()})
    df = pd.DataFrame([row])
    df.attrs[query.SOURCE] = {"out": str(out), "filters": None}  # as audit.load marks its frames
    np.testing.assert_array_equal(query.original_image(df.iloc[0]), h.image(5004, 0)[0])


def test_a_spec_takes_the_format(tmp_path):
    from audit.runner.spec import load_spec

    root = make_tars(tmp_path / "wds", n=2, per_tar=2)
    (tmp_path / "m.keras").write_bytes(b"x")
    spec = load_spec({"model": {"path": "m.keras"}, "dataset": {"format": "webdataset", "path": "wds",
                                                               "masks": "seg.png"}, "output": "out"},
                     base_dir=tmp_path)
    assert spec.dataset.path == root and spec.dataset.masks == "seg.png"  # a member name, not a path
