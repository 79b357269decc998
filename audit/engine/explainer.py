"""The CAM engine: every requested method and layer for a batch, in one pass.

One gradient model is built per :class:`Explainer`; one compiled function per
batch shape runs one forward and one backward pass from the target class
*score* (the logit, see :mod:`audit.engine.heads`) and returns the maps of
every requested layer and one-pass method.  Methods that need more
(``scorecam``: forward passes of masked inputs; ``gradcam++exact``:
higher-order derivatives) run after it on the same batch.  The methods
themselves live in :mod:`audit.engine.methods`, one module each.

Batch shapes: a call is cut into chunks of ``batch_size``; a chunk with fewer
images is padded only up to the next power of two (1, 2, 4, ...), so 16
images cost about what 16 images cost, and each of these shapes is traced
once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from audit.engine import graph
from audit.engine import methods as registry
from audit.engine.heads import Head, resolve_target
from audit.errors import AuditError

METHODS = registry.names()
FLAT_RTOL = 1e-6  # a map whose values differ by less than this share of its maximum is constant


def _tf():
    import tensorflow as tf

    return tf


# ----------------------------------------------------------------------------
# Pure helpers
# ----------------------------------------------------------------------------


def flat_maps(maps: np.ndarray) -> np.ndarray:
    """(N,) True where a map (N, h, w) carries no information.

    A map is flat when it has a non-finite value, no positive value, or is
    constant (max - min <= FLAT_RTOL * max, e.g. every map of a 1x1 layer):
    a constant map has no peak and no place, and must not be read as one.
    """
    arr = np.asarray(maps, np.float64)
    finite = np.isfinite(arr).all(axis=(1, 2))
    a = np.where(np.isfinite(arr), arr, 0.0)
    hi, lo = a.max(axis=(1, 2)), a.min(axis=(1, 2))
    return ~finite | ~(hi > 0) | ((hi - lo) <= FLAT_RTOL * hi)


def buckets(batch_size: int) -> list[int]:
    """The batch shapes an Explainer compiles: powers of two below ``batch_size``, then it."""
    out, b = [], 1
    while b < batch_size:
        out.append(b)
        b *= 2
    return out + [int(batch_size)]


def bucket_for(k: int, batch_size: int) -> int:
    """The smallest compiled batch shape that holds ``k`` images."""
    return next(b for b in buckets(batch_size) if b >= k)


def cam_dense(t: graph.Trace, path: str):
    """The Dense layer of a GAP -> Dense head right above ``path`` (for CAM).

    Between the GlobalAveragePooling2D and the Dense only Dropout or linear
    Activation layers may sit, and after the Dense only the head's activation,
    so that the Dense kernel holds the class weights.

    Raises:
        AuditError: the head above ``path`` is not of that form.
    """
    toward = {t.output_id}  # tensors the chosen output depends on (other outputs' heads are ignored)
    for c in reversed(t.calls):
        if toward & set(c.outputs):
            toward.update(c.inputs)
    cur = t.by_path()[path]
    chain = []
    while t.output_id not in cur.outputs:
        nxt = [c for c in t.calls if set(c.inputs) & set(cur.outputs) and toward & set(c.outputs)]
        if len(nxt) != 1:
            break
        cur = nxt[0]
        chain.append(cur)
    kinds = [c.kind for c in chain]
    dense = [i for i, k in enumerate(kinds) if k == "Dense"]
    middle = chain[1:dense[0]] if dense else []
    after = chain[dense[0] + 1:] if dense else []
    ok = (
        len(dense) == 1 and kinds[0] == "GlobalAveragePooling2D" and t.output_id in chain[-1].outputs
        and all(c.kind == "Dropout" or (c.kind == "Activation" and _linear(c.layer)) for c in middle)
        and all(c.kind in ("Softmax", "Activation") for c in after)
    )
    if not ok:
        raise AuditError(
            f"method 'cam' needs a GlobalAveragePooling2D -> Dense head right above layer "
            f"{path!r}; found {' -> '.join(kinds) or 'nothing'}. Use gradcam instead"
        )
    return chain[dense[0]].layer


def _linear(layer) -> bool:
    act = getattr(layer, "activation", None)
    return getattr(act, "__name__", "") in ("", "linear")


# ----------------------------------------------------------------------------
# The result
# ----------------------------------------------------------------------------


@dataclass
class Explanation:
    """Output of :class:`Explainer` for a batch of N images: M rows.

    M == N, row i for image i, except for a multi-label head with
    ``target="predicted"``: one row per (image, label above 0.5), and one row
    for the most probable label of an image with none (``pred`` -1 there).
    ``image`` says which input image each row is about.

    Attributes:
        pred: (M,) predicted class (multi-label: the row's label when its
            probability is above 0.5, else -1).
        score: (M,) probability of ``pred`` (multi-label: of the row's label).
        target: (M,) class whose score was explained.
        probs: (M, C) class probabilities (multi-label: each label's sigmoid).
        image: (M,) index of the input image of each row.
        maps: (layer, method) -> (M, h, w) float32 maps (ReLU applied, raw scale).
        flat: (layer, method) -> (M,) bool, True where the map is degenerate
            (non-finite, all zero or constant; such maps are set to 0).
    """

    pred: np.ndarray
    score: np.ndarray
    target: np.ndarray
    probs: np.ndarray
    image: np.ndarray = None
    maps: dict = field(default_factory=dict)
    flat: dict = field(default_factory=dict)


@dataclass
class _Chunk:
    """One compiled call's results, cut to its real images."""

    pred: np.ndarray
    target: np.ndarray
    probs: np.ndarray
    maps: dict  # (layer, method) -> (k, h, w)


# ----------------------------------------------------------------------------
# The Explainer
# ----------------------------------------------------------------------------


class Explainer:
    """Batched CAM maps (Grad-CAM, Grad-CAM++, CAM, HiResCAM, ...) for a Keras classifier.

    >>> ex = Explainer(model, layers="auto", methods=("gradcam", "gradcam++"))
    >>> res = ex(x)                      # x: preprocessed float32 (N, H, W, C)
    >>> res.maps[(ex.layers[0], "gradcam")].shape   # (N, h, w)

    Args:
        model: a Functional or Sequential Keras classifier with a fixed input
            size (see :func:`audit.engine.models.with_input_size`).
        layers: ``"auto"`` (the deepest spatial layer every path passes
            through), a layer path, or a list of them (``base/out_relu`` for a
            layer inside a nested model).
        methods: a method name or a list (see :data:`METHODS` and
            docs/methods.md).
        target: ``"predicted"`` (the predicted class; multi-label: every label
            above 0.5), ``"label"`` (the ``labels`` given to each call), or a
            class name or index (names first: see :func:`audit.engine.heads.resolve_class`).
        batch_size: images per compiled call (smaller calls use a power of two).
        classes: class names in output order (for named targets), or None.
        output: the classifier output of a model with several outputs.
        token_grid: (h, w) of the patch tokens of a vision transformer's token
            layers; default found per layer (see :func:`audit.engine.graph.find_grid`).

    Attributes:
        layers: the resolved target-layer paths.
        methods: the method names.
        head: the model's :class:`~audit.engine.heads.Head`.
        num_classes: classes of the head (2 for one sigmoid or logit unit).
        target: ``"predicted"``, ``"label"`` or a class index.
        input_shape: (H, W, C) of the model input.
        layer_shapes: layer path -> (h, w) of its map.
        token_grid: the (h, w) given for token layers, or None.

    Raises:
        AuditError: an unknown method or layer, a layer that is not spatial,
            a head the engine cannot read, ``cam`` without a GAP -> Dense head,
            a target that is not a class, class names that do not fit the model,
            or several outputs and none chosen.
    """

    def __init__(self, model, layers="auto", methods=("gradcam", "gradcam++"),
                 target="predicted", batch_size=32, classes=None, output=None, token_grid=None):
        import keras

        self._methods = registry.get(methods)
        self.methods = tuple(m.name for m in self._methods)
        self.model = model
        self.classes = list(classes) if classes is not None else None
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise AuditError(f"batch_size must be at least 1, got {batch_size}")
        t0 = graph.trace(model, output=output, token_grid=token_grid)  # token_grid: (h, w) of ViT patch tokens
        self.head = Head.from_trace(t0, model, output)
        self.num_classes = self.head.num_classes
        if self.classes is not None and len(self.classes) != self.num_classes:
            raise AuditError(f"{len(self.classes)} class names given but the model has {self.num_classes} classes")
        self.layers = graph.resolve_layers(t0, layers)
        self.token_grid = t0.token_grid
        needs_head = any(m.needs.head_weights for m in self._methods)
        self._cam_dense = {p: cam_dense(t0, p) for p in self.layers} if needs_head else {}
        capture = [self.head.capture] if self.head.capture else []
        t = graph.trace(model, capture=self.layers, capture_inputs=capture, output=output,
                        token_grid=token_grid)
        last = t.captured_in[self.head.capture] if self.head.capture else t.output
        self._gm = keras.Model(t.inputs[0], [t.captured[p] for p in self.layers] + [last])
        self.input_shape = tuple(t.inputs[0].shape[1:])
        self.layer_shapes = {p: tuple(t.captured[p].shape[1:3]) for p in self.layers}
        self.target = resolve_target(target, self.classes, self.num_classes)
        self._one_pass = tuple(m for m in self._methods if not m.needs.own_pass)
        self._own_pass = tuple(m for m in self._methods if m.needs.own_pass)
        # multi-label + predicted: the labels to explain are known only after a forward pass
        self._expand = self.head.kind == "multilabel" and self.target == "predicted"
        self._fn = None
        self._functions: dict = {}

    # -- what methods use --------------------------------------------------------
    def forward(self, x):
        """(activations per layer, class scores) for a batch, float32 TF tensors."""
        tf = _tf()
        outs = self._gm(x, training=False)
        outs = list(outs) if isinstance(outs, (list, tuple)) else [outs]
        acts = [tf.cast(a, tf.float32) for a in outs[:-1]]
        return acts, self.head.scores(outs[-1])

    def function(self, key: str, fn):
        """``tf.function(fn)``, built once per Explainer and ``key`` (traced once per shape)."""
        if key not in self._functions:
            self._functions[key] = _tf().function(fn)
        return self._functions[key]

    # -- the compiled step -------------------------------------------------------
    def _step(self, x, target_in):
        tf = _tf()
        with tf.GradientTape() as tape:
            acts, s = self.forward(x)
            pred = self.head.tf_predict(s)
            tgt = pred if self.target == "predicted" and not self._expand else target_in
            total = tf.reduce_sum(self.head.score_of(s, tgt))
        need_grads = any(m.needs.gradients for m in self._one_pass)
        grads = tape.gradient(total, acts) if need_grads else [None] * len(acts)
        maps = []
        for i, path in enumerate(self.layers):
            for m in self._one_pass:
                head_w = None
                if m.needs.head_weights:
                    kernel = self.head.class_kernel(self._cam_dense[path].kernel)
                    head_w = tf.gather(tf.transpose(kernel), tgt)
                maps.append(m(acts[i], grads[i], head_w))
        return pred, tgt, self.head.tf_probabilities(s), maps

    def _compiled(self):
        if self._fn is None:
            self._fn = _tf().function(self._step)  # one trace per bucket shape
        return self._fn

    def _run_chunk(self, xb: np.ndarray, tb: np.ndarray) -> _Chunk:
        """One compiled call on ``xb`` padded to its bucket, cut back to its images."""
        k = len(xb)
        size = bucket_for(k, self.batch_size)
        if k < size:
            xb = np.concatenate([xb, np.zeros((size - k, *xb.shape[1:]), np.float32)])
            tb = np.concatenate([tb, np.zeros(size - k, np.int32)])
        pred, tgt, probs, maps = self._compiled()(xb, tb)
        keys = [(p, m.name) for p in self.layers for m in self._one_pass]
        out = {key: v.numpy()[:k] for key, v in zip(keys, maps)}
        for m in self._own_pass:
            for p, v in zip(self.layers, m.run(self, xb, tgt.numpy())):
                out[(p, m.name)] = np.asarray(v)[:k]
        return _Chunk(pred.numpy()[:k], tgt.numpy()[:k], probs.numpy()[:k], out)

    # -- public --------------------------------------------------------------------
    def __call__(self, x, labels=None) -> Explanation:
        """Explain a batch.

        Args:
            x: preprocessed float32 images (N, H, W, C) at the model input size;
                any N (cut into chunks of ``batch_size``).
            labels: (N,) int class ids, required when ``target="label"``.

        Returns:
            An :class:`Explanation` (maps at each layer's resolution).

        Raises:
            AuditError: a batch of the wrong shape, or missing / misshapen labels.
        """
        x = self._check_batch(x)
        targets = self._targets(len(x), labels)
        image = np.arange(len(x))
        if self._expand:
            image, targets = self._multilabel_rows(x)
            x = x[image]
        b = self.batch_size
        chunks = [self._run_chunk(x[s:s + b], targets[s:s + b]) for s in range(0, len(x), b)]
        return self._assemble(chunks, image)

    def _check_batch(self, x) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 4 or tuple(x.shape[1:]) != tuple(self.input_shape):
            raise AuditError(
                f"expected a batch of shape (N, {', '.join(map(str, self.input_shape))}), got {x.shape}"
            )
        return x

    def _targets(self, n: int, labels) -> np.ndarray:
        """(n,) int32 classes to explain where they are known before the forward pass."""
        if self.target == "label":
            if labels is None:
                raise AuditError("target='label' needs labels=...")
            labels = np.asarray(labels, dtype=np.int32)
            if labels.shape != (n,):
                raise AuditError(f"labels must have shape ({n},), got {labels.shape}")
            if n and not ((labels >= 0) & (labels < self.num_classes)).all():
                raise AuditError(f"labels must be class ids 0..{self.num_classes - 1}")
            return labels
        if isinstance(self.target, int):
            return np.full(n, self.target, np.int32)
        return np.zeros(n, np.int32)

    def probabilities(self, x) -> np.ndarray:
        """(N, C) class probabilities of a batch (forward passes only)."""
        x = self._check_batch(x)
        fn = self.function("probabilities", lambda xb: self.head.tf_probabilities(self.forward(xb)[1]))
        out = []
        for s in range(0, len(x), self.batch_size):
            xb = x[s:s + self.batch_size]
            k, size = len(xb), bucket_for(len(xb), self.batch_size)
            xb = np.concatenate([xb, np.zeros((size - k, *xb.shape[1:]), np.float32)]) if k < size else xb
            out.append(fn(xb).numpy()[:k])
        return np.concatenate(out) if out else np.zeros((0, self.num_classes), np.float32)

    def _multilabel_rows(self, x):
        """(image index, label) of every label above 0.5; the top label for an image with none."""
        probs = self.probabilities(x)
        image, label = [], []
        for i, p in enumerate(probs):
            above = np.flatnonzero(p > 0.5)
            chosen = above if len(above) else [int(np.argmax(p))]
            image += [i] * len(chosen)
            label += [int(c) for c in chosen]
        return np.array(image, np.int64), np.array(label, np.int32)

    def _assemble(self, chunks: list[_Chunk], image: np.ndarray) -> Explanation:
        def cat(name, dtype, shape):
            parts = [getattr(c, name) for c in chunks]
            return np.concatenate(parts).astype(dtype) if parts else np.zeros(shape, dtype)

        target = cat("target", np.int64, (0,))
        probs = cat("probs", np.float32, (0, self.num_classes))
        pred = cat("pred", np.int64, (0,))
        rows = np.arange(len(target))
        if self.head.kind == "multilabel":  # the row's label, when the model says it is there
            pred = np.where(probs[rows, target] > 0.5, target, -1)
            score = probs[rows, target]
        else:
            score = probs[rows, pred]
        res = Explanation(pred=pred, score=score.astype(np.float32), target=target, probs=probs,
                          image=np.asarray(image, np.int64))
        for path in self.layers:
            h, w = self.layer_shapes[path]
            for m in self.methods:
                parts = [c.maps[(path, m)] for c in chunks]
                arr = np.concatenate(parts).astype(np.float32) if parts else np.zeros((0, h, w), np.float32)
                flat = flat_maps(arr)
                arr[flat] = 0.0  # degenerate: flagged, never NaN passed off as a map
                res.maps[(path, m)] = arr
                res.flat[(path, m)] = flat
        return res
