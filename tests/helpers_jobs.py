"""Tiny deterministic models and datasets for the job tests (made in the test, no downloads)."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import cv2
import numpy as np
import yaml

SIZE = 16


def make_model(path, size=SIZE, classes=2):
    """A 2-conv net with a GAP -> Dense softmax head, saved as .keras."""
    import keras

    keras.utils.set_random_seed(0)
    inp = keras.Input((size, size, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="conv1")(inp)
    x = keras.layers.Conv2D(6, 3, padding="same", activation="relu", name="conv2")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    out = keras.layers.Dense(classes, activation="softmax", name="head")(x)
    model = keras.Model(inp, out)
    model.save(path)
    return str(path)


def image(i, cls, size=SIZE, channels=3, dtype=np.uint8):
    """A deterministic image: noise background plus a bright square whose place depends on the class."""
    rng = np.random.default_rng(i)
    img = rng.integers(0, 80, (size, size, 3)).astype(np.uint8)
    y = (i * 3) % (size // 2)
    x = size // 2 if cls else 1
    img[y:y + size // 4, x:x + size // 4] = 230
    mask = np.zeros((size, size), np.uint8)
    mask[y:y + size // 4, x:x + size // 4] = 255
    return img, mask


def write_png(path, rgb_or_gray):
    arr = np.asarray(rgb_or_gray)
    if arr.ndim == 3 and arr.shape[2] == 3:
        arr = cv2.cvtColor(arr, cv2.COLOR_RGB2BGR)
    elif arr.ndim == 3 and arr.shape[2] == 4:
        arr = cv2.cvtColor(arr, cv2.COLOR_RGBA2BGRA)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), arr)


def encode_png(rgb):
    ok, buf = cv2.imencode(".png", cv2.cvtColor(np.asarray(rgb), cv2.COLOR_RGB2BGR))
    assert ok
    return buf.tobytes()


def encode_mask(mask):
    ok, buf = cv2.imencode(".png", np.asarray(mask, np.uint8))
    assert ok
    return buf.tobytes()


def make_folder(root, n_per_class=10, classes=("cat", "dog"), masks=True, size=SIZE):
    """root/<class>/img_NNN.png (+ root_masks/<class>/img_NNN.png). Returns (root, masks root)."""
    root = Path(root)
    mroot = Path(str(root) + "_masks")
    for c, name in enumerate(classes):
        for i in range(n_per_class):
            img, mask = image(c * 1000 + i, c, size)
            write_png(root / name / f"img_{i:03d}.png", img)
            if masks:
                write_png(mroot / name / f"img_{i:03d}.png", mask)
    return str(root), str(mroot) if masks else None


def bad_files(folder):
    """Unreadable inputs the job must report, not drop.  Returns {relative name: expected words}."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "zero.png").write_bytes(b"")
    good = encode_png(image(5, 0)[0])
    (folder / "truncated.png").write_bytes(good[: len(good) // 2])
    ok, jpg = cv2.imencode(".jpg", image(6, 0)[0])
    (folder / "truncated.jpg").write_bytes(jpg.tobytes()[: len(jpg) // 2])
    (folder / "text.jpg").write_bytes(b"this is not an image at all\n" * 4)
    # a PNG header claiming 100000 x 100000 = 10^10 pixels
    ihdr = b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\rIHDR" + (100000).to_bytes(4, "big") * 2 + b"\x08\x02\x00\x00\x00"
    (folder / "huge.png").write_bytes(ihdr + b"\x00" * 64)
    return {"zero.png": "empty", "truncated.png": "truncated", "truncated.jpg": "truncated",
            "text.jpg": "not an image", "huge.png": "10,000,000,000 pixels"}


def odd_files(folder):
    """Grayscale, RGBA and 16-bit PNGs: audited normally."""
    folder = Path(folder)
    img = image(7, 1)[0]
    write_png(folder / "gray.png", cv2.cvtColor(img, cv2.COLOR_RGB2GRAY))
    rgba = np.concatenate([img, np.full((*img.shape[:2], 1), 255, np.uint8)], axis=2)
    write_png(folder / "rgba.png", rgba)
    write_png(folder / "deep16.png", img.astype(np.uint16) * 257)
    return ["gray.png", "rgba.png", "deep16.png"]


def make_manifest(root, n=20, boxes=False, masks=False, names=True):
    """root/images/*.png + root/manifest.csv (label as class name or index, optional box / mask)."""
    root = Path(root)
    rows = []
    for i in range(n):
        c = i % 2
        img, mask = image(2000 + i, c)
        write_png(root / "images" / f"im{i:03d}.png", img)
        row = {"path": f"images/im{i:03d}.png", "label": ["cat", "dog"][c] if names else c}
        if masks:
            write_png(root / "masks" / f"im{i:03d}.png", mask)
            row["mask"] = f"masks/im{i:03d}.png"
        if boxes:
            ys, xs = np.nonzero(mask)
            row.update(x0=xs.min(), y0=ys.min(), x1=xs.max() + 1, y1=ys.max() + 1)
        rows.append(row)
    path = root / "manifest.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return str(path)


def make_parquet(root, n=20, files=2, keys=True, masks=True):
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    per = n // files
    for f in range(files):
        rows = {"image": [], "label": [], "mask": [], "key": []}
        for i in range(f * per, (f + 1) * per):
            img, mask = image(3000 + i, i % 2)
            rows["image"].append(encode_png(img))
            rows["label"].append(i % 2)
            rows["mask"].append(encode_mask(mask) if masks else None)
            rows["key"].append(f"rec-{i:04d}")
        if not keys:
            rows.pop("key")
        pq.write_table(pa.table(rows), root / f"part-{f}.parquet", row_group_size=4)
    return str(root)


def make_tfrecord(path, n=12, masks=True, keys=False):
    import tensorflow as tf

    def b(v):
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[v]))

    with tf.io.TFRecordWriter(str(path)) as w:
        for i in range(n):
            img, mask = image(4000 + i, i % 2)
            feats = {"image/encoded": b(encode_png(img)),
                     "image/class/label": tf.train.Feature(int64_list=tf.train.Int64List(value=[i % 2]))}
            if masks:
                feats["image/object/mask"] = b(encode_mask(mask))
            if keys:
                feats["image/source_id"] = b(f"src{i}".encode())
            w.write(tf.train.Example(features=tf.train.Features(feature=feats)).SerializeToString())
    return str(path)


def write_spec(path, **sections):
    """A job spec YAML; sections override the defaults below (top-level keys)."""
    spec = {
        "name": "t",
        "model": {"path": "model.keras", "preprocess": "scale_0_1"},
        "dataset": {"format": "folder", "path": "data", "shard_size": 8},
        "explain": {"methods": ["gradcam", "gradcam++"], "layers": "auto"},
        "resources": {"actors": 1, "batch_size": 8, "decode_threads": 2},
        "output": "out",
    }
    for k, v in sections.items():
        if isinstance(v, dict) and isinstance(spec.get(k), dict):
            spec[k] = {**spec[k], **v}
        else:
            spec[k] = v
    Path(path).write_text(yaml.safe_dump(spec, sort_keys=False))
    return str(path)


def folder_workspace(tmp, n_per_class, methods, resources, shard_size=4):
    """A model, a folder dataset (2 classes, no masks) and a spec in ``tmp``: {dir, spec, ids}."""
    tmp = Path(tmp)
    make_model(tmp / "model.keras")
    make_folder(tmp / "data", n_per_class, masks=False)
    spec = write_spec(tmp / "job.yaml", dataset={"format": "folder", "path": "data", "shard_size": shard_size},
                      explain={"methods": list(methods)}, resources=resources)
    return {"dir": tmp, "spec": spec, "ids": folder_ids(tmp / "data")}


def copy_tree(src, dst):
    """Copy a job's folder (its output, or its whole workspace) keeping each file's size and
    modification time, which committed shards record and --resume checks.  Returns ``dst``."""
    import shutil

    shutil.copytree(src, dst, copy_function=shutil.copy2)
    return dst


def env_without_ray(**extra) -> dict:
    """This process's environment for a child, without its ``RAY_*`` variables (no address, token
    or mode of a Ray this process joined) except the idle-worker settings of tests/conftest.py
    (Ray's idle workers are never used by the jobs' actors); ``extra`` on top."""
    keep = ("RAY_enable_worker_prestart", "RAY_prestart_worker_first_driver")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") or k in keep}
    env.update(extra)
    return env


def ray_init_local(num_cpus=2):
    import ray

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    # address="local": a private instance, whatever RAY_ADDRESS or an earlier `ray start` left behind
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
             configure_logging=False, runtime_env={"env_vars": {"TF_CPP_MIN_LOG_LEVEL": "3"}})
    return ray


def assert_exactly_once(out, image_ids, layers=("conv2",), methods=("gradcam", "gradcam++"), errors=()):
    """Every (image, layer, method) exactly once in OUT; ``errors``: ids expected as one error row each."""
    import audit

    df = audit.load(out, columns=["image_id", "layer", "method", "status"])
    bad = df[df.status == "error"]
    good = df[df.status != "error"]
    assert sorted(bad.image_id) == sorted(errors), sorted(bad.image_id)
    want = {(i, la, m) for i in set(image_ids) - set(errors) for la in layers for m in methods}
    got = list(zip(good.image_id, good.layer, good.method))
    assert len(got) == len(set(got)), "duplicate (image, layer, method) rows"
    assert set(got) == want, (sorted(set(got) - want)[:5], sorted(want - set(got))[:5])
    return df


def folder_ids(root):
    """image_ids of a folder dataset (path relative to it), as the job names them."""
    root = Path(root)
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png"))
