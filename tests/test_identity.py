"""Edits that keep the object's identity: a colour-on-the-object model is flagged, a shape model is not."""

import numpy as np
import pytest

from audit.scan.config import DEFAULT
from audit.scan.probes import PROBES, Sample, causal_tests
from audit.scan.probes.edits import attribute, luminance, spare_masks
from audit.scan.verdict import _cue_name, causal_cue, placebo_rates

S = 16
CFG = DEFAULT.replace(screen=0)
RED, GREEN, BLUE = (220, 30, 30), (30, 200, 30), (40, 60, 220)


def strokes(n, rng, shape=None):
    """Objects on black: a bar (horizontal or vertical, ``shape`` 0/1, random when None) at a random place."""
    imgs = np.zeros((n, S, S, 3), np.uint8)
    masks = np.zeros((n, S, S), bool)
    for i in range(n):
        k = rng.integers(0, 2) if shape is None else shape
        h, w = (3, 9) if k == 0 else (9, 3)
        y, x = rng.integers(1, S - h), rng.integers(1, S - w)
        masks[i, y:y + h, x:x + w] = True
    return imgs, masks


def paint(imgs, masks, colours, rng):
    out = imgs.copy()
    for i in range(len(out)):
        c = np.array(colours[i]) + rng.integers(-20, 20, 3)
        out[i][masks[i]] = np.clip(c, 0, 255)
    return out


def dataset(kind, n, seed):
    """``colour``: class 0 red, class 1 green, the same bars; ``shape``: class 0 horizontal bars, class 1
    vertical, colours random."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    if kind == "colour":
        imgs, masks = strokes(n, rng)
        return paint(imgs, masks, [RED if c == 0 else GREEN for c in y], rng), masks, y
    imgs, masks = np.zeros((n, S, S, 3), np.uint8), np.zeros((n, S, S), bool)
    for c in (0, 1):
        imgs[y == c], masks[y == c] = strokes(int((y == c).sum()), rng, c)
    pick = [(RED, GREEN, BLUE)[k] for k in rng.integers(0, 3, n)]
    return paint(imgs, masks, pick, rng), masks, y


@pytest.fixture(scope="module")
def models():
    import keras

    keras.utils.set_random_seed(0)
    out = {}
    for kind in ("colour", "shape"):
        x, _, y = dataset(kind, 400, 1)
        m = keras.Sequential([keras.Input((S, S, 3)), keras.layers.Conv2D(8, 3, activation="relu"),
                              keras.layers.Conv2D(8, 3, activation="relu"), keras.layers.GlobalMaxPooling2D(),
                              keras.layers.Dense(2)])
        m.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
        m.fit(x / 255.0, y, epochs=30, batch_size=32, verbose=0)
        out[kind] = lambda imgs, m=m: np.argmax(m.predict(np.asarray(imgs, np.float32) / 255.0, verbose=0), axis=1)
    return out


def findings(predict, kind, masked: bool):
    """{class: CueFinding at the interval end least favourable to a flag} from each class's own sample."""
    x, masks, y = dataset(kind, 96, 2)
    results = {}
    for c in (0, 1):
        keep = (y == c) & (predict(x) == c)
        xs, ms = x[keep][:32], masks[keep][:32]
        spare = spare_masks((S, S), ms) if masked else spare_masks((S, S), grids=ms.reshape(-1, 8, 2, 8, 2).mean((2, 4)))
        results[c] = causal_tests(predict, Sample(xs, [], ms if masked else None, spare=spare), CFG)
    out = {}
    for c, res in results.items():
        out[c] = causal_cue(res, placebo_rates([results[1 - c]]), DEFAULT, mode=-1)  # the other class's upper end
    return out


def test_attribute_edits_hand_values():
    img = np.zeros((1, 2, 2, 3), np.uint8)
    img[0, 0, 0] = (200, 100, 0)
    m = np.ones((1, 2, 2), bool)
    grey = attribute(img, m, "greyscale")
    assert tuple(grey[0, 0, 0]) == (round(0.299 * 200 + 0.587 * 100),) * 3
    assert tuple(attribute(img, m, "permute")[0, 0, 0]) == (100, 0, 200)
    c = attribute(img, m, "contrast").astype(float)
    mean = img[0].reshape(-1, 3).mean(axis=0)
    np.testing.assert_allclose(c[0, 0, 0], np.clip(np.rint((img[0, 0, 0] - mean) * 0.5 + mean), 0, 255))
    assert tuple(attribute(img, m, "darken")[0, 0, 0]) == (120, 60, 0)
    one = np.full((1, 2, 2, 1), 90, np.uint8)
    np.testing.assert_array_equal(attribute(one, m, "greyscale"), one)  # one channel: nothing to take away
    assert luminance(np.array([[255.0, 255.0, 255.0]]))[0] == pytest.approx(255.0)


@pytest.mark.parametrize("masked", [True, False])
def test_colour_on_the_object_is_flagged_with_its_cue(models, masked):
    got = findings(models["colour"], "colour", masked)
    flagged = {c: f for c, f in got.items() if f.score >= 0.5}
    assert flagged, {c: (f.score, f.flip and f.flip.place) for c, f in got.items()}
    for f in flagged.values():
        assert _cue_name(f.flip) in ("colour of the object", "colour")


@pytest.mark.parametrize("masked", [True, False])
def test_a_shape_model_survives_every_identity_edit(models, masked):
    got = findings(models["shape"], "shape", masked)
    assert all(f.score < 0.5 for f in got.values()), {c: (f.score, f.flip and f.flip.place) for c, f in got.items()}


def test_identity_probes_are_registered_with_their_places():
    places = {p.place for p in PROBES.values() if p.keeps_identity}
    assert {"object:greyscale", "image:greyscale", "object:hue", "background:greyscale", "image:hue"} == places
