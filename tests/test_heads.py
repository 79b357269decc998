"""The classifier head: kinds, predictions by hand, probabilities, class names, several outputs."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np
import pytest

from audit.engine.heads import Head, resolve_class, resolve_target
from audit.errors import AuditError

H = W = 8


def head_model(kind, seed=0, classes=3):
    """A tiny conv net ending in each kind of head (the trunk is the same)."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input((H, W, 3))
    h = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="conv")(inp)
    h = keras.layers.GlobalAveragePooling2D(name="gap")(h)
    if kind == "softmax_fused":
        out = keras.layers.Dense(classes, activation="softmax", name="dense")(h)
    elif kind == "softmax_separate":
        out = keras.layers.Softmax(name="prob")(keras.layers.Dense(classes, name="dense")(h))
    elif kind == "softmax_activation":
        out = keras.layers.Activation("softmax", name="prob")(keras.layers.Dense(classes, name="dense")(h))
    elif kind == "logits":
        out = keras.layers.Dense(classes, name="dense")(h)
    elif kind == "sigmoid_fused":
        out = keras.layers.Dense(1, activation="sigmoid", name="dense")(h)
    elif kind == "sigmoid_separate":
        out = keras.layers.Activation("sigmoid", name="prob")(keras.layers.Dense(1, name="dense")(h))
    elif kind == "logit_binary":
        out = keras.layers.Dense(1, name="dense")(h)
    elif kind == "multilabel":
        out = keras.layers.Dense(classes, activation="sigmoid", name="dense")(h)
    elif kind == "two_outputs":
        out = [keras.layers.Dense(classes, activation="softmax", name="cls")(h),
               keras.layers.Dense(2, name="box")(h)]
    else:
        raise ValueError(kind)
    return keras.Model(inp, out)


EXPECTED = {
    "softmax_fused": ("softmax", 3, "dense", True),
    "softmax_separate": ("softmax", 3, "prob", False),
    "softmax_activation": ("softmax", 3, "prob", False),
    "logits": ("logits", 3, None, False),
    "sigmoid_fused": ("sigmoid_binary", 2, "dense", True),
    "sigmoid_separate": ("sigmoid_binary", 2, "prob", False),
    "logit_binary": ("logit_binary", 2, None, False),
    "multilabel": ("multilabel", 3, "dense", True),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_head_kind_of_each_model(name):
    kind, n, capture, fused = EXPECTED[name]
    head = Head.of(head_model(name))
    assert head.kind == kind
    assert head.num_classes == n
    assert head.capture == capture
    assert (head.dense is not None) == fused


# Predictions from outputs, computed by hand for each kind (what the intervention relies on).
PREDICT_CASES = [
    ("softmax", [[0.2, 0.5, 0.3], [0.7, 0.2, 0.1]], [1, 0]),
    ("logits", [[-3.0, 2.0, 1.0], [5.0, -1.0, 4.9]], [1, 0]),
    ("sigmoid_binary", [[0.9], [0.1], [0.5], [0.51]], [1, 0, 0, 1]),
    ("logit_binary", [[2.0], [-0.1], [0.0], [1e-3]], [1, 0, 0, 1]),
]


@pytest.mark.parametrize("kind,outputs,expected", PREDICT_CASES)
def test_predict_single_label_by_hand(kind, outputs, expected):
    units = len(outputs[0])
    head = Head(kind, 2 if units == 1 else units, units)
    pred = head.predict(np.array(outputs, np.float32))
    assert pred.dtype == np.int64 and pred.shape == (len(outputs),)
    np.testing.assert_array_equal(pred, expected)


def test_predict_multilabel_by_hand():
    head = Head("multilabel", 3, 3)
    pred = head.predict(np.array([[0.9, 0.2, 0.6], [0.1, 0.4, 0.5]]))
    np.testing.assert_array_equal(pred, [[True, False, True], [False, False, False]])


def test_probabilities_by_hand():
    z = np.array([[2.0], [-1.0]])
    p = 1 / (1 + np.exp(-z[:, 0]))
    np.testing.assert_allclose(Head("logit_binary", 2, 1).probabilities(z), np.stack([1 - p, p], 1))
    np.testing.assert_allclose(Head("sigmoid_binary", 2, 1).probabilities(p[:, None]), np.stack([1 - p, p], 1))
    logits = np.array([[1.0, 2.0, 3.0]])
    e = np.exp(logits - 3.0)
    np.testing.assert_allclose(Head("logits", 3, 3).probabilities(logits), e / e.sum())
    with pytest.raises(AuditError, match=r"shape \(N, 3\)"):
        Head("logits", 3, 3).predict(np.zeros((2, 4)))


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_predict_on_real_model_outputs_matches_the_scores(name):
    """Head.predict on model(x) equals the argmax of the head's TF scores (the Explainer's rule)."""
    model = head_model(name)
    head = Head.of(model)
    x = np.random.default_rng(0).normal(size=(16, H, W, 3)).astype(np.float32) * 3
    out = model(x).numpy()
    if head.kind == "multilabel":
        np.testing.assert_array_equal(head.predict(out), out > 0.5)
        return
    # the TF side: scores from the captured tensor (here recomputed from the model)
    from audit.engine import graph

    t = graph.trace(model, capture_inputs=[head.capture] if head.capture else [])
    h = keras.Model(t.inputs[0], t.captured_in[head.capture] if head.capture else t.output)(x)
    s = head.scores(h).numpy()
    np.testing.assert_array_equal(head.predict(out), s.argmax(1))
    np.testing.assert_allclose(head.probabilities(out), head.tf_probabilities(s).numpy(), rtol=1e-5, atol=1e-6)


def test_two_outputs_choose_by_name_else_one_line_error():
    model = head_model("two_outputs")
    with pytest.raises(AuditError, match=r"has 2 outputs \(cls, box\); choose"):
        Head.of(model)
    head = Head.of(model, output="cls")
    assert head.kind == "softmax" and head.output_index == 0
    box = Head.of(model, output="box")
    assert box.kind == "logits" and box.num_classes == 2 and box.output_index == 1
    with pytest.raises(AuditError, match="no output 'nope'; outputs: cls, box"):
        Head.of(model, output="nope")
    outs = model(np.zeros((2, H, W, 3), np.float32))
    np.testing.assert_array_equal(head.predict(outs), np.asarray(outs[0]).argmax(1))


def test_softmax_over_one_unit_is_refused():
    inp = keras.Input((4,))
    model = keras.Model(inp, keras.layers.Dense(1, activation="softmax")(inp))
    with pytest.raises(AuditError, match="softmax over one unit"):
        Head.of(model)


def test_class_names_first_then_indices():
    classes = ["0002", "0001", "cat"]
    assert resolve_class("0002", classes) == 0  # a name that looks like an index is a name
    assert resolve_class("0001", classes, 3) == 1
    assert resolve_class("2", classes, 3) == 2  # no class named "2": an index
    assert resolve_class(2, classes, 3) == 2
    assert resolve_class("cat", classes) == 2
    with pytest.raises(AuditError, match="out of range: the model has 3 classes"):
        resolve_class("3", classes, 3)
    with pytest.raises(AuditError, match="'dog' is not a class name; classes: 0002, 0001, cat"):
        resolve_class("dog", classes)
    assert resolve_target("predicted", classes) == "predicted"
    assert resolve_target("label", None) == "label"


@pytest.mark.parametrize("kind", ["sigmoid_binary", "logit_binary"])
def test_one_unit_scores_and_cam_kernel_are_plus_minus_z(kind):
    head = Head(kind, 2, 1)
    z = np.array([[2.0], [-3.0], [0.5]], np.float32)
    s = head.scores_from_logits(z).numpy()
    np.testing.assert_array_equal(s, [[-2.0, 2.0], [3.0, -3.0], [-0.5, 0.5]])
    np.testing.assert_array_equal(head.score_of(s, np.array([1, 0, 0])).numpy(), [2.0, 3.0, -0.5])
    p = 1 / (1 + np.exp(-z[:, 0]))
    np.testing.assert_allclose(head.tf_probabilities(s).numpy(), np.stack([1 - p, p], 1), rtol=1e-6)
    k = np.arange(4, dtype=np.float32)[:, None]
    np.testing.assert_array_equal(head.class_kernel(k).numpy(), np.concatenate([-k, k], 1))


def test_spec_check_uses_the_same_class_rule(tmp_path):
    from audit.runner.spec import load_spec

    (tmp_path / "m.keras").write_bytes(b"")  # the spec check only needs the file to exist
    (tmp_path / "data").mkdir()

    def spec(target, classes):
        return {"model": {"path": str(tmp_path / "m.keras")},
                "dataset": {"format": "folder", "path": str(tmp_path / "data"), "classes": classes},
                "explain": {"target": target}, "output": str(tmp_path / "out")}

    assert load_spec(spec("0002", ["0002", "0001"])).explain.target == "0002"
    load_spec(spec("1", ["0002", "0001"]))  # no class named "1": index 1
    with pytest.raises(AuditError, match=r"^spec error: explain.target: target 'x' is not a class name; classes: a, b$"):
        load_spec(spec("x", ["a", "b"]))
    with pytest.raises(AuditError, match="explain.target: target class 2 is out of range"):
        load_spec(spec(2, ["a", "b"]))


def test_bucketed_batch_shapes():
    from audit.engine.explainer import bucket_for, buckets

    assert buckets(32) == [1, 2, 4, 8, 16, 32]
    assert buckets(6) == [1, 2, 4, 6]
    assert [bucket_for(k, 32) for k in (1, 3, 16, 17, 32)] == [1, 4, 16, 32, 32]
    assert bucket_for(5, 6) == 6
