"""Confirmation by intervention: flip rates with toy predictors, and the job wiring."""

import json
import math

import cv2
import numpy as np
import pytest

from audit.errors import AuditError
from audit.scan.intervene import MIN_SAMPLE, Intervener, flip_rates, occlude

H = W = 16


def scenes(n, sky="blue", tank=True, seed=0):
    """Sky (top half) blue or grey, red ground, a black 'tank' square at a random ground spot."""
    rng = np.random.default_rng(seed)
    imgs = np.zeros((n, H, W, 3), np.uint8)
    masks = np.zeros((n, H, W), bool)
    for i in range(n):
        imgs[i, :8] = (0, 0, 150) if sky == "blue" else (110, 110, 110)
        imgs[i, 8:] = (250, 0, 0)
        if tank:
            y, x = rng.integers(9, 13), rng.integers(0, 12)
            imgs[i, y:y + 3, x:x + 3] = 0
            masks[i, y:y + 3, x:x + 3] = True
    return imgs, masks


SKY = np.zeros((H, W), bool)
SKY[:8] = True


def sky_model(images):
    """Predicts 0 ('no tank') when the sky is blue, else 1: the shortcut."""
    top = images[:, :8].reshape(len(images), -1, 3).mean(axis=1).astype(float)
    return np.where(top[:, 2] > top[:, 0] + 20, 0, 1)


def tank_model(images):
    """Predicts 1 when a dark object is present: the healthy model."""
    return (images.reshape(len(images), -1, 3).max(axis=2) < 30).any(axis=1).astype(int)


def test_occlude_mean_and_blur_hand_values():
    img = np.zeros((1, 4, 4, 3), np.uint8)
    img[0, :2] = 200  # top half white-ish: mean 100
    m = np.zeros((1, 4, 4), bool)
    m[0, :2, :2] = True
    out = occlude(img, m, "mean")
    assert (out[0, :2, :2] == 100).all() and (out[0, :2, 2:] == 200).all() and (out[0, 2:] == 0).all()
    assert (img[0, :2, :2] == 200).all()  # input untouched
    blurred = occlude(img, m, "blur")
    ref = cv2.GaussianBlur(img[0], (0, 0), 0.5)
    np.testing.assert_array_equal(blurred[0][m[0]], ref[m[0]])
    with pytest.raises(AuditError, match="fill"):
        occlude(img, m, "zeros")


def test_shortcut_model_flips_on_cue_not_on_object():
    imgs, masks = scenes(20, "blue")
    r = flip_rates(sky_model, imgs, SKY, masks)
    # occluding the sky with the image mean (red-ish) removes the blue: every prediction flips
    assert r.flip_rate_cue == 1.0 and r.n_cue == 20
    assert r.flip_rate_object == 0.0 and r.n_object == 20


def test_healthy_model_flips_on_object_not_on_cue():
    imgs, masks = scenes(20, "grey")
    r = flip_rates(tank_model, imgs, SKY, masks)
    assert r.flip_rate_cue == 0.0
    assert r.flip_rate_object == 1.0


def test_cue_mask_spares_the_object():
    imgs, masks = scenes(10, "blue")
    everything = np.ones((H, W), bool)  # a cue covering the whole image ...
    r = flip_rates(tank_model, imgs, everything, masks)
    assert r.flip_rate_cue == 0.0  # ... still leaves the tank visible
    r = flip_rates(tank_model, imgs, everything)  # without masks nothing is spared
    assert r.flip_rate_cue == 1.0 and math.isnan(r.flip_rate_object)


def test_partial_flips_and_small_samples():
    blue, bm = scenes(6, "blue", seed=1)
    grey, gm = scenes(6, "grey", seed=2)
    imgs = np.concatenate([blue, grey])
    masks = np.concatenate([bm, gm])
    r = flip_rates(sky_model, imgs, SKY, masks)
    # grey skies (prediction 1) stay 1 when greyed out; the 6 blue ones flip
    assert r.flip_rate_cue == pytest.approx(6 / 12)
    r = flip_rates(sky_model, imgs[:MIN_SAMPLE - 1], SKY, masks[:MIN_SAMPLE - 1])
    assert math.isnan(r.flip_rate_cue) and math.isnan(r.flip_rate_object)
    no_tank, nm = scenes(8, "blue", tank=False)
    r = flip_rates(sky_model, no_tank, SKY, nm)  # empty object masks: no object test
    assert r.n_object == 0 and math.isnan(r.flip_rate_object) and r.flip_rate_cue == 1.0


def test_predictions_compared_with_the_unmodified_images():
    imgs, masks = scenes(8, "blue")
    calls = []

    def counting(x):
        calls.append(len(x))
        return sky_model(x)

    flip_rates(counting, imgs, SKY, masks)
    assert calls == [8, 8, 8]  # base, cue, object: only extra forward passes on the sample
    calls.clear()
    flip_rates(counting, imgs, SKY, masks, base_pred=sky_model(imgs))
    assert calls == [8, 8]


def test_intervener_reads_job_model_and_dataset(tmp_path):
    import keras

    from audit.runner.spec import load_spec

    # a real Keras model that is the sky shortcut: crop the top half, average, compare blue with red
    inp = keras.Input((H, W, 3))
    x = keras.layers.Cropping2D(((0, 8), (0, 0)))(inp)
    x = keras.layers.GlobalAveragePooling2D()(x)
    dense = keras.layers.Dense(2)
    out = dense(x)
    model = keras.Model(inp, out)
    dense.set_weights([np.array([[-1.0, 1.0], [0.0, 0.0], [1.0, -1.0]], np.float32), np.zeros(2, np.float32)])
    model.save(tmp_path / "m.keras")
    imgs, masks = scenes(8, "blue")
    for i, (im, m) in enumerate(zip(imgs, masks)):
        (tmp_path / "data" / "no_tank").mkdir(parents=True, exist_ok=True)
        (tmp_path / "masks" / "no_tank").mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(tmp_path / "data" / "no_tank" / f"{i}.png"), cv2.cvtColor(im, cv2.COLOR_RGB2BGR))
        cv2.imwrite(str(tmp_path / "masks" / "no_tank" / f"{i}.png"), m.astype(np.uint8) * 255)
    (tmp_path / "data" / "tank").mkdir()
    spec = load_spec({"model": {"path": "m.keras", "preprocess": "none", "input_size": [H, W]},
                      "dataset": {"format": "folder", "path": "data", "masks": "masks"},
                      "output": "out"}, base_dir=tmp_path)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "job.json").write_text(json.dumps({"spec": spec, "input_size": [H, W]}))
    iv = Intervener(tmp_path / "out")
    ids = [f"no_tank/{i}.png" for i in range(8)]
    np.testing.assert_array_equal(iv.predict(imgs), sky_model(imgs))
    r = iv(ids, SKY)
    assert r.flip_rate_cue == 1.0 and r.flip_rate_object == 0.0 and r.n_object == 8
    r = iv(ids, SKY, use_masks=False)
    assert r.n_object == 0 and math.isnan(r.flip_rate_object)
    with pytest.raises(AuditError, match="job.json"):
        Intervener(tmp_path)
