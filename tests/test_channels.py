"""Grayscale and any channel count the model takes: one conversion everywhere.

Images are decoded to RGB; :func:`audit.engine.models.to_channels` turns them
into what the model takes (1 gray, 2 gray + alpha, 3 RGB, 4 RGBA).  Checked
against NumPy: the conversion rule, the Explainer's maps (float64 reference of
a one-conv model), the worker's rows, ``audit run`` + the intervention's
predictions on its output, and ``audit explain``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import cv2
import helpers_jobs as h
import numpy as np
import pytest

from audit.engine.models import model_input, preprocess, to_channels
from audit.errors import AuditError

SIZE = 16


def luma64(rgb):
    """ITU-R BT.601 luma in float64 (not rounded)."""
    rgb = np.asarray(rgb, np.float64)
    return 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]


def palette_images(n, seed=0):
    """RGB images from colours whose luma is at least 0.2 from a rounding tie (so its uint8 value is certain)."""
    rng = np.random.default_rng(seed)
    colours = rng.integers(0, 256, (4000, 3))
    frac = luma64(colours) % 1
    colours = colours[(frac < 0.3) | (frac > 0.7)][:64]
    return colours[rng.integers(0, len(colours), (n, SIZE, SIZE))].astype(np.uint8)


def expected_input(rgb, channels):
    """The model input of ``rgb`` (uint8) under scale_0_1, from the documented rule, in float64."""
    gray = np.round(luma64(rgb))[..., None]
    alpha = np.full(gray.shape, 255.0)
    x = {1: gray, 2: np.concatenate([gray, alpha], -1), 3: rgb.astype(np.float64),
         4: np.concatenate([rgb.astype(np.float64), alpha], -1)}[channels]
    return x / 255.0


# ---------------------------------------------------------------------------
# The rule
# ---------------------------------------------------------------------------


def test_to_channels_rule():
    rgb = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [90, 90, 90]]], np.uint8)  # (1, 4, 3)
    gray = to_channels(rgb, 1)
    assert gray.dtype == np.uint8 and gray.shape == (1, 4, 1)
    assert gray[0, :, 0].tolist() == [76, 150, 29, 90]  # round(255 * 0.299, 0.587, 0.114); gray stays
    rand = np.random.default_rng(0).integers(0, 256, (3, 20, 20, 3)).astype(np.uint8)
    assert np.abs(to_channels(rand, 1)[..., 0] - luma64(rand)).max() <= 0.5 + 1e-6 + 0.01  # OpenCV fixed point
    np.testing.assert_array_equal(to_channels(rgb, 2), np.concatenate([gray, np.full_like(gray, 255)], -1))
    assert to_channels(rgb, 3) is rgb
    np.testing.assert_array_equal(to_channels(rgb, 4)[..., :3], rgb)
    assert (to_channels(rgb, 4)[..., 3] == 255).all()
    np.testing.assert_array_equal(to_channels(gray, 3), np.repeat(gray, 3, -1))
    np.testing.assert_array_equal(to_channels(to_channels(rgb, 4), 3), rgb)  # alpha dropped to show it
    with pytest.raises(AuditError, match=r"takes 5 input channels; images are audited as gray \(1\)"):
        to_channels(rgb, 5)


def test_preprocessing_with_rgb_constants_needs_three_channels():
    gray = np.zeros((1, 2, 2, 1), np.uint8)
    np.testing.assert_allclose(preprocess(gray + 255, "scale_-1_1"), np.ones((1, 2, 2, 1)))
    for mode in ("caffe", "torch"):
        with pytest.raises(AuditError, match=f"preprocess '{mode}' is for RGB images .* takes 1"):
            preprocess(gray, mode)


# ---------------------------------------------------------------------------
# The Explainer, against a float64 NumPy Grad-CAM
# ---------------------------------------------------------------------------


def one_conv_model(channels, seed=0):
    import keras

    keras.utils.set_random_seed(seed)
    inp = keras.Input((SIZE, SIZE, channels))
    a = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="conv")(inp)
    g = keras.layers.GlobalAveragePooling2D()(a)
    return keras.Model(inp, keras.layers.Dense(2, activation="softmax", name="head")(g))


def reference(model, x):
    """(predicted class, Grad-CAM at 'conv') in float64 from the weights: conv 3x3 'same' + ReLU, GAP, Dense."""
    K, b = (np.asarray(v, np.float64) for v in model.get_layer("conv").weights)
    W, c0 = (np.asarray(v, np.float64) for v in model.get_layer("head").weights)
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    A = sum(np.einsum("nhwc,ck->nhwk", xp[:, i:i + SIZE, j:j + SIZE], K[i, j]) for i in range(3) for j in range(3))
    A = np.maximum(A + b, 0)
    pred = (A.mean(axis=(1, 2)) @ W + c0).argmax(1)
    # Grad-CAM on a GAP -> Dense head: w_k = W[k, c] / (h w)
    cam = np.maximum(np.einsum("nhwk,kn->nhw", A, W[:, pred]) / (SIZE * SIZE), 0)
    return pred, cam


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_explainer_maps_for_any_channel_count(channels):
    from audit.engine.explainer import Explainer

    model = one_conv_model(channels)
    rgb = palette_images(4)
    res = Explainer(model, methods=("gradcam",), batch_size=4)(model_input(rgb, channels, "scale_0_1"))
    pred, cam = reference(model, expected_input(rgb, channels))
    np.testing.assert_array_equal(res.pred, pred)
    assert (cam > 0).any()
    np.testing.assert_allclose(res.maps[("conv", "gradcam")], cam, rtol=1e-4, atol=1e-7)


# ---------------------------------------------------------------------------
# The worker, audit run + the intervention, audit explain
# ---------------------------------------------------------------------------


def write_dataset(root, n=6):
    rgb = palette_images(n, seed=1)
    for i, im in enumerate(rgb):
        h.write_png(Path(root) / ("a" if i % 2 else "b") / f"im{i}.png", im)
    return rgb


def spec_doc(tmp, model_path, channels_out="out"):
    return {"name": "gray", "model": {"path": str(model_path), "preprocess": "scale_0_1"},
            "dataset": {"format": "folder", "path": str(tmp / "data"), "shard_size": 4},
            "explain": {"methods": ["gradcam"], "layers": "auto"},
            "resources": {"actors": 1, "batch_size": 4, "decode_threads": 1},
            "output": str(tmp / channels_out)}


def _images_by_id(tmp, rgb):
    return {f"{'a' if i % 2 else 'b'}/im{i}.png": im for i, im in enumerate(rgb)}


@pytest.mark.parametrize("channels", [1, 4])
def test_worker_rows_for_gray_and_rgba_models(tmp_path, channels):
    from audit.data import datasets
    from audit.runner.spec import load_spec
    from audit.runner.worker import AuditWorker

    model = one_conv_model(channels, seed=channels)
    model.save(tmp_path / "m.keras")
    rgb = write_dataset(tmp_path / "data")
    spec = load_spec(spec_doc(tmp_path, tmp_path / "m.keras"))
    plan = datasets.plan(spec.dataset)
    w = AuditWorker(spec, classes=plan.classes)
    import pyarrow as pa

    df = pa.concat_tables([w.process_shard(s, commit=False)["table"] for s in plan.shards]).to_pandas()
    assert (df.status == "ok").all() and len(df) == len(rgb)
    by_id = _images_by_id(tmp_path, rgb)
    x = expected_input(np.stack([by_id[i] for i in df.image_id]), channels)
    pred, cam = reference(model, x)
    np.testing.assert_array_equal(df.pred.to_numpy(), pred)
    np.testing.assert_allclose(np.stack(df.cam).reshape(-1, SIZE, SIZE), cam, rtol=1e-4, atol=1e-7)


def test_caffe_preprocessing_of_a_gray_model_is_refused_at_start(tmp_path):
    from audit.runner.spec import load_spec
    from audit.runner.worker import AuditWorker

    one_conv_model(1).save(tmp_path / "m.keras")
    write_dataset(tmp_path / "data", n=2)
    doc = spec_doc(tmp_path, tmp_path / "m.keras")
    doc["model"]["preprocess"] = "caffe"
    with pytest.raises(AuditError, match="preprocess 'caffe' is for RGB images"):
        AuditWorker(load_spec(doc), classes=["a", "b"]).setup()  # at start-up, before any shard


@pytest.mark.slow  # a local Ray, the job, the scan and audit explain: about a minute
def test_audit_run_intervention_and_explain_on_a_gray_model(tmp_path, capsys):
    import yaml

    from audit.cli import main
    from audit.scan.intervene import Intervener
    from audit.scan.probes.edits import occlude

    model = one_conv_model(1, seed=5)
    model.save(tmp_path / "gray.keras")
    rgb = write_dataset(tmp_path / "data", n=8)
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump(spec_doc(tmp_path, tmp_path / "gray.keras")))
    code = main(["run", str(spec), "--no-progress"])
    out = capsys.readouterr()
    assert code in (0, 1), out.err  # 1 only when the scan finds a suspect
    assert "Traceback" not in out.err

    import audit

    df = audit.load(tmp_path / "out")
    assert (df.status == "ok").all() and len(df) == 8
    by_id = _images_by_id(tmp_path, rgb)
    pred, cam = reference(model, expected_input(np.stack([by_id[i] for i in df.image_id]), 1))
    np.testing.assert_array_equal(df.pred.to_numpy(), pred)
    np.testing.assert_allclose(np.stack(df.cam).reshape(-1, SIZE, SIZE), cam, rtol=1e-4, atol=1e-7)

    # the intervention feeds the model its images through the same conversion
    assert json.loads((tmp_path / "out" / "job.json").read_text())["spec"]["model"]["path"]
    iv = Intervener(tmp_path / "out", batch_size=3)
    np.testing.assert_array_equal(iv.predict(rgb), reference(model, expected_input(rgb, 1))[0])
    whole = np.ones((len(rgb), SIZE, SIZE), bool)
    occluded = occlude(rgb, whole)  # every image filled with its mean colour
    np.testing.assert_array_equal(iv.predict(occluded), reference(model, expected_input(occluded, 1))[0])

    # audit explain reads the PNG, converts it the same way and writes its page
    png = tmp_path / "data" / "b" / "im0.png"
    assert main(["explain", str(tmp_path / "gray.keras"), str(png), "--out", str(tmp_path / "ex"),
                 "--preprocess", "scale_0_1", "--methods", "gradcam", "gradient", "--filters", "2",
                 "--steps", "2"]) == 0
    assert (tmp_path / "ex" / "index.html").is_file()
    from audit.review.explain import read_image

    np.testing.assert_array_equal(read_image(png, (SIZE, SIZE), 1)[..., 0],
                                  np.round(luma64(cv2.cvtColor(cv2.imread(str(png)), cv2.COLOR_BGR2RGB))))
