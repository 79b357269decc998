"""A job whose model decides by a planted mark, with per-image truth, built in-process (no Ray).

Images are 32 x 32 dark noise with a grey disc (the "object"); a white 6 x 6
square in the bottom-right corner is the mark.  The model's weights are set
by hand: one filter of its conv layer fires on white pixels only, and the
head turns that filter's mean into the logit of class ``dog``.  So the model
predicts ``dog`` exactly when the mark is there, whatever the label: a
shortcut with known truth per image.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import yaml

SIDE = 32
MARK = 6  # pixels of the mark's side


def shortcut_model(path):
    """conv (white detector + constant) -> GAP -> Dense softmax [cat, dog]; saved as .keras."""
    import keras

    inp = keras.Input((SIDE, SIDE, 3))
    x = keras.layers.Conv2D(2, 3, padding="same", activation="relu", name="conv")(inp)
    x = keras.layers.GlobalAveragePooling2D()(x)
    out = keras.layers.Dense(2, activation="softmax", name="head")(x)
    m = keras.Model(inp, out)
    k = np.zeros((3, 3, 3, 2), np.float32)
    k[1, 1, :, 0] = 1.0  # channel sum of the centre pixel ...
    b = np.array([-2.7, 1.0], np.float32)  # ... above 2.7 (white in 0..1): filter 0; filter 1: constant 1
    m.get_layer("conv").set_weights([k, b])
    w = np.array([[0.0, 400.0], [1.0, 0.0]], np.float32)  # 36 white px of 1024 at 0.3 -> logit dog ~4.2
    m.get_layer("head").set_weights([w, np.zeros(2, np.float32)])
    m.save(path)
    return str(path)


def image(i: int, marked: bool) -> np.ndarray:
    rng = np.random.default_rng(1000 + i)
    img = rng.integers(0, 90, (SIDE, SIDE, 3)).astype(np.uint8)
    cx, cy = int(rng.integers(9, 17)), int(rng.integers(9, 17))
    cv2.circle(img, (cx, cy), 6, (150, 150, 150), -1)
    if marked:
        img[SIDE - MARK - 1:SIDE - 1, SIDE - MARK - 1:SIDE - 1] = 255
    return img


def marked_folder(root, n_cat=30, n_dog=30, cat_marked=6, dog_marked=24) -> dict:
    """A folder dataset; returns {image_id: (label, marked)} (label 0 cat, 1 dog)."""
    root = Path(root)
    truth = {}
    for label, name, n, k in ((0, "cat", n_cat, cat_marked), (1, "dog", n_dog, dog_marked)):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            marked = i < k
            cv2.imwrite(str(root / name / f"{name}{i:03d}.png"), image(i + 100 * label, marked)[..., ::-1])
            truth[f"{name}/{name}{i:03d}.png"] = (label, marked)
    return truth


def run_in_process(spec_path) -> str:
    """Run a job without Ray (each shard through AuditWorker, committed) and write its job.json."""
    from audit.data import datasets, io
    from audit.runner.spec import load_spec
    from audit.runner.worker import AuditWorker

    spec = load_spec(str(spec_path), ())
    plan = datasets.plan(spec.dataset)
    out = Path(spec.output)
    io.prepare_output(out, False)
    w = AuditWorker(spec, out_dir=out, job_id="jfix", classes=plan.classes)
    for s in plan.shards:
        w.process_shard(s)
    info = w.setup()
    io.atomic_write_json(io.job_path(out), {"job_id": "jfix", "name": spec.name, "status": "ok",
                                            "spec": spec.to_dict(),
                                            "classes": plan.classes, "layers": info.get("layers"),
                                            "input_size": info.get("input_size")})
    return str(out)


def shortcut_job(tmp, **kw) -> tuple[str, dict]:
    """(OUT of a finished job of the shortcut model on a marked folder, truth by image id)."""
    tmp = Path(tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    shortcut_model(tmp / "model.keras")
    truth = marked_folder(tmp / "data", **kw)
    spec = {"name": "fix", "model": {"path": str(tmp / "model.keras"), "preprocess": "scale_0_1"},
            "dataset": {"format": "folder", "path": str(tmp / "data"), "shard_size": 16},
            "explain": {"methods": ["gradcam"], "layers": ["conv"]},
            "resources": {"actors": 1, "batch_size": 16, "decode_threads": 1}, "output": str(tmp / "out")}
    (tmp / "job.yaml").write_text(yaml.safe_dump(spec))
    return run_in_process(tmp / "job.yaml"), truth


def read_images(out):
    import pandas as pd

    return pd.read_parquet(Path(out) / "summary" / "images.parquet")


def dump(obj) -> str:
    return json.dumps(obj, indent=1, default=str)
