"""``audit explain``: guided backprop against float64 NumPy, figures that are not blank, CLI errors."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import cv2
import keras
import numpy as np
import pytest

from audit.cli import main
from audit.engine import backprop as B
from audit.errors import AuditError
from audit.review import explain as E

# ----------------------------------------------------------------------------
# Guided backpropagation / deconvnet vs a hand-written float64 reference
# ----------------------------------------------------------------------------


def _tiny_relu_net(seed=0):
    """Every way a ReLU appears: fused in a Conv, a ReLU layer, an Activation layer."""
    keras.utils.set_random_seed(seed)
    init = keras.initializers.RandomNormal(stddev=0.7, seed=seed)
    inp = keras.Input((5, 5, 2))
    h = keras.layers.Conv2D(3, 2, activation="relu", kernel_initializer=init, bias_initializer=init, name="c1")(inp)
    h = keras.layers.Conv2D(4, 2, kernel_initializer=init, bias_initializer=init, name="c2")(h)
    h = keras.layers.ReLU(name="r2")(h)
    h = keras.layers.Flatten(name="flat")(h)
    h = keras.layers.Dense(6, kernel_initializer=init, bias_initializer=init, name="d1")(h)
    h = keras.layers.Activation("relu", name="a1")(h)
    out = keras.layers.Dense(3, activation="softmax", kernel_initializer=init, name="d2")(h)
    return keras.Model(inp, out)


def _conv(x, K, b):
    """'valid' stride-1 convolution (cross-correlation, as Keras), float64."""
    kh, kw, _, co = K.shape
    H, W = x.shape[0] - kh + 1, x.shape[1] - kw + 1
    y = np.zeros((H, W, co))
    for i in range(H):
        for j in range(W):
            y[i, j] = np.einsum("abc,abco->o", x[i:i + kh, j:j + kw], K) + b
    return y


def _conv_back(dy, K, in_shape):
    kh, kw = K.shape[:2]
    dx = np.zeros(in_shape)
    for i in range(dy.shape[0]):
        for j in range(dy.shape[1]):
            dx[i:i + kh, j:j + kw] += np.einsum("abco,o->abc", K, dy[i, j])
    return dx


def _reference(model, x, mode):
    """d logit_c / d x with the backward rule of ``mode`` at every ReLU, by hand."""
    w = {n: [v.numpy().astype(np.float64) for v in model.get_layer(n).weights] for n in ("c1", "c2", "d1", "d2")}

    def relu_back(z, g):
        if mode == "deconvnet":
            return np.maximum(g, 0)
        out = g * (z > 0)
        return out * (g > 0) if mode == "guided" else out

    x = x.astype(np.float64)
    z1 = _conv(x, *w["c1"])
    h1 = np.maximum(z1, 0)
    z2 = _conv(h1, *w["c2"])
    h2 = np.maximum(z2, 0)
    z3 = h2.reshape(-1) @ w["d1"][0] + w["d1"][1]
    h3 = np.maximum(z3, 0)
    logits = h3 @ w["d2"][0] + w["d2"][1]
    c = int(np.argmax(logits))
    g = w["d2"][0][:, c]
    g = relu_back(z3, g)
    g = (w["d1"][0] @ g).reshape(h2.shape)
    g = relu_back(z2, g)
    g = _conv_back(g, w["c2"][0], h1.shape)
    g = relu_back(z1, g)
    g = _conv_back(g, w["c1"][0], x.shape)
    masks = ((z1 > 0).mean(), (z2 > 0).mean(), (z3 > 0).mean())
    return c, g, masks


@pytest.fixture(scope="module")
def tiny():
    model = _tiny_relu_net()
    x = np.random.default_rng(3).normal(size=(3, 5, 5, 2)).astype(np.float32)
    return model, x


@pytest.mark.parametrize("mode", ["guided", "deconvnet", "gradient"])
def test_backward_rules_match_numpy_reference(tiny, mode):
    model, x = tiny
    gm = B.guided_model(model, mode)
    assert sorted(gm.replaced) == ["a1", "c1", "r2"]
    refs = [_reference(model, xi, mode) for xi in x]
    target = [r[0] for r in refs]
    got = B.input_gradients(gm, x, target)
    want = np.stack([r[1] for r in refs])
    # the network really has active and inactive units at every ReLU
    for r in refs:
        assert all(0 < m < 1 for m in r[2]), r[2]
    assert np.abs(want).max() > 1e-3
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6 * np.abs(want).max())


def test_guided_differs_from_plain_gradient_and_model_is_untouched(tiny):
    model, x = tiny
    before = model(x).numpy()
    acts = {layer.name: getattr(layer, "activation", None) for layer in model.layers}
    guided = B.input_gradients(B.guided_model(model, "guided"), x, [0, 1, 2])
    plain = B.input_gradients(B.guided_model(model, "gradient"), x, [0, 1, 2])
    assert not np.allclose(guided, plain)
    # the user's model: same layers, same activations, same outputs, ordinary gradients
    np.testing.assert_array_equal(model(x).numpy(), before)
    assert {layer.name: getattr(layer, "activation", None) for layer in model.layers} == acts
    assert [type(layer).__name__ for layer in model.layers] == [
        "InputLayer", "Conv2D", "Conv2D", "ReLU", "Flatten", "Dense", "Activation", "Dense"]


def test_nested_base_model_and_relu6():
    """A base model nested in the classifier, with ReLU6 (MobileNet): same gradients as flat."""
    keras.utils.set_random_seed(1)
    c1 = keras.layers.Conv2D(4, 3, padding="same", name="b_c1")
    r1 = keras.layers.ReLU(max_value=6.0, name="b_r1")
    c2 = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="b_c2")
    base = keras.Sequential([keras.Input((6, 6, 3)), c1, r1, c2], name="base")
    gap = keras.layers.GlobalAveragePooling2D(name="gap")
    dense = keras.layers.Dense(3, activation="softmax", name="head")
    inp = keras.Input((6, 6, 3))
    nested = keras.Model(inp, dense(gap(base(inp))))
    inp2 = keras.Input((6, 6, 3))
    flat = keras.Model(inp2, dense(gap(c2(r1(c1(inp2))))))
    x = np.random.default_rng(0).normal(scale=3.0, size=(2, 6, 6, 3)).astype(np.float32)
    gn = B.guided_model(nested, "guided")
    gf = B.guided_model(flat, "guided")
    assert gn.replaced == ["base/b_r1", "base/b_c2"]
    np.testing.assert_allclose(B.input_gradients(gn, x, [1, 2]), B.input_gradients(gf, x, [1, 2]), rtol=1e-5, atol=1e-7)
    # relu6: units above 6 pass no gradient
    z = np.array([-1.0, 0.5, 5.0, 7.0], np.float32)
    g = np.array([1.0, 1.0, -1.0, 1.0], np.float32)
    np.testing.assert_array_equal(np.asarray(B.guided_relu_grad(z, g, "gradient", max_value=6.0)), [0, 1, -1, 0])
    np.testing.assert_array_equal(np.asarray(B.guided_relu_grad(z, g, "guided", max_value=6.0)), [0, 1, 0, 0])
    np.testing.assert_array_equal(np.asarray(B.guided_relu_grad(z, g, "deconvnet")), [1, 1, 0, 1])


# ----------------------------------------------------------------------------
# Pure helpers
# ----------------------------------------------------------------------------


def test_affine_of_preprocessings():
    from audit.engine.models import preprocess

    u = np.random.default_rng(0).uniform(0, 255, (2, 4, 4, 3)).astype(np.float32)
    for mode in ("none", "scale_0_1", "scale_-1_1", "caffe", "torch"):
        M, b = B.affine_of(lambda a, m=mode: preprocess(a, m), 3)
        np.testing.assert_allclose(u @ M.T + b, preprocess(u, mode), rtol=1e-4, atol=1e-3)
    M, _ = B.affine_of(lambda a: preprocess(a, "caffe"), 3)
    np.testing.assert_allclose(M, np.eye(3)[::-1], atol=1e-5)  # RGB -> BGR
    assert B.affine_of(lambda a: np.sqrt(a), 3) is None


def test_feature_channel_normalisation_and_deprocess():
    a = np.arange(16, dtype=np.float32).reshape(4, 4)
    n = E.normalize_channel(a)
    z = (a - a.mean()) / a.std() * 64 + 128
    np.testing.assert_array_equal(n, np.uint8(np.clip(z, 0, 255)))
    assert not E.normalize_channel(np.full((3, 3), 2.0)).any()  # a dead channel is dark, not NaN
    d = E.deprocess(np.random.default_rng(0).normal(size=(8, 8, 3)) * 50 + 7)
    assert d.dtype == np.uint8 and abs(d.mean() - 127.5) < 3 and 20 < d.std() < 30  # std 0.1 * 255


def test_filter_patterns_increase_the_filter_activation():
    keras.utils.set_random_seed(2)
    inp = keras.Input((12, 12, 3))
    h = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="c1")(inp)
    h = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="c2")(h)
    model = keras.Model(inp, keras.layers.Dense(2)(keras.layers.GlobalAveragePooling2D()(h)))
    affine = (np.eye(3, dtype=np.float32) / 255.0, np.zeros(3, np.float32))  # scale_0_1
    start = B.filter_patterns(model, "c2", [0, 3], affine=affine, steps=0)
    end = B.filter_patterns(model, "c2", [0, 3], affine=affine, steps=20)
    fm = keras.Model(model.input, model.get_layer("c2").output)
    a0 = fm(start / 255.0).numpy().mean(axis=(1, 2))
    a1 = fm(end / 255.0).numpy().mean(axis=(1, 2))
    for row, f in enumerate([0, 3]):
        assert a1[row, f] > a0[row, f] + 1e-3
    # each step moves the image by at most one grey level RMS (normalised gradient)
    rms = np.sqrt(((end - start) ** 2).mean(axis=(1, 2, 3)))
    assert np.all((rms > 1) & (rms <= 20.01))
    one = B.filter_patterns(model, "c2", [0], affine=affine, steps=1)
    np.testing.assert_allclose(np.sqrt(((one - start[:1]) ** 2).mean()), 1.0, rtol=1e-3)


# ----------------------------------------------------------------------------
# The figures
# ----------------------------------------------------------------------------


def _residual_gap_model(path):
    keras.utils.set_random_seed(0)
    inp = keras.Input((24, 24, 3))
    h = keras.layers.Conv2D(6, 3, padding="same", activation="relu", name="c1")(inp)
    h = keras.layers.Conv2D(6, 3, padding="same", name="c2")(h)
    h = keras.layers.Activation("relu", name="r2")(h)
    h = keras.layers.Add(name="add")([h, keras.layers.Conv2D(6, 1, name="skip")(inp)])
    h = keras.layers.ReLU(name="out")(h)
    out = keras.layers.Dense(3, activation="softmax", name="pred")(keras.layers.GlobalAveragePooling2D()(h))
    model = keras.Model(inp, out)
    model.save(path)
    return model


def _images(folder, n=2):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        img = np.full((30, 26, 3), 100, np.uint8)
        cv2.circle(img, (10 + 6 * i, 14), 7, (40, 200, 250), -1)
        img = np.clip(img.astype(int) + rng.integers(-20, 20, img.shape), 0, 255).astype(np.uint8)
        p = folder / f"img{i}.png"
        cv2.imwrite(str(p), img)
        paths.append(p)
    return paths


@pytest.fixture(scope="module")
def explained(tmp_path_factory):
    d = tmp_path_factory.mktemp("explain")
    model = _residual_gap_model(d / "m.keras")
    paths = _images(d)
    index = E.explain(model, paths, d / "out", preprocess_mode="scale_0_1", filters=3, steps=5,
                      classes=["a", "b", "c"])
    return model, paths, index


def test_default_layers_follow_the_seeds(explained):
    from audit.engine import graph

    model = explained[0]
    t = graph.trace(model)
    # last conv before the automatic layer, the last merge, the automatic layer
    assert E.default_layers(t) == ["skip", "add", "out"]
    # first conv, a trunk layer half-way down (not the side branch), the automatic layer
    assert E.default_feature_layers(t) == ["c1", "add", "out"]
    # a plain CNN (no merge, the automatic layer is the last conv): compare with the conv before
    plain = keras.Sequential([keras.Input((16, 16, 3)), keras.layers.Conv2D(2, 3, name="k1"),
                              keras.layers.Conv2D(2, 3, name="k2"), keras.layers.MaxPooling2D(),
                              keras.layers.Conv2D(2, 3, name="k3"), keras.layers.Flatten(),
                              keras.layers.Dense(2)])
    assert E.default_layers(graph.trace(plain)) == ["k2", "k3"]


def test_explain_figures_exist_and_are_not_blank(explained):
    _, paths, index = explained
    out = index.parent
    pngs = sorted(p.name for p in out.glob("*.png"))
    expected = {f"{i:02d}_img{i}_{kind}.png" for i in range(2) for kind in ("cams", "gradients")}
    expected |= {f"{i:02d}_img{i}_features_{layer}.png" for i in range(2) for layer in ("c1", "add", "out")}
    expected |= {"filters_c1.png", "patterns_c1.png", "patterns_add.png", "patterns_out.png"}
    assert set(pngs) == expected
    html = index.read_text()
    for name in pngs:
        assert f'src="{name}"' in html
        img = cv2.imread(str(out / name))
        assert img is not None and img.shape[0] > 20 and img.shape[1] > 20, name
        assert img.astype(np.float64).var() > 50, f"{name} looks blank"
    assert "pred" in html and "guided" in html
    # the CAM grid: header + 3 layer rows, 1 + 5 columns (gradcam, gradcam++, cam, guided-gradcam... )
    grid = cv2.imread(str(out / "00_img0_cams.png"))
    assert grid.shape[1] > 5 * 160


def test_cam_overlays_differ_between_images(explained):
    out = explained[2].parent
    a = cv2.imread(str(out / "00_img0_cams.png")).astype(np.float64)
    b = cv2.imread(str(out / "01_img1_cams.png")).astype(np.float64)
    assert a.shape == b.shape and np.abs(a - b).mean() > 1.0


# ----------------------------------------------------------------------------
# Command line: one-line errors
# ----------------------------------------------------------------------------


def test_cli_bad_input_is_one_line_error(explained, tmp_path, capsys):
    model_path = explained[1][0].parent / "m.keras"
    img = str(explained[1][0])
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    cases = [
        ([str(model_path), str(tmp_path / "missing.png")], "image not found"),
        ([str(model_path), str(bad)], "cannot decode image"),
        ([str(model_path), img, "--layers", "nope"], "unknown layer 'nope'; the model's layers: c1"),  # from the file, before TF
        ([str(model_path), img, "--methods", "gradcam", "bogus"], "unknown method 'bogus'"),
        ([str(model_path), img, "--methods", "cam", "--layers", "add"], "needs a GlobalAveragePooling2D"),
        ([str(tmp_path / "nomodel.keras"), img], "model file not found"),
        ([str(model_path), img, "--target", "3"], "target class 3 is out of range: the model has 3 classes (0..2)"),
        ([str(model_path), img, "--classes", "a", "b"], "2 class names given but the model has 3 classes"),
        ([str(model_path), img, "--filters", "-1"], "--filters must be at least 0"),
        ([str(model_path), img, "--input-size", "0", "24"], "--input-size must be two integers >= 1"),
        ([str(model_path), img, "--out", str(bad)], "exists and is not a directory"),
        (["--application", "MobileNetV2", "--input-size", "8", "8", img], "cannot build MobileNetV2: Input size"),
    ]
    for args, msg in cases:
        rc = main(["explain", "--out", str(tmp_path / "o"), *args])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2, args
        assert len(err) == 1 and err[0].startswith("audit: error: ") and msg in err[0], (args, err)


def test_cli_explain_runs(explained, tmp_path, capsys):
    model_path = explained[1][0].parent / "m.keras"
    rc = main(["explain", str(model_path), str(explained[1][1]), "--out", str(tmp_path / "o"),
               "--preprocess", "scale_0_1", "--layers", "out", "--methods", "gradcam,guided",
               "--filters", "0"])
    assert rc == 0
    assert "index.html" in capsys.readouterr().out
    names = sorted(p.name for p in (tmp_path / "o").glob("*.png"))
    assert "00_img1_cams.png" in names and not any(n.startswith("patterns_") for n in names)


def test_explain_rejects_unknown_method(explained, tmp_path):
    with pytest.raises(AuditError, match="unknown method"):
        E.explain(explained[0], explained[1], tmp_path, methods=["nope"])
