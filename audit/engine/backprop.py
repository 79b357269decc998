"""Input gradients of a whole model: gradient, guided backpropagation, deconvnet, filter patterns.

The backward passes that ``audit explain`` draws, kept beside the CAM methods
because they are model maths, not pictures:

* input gradients: plain gradient, guided backpropagation (Springenberg et al.
  2015) and deconvnet (Zeiler & Fergus 2014), which differ only in what the
  backward pass does at a ReLU;
* filter patterns: the input that maximises a filter's mean activation,
  found by normalised gradient ascent from a noisy grey image (the seeds,
  Chollet 5.4.2);
* :func:`affine_of`: a preprocessing as an affine map, so that gradients can be
  shown, and ascent steps taken, in grey levels.

Guided backpropagation and deconvnet run on a *rebuilt* graph of the model in
which every ReLU (an ``Activation('relu')``, a ``ReLU`` layer or a fused
``activation='relu'`` of a Conv/Dense layer, also inside nested base models)
is replaced by a ReLU with a custom gradient.  Layers with a fused ReLU are
copied (same weights, linear activation); no attribute of the user's model is
changed.

The registry: :data:`BACKWARD_MODES` (the rule at a ReLU) and
:data:`GRAD_METHODS` (the names ``audit explain`` accepts besides the CAM
methods of :mod:`audit.engine.methods`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from audit.engine.heads import Head
from audit.engine.methods import names as cam_names
from audit.errors import AuditError

BACKWARD_MODES = ("gradient", "guided", "deconvnet")
GRAD_METHODS = ("gradient", "guided", "deconvnet", "guided-gradcam")


def _tf():
    # Deferred: TensorFlow takes seconds to import, and the CLI's help and
    # checks read the registry below without it (likewise keras and
    # audit.engine.graph, which imports keras, inside the functions).
    import tensorflow as tf

    return tf


def cam_methods() -> tuple[str, ...]:
    """The CAM methods of the engine's registry."""
    return cam_names()


def all_methods() -> tuple[str, ...]:
    """Every method ``audit explain`` draws: the registry's CAM methods, then the input gradients."""
    return cam_methods() + GRAD_METHODS


def _relu_params(layer):
    """(negative_slope, max_value, threshold) when ``layer`` applies a ReLU, else None."""
    import keras

    kind = type(layer).__name__
    if isinstance(layer, keras.layers.ReLU) or kind == "ReLU":
        cfg = layer.get_config()
        mv = cfg.get("max_value")
        return float(cfg.get("negative_slope") or 0.0), (None if mv is None else float(mv)), float(
            cfg.get("threshold") or 0.0
        )
    act = getattr(layer, "activation", None)
    name = getattr(act, "__name__", "")
    if name == "relu":
        return 0.0, None, 0.0
    if name == "relu6":
        return 0.0, 6.0, 0.0
    return None


def guided_relu_grad(x, g, mode: str, negative_slope=0.0, max_value=None, threshold=0.0):
    """Backward rule at a ReLU for upstream gradient ``g`` (NumPy or TF arrays).

    * ``gradient``: the ordinary chain rule, g * f'(x);
    * ``guided`` (Springenberg et al. 2015, eq. for R^l): g * f'(x) * [g > 0]:
      only positive signal through units that were active;
    * ``deconvnet`` (Zeiler & Fergus 2014): relu(g), ignoring the forward pass.
    """
    tf = _tf()
    if mode == "deconvnet":
        return tf.nn.relu(g)
    x = tf.convert_to_tensor(x)
    g = tf.convert_to_tensor(g, dtype=x.dtype)
    active = x > threshold
    if max_value is not None:
        active = tf.logical_and(active, x < max_value)
    d = tf.cast(active, x.dtype)
    if negative_slope:
        d = d + negative_slope * tf.cast(x < threshold, x.dtype)
    out = g * d
    if mode == "guided":
        out = out * tf.cast(g > 0, x.dtype)
    return out


def _guided_relu_layer(mode, negative_slope, max_value, threshold, name):
    import keras

    tf = _tf()

    class GuidedReLU(keras.layers.Layer):
        """A ReLU whose backward pass follows ``mode`` (see guided_relu_grad)."""

        def call(self, x):
            @tf.custom_gradient
            def op(z):
                y = keras.activations.relu(z, negative_slope=negative_slope, max_value=max_value,
                                           threshold=threshold)

                def grad(g):
                    return guided_relu_grad(z, g, mode, negative_slope, max_value, threshold)

                return y, grad

            return op(x)

        def compute_output_shape(self, input_shape):
            return input_shape

    return GuidedReLU(name=name)


def _safe(path: str) -> str:
    return re.sub(r"[^0-9A-Za-z_.-]", "_", path)


def _linear_copy(layer, input_shape, name):
    """A copy of ``layer`` with a linear activation and the same weights."""
    cfg = layer.get_config()
    cfg["activation"] = "linear"
    cfg["name"] = name
    new = type(layer).from_config(cfg)
    new.build(input_shape)
    new.set_weights(layer.get_weights())
    return new



@dataclass
class GuidedModel:
    """The rebuilt model: input -> the head's logits, with ReLUs replaced."""

    model: object
    mode: str
    replaced: list = field(default_factory=list)  # paths whose ReLU got the custom gradient
    head: object = None  # audit.engine.heads.Head

    def logits(self, x):
        """(N, classes) class scores: one sigmoid/logit unit z becomes (-z, +z), as in the Explainer."""
        return self.head.scores_from_logits(self.model(x, training=False))


def guided_model(model, mode: str = "guided", output=None) -> GuidedModel:
    """Rebuild ``model`` (input -> logits) with every ReLU's backward rule set by ``mode``.

    ``mode``: ``guided`` | ``deconvnet`` | ``gradient`` (the ordinary rule, for
    comparison).  The softmax/sigmoid of the head is dropped (gradients are
    taken from the class logit, as for Grad-CAM).  Nested Functional and
    Sequential base models are walked into.  Other layers are shared with
    ``model``; layers with a fused ReLU are copied; ``model`` itself is not
    modified.  ``output`` chooses the output of a multi-output model.

    Raises:
        AuditError: an unknown ``mode``, or a model :func:`audit.engine.graph.trace` refuses.
    """
    import keras

    from audit.engine import graph

    if mode not in ("guided", "deconvnet", "gradient"):
        raise AuditError(f"unknown backward mode {mode!r}; expected guided, deconvnet or gradient")
    t0 = graph.trace(model, output=output)
    head = Head.from_trace(t0, model, output)
    shape = graph._model_input_shape(model)
    x = keras.Input(shape=shape[1:], batch_size=shape[0])
    leaf = _GuidedLeaf(head, mode)
    out = graph.Walk(leaf).run(model, x)
    if not graph._is_sequential(model) and len(model.outputs) > 1:
        out = head.select(keras.tree.flatten(out))
    rebuilt = keras.Model(x, out, name=f"{_safe(model.name)}_{mode}")
    return GuidedModel(rebuilt, mode, leaf.replaced, head)


@dataclass
class _GuidedLeaf:
    """The leaf of :func:`guided_model`'s walk: the head gives its logits, each ReLU gets ``mode``'s gradient."""

    head: object  # audit.engine.heads.Head
    mode: str
    replaced: list = field(default_factory=list)  # paths whose ReLU got the custom gradient

    def __call__(self, layer, path: str, args, kwargs):
        kwargs = {k: v for k, v in kwargs.items() if k not in ("training", "mask")}
        head = self.head
        if path == head.layer and head.capture and head.dense is None:
            return args[0]  # the logit is the input of the separate softmax/sigmoid
        if path == head.layer and head.dense is not None:
            return _linear_copy(layer, args[0].shape, f"{_safe(path)}_logits")(args[0])
        params = _relu_params(layer)
        if params is None:
            return layer(*args, **kwargs)
        self.replaced.append(path)
        relu = _guided_relu_layer(self.mode, *params, name=f"{_safe(path)}_{self.mode}_relu")
        if type(layer).__name__ in ("ReLU", "Activation"):
            return relu(args[0])
        return relu(_linear_copy(layer, args[0].shape, f"{_safe(path)}_linear")(*args, **kwargs))


def input_gradients(gm: GuidedModel, x, target) -> np.ndarray:
    """d logit[target] / d input through ``gm`` for a batch: (N, H, W, C) float32."""
    tf = _tf()
    x = tf.convert_to_tensor(np.asarray(x, np.float32))
    target = tf.convert_to_tensor(np.asarray(target, np.int32))
    with tf.GradientTape() as tape:
        tape.watch(x)
        logits = gm.logits(x)
        s = tf.reduce_sum(tf.gather(logits, target, axis=1, batch_dims=1))
    return tape.gradient(s, x).numpy().astype(np.float32)



def affine_of(preprocess_fn, channels: int):
    """(M, b) with preprocess(u) == u @ M.T + b per pixel, or None when it is not affine.

    All the usual preprocessings (scale, caffe's BGR mean subtraction, torch's
    mean/std) are affine; knowing M lets gradients be shown in image (RGB)
    space and lets gradient ascent take steps of one grey level.
    """
    c = int(channels)
    probe = np.zeros((c + 1, 1, 1, c), np.float32)
    for j in range(c):
        probe[j + 1, 0, 0, j] = 255.0
    try:
        out = np.asarray(preprocess_fn(probe.copy()), np.float64)[:, 0, 0, :]
    except Exception:  # a preprocessing we cannot probe: show raw input space
        return None
    b = out[0]
    M = ((out[1:] - b) / 255.0).T  # M[:, j] = response to channel j
    rng = np.random.default_rng(0)
    test = rng.uniform(0, 255, (1, 3, 3, c)).astype(np.float32)
    got = np.asarray(preprocess_fn(test.copy()), np.float64)
    want = test.astype(np.float64) @ M.T + b
    scale = max(float(np.abs(want).max()), 1e-6)
    if got.shape != want.shape or not np.allclose(got, want, atol=1e-4 * scale):
        return None
    if abs(np.linalg.det(M)) < 1e-12:
        return None
    return M.astype(np.float32), b.astype(np.float32)



def filter_patterns(model, layer: str, filters, *, affine=None, steps: int = 40, step: float = 1.0,
                    seed: int = 0, output=None, token_grid=None) -> np.ndarray:
    """Gradient ascent on the input for each filter of ``layer`` (seeds: Chollet 5.4.2).

    Starts from a noisy grey image (128 + U(0, 20) grey levels), maximises
    the mean activation of the filter with steps of the RMS-normalised
    gradient, ``step`` grey levels each.  When ``affine`` (M, b) is given the
    ascent runs on the image before preprocessing.  ``output`` chooses the
    output of a multi-output model (the layer's own activations are ascended).
    Returns (F, H, W, C) images in grey-level units (not yet deprocessed).
    """
    import keras

    from audit.engine import graph

    tf = _tf()
    t = graph.trace(model, capture=[layer], output=output, token_grid=token_grid)
    fm = keras.Model(t.inputs[0], t.captured[layer])
    shape = tuple(t.inputs[0].shape[1:])
    filters = [int(f) for f in filters]
    n_ch = int(t.captured[layer].shape[-1])
    onehot = tf.constant(np.eye(n_ch, dtype=np.float32)[filters])  # (F, K)
    rng = np.random.default_rng(seed)
    u = tf.Variable(rng.random((len(filters), *shape)).astype(np.float32) * 20 + 128)
    if affine is not None:
        M = tf.constant(affine[0].T)
        b = tf.constant(affine[1])

    @tf.function
    def ascend():
        with tf.GradientTape() as tape:
            x = tf.tensordot(u, M, axes=1) + b if affine is not None else u
            a = tf.cast(fm(x, training=False), tf.float32)
            loss = tf.reduce_sum(tf.reduce_mean(a, axis=(1, 2)) * onehot)
        g = tape.gradient(loss, u)
        rms = tf.sqrt(tf.reduce_mean(tf.square(g), axis=(1, 2, 3), keepdims=True))
        u.assign_add(step * tf.math.divide_no_nan(g, rms))

    for _ in range(int(steps)):
        ascend()
    return u.numpy()


# ----------------------------------------------------------------------------
# The whole page
# ----------------------------------------------------------------------------


def mode_gradients(model, x, target, methods, affine, output):
    """Input gradients per backward mode that ``methods`` asks for, and the ReLU paths replaced.

    Args:
        model: the Keras model.
        x: preprocessed batch (N, H, W, C).
        target: (N,) class index per image.
        methods: names among :data:`GRAD_METHODS` (others are ignored);
            ``guided-gradcam`` needs the guided gradient.
        affine: (M, b) of the preprocessing (see :func:`affine_of`) or None.
        output: the output of a multi-output model, or None.

    Returns:
        ({mode: (N, H, W, C) float32}, [paths of the replaced ReLUs]).
    """
    grads, replaced = {}, []
    for mode in BACKWARD_MODES:
        if mode in methods or (mode == "guided" and "guided-gradcam" in methods):
            gm = guided_model(model, mode, output=output)
            replaced = gm.replaced
            g = input_gradients(gm, x, target)
            if affine is not None:
                g = g @ affine[0]  # dL/du = dL/dx . M: back to image (RGB) space
            grads[mode] = g
    return grads, replaced
