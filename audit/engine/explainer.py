"""The CAM engine: Grad-CAM, Grad-CAM++ and CAM for a batch, in one pass.

One gradient model is built per :class:`Explainer`; one compiled function per
batch shape runs one forward and one backward pass from the target class
*logit* (pre-softmax score) and returns the maps of every requested layer and
method.  The channel-weighting rules are pure functions of the activations
``A`` (N, h, w, K) and gradients ``g`` (same shape), so they can be tested
against NumPy without a model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from audit.engine import graph
from audit.errors import AuditError

METHODS = ("gradcam", "gradcam++", "cam", "gradcam++exact")


def _tf():
    import tensorflow as tf

    return tf


# ----------------------------------------------------------------------------
# Channel weights (pure functions; work on NumPy arrays and TF tensors alike)
# ----------------------------------------------------------------------------


def gradcam_weights(A, g):
    """Grad-CAM (Selvaraju et al. 2017, eq. 1): w_k = mean_ij dS/dA^k_ij."""
    tf = _tf()
    return tf.reduce_mean(g, axis=(1, 2))


def gradcampp_weights(A, g):
    """Grad-CAM++ closed form (Chattopadhyay et al. 2018, eq. 19 with Y = exp(S)).

    alpha = g^2 / (2 g^2 + sum_ab(A) g^3), w_k = sum_ij alpha * relu(g).
    Computed from the gradient of the logit S; the factor exp(S) cancels, so
    it is never formed (it overflows float32 above S = 88.7).  A zero or
    non-finite denominator is replaced by 1 (alpha is then 0 where g is 0).
    """
    tf = _tf()
    g2 = tf.square(g)
    g3 = g2 * g
    sum_a = tf.reduce_sum(A, axis=(1, 2), keepdims=True)
    denom = 2.0 * g2 + sum_a * g3
    ok = tf.logical_and(tf.not_equal(denom, 0.0), tf.math.is_finite(denom))
    alpha = g2 / tf.where(ok, denom, tf.ones_like(denom))
    return tf.reduce_sum(alpha * tf.nn.relu(g), axis=(1, 2))


def combine(A, w):
    """map = relu(sum_k w_k A^k): (N, h, w, K) x (N, K) -> (N, h, w)."""
    tf = _tf()
    return tf.nn.relu(tf.einsum("nhwk,nk->nhw", A, tf.cast(w, A.dtype)))


class Method:
    """A CAM method: how channels are weighted.  The engine owns the tape."""

    name = ""
    needs_head = False

    def weights(self, A, g, head_w):  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, A, g, head_w=None):
        return combine(A, self.weights(A, g, head_w))


class GradCAM(Method):
    name = "gradcam"

    def weights(self, A, g, head_w):
        return gradcam_weights(A, g)


class GradCAMPlusPlus(Method):
    name = "gradcam++"

    def weights(self, A, g, head_w):
        return gradcampp_weights(A, g)


class CAM(Method):
    """CAM (Zhou et al. 2016): w_k = W[k, c], the Dense kernel of a GAP head."""

    name = "cam"
    needs_head = True

    def weights(self, A, g, head_w):
        return head_w


_METHODS = {m.name: m for m in (GradCAM(), GradCAMPlusPlus(), CAM())}


# ----------------------------------------------------------------------------
# The head: where the class logit comes from
# ----------------------------------------------------------------------------


def _activation_name(layer) -> str:
    act = getattr(layer, "activation", None)
    return getattr(act, "__name__", str(act)) if act is not None else ""


def _head(t: graph.Trace):
    """(kind, capture_input_path, dense_layer) for the model's last layer.

    kind: "dense_softmax" / "dense_sigmoid" (activation fused in a Dense: the
    logit is recomputed from the Dense input), "softmax" / "sigmoid" (a
    separate activation layer: its input is the logit), or "linear".
    """
    head = t.head()
    act = _activation_name(head.layer)
    if head.kind == "Softmax" or (head.kind == "Activation" and act == "softmax"):
        return "softmax", head.path, None
    if head.kind == "Activation" and act == "sigmoid":
        return "sigmoid", head.path, None
    if act in ("softmax", "sigmoid"):
        if head.kind != "Dense":
            raise AuditError(
                f"the last layer {head.path!r} ({head.kind}) has a fused {act}; only a "
                f"Dense layer may fuse it. Put the {act} in its own Activation layer"
            )
        return f"dense_{act}", head.path, head.layer
    return "linear", None, None


def _cam_kernel(t: graph.Trace, path: str):
    """The Dense kernel (K, C) above ``path`` when the head is GAP -> Dense."""
    calls = t.by_path()
    cur = calls[path]
    chain = []
    while True:
        nxt = [c for c in t.calls if set(c.inputs) & set(cur.outputs)]
        if len(nxt) != 1:
            break
        cur = nxt[0]
        chain.append(cur)
        if cur.kind == "Dense":
            break
    kinds = [c.kind for c in chain]
    ok = (
        kinds
        and kinds[0] in ("GlobalAveragePooling2D",)
        and kinds[-1] == "Dense"
        and all(k in ("Dropout", "Activation") for k in kinds[1:-1])
        and (len(kinds) < 3 or all(_activation_name(c.layer) in ("", "linear") for c in chain[1:-1]))
    )
    if not ok:
        raise AuditError(
            f"method 'cam' needs a GlobalAveragePooling2D -> Dense head right above layer "
            f"{path!r}; found {' -> '.join(kinds) or 'nothing'}. Use gradcam instead"
        )
    return chain[-1].layer.kernel


# ----------------------------------------------------------------------------
# The Explainer
# ----------------------------------------------------------------------------


@dataclass
class Explanation:
    """Output of :class:`Explainer` for a batch of N images."""

    pred: np.ndarray  # (N,) predicted class
    score: np.ndarray  # (N,) probability of the predicted class
    target: np.ndarray  # (N,) class whose logit was explained
    probs: np.ndarray  # (N, C) class probabilities
    maps: dict = field(default_factory=dict)  # (layer, method) -> (N, h, w) float32
    flat: dict = field(default_factory=dict)  # (layer, method) -> (N,) bool


class Explainer:
    """Batched Grad-CAM / Grad-CAM++ / CAM for a Keras classifier.

    >>> ex = Explainer(model, layers="auto", methods=("gradcam", "gradcam++"))
    >>> res = ex(x)                      # x: preprocessed float32 (N, H, W, C)
    >>> res.maps[(ex.layers[0], "gradcam")].shape   # (N, h, w)
    """

    def __init__(self, model, layers="auto", methods=("gradcam", "gradcam++"),
                 target="predicted", batch_size=32, classes=None, token_grid=None):
        import keras

        if isinstance(methods, str):
            methods = (methods,)
        bad = [m for m in methods if m not in METHODS]
        if bad or not methods:
            raise AuditError(f"unknown method {bad[0] if bad else ''!r}; expected some of {', '.join(METHODS)}")
        self.model = model
        self.methods = tuple(dict.fromkeys(methods))
        self.classes = list(classes) if classes is not None else None
        self.batch_size = int(batch_size)
        t0 = graph.trace(model, token_grid=token_grid)  # token_grid: (h, w) of ViT patch tokens
        self.layers = graph.resolve_layers(t0, layers)
        self._head_kind, head_in, dense = _head(t0)
        t = graph.trace(model, capture=self.layers, capture_inputs=[head_in] if head_in else [],
                        token_grid=token_grid)
        last = t.captured_in[head_in] if head_in else t.output
        self._dense = dense
        # several sigmoid units: independent (multi-label) probabilities
        self._multi_label = self._head_kind.endswith("sigmoid") and t.output.shape[-1] > 1
        self._cam_w = {p: _cam_kernel(t0, p) for p in self.layers} if "cam" in self.methods else {}
        self._gm = keras.Model(t.inputs[0], [t.captured[p] for p in self.layers] + [last])
        self.input_shape = tuple(t.inputs[0].shape[1:])
        self.layer_shapes = {p: tuple(t.captured[p].shape[1:3]) for p in self.layers}
        # classes the logits have (a single sigmoid unit is explained as two classes)
        n_out = int(t.output.shape[-1])
        self.num_classes = 2 if n_out == 1 and self._head_kind.endswith("sigmoid") else n_out
        self.target = self._check_target(target)
        self._fn = None
        self._exact_fn = None

    # -- target ---------------------------------------------------------------
    def _check_target(self, target):
        if target in ("predicted", "label"):
            return target
        if isinstance(target, str) and not target.lstrip("-").isdigit():
            if not self.classes or target not in self.classes:
                raise AuditError(
                    f"target {target!r} is not a class name"
                    + (f"; classes: {', '.join(self.classes)}" if self.classes else "")
                )
            return self.classes.index(target)
        index = int(target)
        if not 0 <= index < self.num_classes:
            raise AuditError(f"target class {index} is out of range: the model has {self.num_classes} classes "
                             f"(0..{self.num_classes - 1})")
        return index

    # -- the compiled step ------------------------------------------------------
    def _logits(self, h):
        tf = _tf()
        h = tf.cast(h, tf.float32)
        if self._dense is not None:
            h = tf.matmul(h, tf.cast(self._dense.kernel, tf.float32))
            if self._dense.bias is not None:
                h = h + tf.cast(self._dense.bias, tf.float32)
        if self._head_kind.endswith("sigmoid") and h.shape[-1] == 1:
            h = tf.concat([-0.5 * h, 0.5 * h], axis=-1)  # softmax of this == (1-p, p)
        return h

    def _forward(self, x, labels):
        """Forward pass inside a tape: activations, logits, targets, summed score."""
        tf = _tf()
        outs = self._gm(x, training=False)
        acts, logits = outs[:-1], self._logits(outs[-1])
        pred = tf.argmax(logits, axis=-1, output_type=tf.int32)
        if self.target == "predicted":
            tgt = pred
        elif self.target == "label":
            tgt = labels
        else:
            tgt = tf.fill(tf.shape(pred), tf.constant(self.target, tf.int32))
        s = tf.gather(logits, tgt, axis=1, batch_dims=1)
        return acts, logits, pred, tgt, s

    def _step(self, x, labels):
        tf = _tf()
        with tf.GradientTape() as tape:
            acts, logits, pred, tgt, s = self._forward(x, labels)
            total = tf.reduce_sum(s)
        grads = tape.gradient(total, acts)
        maps = {}
        for i, path in enumerate(self.layers):
            A = tf.cast(acts[i], tf.float32)
            g = tf.cast(grads[i], tf.float32)
            for m in self.methods:
                if m == "gradcam++exact":
                    continue
                head_w = None
                if m == "cam":
                    head_w = tf.gather(tf.transpose(tf.cast(self._cam_w[path], tf.float32)), tgt)
                maps[f"{i}|{m}"] = _METHODS[m](A, g, head_w)
        probs = tf.sigmoid(logits) if self._multi_label else tf.nn.softmax(logits)
        score = tf.gather(probs, pred, axis=1, batch_dims=1)
        return pred, score, tgt, probs, maps

    def _exact_step(self, x, labels):
        """Grad-CAM++ from the exact diagonal 2nd/3rd derivatives of Y = exp(S).

        For comparison on small models only: it costs two Jacobians per layer.
        Y is taken as exp(S - S0) with S0 = S held constant, which leaves alpha
        unchanged and cannot overflow.
        """
        tf = _tf()
        out = {}
        for i in range(len(self.layers)):
            with tf.GradientTape() as t3:
                with tf.GradientTape() as t2:
                    with tf.GradientTape() as t1:
                        acts, _, _, _, s = self._forward(x, labels)
                        A = acts[i]
                        y = tf.exp(s - tf.stop_gradient(s))
                        total = tf.reduce_sum(y)
                    g1 = t1.gradient(total, A)
                    n = tf.shape(A)[0]
                    g1f = tf.reshape(g1, (n, -1))
                j2 = t2.batch_jacobian(g1f, A, experimental_use_pfor=False)
                d2 = tf.linalg.diag_part(tf.reshape(j2, (n, g1f.shape[1], -1)))
            j3 = t3.batch_jacobian(d2, A, experimental_use_pfor=False)
            d3 = tf.linalg.diag_part(tf.reshape(j3, (n, g1f.shape[1], -1)))
            shape = tf.shape(A)
            d2, d3 = tf.reshape(d2, shape), tf.reshape(d3, shape)
            sum_a = tf.reduce_sum(A, axis=(1, 2), keepdims=True)
            denom = 2.0 * d2 + sum_a * d3
            ok = tf.logical_and(tf.not_equal(denom, 0.0), tf.math.is_finite(denom))
            alpha = d2 / tf.where(ok, denom, tf.ones_like(denom))
            w = tf.reduce_sum(alpha * tf.nn.relu(g1), axis=(1, 2))  # g1 = dY/dA at Y = 1
            out[f"{i}|gradcam++exact"] = combine(A, w)
        return out

    def _compiled(self):
        if self._fn is None:
            tf = _tf()
            sig = [
                tf.TensorSpec((self.batch_size, *self.input_shape), tf.float32),
                tf.TensorSpec((self.batch_size,), tf.int32),
            ]
            self._fn = tf.function(self._step, input_signature=sig)
            if "gradcam++exact" in self.methods:
                self._exact_fn = tf.function(self._exact_step, input_signature=sig)
        return self._fn

    # -- public ---------------------------------------------------------------
    def __call__(self, x, labels=None) -> Explanation:
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 4 or tuple(x.shape[1:]) != tuple(self.input_shape):
            raise AuditError(
                f"expected a batch of shape (N, {', '.join(map(str, self.input_shape))}), got {x.shape}"
            )
        n = len(x)
        if self.target == "label":
            if labels is None:
                raise AuditError("target='label' needs labels=...")
            labels = np.asarray(labels, dtype=np.int32)
            if labels.shape != (n,):
                raise AuditError(f"labels must have shape ({n},), got {labels.shape}")
        else:
            labels = np.zeros(n, np.int32)
        fn = self._compiled()
        b = self.batch_size
        parts = []
        for start in range(0, max(n, 1), b):
            xb, lb = x[start:start + b], labels[start:start + b]
            k = len(xb)
            if k < b:  # pad: one compiled shape for every batch
                xb = np.concatenate([xb, np.zeros((b - k, *xb.shape[1:]), np.float32)])
                lb = np.concatenate([lb, np.zeros(b - k, np.int32)])
            pred, score, tgt, probs, maps = fn(xb, lb)
            if self._exact_fn is not None:
                maps = {**maps, **self._exact_fn(xb, lb)}
            parts.append(
                (pred.numpy()[:k], score.numpy()[:k], tgt.numpy()[:k], probs.numpy()[:k],
                 {key: v.numpy()[:k] for key, v in maps.items()})
            )
        res = Explanation(
            pred=np.concatenate([p[0] for p in parts]).astype(np.int64),
            score=np.concatenate([p[1] for p in parts]).astype(np.float32),
            target=np.concatenate([p[2] for p in parts]).astype(np.int64),
            probs=np.concatenate([p[3] for p in parts]).astype(np.float32),
        )
        for i, path in enumerate(self.layers):
            for m in self.methods:
                key = f"{i}|{m}"
                arr = np.concatenate([p[4][key] for p in parts]).astype(np.float32)
                flat = ~np.isfinite(arr).all(axis=(1, 2)) | ~(arr > 0).any(axis=(1, 2))
                arr[flat] = 0.0  # degenerate: flagged, never NaN passed off as a map
                res.maps[(path, m)] = arr
                res.flat[(path, m)] = flat
        return res
