"""Confirmation by intervention: flip rates with toy predictors, and the job wiring."""

import json
import math

import cv2
import numpy as np
import pytest

from audit.errors import AuditError
from audit.scan.config import DEFAULT
from audit.scan.intervene import Intervener
from audit.scan.probes import Sample, causal_tests, extra_forwards
from audit.scan.probes.edits import (
    Levels,
    occlude,
    remove_objects,
    replace_background,
    spare_masks,
    transform,
)
from audit.scan.probes.places import Spot, place_bank

MIN_SAMPLE = DEFAULT.min_rate_n

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


SKY_PLACE = Spot("region:sky", (0.0, 0.0, 1.0, 0.5), SKY)


def test_shortcut_model_flips_on_the_sky_not_on_the_object():
    imgs, masks = scenes(20, "blue")
    r = causal_tests(sky_model, Sample(imgs, [SKY_PLACE], masks))
    # occluding the sky with the image mean (red-ish) removes the blue: every prediction flips
    # all of the first 16 (min_tested) flipped, or none did: settled there, the other 4 not predicted
    assert r.rate_at("region:sky") == 1.0 and r.at("region:sky").n == DEFAULT.min_tested == 16
    assert r.object_rate() == 0.0 and r.object().n == 16 and r.object().fill == "inpaint"
    assert r.masked and not r.absence


def test_healthy_model_flips_on_object_not_on_the_sky():
    imgs, masks = scenes(20, "grey")
    r = causal_tests(tank_model, Sample(imgs, [SKY_PLACE], masks))
    assert r.rate_at("region:sky") == 0.0
    assert r.object_rate() == 1.0
    assert r.background_rate() == 0.0  # the tank kept, the rest replaced: still a tank


def test_places_spare_the_object():
    imgs, masks = scenes(10, "blue")
    everything = Spot("all", None, np.ones((H, W), bool))  # a place covering the whole image ...
    r = causal_tests(tank_model, Sample(imgs, [everything], masks))
    assert r.rate_at("all") == 0.0  # ... still leaves the tank visible
    r = causal_tests(tank_model, Sample(imgs, [everything]))  # without masks nothing is spared
    assert r.rate_at("all") == 1.0 and r.object() is None and not r.masked


def test_partial_flips_small_samples_and_absence():
    blue, bm = scenes(6, "blue", seed=1)
    grey, gm = scenes(6, "grey", seed=2)
    r = causal_tests(sky_model, Sample(np.concatenate([blue, grey]), [SKY_PLACE], np.concatenate([bm, gm])))
    # grey skies (prediction 1) stay 1 when greyed out; the 6 blue ones flip
    assert r.rate_at("region:sky") == pytest.approx(6 / 12)
    r = causal_tests(sky_model, Sample(blue[:MIN_SAMPLE - 1], [SKY_PLACE], bm[:MIN_SAMPLE - 1]))
    assert math.isnan(r.rate_at("region:sky")) and math.isnan(r.object_rate())
    no_tank, nm = scenes(8, "blue", tank=False)
    r = causal_tests(sky_model, Sample(no_tank, [SKY_PLACE], nm))  # empty object masks: no object test
    assert r.object().n == 0 and math.isnan(r.object_rate()) and r.rate_at("region:sky") == 1.0
    assert r.absence


def test_background_replacement_takes_another_image_or_a_neutral_colour():
    imgs, masks = scenes(4, "blue")
    donors, _ = scenes(2, "grey", tank=False)
    out, fill = replace_background(imgs, masks, donors)
    assert fill == "other-background"
    np.testing.assert_array_equal(out[1][masks[1]], imgs[1][masks[1]])  # the object is kept
    np.testing.assert_array_equal(out[1][~masks[1]], donors[1][~masks[1]])  # the rest is the donor's
    np.testing.assert_array_equal(out[2][~masks[2]], donors[0][~masks[2]])  # donors taken in turn
    out, fill = replace_background(imgs, masks)
    assert fill == "neutral"
    ref = np.round(imgs[0][~masks[0]].astype(np.float64).mean(axis=0))
    np.testing.assert_array_equal(out[0][~masks[0]], np.broadcast_to(ref, out[0][~masks[0]].shape))


def test_all_variants_are_predicted_in_chunks():
    imgs, masks = scenes(8, "blue")
    calls = []

    def counting(x):
        calls.append(len(x))
        return sky_model(x)

    bank = place_bank((H, W))
    r = causal_tests(counting, Sample(imgs, bank, masks), chunk=64)
    tested = sum(t.n for t in r.tests)
    total = sum(r.forwards.values())
    assert r.forwards["base"] == 8  # the base predictions, in the stages' calls
    # the screening's first 5 images, its other 3 (for the tests that flipped one), the rest: one partial call each
    assert sum(calls) == total <= 8 + tested and max(calls) <= 64 and len(calls) <= math.ceil(total / 64) + 3
    assert extra_forwards(8, len(bank), True) >= total
    names = [p.name for p in bank]
    assert {"border:4%", "border:10%", "edge:top", "corner:bottom_left"} <= set(names) and "border:20%" not in names


def test_places_that_flip_nothing_on_the_screen_stop_there():
    imgs, masks = scenes(32, "blue")
    bank = place_bank((H, W))
    calls = []

    def counting(x):
        calls.append(len(x))
        return sky_model(x)

    r = causal_tests(counting, Sample(imgs, [SKY_PLACE, *bank], masks))
    assert r.at("region:sky").n == 16  # flips all of 16 (min_tested): settled there
    quiet = [t for t in r.places if t.place != "region:sky" and t.flip_rate == 0.0]
    assert quiet and all(t.n == 5 for t in quiet)  # flip none of the first 5: not tested further
    assert sum(calls) == sum(r.forwards.values()) <= 32 + sum(t.n for t in r.tests)


# ----------------------------------------------------------------------------
# Removing an object: no silhouette left for a shape classifier
# ----------------------------------------------------------------------------


def triangle_scene(n=12, size=48, seed=0):
    """A noisy dark-green left part with a blue filled triangle (the object), a bright right part.

    The bright part makes the image's mean colour unlike the background around the object, as in
    real photos: a constant mean fill of the object's mask then leaves a visible silhouette.
    """
    rng = np.random.default_rng(seed)
    imgs = np.zeros((n, size, size, 3), np.uint8)
    masks = np.zeros((n, size, size), bool)
    for i in range(n):
        img = np.clip(np.array([70, 90, 60]) + rng.normal(0, 5, (size, size, 3)), 0, 255).astype(np.uint8)
        img[:, LEFT:] = 235
        x, y, s = rng.integers(3, 10), rng.integers(6, 26), rng.integers(12, 16)
        tri = np.array([[x, y + s], [x + s, y + s], [x + s // 2, y]], np.int32)
        m = np.zeros((size, size), np.uint8)
        cv2.fillPoly(m, [tri], 1)
        img[m.astype(bool)] = (20, 20, 200)
        imgs[i], masks[i] = img, m.astype(bool)
    return imgs, masks


LEFT = 28  # the shape model looks at the columns left of this


def shape_model(images):
    """By shape alone, in the left part: 1 (triangle) when the pixels unlike the background fill about
    half their box, 0 (square) when they fill it, 2 when there is no shape.  Colour plays no part."""
    out = []
    for img in images[:, :, :LEFT]:
        bg = np.median(img.reshape(-1, 3), axis=0)
        fg = np.abs(img.astype(int) - bg).max(axis=2) > 40
        if fg.sum() < 20:
            out.append(2)
            continue
        ys, xs = np.nonzero(fg)
        fill = fg.sum() / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))
        out.append(1 if 0.3 < fill < 0.7 else 0 if fill > 0.85 else 2)
    return np.array(out)


def test_inpainting_removes_the_shape_a_constant_fill_keeps():
    imgs, masks = triangle_scene()
    assert (shape_model(imgs) == 1).all()  # the model sees the triangles
    kept = occlude(imgs, masks, "mean")  # a constant fill of the object's own mask ...
    assert (shape_model(kept) == 1).all()  # ... keeps the silhouette: still a triangle
    removed = remove_objects(imgs, masks)
    assert (shape_model(removed) == 2).all()  # inpainted: no shape left
    far = ~np.stack([cv2.dilate(m.astype(np.uint8), np.ones((15, 15), np.uint8)).astype(bool) for m in masks])
    np.testing.assert_array_equal(removed[far], imgs[far])  # the background away from the object is untouched
    r = causal_tests(shape_model, Sample(imgs, [], masks))
    assert r.object_rate() == 1.0


def test_inpainting_any_channel_count():
    imgs, masks = triangle_scene(3)
    gray = imgs[..., :1]
    out = remove_objects(gray, masks)
    assert out.shape == gray.shape and np.abs(out[..., 0][masks].astype(int) - 70).mean() < 30
    four = np.concatenate([imgs, imgs[..., :1]], axis=-1)
    assert remove_objects(four, masks).shape == four.shape


@pytest.mark.parametrize("head", ["logits", "sigmoid"])
def test_intervener_reads_job_model_and_dataset(tmp_path, head):
    import keras

    from audit.runner.spec import load_spec

    # a real Keras model that is the sky shortcut: crop the top half, average, compare blue with red;
    # as two logits, or as one sigmoid unit (class 1 when p > 0.5: an argmax over one column would
    # always say 0 and no prediction could ever flip)
    inp = keras.Input((H, W, 3))
    x = keras.layers.Cropping2D(((0, 8), (0, 0)))(inp)
    x = keras.layers.GlobalAveragePooling2D()(x)
    if head == "logits":
        dense = keras.layers.Dense(2)
        kernel = np.array([[-1.0, 1.0], [0.0, 0.0], [1.0, -1.0]], np.float32)
    else:
        dense = keras.layers.Dense(1, activation="sigmoid")
        kernel = np.array([[1.0], [0.0], [-1.0]], np.float32)
    out = dense(x)
    model = keras.Model(inp, out)
    dense.set_weights([kernel, np.zeros(kernel.shape[1], np.float32)])
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
    (tmp_path / "out" / "job.json").write_text(json.dumps({"spec": spec.to_dict(), "input_size": [H, W]}))
    iv = Intervener(tmp_path / "out")
    ids = [f"no_tank/{i}.png" for i in range(8)]
    np.testing.assert_array_equal(iv.predict(imgs), sky_model(imgs))
    images, m = iv.load(ids)
    np.testing.assert_array_equal(images, imgs)
    np.testing.assert_array_equal(m, masks)
    r = causal_tests(iv.predict, Sample(images, [SKY_PLACE], m))
    assert r.rate_at("region:sky") == 1.0 and r.object_rate() == 0.0 and r.object().n == 8
    assert r.placebo("region:sky") is None  # 8 images can make no verdict: no placebo is spent on them
    assert r.placebo("region:sky") is None  # 8 images can make no verdict: no placebo is spent on them
    # the check above, base, object, background, sky; 3 whole-image identity edits (greyscale, hue, shift)
    # that flip none of the first 5 images (screen_early) and stop there
    assert iv.forwards == 8 * 5 + 5 * 3 == 8 + sum(r.forwards.values())
    # the check above, base, object, background, sky; 3 whole-image identity edits (greyscale, hue, shift)
    # that flip none of the first 5 images (screen_early) and stop there
    assert iv.forwards == 8 * 5 + 5 * 3 == 8 + sum(r.forwards.values())
    with pytest.raises(AuditError, match="job.json"):
        Intervener(tmp_path)


# ----------------------------------------------------------------------------
# Background transforms: a texture or a colour cast goes, the object is spared
# ----------------------------------------------------------------------------

S = 32


def textured(n, stripes, tint=False, seed=0):
    """Plain grey or striped backgrounds (period 4 px), an optional orange cast, and a dark square."""
    rng = np.random.default_rng(seed)
    imgs = np.full((n, S, S, 3), 128.0)
    masks = np.zeros((n, S, S), bool)
    for i in range(n):
        if stripes:
            imgs[i] = np.where((np.arange(S) // 2 % 2 == 0)[None, :, None], 60.0, 200.0)
        y, x = rng.integers(2, S - 10, 2)
        imgs[i, y:y + 8, x:x + 8] = 10.0
        masks[i, y:y + 8, x:x + 8] = True
        if tint:
            imgs[i] = imgs[i] * 0.55 + np.array([255.0, 150.0, 40.0]) * 0.45
    return imgs.astype(np.uint8), masks


def stripes_model(images):
    """1 when the image has strong fine horizontal variation (a texture), else 0."""
    f = images.astype(float).mean(axis=3)
    return (np.abs(np.diff(f, axis=2)).mean(axis=(1, 2)) > 15).astype(int)


def orange_model(images):
    """1 when red clearly exceeds blue on average (an orange cast), else 0."""
    m = images.reshape(len(images), -1, 3).astype(float).mean(axis=1)
    return (m[:, 0] - m[:, 2] > 60).astype(int)


def test_fine_blur_removes_a_texture_and_keeps_the_spared_object():
    imgs, masks = textured(4, stripes=True)
    spare = spare_masks((S, S), masks)
    out = transform(imgs, ~spare, "fine-blur")
    np.testing.assert_array_equal(out[spare], imgs[spare])  # the object and a ring around it: untouched
    off = ~spare
    assert np.abs(np.diff(out.astype(float), axis=2))[off[:, :, 1:]].mean() < 0.2 * \
        np.abs(np.diff(imgs.astype(float), axis=2))[off[:, :, 1:]].mean()
    assert (stripes_model(imgs) == 1).all() and (stripes_model(out) == 0).all()


def test_grey_world_removes_a_cast_and_keeps_brightness():
    imgs, masks = textured(3, stripes=False, tint=True)
    edit = ~spare_masks((S, S), masks)
    out = transform(imgs, edit, "colour-levels")
    bg = out[0][edit[0]].astype(float).mean(axis=0)
    assert np.ptp(bg) < 2  # every channel at the same mean
    lum_in, lum_out = imgs[0][edit[0]].astype(float).mean(), bg.mean()
    assert abs(lum_in - lum_out) < 2
    assert (orange_model(imgs) == 1).all() and (orange_model(out) == 0).all()
    plain, _ = textured(3, stripes=False)  # no cast: nothing to change
    assert np.abs(transform(plain, edit, "colour-levels").astype(int) - plain).max() <= 1
    # with the dataset's levels: a washed-out (hazy) image gets the typical contrast back
    hazy = (plain.astype(float) * 0.5 + 64).astype(np.uint8)
    lv = Levels.of(plain)
    back = transform(hazy, np.ones(hazy.shape[:3], bool), "colour-levels", lv)
    assert abs(Levels.of(back).std - lv.std) < 1 and abs(Levels.of(back).mean - lv.mean) < 1
    flat = transform(imgs, edit, "flat-grey")
    assert np.ptp(flat[0][edit[0]].astype(int), axis=0).max() == 0 and np.ptp(flat[0][edit[0]][0]) == 0
    assert abs(flat[0][edit[0]].astype(float).mean() - lum_in) < 1


def test_spare_masks_from_masks_or_from_each_image_own_heatmap():
    _, masks = textured(2, stripes=False)
    grown = spare_masks((S, S), masks)
    assert (grown >= masks).all() and grown.sum() > masks.sum()
    grids = np.zeros((2, 8, 8), np.float32)
    grids[0, 1, 2] = 1.0
    grids[1, 6, 6], grids[1, 0, 0] = 1.0, 0.4  # 0.4 < SPARE_HOT of the peak: not spared
    hot = spare_masks((S, S), grids=grids)
    assert hot.shape == (2, S, S)
    assert hot[0, 4:8, 8:12].all() and hot[0].sum() == 3 * 3 * 16  # the hot cell grown by one cell
    assert hot[1, 24:28, 24:28].all() and not hot[1, 0:4, 0:4].any()
    assert spare_masks((S, S)) is None


def test_texture_class_flips_under_the_blur_and_a_shape_class_does_not():
    imgs, masks = textured(16, stripes=True)
    res = causal_tests(stripes_model, Sample(imgs, [], masks, spare=spare_masks((S, S), masks)), DEFAULT.replace(screen=0))
    assert res.at("background:texture").flip_rate == 1.0
    assert res.at("image:colour").flip_rate == 0.0
    assert res.at("background:flat").flip_rate == 1.0
    sc, sm = scenes(16)
    shape = causal_tests(tank_model, Sample(sc, [], sm, spare=spare_masks((H, W), sm)), DEFAULT.replace(screen=0))
    assert shape.at("background:texture").flip_rate == 0.0
    with pytest.raises(AuditError, match="unknown transform"):
        transform(imgs, masks, "sharpen")
