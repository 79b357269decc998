"""Vision transformers: token layers as target layers.

A small ViT built from Keras layers (patch embedding Conv2D with stride 4,
tokens, a class token, a position embedding, two transformer blocks with
MultiHeadAttention + LayerNormalization + MLP, a class-token head).  Maps are
compared with a float64 NumPy Grad-CAM computed from the token activations and
gradients of an eager run of the same layers split at the target layer.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np
import pytest
import tensorflow as tf

from audit import AuditError
from audit.cli import main
from audit.engine import graph
from audit.engine.explainer import Explainer

C, HEADS, PATCH = 16, 2, 4


@keras.saving.register_keras_serializable(package="test_vit")
class ClassToken(keras.layers.Layer):
    """Prepends one learned token: (N, T, C) -> (N, 1 + T, C)."""

    def build(self, input_shape):
        self.token = self.add_weight(shape=(1, 1, input_shape[-1]), initializer="random_normal", name="token")

    def call(self, x):
        n = keras.ops.shape(x)[0]
        return keras.ops.concatenate([keras.ops.broadcast_to(self.token, (n, 1, x.shape[-1])), x], axis=1)


@keras.saving.register_keras_serializable(package="test_vit")
class PositionEmbedding(keras.layers.Layer):
    """Adds a learned embedding per position."""

    def build(self, input_shape):
        self.pos = self.add_weight(shape=(1, *input_shape[1:]), initializer="random_normal", name="pos")

    def call(self, x):
        return x + self.pos


class ViT:
    """The layers of a tiny ViT, applied symbolically (the model) or eagerly (the reference)."""

    def __init__(self, size=(28, 28), head="class_token", classes=3):
        L = keras.layers
        self.size, self.head_kind = size, head
        self.grid = (size[0] // PATCH, size[1] // PATCH)
        self.embed = L.Conv2D(C, PATCH, strides=PATCH, name="patch_embed")
        self.to_tokens = L.Reshape((self.grid[0] * self.grid[1], C), name="to_tokens")
        self.cls = ClassToken(name="class_token") if head == "class_token" else None
        self.pos = PositionEmbedding(name="pos_embed")
        self.blocks = [self._block(i) for i in (1, 2)]
        self.norm = L.LayerNormalization(name="final_ln")
        self.pool = L.GlobalAveragePooling1D(name="token_gap") if head == "gap" else None
        self.dense = L.Dense(classes, activation="softmax", name="head")

    @staticmethod
    def _block(i):
        L = keras.layers
        return dict(
            ln1=L.LayerNormalization(name=f"block{i}_ln1"),
            mha=L.MultiHeadAttention(HEADS, C // HEADS, name=f"block{i}_mha"),
            add1=L.Add(name=f"block{i}_add1"),
            ln2=L.LayerNormalization(name=f"block{i}_ln2"),
            mlp1=L.Dense(2 * C, activation="gelu", name=f"block{i}_mlp1"),
            mlp2=L.Dense(C, name=f"block{i}_mlp2"),
            out=L.Add(name=f"block{i}_out"),
        )

    @staticmethod
    def _run_block(b, x):
        h = b["ln1"](x)
        x = b["add1"]([x, b["mha"](h, h)])
        return b["out"]([x, b["mlp2"](b["mlp1"](b["ln2"](x)))])

    def front(self, x):
        """Image -> tokens after block 1 (the automatic layer of the class-token model)."""
        h = self.to_tokens(self.embed(x))
        h = self.pos(self.cls(h) if self.cls else h)
        return self._run_block(self.blocks[0], h)

    def back_logits(self, tokens):
        """Tokens after block 1 -> class logits (the pre-softmax score of the fused head)."""
        h = self.norm(self._run_block(self.blocks[1], tokens))
        h = h[:, 0] if self.cls else self.pool(h)
        return keras.ops.matmul(h, self.dense.kernel) + self.dense.bias

    def model(self):
        x = keras.Input((*self.size, 3))
        h = self.norm(self._run_block(self.blocks[1], self.front(x)))
        h = h[:, 0] if self.cls else self.pool(h)
        return keras.Model(x, self.dense(h), name="tiny_vit")


def _images(n, size, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, (n, *size, 3)).astype(np.float32)


def reference_gradcam(vit, x, extra):
    """float64 Grad-CAM at the output of block 1 from tokens and gradients fetched eagerly.

    The patch tokens are tokens[extra:], row-major on the patch grid.
    """
    tokens = tf.convert_to_tensor(vit.front(x))
    with tf.GradientTape() as tape:
        tape.watch(tokens)
        logits = vit.back_logits(tokens)
        target = tf.argmax(logits, axis=-1)
        score = tf.reduce_sum(tf.gather(logits, target, axis=1, batch_dims=1))
    g = tape.gradient(score, tokens).numpy().astype(np.float64)
    a = tokens.numpy().astype(np.float64)
    h, w = vit.grid
    A = a[:, extra:].reshape(len(x), h, w, -1)
    G = g[:, extra:].reshape(len(x), h, w, -1)
    weights = G.mean(axis=(1, 2))  # Grad-CAM, Selvaraju et al. 2017 eq. 1
    return np.maximum(np.einsum("nhwk,nk->nhw", A, weights), 0), target.numpy()


@pytest.fixture(scope="module")
def vit():
    keras.utils.set_random_seed(1)
    v = ViT()
    v.built = v.model()
    return v


def test_automatic_layer_is_the_last_block_whose_patch_tokens_reach_the_head(vit):
    t = graph.trace(vit.built)
    call, why = graph.auto_layer(t)
    # block2's own layers after its attention are per-token: their patch tokens never
    # reach the class token, so the last usable layer is block 1's output (block 2's input)
    assert call.path == "block1_out"
    assert call.grid == graph.TokenGrid(1, 7, 7) and "1 + 7x7" in why
    reach = graph.patch_tokens_reach(t, [t.by_path()[p] for p in ("block1_out", "block2_add1", "final_ln")])
    assert reach == {"block1_out": True, "block2_add1": False, "final_ln": False}


def test_gradcam_on_tokens_matches_a_float64_reference(vit):
    x = _images(4, vit.size)
    ref, target = reference_gradcam(vit, x, extra=1)
    assert (ref > 0).any()
    ex = Explainer(vit.built, layers="auto", methods=("gradcam",), batch_size=4)
    res = ex(x)
    assert ex.layer_shapes == {"block1_out": (7, 7)}
    np.testing.assert_array_equal(res.target, target)
    np.testing.assert_allclose(res.maps[("block1_out", "gradcam")], ref, rtol=1e-4, atol=1e-6)


def test_given_token_grid_is_the_same_as_the_found_one(vit):
    x = _images(2, vit.size, seed=3)
    ref, _ = reference_gradcam(vit, x, extra=1)
    res = Explainer(vit.built, layers=["block1_out"], methods=("gradcam",), batch_size=2, token_grid=(7, 7))(x)
    np.testing.assert_allclose(res.maps[("block1_out", "gradcam")], ref, rtol=1e-4, atol=1e-6)


def test_non_square_grid_comes_from_the_patch_embedding():
    """28x20 images: 7x5 = 35 patches + 1 class token = 36 = 6x6 tokens; the grid is still 7x5."""
    keras.utils.set_random_seed(2)
    vit = ViT(size=(28, 20))
    model = vit.model()
    call = graph.auto_layer(graph.trace(model))[0]
    assert call.grid == graph.TokenGrid(1, 7, 5)
    x = _images(3, vit.size)
    ref, _ = reference_gradcam(vit, x, extra=1)
    res = Explainer(model, methods=("gradcam",), batch_size=3)(x)
    np.testing.assert_allclose(res.maps[("block1_out", "gradcam")], ref, rtol=1e-4, atol=1e-6)
    with pytest.raises(AuditError, match=r"explain.token_grid 8x8 needs 64 patch tokens but it has 36"):
        Explainer(model, layers=["block1_out"], token_grid=(8, 8))


def test_gap_head_picks_the_last_token_layer():
    keras.utils.set_random_seed(3)
    vit = ViT(head="gap")
    t = graph.trace(vit.model())
    call = graph.auto_layer(t)[0]
    # averaged over every token, the final LayerNorm's patch tokens reach the output
    assert call.path == "final_ln" and call.grid == graph.TokenGrid(0, 7, 7)


def test_layer_whose_patch_tokens_do_not_reach_the_head_is_refused(vit):
    t = graph.trace(vit.built)
    with pytest.raises(AuditError) as e:
        graph.resolve_layers(t, ["final_ln"])
    msg = str(e.value)
    assert len(msg.splitlines()) == 1
    assert "patch tokens do not reach the output" in msg and "'block1_out'" in msg


def test_cli_layers_shows_token_grids(vit, tmp_path, capsys):
    path = tmp_path / "vit.keras"
    vit.built.save(path)
    assert main(["layers", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    row = {ln.split()[0] if not ln.startswith("*") else ln.split()[1]: ln for ln in lines if ln.strip()}
    assert row["block1_out"].startswith("*") and "tokens 1 + 7x7" in row["block1_out"]
    assert "not usable: its patch tokens do not reach" in row["final_ln"]
    assert "automatic choice: block1_out" in lines[-1]
    assert main(["layers", str(path), "--token-grid", "5", "5"]) == 0
    out = capsys.readouterr().out
    assert "tokens 25 + 5x5" in out


def test_a_loaded_model_whose_ops_have_default_names(tmp_path):
    """The model's own `h[:, 0]` is an op named 'get_item' once saved and loaded in a fresh session;
    the capture must not add a second 'get_item' (Keras refuses duplicate names)."""
    keras.backend.clear_session()
    keras.utils.set_random_seed(4)
    vit = ViT()
    vit.model().save(tmp_path / "v.keras")
    keras.backend.clear_session()
    model = keras.models.load_model(tmp_path / "v.keras")
    assert "get_item" in [c.path for c in graph.trace(model).calls]
    x = _images(2, vit.size)
    res = Explainer(model, methods=("gradcam",), batch_size=2)(x)
    assert res.maps[("block1_out", "gradcam")].shape == (2, 7, 7)
    np.testing.assert_allclose(res.probs, model.predict(x, verbose=0), rtol=1e-5, atol=1e-6)


def test_audit_explain_on_a_vit(vit, tmp_path):
    """audit explain draws CAMs, feature grids (the 7x7 view) and filter patterns of token layers."""
    import cv2

    from audit.review.explain import _activations, explain

    png = tmp_path / "img.png"
    cv2.imwrite(str(png), (np.random.default_rng(0).random((28, 28, 3)) * 255).astype(np.uint8))
    index = explain(vit.built, [png], tmp_path / "ex", methods=["gradcam"], layers=["block1_out"],
                    feature_layers=["block1_out"], filters=2, steps=2, token_grid=(7, 7))
    names = {p.name for p in index.parent.iterdir()}
    assert {"00_img_cams.png", "00_img_features_block1_out.png", "patterns_block1_out.png"} <= names
    x = _images(1, vit.size)
    acts = _activations(vit.built, x, ["block1_out"], token_grid=(7, 7))["block1_out"]
    np.testing.assert_allclose(acts, np.asarray(vit.front(x))[:, 1:].reshape(1, 7, 7, C), rtol=1e-5, atol=1e-6)


def test_worker_rows_of_a_vit_with_token_grid_in_the_spec(vit, tmp_path):
    """explain.token_grid reaches the worker: 7x7 maps equal to the float64 reference of the same images."""
    import helpers_jobs as h
    import pyarrow as pa

    from audit.data import datasets
    from audit.runner.spec import load_spec
    from audit.runner.worker import AuditWorker

    vit.built.save(tmp_path / "vit.keras")
    spec = load_spec({
        "model": {"path": str(tmp_path / "vit.keras"), "preprocess": "scale_-1_1"},
        "dataset": {"format": "manifest", "path": h.make_manifest(tmp_path, n=4), "shard_size": 4,
                    "classes": ["cat", "dog", "bird"]},
        "explain": {"methods": ["gradcam"], "token_grid": [7, 7]},
        "resources": {"batch_size": 4, "decode_threads": 1},
        "output": str(tmp_path / "out"),
    })
    plan = datasets.plan(spec.dataset)
    w = AuditWorker(spec, classes=plan.classes)
    df = pa.concat_tables([w.process_shard(s, commit=False)["table"] for s in plan.shards]).to_pandas()
    assert (df.status == "ok").all(), df.error.tolist()
    assert set(df.layer) == {"block1_out"}
    assert (df.cam_h == 7).all() and (df.cam_w == 7).all()
    images = datasets.load_images(spec, df.image_id.tolist(), vit.size)[0]
    ref, target = reference_gradcam(vit, images.astype(np.float32) / 127.5 - 1.0, extra=1)
    np.testing.assert_array_equal(df.pred.to_numpy(), target)
    np.testing.assert_allclose(np.stack(df.cam).reshape(-1, 7, 7), ref, rtol=1e-4, atol=1e-6)
