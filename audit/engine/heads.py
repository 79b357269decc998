"""The classifier head: which scores a model's output holds and how to read them.

One :class:`Head` is built and validated once per model (:meth:`Head.of`) and
used everywhere a prediction or a score to differentiate is needed: the
Explainer, the intervention of the scan and ``audit explain``.

Kinds of head (``Head.kind``):

================  ==============================================  ========================
kind              output layer                                    prediction
================  ==============================================  ========================
softmax           C >= 2 units, softmax fused in the last Dense   argmax
                  or a separate Softmax / Activation('softmax')
logits            C >= 2 raw units (trained with from_logits)     argmax
sigmoid_binary    one sigmoid unit p (fused or separate)          class 1 when p > 0.5
logit_binary      one raw unit z                                  class 1 when z > 0
multilabel        C >= 2 sigmoid units, each label independent    every label with p > 0.5
================  ==============================================  ========================

Class scores (what is differentiated): the pre-activation logit of a class;
for one unit z (sigmoid or raw), class 1 scores +z and class 0 scores -z, so a
binary model has two classes like any other.  The activation fused in the
last Dense is never differentiated through: the logit is recomputed from the
Dense input with its kernel and bias.

Class names (:func:`resolve_class`) are matched as names first, and read as
indices only where no name matches: with classes ``["0002", "0001"]`` target
``"0002"`` is class 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from audit.errors import AuditError

KINDS = ("softmax", "logits", "sigmoid_binary", "logit_binary", "multilabel")
BINARY = ("sigmoid_binary", "logit_binary")
TARGET_KEYWORDS = ("predicted", "label")


def _tf():
    import tensorflow as tf

    return tf


def _activation_name(layer) -> str:
    act = getattr(layer, "activation", None)
    return getattr(act, "__name__", str(act)) if act is not None else ""


def _separate_activation(call) -> str:
    """'softmax' / 'sigmoid' when ``call`` is a weightless activation layer, else ''."""
    if call.kind == "Softmax":
        return "softmax"
    if call.kind == "Activation":
        act = _activation_name(call.layer)
        return act if act in ("softmax", "sigmoid") else ""
    return ""


@dataclass(frozen=True, eq=False)
class Head:
    """What a classifier's output means.  Build it with :meth:`Head.of`.

    Attributes:
        kind: one of :data:`KINDS`.
        num_classes: classes the scores have (2 for a single unit).
        units: width of the output layer.
        output: name of the chosen output (None for a single-output model).
        output_index: its index in ``model.outputs``.
        layer: path of the layer that produces the output.
        capture: path of the layer whose *input* holds the logits (a separate
            Softmax/Activation) or the Dense input (an activation fused in a
            Dense); None when the output itself is the logits.
        dense: the Dense layer whose fused activation is stripped, or None.
    """

    kind: str
    num_classes: int
    units: int
    output: str | None = None
    output_index: int = 0
    layer: str = ""
    capture: str | None = None
    dense: object = None

    # -- construction -----------------------------------------------------------
    @classmethod
    def of(cls, model, output: str | None = None) -> Head:
        """The head of ``model`` (its output named ``output`` when it has several).

        Args:
            model: a Functional or Sequential Keras classifier.
            output: name of the classifier output of a multi-output model
                (an output layer's name, or a key of a dict of outputs).

        Returns:
            The validated :class:`Head`.

        Raises:
            AuditError: several outputs and none named (the message lists them),
                an unknown output name, a softmax over one unit, an activation
                fused into a layer that is not Dense, or a non-vector output.
        """
        from audit.engine import graph

        return cls.from_trace(graph.trace(model, output=output), model, output)

    @classmethod
    def from_trace(cls, t, model, output: str | None = None) -> Head:
        """:meth:`of` for a model already traced (``graph.trace(model, output=output)``)."""
        from audit.engine import graph

        index = graph.output_index(model, output) if output is not None or len(model.outputs) > 1 else 0
        name = graph.output_names(model)[index] if output is not None or len(model.outputs) > 1 else None
        if len(t.output.shape) != 2:
            raise AuditError(f"the model output{f' {name!r}' if name else ''} has shape {tuple(t.output.shape)}; "
                             "a classifier outputs (N, classes)")
        units = int(t.output.shape[-1])
        call = t.head()
        kind, capture, dense = _classify(call, units)
        num = 2 if kind in BINARY else units
        return cls(kind, num, units, name, index, call.path, capture, dense)

    # -- NumPy side: from what the model outputs -------------------------------
    def select(self, outputs):
        """The chosen output from what ``model(x)`` returned (an array, a list or a dict)."""
        if isinstance(outputs, dict):
            if self.output in outputs:
                return outputs[self.output]
            return outputs[sorted(outputs)[self.output_index]]
        if isinstance(outputs, (list, tuple)):
            return outputs[self.output_index]
        return outputs

    def _out(self, outputs) -> np.ndarray:
        y = np.asarray(self.select(outputs), np.float64)
        if y.ndim != 2 or y.shape[1] != self.units:
            raise AuditError(f"expected model outputs of shape (N, {self.units}), got {y.shape}")
        return y

    def probabilities(self, outputs) -> np.ndarray:
        """(N, num_classes) float64 class probabilities from the model's outputs.

        softmax: the outputs; logits: their softmax; one unit: (1 - p, p);
        multilabel: each label's own sigmoid probability (rows need not sum to 1).
        """
        y = self._out(outputs)
        if self.kind in ("softmax", "multilabel"):
            return y
        if self.kind == "logits":
            e = np.exp(y - y.max(axis=1, keepdims=True))
            return e / e.sum(axis=1, keepdims=True)
        p = y[:, 0] if self.kind == "sigmoid_binary" else _sigmoid(y[:, 0])
        return np.stack([1.0 - p, p], axis=1)

    def predict(self, outputs) -> np.ndarray:
        """Predictions from the model's outputs (post-activation, as ``model(x)`` returns them).

        Returns:
            (N,) int64 class ids for single-label heads (one unit: 1 where
            p > 0.5, i.e. z > 0); (N, C) bool for a multilabel head (p > 0.5).
        """
        y = self._out(outputs)
        if self.kind == "multilabel":
            return y > 0.5
        if self.kind == "sigmoid_binary":
            return (y[:, 0] > 0.5).astype(np.int64)
        if self.kind == "logit_binary":
            return (y[:, 0] > 0).astype(np.int64)
        return y.argmax(axis=1).astype(np.int64)

    # -- TensorFlow side: inside the compiled step ---------------------------------
    def scores(self, h):
        """(N, num_classes) float32 class scores (logits) from the captured tensor ``h``.

        ``h`` is the input of ``capture`` when it is set (the Dense input, or
        the logits below a separate activation), else the model output.
        """
        tf = _tf()
        h = tf.cast(h, tf.float32)
        if self.dense is not None:
            h = tf.matmul(h, tf.cast(self.dense.kernel, tf.float32))
            if self.dense.bias is not None:
                h = h + tf.cast(self.dense.bias, tf.float32)
        return self.scores_from_logits(h)

    def scores_from_logits(self, z):
        """Class scores from the output layer's logits: one unit z becomes (-z, +z)."""
        tf = _tf()
        z = tf.cast(z, tf.float32)
        return tf.concat([-z, z], axis=-1) if self.kind in BINARY else z

    def score_of(self, s, target):
        """(N,) the score to differentiate: each row's class score ``s[n, target[n]]``."""
        tf = _tf()
        return tf.gather(s, tf.cast(target, tf.int32), axis=1, batch_dims=1)

    def tf_probabilities(self, s):
        """Probabilities from class scores: softmax, or a sigmoid per class (binary, multilabel)."""
        tf = _tf()
        return tf.sigmoid(s) if self.kind in BINARY + ("multilabel",) else tf.nn.softmax(s)

    def tf_predict(self, s):
        """(N,) int32 argmax class of the scores (binary: z > 0; ties go to class 0)."""
        tf = _tf()
        return tf.argmax(s, axis=-1, output_type=tf.int32)

    def class_kernel(self, kernel):
        """CAM's per-class kernel (K, num_classes) from the Dense kernel (K, units).

        One unit w: class 1 is +w and class 0 is -w (as the scores).
        """
        tf = _tf()
        k = tf.cast(kernel, tf.float32)
        return tf.concat([-k, k], axis=1) if self.kind in BINARY else k


def _sigmoid(z):
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # no overflow warning for large |z|


def _classify(call, units: int):
    """(kind, capture path, dense layer) for the layer that produces the output."""
    sep = _separate_activation(call)
    fused = _activation_name(call.layer) if not sep else ""
    act = sep or (fused if fused in ("softmax", "sigmoid") else "")
    if fused in ("softmax", "sigmoid") and call.kind != "Dense":
        raise AuditError(
            f"the last layer {call.path!r} ({call.kind}) has a fused {fused}; only a Dense layer may "
            f"fuse it. Put the {fused} in its own Activation layer"
        )
    if act == "softmax" and units == 1:
        raise AuditError(f"the last layer {call.path!r} is a softmax over one unit (always 1.0); "
                         "a binary classifier with one output unit uses a sigmoid")
    capture = call.path if act else None
    dense = call.layer if act and not sep else None
    if act == "softmax":
        return "softmax", capture, dense
    if act == "sigmoid":
        return ("sigmoid_binary" if units == 1 else "multilabel"), capture, dense
    return ("logit_binary" if units == 1 else "logits"), None, None


# ----------------------------------------------------------------------------
# Class names and targets: one rule everywhere
# ----------------------------------------------------------------------------


def resolve_class(value, classes=None, num_classes: int | None = None) -> int:
    """Class index of ``value``: a class name first, an index only where no name matches.

    Args:
        value: a class name, or an index (int or a string of digits).
        classes: class names in output order, or None.
        num_classes: classes of the model, for the range check (None: unchecked).

    Returns:
        The class index.

    Raises:
        AuditError: neither a class name nor an index in range (one line,
            listing the class names when they are known).
    """
    if isinstance(value, str) and classes and value in classes:
        return list(classes).index(value)
    if isinstance(value, (bool, np.bool_)):
        raise AuditError(f"target {value!r} is neither a class name nor a class index")
    if isinstance(value, (int, np.integer)) or (isinstance(value, str) and value.strip().lstrip("-").isdigit()):
        index = int(value)
        n = num_classes if num_classes is not None else (len(classes) if classes else None)
        if index < 0 or (n is not None and index >= n):
            raise AuditError(f"target class {index} is out of range: the model has {n} classes (0..{n - 1})"
                             if n is not None else f"target class {index} is negative")
        return index
    known = f"; classes: {', '.join(map(str, classes))}" if classes else "; give class names (dataset.classes / --classes) or an index"
    raise AuditError(f"target {value!r} is not a class name{known}")


def resolve_target(target, classes=None, num_classes: int | None = None):
    """``"predicted"`` / ``"label"`` as they are, anything else through :func:`resolve_class`.

    The two keywords win over class names: a class called ``label`` is
    targeted by its index.
    """
    if isinstance(target, str) and target in TARGET_KEYWORDS:
        return target
    return resolve_class(target, classes, num_classes)
