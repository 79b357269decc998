"""Head kind x method: every map against a float64 NumPy definition from its paper,
predictions and scores by hand; the method registry; multi-label rows; `audit explain`."""

import json
import os
import re
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import cam_refs as R
import cv2
import keras
import numpy as np
import pytest

from audit.cli import main
from audit.engine import methods as registry
from audit.engine.explainer import Explainer, flat_maps

H = W = 8
KINDS = ("softmax_fused", "softmax_separate", "logits", "sigmoid_binary", "logit_binary", "multilabel",
         "two_outputs")
UNITS = {"sigmoid_binary": 1, "logit_binary": 1}
ROOT = Path(__file__).parents[1]


def build(kind, pool="flatten", seed=0, side=H):
    """conv c1 -> conv c2 (target) -> Flatten -> Dense(7, relu) d1 | GAP -> head d2 of ``kind``."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input((side, side, 3))
    h = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="c1")(inp)
    h = keras.layers.Conv2D(5, 3, padding="same", activation="relu", name="c2")(h)
    if pool == "flatten":
        h = keras.layers.Dense(7, activation="relu", name="d1")(keras.layers.Flatten(name="flat")(h))
    else:
        h = keras.layers.GlobalAveragePooling2D(name="gap")(h)
    units = UNITS.get(kind, 3)
    act = {"softmax_fused": "softmax", "sigmoid_binary": "sigmoid", "multilabel": "sigmoid"}.get(kind)
    out = keras.layers.Dense(units, activation=act, name="d2")(h)
    if kind == "softmax_separate":
        out = keras.layers.Softmax(name="prob")(out)
    if kind == "two_outputs":
        out = [out, keras.layers.Dense(2, name="aux")(h)]
    model = keras.Model(inp, out)
    if kind in ("multilabel", "sigmoid_binary", "logit_binary"):
        # biases at the median logit: both classes of a binary head occur, and images with
        # 0, 1, 2 or 3 labels above 0.5
        k, _ = model.get_layer("d2").get_weights()
        z = forward64(model, images(side=side), pool)[1]
        shift = [0.05, -0.05, 0.02] if units == 3 else [0.0]
        model.get_layer("d2").set_weights([k, (-np.median(z, axis=0) + shift).astype(np.float32)])
    return model


def images(n=6, seed=1, side=H):
    return np.random.default_rng(seed).random((n, side, side, 3)).astype(np.float32)


def forward64(model, x, pool):
    """float64: activations A of c2, logits z of d2 and what the gradient needs."""
    A = keras.Model(model.input, model.get_layer("c2").output)(x).numpy().astype(np.float64)
    W2, b2 = (v.numpy().astype(np.float64) for v in model.get_layer("d2").weights)
    if pool == "flatten":
        W1, b1 = (v.numpy().astype(np.float64) for v in model.get_layer("d1").weights)
        z1 = A.reshape(len(x), -1) @ W1 + b1
        return A, np.maximum(z1, 0) @ W2 + b2, (W1, z1, W2)
    return A, A.mean(axis=(1, 2)) @ W2 + b2, (None, None, W2)


def sigmoid(z):
    return 1 / (1 + np.exp(-z))


def expected_rows(kind, z):
    """Rows (image, target, pred, score) the Explainer must give, by hand."""
    if kind in UNITS:  # one unit: class 1 = +z, class 0 = -z; predicted 1 where z > 0
        pred = (z[:, 0] > 0).astype(int)
        score = sigmoid(np.where(pred == 1, z[:, 0], -z[:, 0]))
        return np.arange(len(z)), pred, pred, score
    if kind == "multilabel":
        p = sigmoid(z)
        rows = [(i, c) for i in range(len(z)) for c in (np.flatnonzero(p[i] > 0.5) if (p[i] > 0.5).any()
                                                        else [int(p[i].argmax())])]
        image, target = np.array(rows).T
        pred = np.where(p[image, target] > 0.5, target, -1)
        return image, target, pred, p[image, target]
    e = np.exp(z - z.max(1, keepdims=True))
    p = e / e.sum(1, keepdims=True)
    pred = z.argmax(1)
    return np.arange(len(z)), pred, pred, p[np.arange(len(z)), pred]


def class_weights(kind, W2, target):
    """dS_c/d(hidden) per row: the class's column of the head; one unit: +-w."""
    if kind in UNITS:
        return np.where(target[:, None] == 1, 1.0, -1.0) * W2[:, 0][None, :]
    return W2[:, target].T


def gradient64(kind, A, cache, target, image, pool):
    W1, z1, W2 = cache
    wc = class_weights(kind, W2, target)
    if pool == "flatten":
        return (((z1[image] > 0) * wc) @ W1.T).reshape((len(image), *A.shape[1:]))
    return np.broadcast_to((wc / (H * W))[:, None, None, :], (len(image), *A.shape[1:])).copy()


ONE_PASS = ("gradcam", "gradcam++", "hirescam", "layercam", "xgradcam", "eigencam")
REFS = {"gradcam": R.gradcam, "gradcam++": R.gradcampp, "hirescam": R.hirescam, "layercam": R.layercam,
        "xgradcam": R.xgradcam, "eigencam": lambda A, g: R.eigencam(A)}


_CACHE = {}


def explained(kind, pool):
    """(expected rows, float64 A and g per row, Explanation) for one head kind; computed once."""
    if (kind, pool) not in _CACHE:
        model = build(kind, pool)
        x = images()
        A, z, cache = forward64(model, x, pool)
        image, target, pred, score = expected_rows(kind, z)
        g = gradient64(kind, A, cache, target, image, pool)
        methods = ONE_PASS + ("scorecam",) if pool == "flatten" else ("gradcam", "cam")
        ex = Explainer(model, layers="c2", methods=methods, batch_size=4,
                       output="d2" if kind == "two_outputs" else None)
        res = ex(x)
        head_w = class_weights(kind, cache[2], target)
        _CACHE[(kind, pool)] = (model, x, (image, target, pred, score), A[image], g, head_w, res)
    return _CACHE[(kind, pool)]


def assert_maps(got, ref):
    ref = ref.copy()
    ref[flat_maps(ref)] = 0.0  # the engine's rule for degenerate maps
    assert ref.max() > 0
    np.testing.assert_allclose(got, ref, rtol=2e-4, atol=2e-5 * ref.max())


@pytest.mark.parametrize("kind", KINDS)
def test_predictions_and_scores_by_hand(kind):
    _, _, (image, target, pred, score), _, _, _, res = explained(kind, "flatten")
    np.testing.assert_array_equal(res.image, image)
    np.testing.assert_array_equal(res.target, target)
    np.testing.assert_array_equal(res.pred, pred)
    np.testing.assert_allclose(res.score, score, rtol=1e-4)
    if kind == "multilabel":  # the data covers: an image with several labels, and one with none
        counts = np.bincount(image)
        assert counts.max() >= 2 and (pred == -1).any()


@pytest.mark.parametrize("method", ONE_PASS)
@pytest.mark.parametrize("kind", KINDS)
def test_one_pass_method_matches_paper_reference(kind, method):
    _, _, _, A, g, _, res = explained(kind, "flatten")
    assert_maps(res.maps[("c2", method)], REFS[method](A, g))


@pytest.mark.parametrize("kind", KINDS)
def test_cam_per_class_kernel_for_every_head(kind):
    """CAM on a GAP head; one unit: class 1 is +w and class 0 is -w (never an index error)."""
    _, _, (_, target, _, _), A, g, head_w, res = explained(kind, "gap")
    assert_maps(res.maps[("c2", "cam")], R.cam(A, head_w))
    assert_maps(res.maps[("c2", "gradcam")], R.gradcam(A, g))
    if kind in UNITS:  # both classes occur, and class 0 is not the class-1 map
        assert set(target) == {0, 1}


@pytest.mark.parametrize("kind", ["softmax_fused", "logits", "sigmoid_binary", "logit_binary", "multilabel"])
def test_scorecam_matches_paper_reference(kind):
    model, x, (image, target, _, _), A, _, _, res = explained(kind, "flatten")
    head_probs = {  # the probability Score-CAM reads: softmax, or the sigmoid of the class score
        "softmax_fused": lambda out: out, "logits": lambda out: _softmax(out),
        "sigmoid_binary": lambda out: np.concatenate([1 - out, out], 1),
        "logit_binary": lambda out: np.concatenate([sigmoid(-out), sigmoid(out)], 1),
        "multilabel": lambda out: out,
    }[kind]

    def prob_fn(batch):
        return head_probs(model.predict(batch.astype(np.float32), verbose=0).astype(np.float64))

    ref = R.scorecam(A, x[image], target, prob_fn)
    assert_maps(res.maps[("c2", "scorecam")], ref)


def _softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def test_eigencam_needs_no_gradient_and_ignores_the_class():
    model = build("softmax_fused")
    x = images()
    a = Explainer(model, layers="c2", methods="eigencam", target=0, batch_size=8)(x)
    b = Explainer(model, layers="c2", methods="eigencam", target=2, batch_size=8)(x)
    np.testing.assert_array_equal(a.maps[("c2", "eigencam")], b.maps[("c2", "eigencam")])
    assert not registry.METHODS["eigencam"].needs.gradients


def test_constant_map_is_flat():
    maps = np.zeros((4, 3, 3), np.float32)
    maps[1] = 2.5  # constant, not zero
    maps[2, 0, 0] = 1.0  # one peak
    maps[3] = np.nan
    np.testing.assert_array_equal(flat_maps(maps), [True, True, False, True])
    one_by_one = np.full((2, 1, 1), 3.0, np.float32)  # a 1x1 layer's map is constant
    assert flat_maps(one_by_one).all()


# ----------------------------------------------------------------------------
# The registry drives the schema, the CLI help, the scan preference and the docs
# ----------------------------------------------------------------------------


def test_schema_enum_is_the_registry():
    schema = json.loads((ROOT / "schemas" / "job.schema.json").read_text())
    enum = schema["properties"]["explain"]["properties"]["methods"]["items"]["enum"]
    assert enum == list(registry.METHODS)


def test_cli_help_lists_every_method(capsys):
    with pytest.raises(SystemExit):
        main(["explain", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for name in registry.METHODS:
        assert name in help_text


def test_scan_preference_comes_from_the_registry():
    from audit.scan.config import METHOD_PREFERENCE

    assert set(METHOD_PREFERENCE) == set(registry.METHODS)
    assert METHOD_PREFERENCE[:2] == ("gradcam++", "gradcam")


def test_docs_table_is_generated_from_the_registry():
    doc = (ROOT / "docs" / "methods.md").read_text()
    assert registry.markdown_table() in doc
    assert "docs/methods.md" in (ROOT / "README.md").read_text()


def test_a_method_is_one_module_and_one_registry_line():
    folder = ROOT / "audit" / "engine" / "methods"
    modules = sorted(p.stem for p in folder.glob("*.py") if p.stem not in ("__init__", "base"))
    source = (folder / "__init__.py").read_text()
    lines = [m for m in modules if len(re.findall(rf'^\s*\("{m}", "\w+"\),$', source, re.M)) == 1]
    assert lines == modules
    assert len(registry.METHODS) == len(modules)


# ----------------------------------------------------------------------------
# Multi-label rows in the worker, and `audit explain` for each head kind
# ----------------------------------------------------------------------------


def _write_images(folder, x):
    """PNG files of images in [0, 1], and the float images `audit explain` reads back (scale_0_1)."""
    from audit.review.explain import read_image

    paths = []
    for i, im in enumerate(x):
        p = folder / f"im{i}.png"
        cv2.imwrite(str(p), cv2.cvtColor(np.uint8(np.round(im * 255)), cv2.COLOR_RGB2BGR))
        paths.append(p)
    back = np.stack([read_image(p, (H, W)) for p in paths]).astype(np.float32) / 255.0
    return paths, back


@pytest.mark.parametrize("kind", KINDS)
def test_audit_explain_each_head(kind, tmp_path, capsys):
    """CAM and HiResCAM on a GAP head of every kind; class "0002" is the class of that name."""
    model = build(kind, "gap")
    path = tmp_path / "m.keras"
    model.save(path)
    paths, x = _write_images(tmp_path, images(3))
    classes = ["0002", "0001"] if kind in UNITS else ["0002", "b", "c"]
    args = ["explain", str(path), *map(str, paths), "--out", str(tmp_path / "o"), "--layers", "c2",
            "--filters", "0", "--methods", "gradcam,cam,hirescam,guided", "--classes", *classes,
            "--target", "0002", "--preprocess", "scale_0_1"]
    if kind == "two_outputs":
        assert main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "has 2 outputs (d2, aux); choose" in err[0]
        args += ["--output", "d2"]
    assert main(args) == 0, capsys.readouterr().err
    page = (tmp_path / "o" / "index.html").read_text()
    assert page.count("explained class 0002") == 3  # the class named "0002", not index 2
    z = forward64(model, x, "gap")[1]
    if kind == "multilabel":  # a fixed target: the row's label when it is above 0.5
        names = ["0002" if p > 0.5 else "none" for p in sigmoid(z[:, 0])]
    else:
        names = [classes[c] for c in expected_rows(kind, z)[2]]
    for name in set(names):
        assert page.count(f"predicted {name} (") == names.count(name)


def test_audit_explain_multilabel_predicted_gives_a_page_per_label(tmp_path):
    from audit.review.explain import explain

    model = build("multilabel")
    paths, x = _write_images(tmp_path, images())
    image, target, _, _ = expected_rows("multilabel", forward64(model, x, "flatten")[1])
    assert len(image) > len(x)  # some image has several labels
    explain(model, paths, tmp_path / "o", layers=["c2"], methods=["gradcam"], filters=0,
            preprocess_mode="scale_0_1", classes=["a", "b", "c"])
    cams = sorted(p.name for p in (tmp_path / "o").glob("*_cams.png"))
    assert len(cams) == len(image)  # one page per (image, label); an image with none: its top label
    page = (tmp_path / "o" / "index.html").read_text()
    for c in range(3):
        assert page.count(f"explained class {'abc'[c]}") == int((target == c).sum())


def test_worker_writes_a_row_per_label_and_keeps_every_image(tmp_path):
    """Multi-label, target predicted: one row per (image, label above 0.5, layer, method); an
    image with no label above 0.5 keeps its rows (its top label explained, pred null)."""
    import helpers_jobs as hj
    import pyarrow as pa

    from audit.data import datasets
    from audit.runner.spec import load_spec
    from audit.runner.worker import AuditWorker

    keras.utils.set_random_seed(0)
    inp = keras.Input((hj.SIZE, hj.SIZE, 3))
    h = keras.layers.Conv2D(6, 3, padding="same", activation="relu", name="conv")(inp)
    feats = keras.layers.GlobalAveragePooling2D()(h)
    model = keras.Model(inp, keras.layers.Dense(3, activation="sigmoid", name="head")(feats))
    root, _ = hj.make_folder(tmp_path / "data", 4, classes=("a", "b", "c"), masks=False)
    files = sorted(Path(root).glob("*/*.png"))
    x = np.stack([cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB) for p in files]).astype(np.float32) / 255
    f = keras.Model(inp, feats).predict(x, verbose=0).astype(np.float64)
    k = np.random.default_rng(3).normal(size=(6, 3)) * 40 / f.std(axis=0).mean()
    z = f @ k
    model.get_layer("head").set_weights([k.astype(np.float32), (-np.median(z, axis=0)).astype(np.float32)])
    p = model.predict(x, verbose=0)
    above = p > 0.5
    assert above.sum(1).max() >= 2 and (above.sum(1) == 0).any()  # the data covers both cases
    model.save(tmp_path / "ml.keras")
    spec = load_spec({"model": {"path": str(tmp_path / "ml.keras"), "preprocess": "scale_0_1"},
                      "dataset": {"format": "folder", "path": root},
                      "explain": {"methods": ["gradcam", "cam"]},
                      "resources": {"batch_size": 4, "decode_threads": 2}, "output": str(tmp_path / "out")})
    plan = datasets.plan(spec.dataset)
    w = AuditWorker(spec, classes=plan.classes)
    df = pa.concat_tables([w.process_shard(s, commit=False)["table"] for s in plan.shards]).to_pandas()
    ids = [f"{p.parent.name}/{p.name}" for p in files]
    assert set(df.image_id) == set(ids)
    for i, image_id in enumerate(ids):
        rows = df[(df.image_id == image_id) & (df.method == "gradcam")].sort_values("target")
        want = np.flatnonzero(above[i]) if above[i].any() else [int(p[i].argmax())]
        assert rows.target.tolist() == list(want), image_id
        np.testing.assert_allclose(rows.score, p[i, want], rtol=1e-4)
        if above[i].any():
            assert rows.pred.tolist() == list(want)
        else:
            assert rows.pred.isna().all() and rows.pred_name.isna().all()
        assert len(df[df.image_id == image_id]) == 2 * len(want)  # gradcam and cam


@pytest.mark.parametrize("kind", [pytest.param("sigmoid_binary", marks=pytest.mark.slow), "logit_binary",
                                  pytest.param("multilabel", marks=pytest.mark.slow)])
def test_gradcampp_exact_equals_closed_form_on_every_head(kind):
    """Piecewise-linear head above the layer: the exact diagonal derivatives equal the closed form.

    On 4 x 4 images: the exact method loops over every element of the layer's output (4 x 4 x 5
    here, a quarter of the 8 x 8 ones)."""
    model = build(kind, "gap", side=4)
    ex = Explainer(model, layers="c2", methods=("gradcam++", "gradcam++exact"), batch_size=2, target=1)
    res = ex(images(2, side=4))
    closed, exact = res.maps[("c2", "gradcam++")], res.maps[("c2", "gradcam++exact")]
    assert closed.max() > 0
    np.testing.assert_allclose(exact, closed, rtol=1e-4, atol=1e-6 * closed.max())


def test_audit_explain_head_errors_are_one_line(tmp_path, capsys):
    inp = keras.Input((H, W, 3))
    h = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(4, 3, name="conv")(inp))
    one_unit_softmax = keras.Model(inp, keras.layers.Dense(1, activation="softmax")(h))
    conv_sigmoid = keras.Model(inp, keras.layers.Conv2D(2, 3, activation="sigmoid", name="top")(inp))
    two = build("two_outputs", "gap")
    paths, _ = _write_images(tmp_path, images(1))
    cases = [
        (one_unit_softmax, [], "is a softmax over one unit (always 1.0)"),
        (conv_sigmoid, [], "the model output has shape (None, 6, 6, 2); a classifier outputs (N, classes)"),
        (two, ["--output", "nope"], "has no output 'nope'; outputs: d2, aux"),
        (two, ["--output", "d2", "--classes", "x", "y", "z", "--target", "w"],
         "target 'w' is not a class name; classes: x, y, z"),
        (build("logit_binary", "gap"), ["--classes", "a", "b", "c"], "3 class names given but the model has 2 classes"),
    ]
    for i, (model, extra, msg) in enumerate(cases):
        model.save(tmp_path / f"m{i}.keras")
        rc = main(["explain", str(tmp_path / f"m{i}.keras"), str(paths[0]), "--out", str(tmp_path / "o"),
                   "--filters", "0", *extra])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and msg in err[0], (msg, err)


def test_audit_layers_follows_the_chosen_output(tmp_path, capsys):
    build("two_outputs", "gap").save(tmp_path / "two.keras")
    assert main(["layers", str(tmp_path / "two.keras")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has 2 outputs (d2, aux)" in err[0] and "--output NAME" in err[0]
    assert main(["layers", str(tmp_path / "two.keras"), "--output", "d2"]) == 0
    assert "automatic choice: c2" in capsys.readouterr().out
