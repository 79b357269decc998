"""Model loading (safe mode, .h5, applications with local weights) and preprocessing."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np
import pytest

from audit import AuditError
from audit.engine.models import input_size_of, load_model, preprocess


def _small():
    keras.utils.set_random_seed(0)
    inp = keras.Input((12, 10, 3))
    h = keras.layers.Conv2D(3, 3, activation="relu")(inp)
    h = keras.layers.GlobalAveragePooling2D()(h)
    return keras.Model(inp, keras.layers.Dense(2, activation="softmax")(h))


def test_keras_and_h5_round_trip(tmp_path):
    m = _small()
    x = np.random.default_rng(0).random((2, 12, 10, 3)).astype("float32")
    for name in ("m.keras", "m.h5"):
        m.save(tmp_path / name)
        loaded = load_model(tmp_path / name)
        np.testing.assert_allclose(loaded.predict(x, verbose=0), m.predict(x, verbose=0), rtol=1e-6)
        assert input_size_of(loaded) == (12, 10)


def test_lambda_layer_refused_unless_trusted(tmp_path):
    inp = keras.Input((8, 8, 3))
    h = keras.layers.Lambda(lambda t: t * 2.0)(inp)
    h = keras.layers.Conv2D(2, 3)(h)
    model = keras.Model(inp, keras.layers.Dense(2)(keras.layers.Flatten()(h)))
    path = tmp_path / "lambda.keras"
    model.save(path)
    with pytest.raises(AuditError, match="trust_code"):
        load_model(path)
    assert load_model(path, trust_code=True) is not None


def test_clear_errors_for_bad_files(tmp_path):
    with pytest.raises(AuditError, match="not found"):
        load_model(tmp_path / "nope.keras")
    junk = tmp_path / "junk.keras"
    junk.write_bytes(b"not a zip file at all")
    with pytest.raises(AuditError, match="is not a Keras model: a .keras model file is a zip file, this one is a text"):
        load_model(junk)
    (tmp_path / "saved").mkdir()
    with pytest.raises(AuditError, match="SavedModel"):
        load_model(tmp_path / "saved")
    with pytest.raises(AuditError, match="unknown keras.applications"):
        load_model(application="ResNet9000")
    with pytest.raises(AuditError, match="cannot build MobileNetV2"):
        load_model(application="MobileNetV2", input_size=(8, 8))


def test_application_with_local_weights_file(tmp_path):
    a = load_model(application="MobileNetV2", input_size=(32, 32), num_classes=3)
    wpath = tmp_path / "mnv2.weights.h5"
    a.save_weights(wpath)
    b = load_model(application="MobileNetV2", input_size=(32, 32), num_classes=3, weights=wpath)
    x = np.random.default_rng(0).random((1, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(b.predict(x, verbose=0), a.predict(x, verbose=0), rtol=1e-5)
    with pytest.raises(AuditError, match="weights file not found"):
        load_model(application="MobileNetV2", weights=tmp_path / "missing.h5")


def test_preprocess_modes():
    img = np.array([[[0, 127.5, 255]]], np.float32)[None]  # (1, 1, 1, 3) RGB
    np.testing.assert_allclose(preprocess(img, "none"), img)
    np.testing.assert_allclose(preprocess(img, "scale_0_1")[0, 0, 0], [0, 0.5, 1])
    np.testing.assert_allclose(preprocess(img, "scale_-1_1")[0, 0, 0], [-1, 0, 1])
    # caffe: RGB -> BGR, minus the ImageNet BGR mean
    np.testing.assert_allclose(preprocess(img, "caffe")[0, 0, 0], [255 - 103.939, 127.5 - 116.779, 0 - 123.68],
                               rtol=1e-6)
    torch = (np.array([0, 0.5, 1]) - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
    np.testing.assert_allclose(preprocess(img, "torch")[0, 0, 0], torch, rtol=1e-5)
    # a keras.applications module name: mobilenet_v2 scales to [-1, 1]
    np.testing.assert_allclose(preprocess(img, "mobilenet_v2")[0, 0, 0], [-1, 0, 1], atol=1e-6)
    with pytest.raises(AuditError, match="unknown preprocess"):
        preprocess(img, "sharpen")


def test_a_model_that_takes_any_size_is_fixed_to_the_input_size(tmp_path):
    from audit.engine.models import with_input_size

    keras.utils.set_random_seed(1)
    inp = keras.Input((None, None, 3))
    h = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="c1")(inp)
    h = keras.layers.GlobalAveragePooling2D(name="gap")(h)
    functional = keras.Model(inp, keras.layers.Dense(2, activation="softmax", name="head")(h))
    sequential = keras.Sequential([keras.Input((None, None, 1)), keras.layers.Conv2D(3, 3, name="c1"),
                                   keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(2, name="head")])
    for m, ch in ((functional, 3), (sequential, 1)):
        m.save(tmp_path / "any.keras")
        loaded = load_model(tmp_path / "any.keras")
        with pytest.raises(AuditError, match="accepts any image size; set model.input_size"):
            input_size_of(loaded)
        fixed = with_input_size(loaded, (12, 10))
        assert input_size_of(fixed) == (12, 10) and tuple(fixed.inputs[0].shape) == (None, 12, 10, ch)
        assert [ly.name for ly in fixed.layers] == [ly.name for ly in loaded.layers]  # spec layer names apply
        x = np.random.default_rng(0).random((3, 12, 10, ch)).astype("float32")
        np.testing.assert_array_equal(fixed.predict(x, verbose=0), loaded.predict(x, verbose=0))
        # load_model does the same when given the size
        assert tuple(load_model(tmp_path / "any.keras", input_size=(12, 10)).inputs[0].shape) == (None, 12, 10, ch)
    # a model with a fixed size is left as it is
    small = _small()
    assert with_input_size(small, (5, 5)) is small
