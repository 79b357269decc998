"""Automatic target-layer choice, nested models, and `audit layers`."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import pytest

from audit import AuditError
from audit.cli import main
from audit.engine import graph

A = keras.applications


# VGG16, ResNet50, InceptionV3 and MobileNetV2 (and the reason given) are checked with their maps
# by tests/test_applications.py in the quick loop too; DenseNet121 is slow there, so here as well
@pytest.mark.parametrize(("build", "size", "expected"), [(A.DenseNet121, 64, "relu")], ids=["densenet121"])
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


# ---------------------------------------------------------------------------
# Spatial target layers only (h x w > 1)
# ---------------------------------------------------------------------------


def _ends_in_1x1():
    """A net whose last conv is 1x1 (MobileNet's conv_preds in miniature)."""
    return keras.Sequential([
        keras.Input((8, 8, 3)),
        keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="c1"),
        keras.layers.Conv2D(4, 3, strides=2, padding="same", activation="relu", name="c2"),
        keras.layers.Conv2D(3, 4, name="preds"),  # 4x4 -> 1x1
        keras.layers.Flatten(),
        keras.layers.Softmax(),
    ])


def test_one_by_one_layer_is_skipped_and_refused_by_name():
    t = graph.trace(_ends_in_1x1())
    assert graph.auto_layer(t)[0].path == "c2"
    assert [c.path for c in graph.candidates(t)] == ["c1", "c2"]
    with pytest.raises(AuditError) as e:
        graph.resolve_layers(t, ["preds"])
    msg = str(e.value)
    assert len(msg.splitlines()) == 1
    assert "'preds'" in msg and "1x1" in msg and "automatic choice is 'c2'" in msg


def test_mobilenet_with_top_gets_its_last_spatial_layer_not_conv_preds():
    keras.backend.clear_session()
    model = A.MobileNet(weights=None, input_shape=(64, 64, 3), classes=3)
    t = graph.trace(model)
    assert t.by_path()["conv_preds"].shape[1:3] == (1, 1)
    assert graph.auto_layer(t)[0].path == "conv_pw_13_relu"
    with pytest.raises(AuditError, match=r"'conv_preds' cannot be a target layer: .*1x1.*'conv_pw_13_relu'"):
        graph.resolve_layers(t, ["conv_preds"])


def test_small_input_falls_back_to_the_deepest_map_bigger_than_1x1():
    """ResNet50 at 32 px: conv5 is 1x1, so the choice is the last block of conv4 (2x2)."""
    t = graph.trace(A.ResNet50(weights=None, input_shape=(32, 32, 3), classes=3))
    assert t.by_path()["conv5_block3_out"].shape[1:3] == (1, 1)
    call = graph.auto_layer(t)[0]
    assert call.path == "conv4_block6_out" and call.shape[1:3] == (2, 2)


def test_no_map_bigger_than_1x1_says_use_a_larger_input():
    model = keras.Sequential([keras.Input((3, 3, 3)), keras.layers.Conv2D(4, 3, name="only"),
                              keras.layers.Flatten(), keras.layers.Dense(2)])
    with pytest.raises(AuditError, match=r"'only', is 1x1: use a larger input size"):
        graph.auto_layer(graph.trace(model))


def test_cli_layers_lists_1x1_layers_as_not_usable(tmp_path, capsys):
    path = tmp_path / "m.keras"
    _ends_in_1x1().save(path)
    assert main(["layers", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    (preds,) = [ln for ln in lines if ln.split()[:1] == ["preds"]]
    assert "not usable" in preds and "1x1" in preds
    assert [ln.split()[1] for ln in lines if ln.startswith("*")] == ["c2"]


# ---------------------------------------------------------------------------
# Token grids (vision transformers): the rule as a case table
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tokens", "earlier", "given", "expected"),
    [
        (197, [], None, graph.TokenGrid(1, 14, 14)),  # ViT-B/16 at 224: class token + 14x14
        (201, [], None, graph.TokenGrid(5, 14, 14)),  # class token + 4 registers
        (196, [], None, graph.TokenGrid(0, 14, 14)),  # no class token (GAP head)
        (141, [(56, 56), (14, 10)], None, graph.TokenGrid(1, 14, 10)),  # patch embedding's grid
        (141, [], None, graph.TokenGrid(20, 11, 11)),  # without it: the largest square
        (50, [(7, 7)], (5, 10), graph.TokenGrid(0, 5, 10)),  # given in the spec: wins
        (50, [], (8, 8), None),  # given grid needs more tokens than there are
        (3, [], None, None),  # too few tokens for a 2x2 grid
        (None, [], None, None),  # unknown length
    ],
)
def test_find_grid(tokens, earlier, given, expected):
    assert graph.find_grid(tokens, earlier, given) == expected


def test_keras_application_nested_in_a_larger_model():
    """MobileNetV2 as the base of a Sequential: its layers are named 'mobilenetv2_.../...'."""
    base = A.MobileNetV2(include_top=False, weights=None, input_shape=(64, 64, 3))
    seq = keras.Sequential([keras.Input((64, 64, 3)), base, keras.layers.GlobalAveragePooling2D(),
                            keras.layers.Dense(3, activation="softmax")])
    assert graph.auto_layer(graph.trace(seq))[0].path == f"{base.name}/out_relu"
    # a nested MobileNet with its top: the 1x1 conv_preds inside it is refused by name too
    top = A.MobileNet(weights=None, input_shape=(64, 64, 3), classes=3)
    inp = keras.Input((64, 64, 3))
    outer = keras.Model(inp, top(keras.layers.Rescaling(1 / 127.5, offset=-1)(inp)))
    t = graph.trace(outer)
    assert graph.auto_layer(t)[0].path == f"{top.name}/conv_pw_13_relu"
    with pytest.raises(AuditError, match=rf"'conv_preds' cannot be a target layer: .*1x1.*'{top.name}/conv_pw_13_relu'"):
        graph.resolve_layers(t, ["conv_preds"])
