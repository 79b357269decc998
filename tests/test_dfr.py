"""DFR: the group-balanced subset, the regression folded into a Dense layer, a re-trained tiny model."""

from __future__ import annotations

import numpy as np
import pytest

from audit.scan import dfr


def test_balanced_takes_the_smallest_group_from_each():
    y = np.array([0] * 10 + [1] * 10)
    place = np.array([0] * 8 + [1] * 2 + [1] * 7 + [0] * 3)
    idx = dfr.balanced(y, place)
    got = {(a, b): int(((y[idx] == a) & (place[idx] == b)).sum()) for a in (0, 1) for b in (0, 1)}
    assert got == {(0, 0): 2, (0, 1): 2, (1, 0): 2, (1, 1): 2} and len(set(idx)) == 8


@pytest.mark.parametrize("classes", [2, 3])
def test_head_weights_equal_the_regression(classes):
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    x = rng.normal(size=(90, 5)) * [1, 2, 3, 0.5, 4] + [0, 1, -1, 2, 0]
    y = rng.integers(0, classes, 90)
    x[:, 0] += y  # some signal
    mean, std = x.mean(0), x.std(0)
    lr = LogisticRegression(max_iter=2000).fit((x - mean) / std, y)
    W, b = dfr.head_weights(lr.coef_, lr.intercept_, mean, std, classes)
    z = x @ W.astype(np.float64) + b
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    np.testing.assert_allclose(p, lr.predict_proba((x - mean) / std), atol=1e-5)


def test_retrain_a_tiny_model_follows_the_balanced_groups(tmp_path):
    """A model that says "dog" by a white corner; DFR on balanced groups moves it to the object's brightness."""
    import keras

    keras.utils.set_random_seed(0)
    inp = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 1, activation="relu", name="conv")(inp)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inp, keras.layers.Dense(2, activation="softmax", name="head")(x))
    rng = np.random.default_rng(1)
    n = 80
    y = np.repeat([0, 1], n // 2)
    place = np.tile([0, 1], n // 2)  # half of each class carries the mark
    imgs = rng.integers(0, 60, (n, 8, 8, 3)).astype(np.uint8)
    imgs[y == 1, 2:6, 2:6] += 120  # the true signal: a brighter object for dogs
    imgs[place == 1, 6:, 6:] = 255  # the mark on both classes
    res = dfr.retrain(model, imgs, y, place, preprocess="scale_0_1")
    assert res.groups == {(0, 0): 20, (0, 1): 20, (1, 0): 20, (1, 1): 20}
    pred = res.model.predict(imgs.astype(np.float32) / 255, verbose=0).argmax(1)
    acc = {(a, b): float((pred[(y == a) & (place == b)] == a).mean()) for a in (0, 1) for b in (0, 1)}
    assert min(acc.values()) >= 0.9, acc  # every group, the marked and unmarked alike
    # the body is unchanged: only the head was re-fitted
    np.testing.assert_array_equal(res.model.get_layer("conv").get_weights()[0], model.get_layer("conv").get_weights()[0])
