"""The CAM engine against float64 NumPy references computed from A and dS/dA."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np
import pytest

from audit import AuditError
from audit.engine.explainer import Explainer

H = W = 8


def _flatten_head_model(head="fused", seed=0):
    """conv -> conv (target) -> Flatten -> Dense(relu) -> Dense(3) with a chosen softmax style."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input((H, W, 3))
    h = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="c1")(inp)
    h = keras.layers.Conv2D(5, 3, padding="same", activation="relu", name="c2")(h)
    h = keras.layers.Flatten(name="flat")(h)
    h = keras.layers.Dense(7, activation="relu", name="d1")(h)
    if head == "fused":
        out = keras.layers.Dense(3, activation="softmax", name="d2")(h)
    elif head == "separate":
        out = keras.layers.Dense(3, name="d2")(h)
        out = keras.layers.Activation("softmax", name="prob")(out)
    else:  # logits
        out = keras.layers.Dense(3, name="d2")(h)
    return keras.Model(inp, out)


def _reference(model, x, target=None):
    """float64 NumPy: A from the conv part, logits and dS/dA by hand through the Dense head."""
    A = keras.Model(model.input, model.get_layer("c2").output)(x).numpy().astype(np.float64)
    W1, b1 = (v.numpy().astype(np.float64) for v in model.get_layer("d1").weights)
    W2, b2 = (v.numpy().astype(np.float64) for v in model.get_layer("d2").weights)
    n = len(x)
    f = A.reshape(n, -1)
    z1 = f @ W1 + b1
    logits = np.maximum(z1, 0) @ W2 + b2
    c = logits.argmax(1) if target is None else np.full(n, target)
    g = ((z1 > 0) * W2[:, c].T) @ W1.T  # dS_c/df, per sample
    g = g.reshape(A.shape)
    # Grad-CAM (Selvaraju et al. 2017)
    w = g.mean(axis=(1, 2))
    gradcam = np.maximum(np.einsum("nhwk,nk->nhw", A, w), 0)
    # Grad-CAM++ closed form (Chattopadhyay et al. 2018, eq. 19)
    s = A.sum(axis=(1, 2), keepdims=True)
    den = 2 * g**2 + s * g**3
    alpha = np.where(den != 0, g**2 / np.where(den != 0, den, 1), 0)
    wpp = (alpha * np.maximum(g, 0)).sum(axis=(1, 2))
    gradcampp = np.maximum(np.einsum("nhwk,nk->nhw", A, wpp), 0)
    return logits, c, gradcam, gradcampp


@pytest.fixture(scope="module")
def x():
    return np.random.default_rng(1).random((6, H, W, 3)).astype(np.float32)


@pytest.mark.parametrize("head", ["fused", "separate", "logits"])
def test_gradcam_and_plusplus_match_numpy_reference(head, x):
    model = _flatten_head_model(head)
    ex = Explainer(model, layers=["c2"], methods=("gradcam", "gradcam++"), batch_size=4)
    res = ex(x)
    logits, c, ref_gc, ref_pp = _reference(model, x)
    np.testing.assert_array_equal(res.pred, c)
    np.testing.assert_array_equal(res.target, c)
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    np.testing.assert_allclose(res.score, probs[np.arange(len(x)), c], rtol=1e-4)
    # maps vary across space (Flatten head), so this really tests the weighting
    assert ref_gc.std() > 0 and ref_pp.std() > 0
    np.testing.assert_allclose(res.maps[("c2", "gradcam")], ref_gc, rtol=2e-4, atol=1e-6)
    np.testing.assert_allclose(res.maps[("c2", "gradcam++")], ref_pp, rtol=2e-4, atol=1e-6)
    assert res.maps[("c2", "gradcam")].dtype == np.float32


def test_fixed_target_and_label_target(x):
    model = _flatten_head_model("fused")
    _, _, ref_gc, _ = _reference(model, x, target=2)
    res = Explainer(model, layers="c2", methods="gradcam", target=2, batch_size=6)(x)
    np.testing.assert_allclose(res.maps[("c2", "gradcam")], ref_gc, rtol=2e-4, atol=1e-6)
    ex = Explainer(model, layers="c2", methods="gradcam", target="label", batch_size=6)
    res2 = ex(x, labels=np.full(len(x), 2))
    np.testing.assert_allclose(res2.maps[("c2", "gradcam")], ref_gc, rtol=2e-4, atol=1e-6)
    with pytest.raises(AuditError, match="labels"):
        ex(x)
    named = Explainer(model, layers="c2", methods="gradcam", target="zebra", classes=["a", "b", "zebra"])
    assert named.target == 2
    with pytest.raises(AuditError, match="not a class name"):
        Explainer(model, target="giraffe", classes=["a", "b", "zebra"])
    with pytest.raises(AuditError, match=r"out of range: the model has 3 classes"):
        Explainer(model, layers="c2", target=3)


def test_padding_last_batch_gives_same_maps(x):
    model = _flatten_head_model("fused")
    full = Explainer(model, layers="c2", batch_size=6)(x)
    padded = Explainer(model, layers="c2", batch_size=4)(x)  # 4 + 2 (padded to 4)
    for key in full.maps:
        np.testing.assert_allclose(padded.maps[key], full.maps[key], rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(padded.pred, full.pred)


def test_one_trace_per_batch_shape(x):
    """Short batches are padded to the next power of two, and each shape is traced once."""
    model = _flatten_head_model("fused")
    ex = Explainer(model, layers="c2", batch_size=4)
    ex(x)  # 4 + 2
    ex(x[:3])  # padded to 4
    ex(x[:1])  # 1
    ex(x[:2])
    assert ex._fn.experimental_get_tracing_count() == 3  # shapes 4, 2 and 1


def test_gradcampp_exact_agrees_with_closed_form(x):
    """With a piecewise-linear head, diag d2Y = Y g^2 and d3Y = Y g^3 exactly (Y = exp S)."""
    model = _flatten_head_model("separate")
    ex = Explainer(model, layers=["c2", "c1"], methods=("gradcam++", "gradcam++exact"), batch_size=3)
    res = ex(x[:3])
    for layer in ("c2", "c1"):
        a, b = res.maps[(layer, "gradcam++")], res.maps[(layer, "gradcam++exact")]
        assert a.max() > 0
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)


def test_plusplus_never_nan_on_huge_logits():
    """A logit far above 88.7 would overflow exp(S) in float32; the closed form never forms it."""
    model = _flatten_head_model("logits")
    d2 = model.get_layer("d2")
    k, b = d2.get_weights()
    d2.set_weights([np.abs(k) * 300.0, b + 500.0])  # h >= 0 after ReLU: every logit >= 500
    xs = np.random.default_rng(3).random((4, H, W, 3)).astype(np.float32) * 50
    res = Explainer(model, layers="c2", methods=("gradcam", "gradcam++"), batch_size=4)(xs)
    logits, c, ref_gc, ref_pp = _reference(model, xs)
    assert logits.min() > 500  # exp(S) overflows float32 (above 88.7) for every image
    for key, m in res.maps.items():
        assert np.isfinite(m).all(), key
    assert not res.flat[("c2", "gradcam++")].any()
    np.testing.assert_allclose(res.maps[("c2", "gradcam")], ref_gc, rtol=1e-3, atol=1e-6 * ref_gc.max())
    np.testing.assert_allclose(res.maps[("c2", "gradcam++")], ref_pp, rtol=1e-3, atol=1e-6 * ref_pp.max())


def _gap_model(seed=0):
    keras.utils.set_random_seed(seed)
    inp = keras.Input((H, W, 3))
    h = keras.layers.Conv2D(6, 3, padding="same", activation="relu", name="conv")(inp)
    h = keras.layers.GlobalAveragePooling2D()(h)
    h = keras.layers.Dropout(0.2)(h)
    out = keras.layers.Dense(4, activation="softmax")(h)
    return keras.Model(inp, out)


def test_cam_equals_gradcam_up_to_constant_on_gap_model(x):
    model = _gap_model()
    res = Explainer(model, methods=("gradcam", "cam"), batch_size=6)(x)
    gc, cam = res.maps[("conv", "gradcam")], res.maps[("conv", "cam")]
    assert cam.max() > 0
    # Grad-CAM weights are W[k, c] / (h * w) on a GAP head
    np.testing.assert_allclose(cam, gc * H * W, rtol=1e-4, atol=1e-6)


def test_cam_refuses_other_heads():
    with pytest.raises(AuditError, match="GlobalAveragePooling2D"):
        Explainer(_flatten_head_model("fused"), layers="c2", methods=("cam",))


def test_degenerate_maps_are_flagged_not_nan(x):
    model = _flatten_head_model("fused")
    c2 = model.get_layer("c2")
    kernel, bias = c2.get_weights()
    c2.set_weights([np.zeros_like(kernel), np.zeros_like(bias)])  # A == 0 everywhere
    res = Explainer(model, layers="c2", batch_size=6)(x)
    for key in res.maps:
        assert res.flat[key].all()
        assert (res.maps[key] == 0).all()

    bad = x.copy()
    bad[0] *= 3e38  # activations overflow to inf: non-finite gradients for image 0 only
    res = Explainer(_flatten_head_model("fused"), layers="c2", batch_size=6)(bad)
    flat = res.flat[("c2", "gradcam")]
    assert flat[0] and not flat[1:].any()
    assert np.isfinite(res.maps[("c2", "gradcam")]).all()


def test_sigmoid_binary_head():
    keras.utils.set_random_seed(0)
    inp = keras.Input((H, W, 3))
    h = keras.layers.Conv2D(4, 3, activation="relu", name="conv")(inp)
    h = keras.layers.Flatten()(h)
    out = keras.layers.Dense(1, activation="sigmoid")(h)
    model = keras.Model(inp, out)
    xs = np.random.default_rng(0).random((5, H, W, 3)).astype(np.float32)
    res = Explainer(model, batch_size=5)(xs)
    p1 = model.predict(xs, verbose=0)[:, 0]
    np.testing.assert_allclose(res.probs[:, 1], p1, rtol=1e-4)
    np.testing.assert_array_equal(res.pred, (p1 > 0.5).astype(int))
    # Grad-CAM by hand (float64): the explained score is +z for class 1 and -z for class 0;
    # dS/dA = +-W reshaped to the conv output.
    A = keras.Model(model.input, model.get_layer("conv").output)(xs).numpy().astype(np.float64)
    k = model.layers[-1].kernel.numpy().astype(np.float64)[:, 0].reshape(A.shape[1:])
    sign = np.where(res.pred == 1, 1.0, -1.0)
    w = sign[:, None] * k.mean(axis=(0, 1))[None, :]
    ref = np.maximum(np.einsum("nhwk,nk->nhw", A, w), 0)
    assert ref.std() > 0
    np.testing.assert_allclose(res.maps[("conv", "gradcam")], ref, rtol=2e-4, atol=1e-6)


def test_bad_batch_shape_and_method():
    model = _flatten_head_model("fused")
    with pytest.raises(AuditError, match="unknown method"):
        Explainer(model, methods=("saliency",))
    ex = Explainer(model, layers="c2")
    with pytest.raises(AuditError, match="expected a batch"):
        ex(np.zeros((2, 9, 9, 3), np.float32))
