"""Automatic target-layer choice, nested models, and `audit layers`."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import pytest

from audit import AuditError
from audit.cli import main
from audit.engine import graph

A = keras.applications


@pytest.mark.parametrize(
    ("build", "size", "expected"),
    [
        (A.VGG16, 32, "block5_conv3"),
        (A.ResNet50, 32, "conv5_block3_out"),
        (A.InceptionV3, 75, "mixed10"),
        (A.DenseNet121, 32, "relu"),
        (A.MobileNetV2, 32, "out_relu"),
    ],
    ids=["vgg16", "resnet50", "inceptionv3", "densenet121", "mobilenetv2"],
)
def test_auto_layer_on_applications(build, size, expected):
    model = build(weights=None, input_shape=(size, size, 3), classes=3)
    call, why = graph.auto_layer(graph.trace(model))
    assert call.path == expected
    assert "every" in why


def _tiny_base():
    inp = keras.Input((16, 16, 3))
    a = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="a")(inp)
    b1 = keras.layers.Conv2D(4, 3, padding="same", name="b1")(a)
    b2 = keras.layers.Conv2D(4, 1, padding="same", name="b2")(a)
    m = keras.layers.Add(name="merge")([b1, b2])
    r = keras.layers.ReLU(name="out_relu")(m)
    return keras.Model(inp, r, name="base")


def test_branches_skip_layers_inside_a_branch():
    base = _tiny_base()
    t = graph.trace(base)
    assert graph.auto_layer(t)[0].path == "out_relu"
    calls = t.by_path()
    # b1 and b2 lie on one branch each; 'a' and 'merge' are on every path
    assert not graph.through_every_path(t, calls["b1"])
    assert graph.through_every_path(t, calls["a"])
    assert graph.through_every_path(t, calls["merge"])


def test_sequential_model_and_pooling_is_skipped():
    model = keras.Sequential([
        keras.Input((16, 16, 1)),
        keras.layers.Conv2D(4, 3, activation="relu", name="c1"),
        keras.layers.Conv2D(4, 3, activation="relu", name="c2"),
        keras.layers.MaxPooling2D(name="pool"),
        keras.layers.ZeroPadding2D(name="pad"),
        keras.layers.Flatten(),
        keras.layers.Dense(2),
    ])
    assert graph.auto_layer(graph.trace(model))[0].path == "c2"


def test_nested_base_in_sequential_and_functional():
    base = _tiny_base()
    seq = keras.Sequential([keras.Input((16, 16, 3)), base, keras.layers.GlobalAveragePooling2D(),
                            keras.layers.Dense(2, activation="softmax")])
    assert graph.auto_layer(graph.trace(seq))[0].path == "base/out_relu"

    inp = keras.Input((16, 16, 3))
    h = keras.layers.Rescaling(1 / 255.0)(inp)
    h = base(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    out = keras.layers.Dense(2)(h)
    fn = keras.Model(inp, out)
    t = graph.trace(fn)
    assert graph.auto_layer(t)[0].path == "base/out_relu"
    assert graph.resolve_layers(t, ["base/merge", "a"]) == ["base/merge", "base/a"]


def test_explainer_on_nested_model_matches_flat_model():
    """Grad-CAM of a layer inside a nested base equals that of the same layer in a flat copy."""
    import numpy as np

    from audit.engine.explainer import Explainer

    keras.utils.set_random_seed(0)
    base = _tiny_base()
    head = keras.layers.Dense(3, activation="softmax")
    seq = keras.Sequential([keras.Input((16, 16, 3)), base, keras.layers.GlobalAveragePooling2D(), head])
    inp = keras.Input((16, 16, 3))
    out = head(keras.layers.GlobalAveragePooling2D()(base(inp)))
    x = np.random.default_rng(0).random((3, 16, 16, 3)).astype("float32")
    nested = Explainer(seq, methods=("gradcam", "cam"), batch_size=3)(x)
    # flat reference: A from the base, weights from the head kernel
    A = base(x).numpy()
    k = head.kernel.numpy()
    c = seq.predict(x, verbose=0).argmax(1)
    cam = np.maximum(np.einsum("nhwk,kn->nhw", A, k[:, c]), 0)
    np.testing.assert_allclose(nested.maps[("base/out_relu", "cam")], cam, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(nested.maps[("base/out_relu", "gradcam")], cam / 256, rtol=1e-4, atol=1e-7)
    del inp, out


def test_unknown_layer_lists_candidates():
    t = graph.trace(_tiny_base())
    with pytest.raises(AuditError, match=r"unknown layer 'nope'.*out_relu"):
        graph.resolve_layers(t, ["nope"])


def test_no_spatial_layer_is_a_clear_error():
    model = keras.Sequential([keras.Input((10,)), keras.layers.Dense(3)])
    with pytest.raises(AuditError, match="spatial"):
        graph.auto_layer(graph.trace(model))


def test_cli_layers_marks_the_choice(tmp_path, capsys):
    path = tmp_path / "base.keras"
    _tiny_base().save(path)
    assert main(["layers", str(path)]) == 0
    out = capsys.readouterr().out
    marked = [line for line in out.splitlines() if line.startswith("*")]
    assert len(marked) == 1 and "out_relu" in marked[0] and "all paths" in marked[0]
    assert "automatic choice: out_relu" in out
    assert main(["layers", str(tmp_path / "missing.keras")]) == 2
    assert "not found" in capsys.readouterr().err
    for args, words in ((["--application", "MobileNetV2", "--input-size", "8", "8"], "cannot build MobileNetV2"),
                        ([str(path), "--input-size", "0", "16"], "--input-size must be two integers >= 1"),
                        ([], "give a model file or --application")):
        assert main(["layers", *args]) == 2, args
        e = capsys.readouterr().err.strip()
        assert e.startswith("audit: error: ") and words in e and len(e.splitlines()) == 1, (args, e)
