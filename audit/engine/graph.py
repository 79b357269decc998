"""The model as a graph of layers: tracing, nested models, target-layer choice.

Keras does not let you take ``model.get_layer(...).output`` of a layer inside a
base model nested in a larger model (the graph is "disconnected").  We avoid
the problem by re-running the model *symbolically*, layer by layer, descending
into nested Functional and Sequential models.  Every leaf layer call is
recorded with its path (``outer/inner``) and the tensors it reads and writes.
The same walk can capture any layer's output (or input), which is how
:class:`audit.Explainer` builds its one gradient model.

Layer choice (docs/layers.md): the deepest layer that every path from input
to output passes through (a dominator) whose output is a map of more than one
cell and that is not a pure pooling, padding or reshaping layer.  A map is a
4-D (N, h, w, C) output with h x w > 1, or a token sequence (N, T, C) of a
vision transformer whose patch tokens form a grid (:class:`TokenGrid`) and
reach the output.  A captured token layer is replayed as tokens -> (N, h, w,
C) view -> tokens, so the view lies on the gradient path.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import keras

from audit.errors import AuditError

# Layers that only pool, pad, crop or reshape without learning anything: never
# a good place to explain from.
_PASSIVE = (
    "MaxPooling2D",
    "AveragePooling2D",
    "GlobalMaxPooling2D",
    "GlobalAveragePooling2D",
    "ZeroPadding2D",
    "Cropping2D",
    "UpSampling2D",
    "Dropout",
    "SpatialDropout2D",
    "GaussianNoise",
    "GaussianDropout",
    "InputLayer",
    "Reshape",
    "Permute",
    "Flatten",
)


@dataclass(frozen=True)
class TokenGrid:
    """How a token sequence (N, T, C) maps to an (N, h, w, C) feature map.

    ``extra`` leading tokens (class, register or distillation tokens) are
    dropped; the next ``h * w`` tokens are the patches in row-major order.
    """

    extra: int
    h: int
    w: int

    def __str__(self) -> str:
        return f"{self.extra} + {self.h}x{self.w}" if self.extra else f"{self.h}x{self.w}"


@dataclass
class Call:
    """One leaf-layer call seen while tracing."""

    path: str
    layer: keras.layers.Layer
    inputs: list[int]  # ids of the symbolic tensors read
    outputs: list[int]  # ids of the symbolic tensors written
    shape: tuple  # output shape (first output), batch dim included
    grid: TokenGrid | None = None  # set for a token-sequence (N, T, C) output with a grid

    @property
    def kind(self) -> str:
        return type(self.layer).__name__

    @property
    def is_tokens(self) -> bool:
        return len(self.shape) == 3

    @property
    def map_shape(self) -> tuple | None:
        """(h, w) of the map this layer gives: its 4-D output or its token grid."""
        if len(self.shape) == 4:
            return tuple(self.shape[1:3])
        if self.grid is not None:
            return (self.grid.h, self.grid.w)
        return None


@dataclass
class Trace:
    """Result of a symbolic walk through a model."""

    calls: list[Call] = field(default_factory=list)
    input_ids: list[int] = field(default_factory=list)
    output_id: int = 0
    inputs: list = field(default_factory=list)
    output: object = None
    captured: dict = field(default_factory=dict)  # path -> tensor (output)
    captured_in: dict = field(default_factory=dict)  # path -> tensor (input)
    model: object = None
    token_grid: tuple | None = None  # (h, w) given by the user, else found per layer
    reach: dict = field(default_factory=dict)  # path -> patch tokens reach the output (cache)
    output_choice: object = None  # the ``output=`` the trace followed

    def by_path(self) -> dict[str, Call]:
        return {c.path: c for c in self.calls}

    def head(self) -> Call:
        """The leaf layer whose output is the model's output."""
        for c in reversed(self.calls):
            if self.output_id in c.outputs:
                return c
        raise AuditError("could not find the layer that produces the model output")


def _is_functional(layer) -> bool:
    return isinstance(layer, keras.Model) and hasattr(layer, "_run_through_graph") and hasattr(
        layer, "_nodes_by_depth"
    )


def _is_sequential(layer) -> bool:
    return isinstance(layer, keras.Sequential)


def _flat(x) -> list:
    return list(keras.tree.flatten(x))


def _model_input_shape(model) -> tuple:
    try:
        shape = model.inputs[0].shape
    except (AttributeError, IndexError, ValueError):
        shape = None
    if shape is None:
        try:
            shape = model.input_shape
        except (AttributeError, ValueError):
            shape = None
    if shape is None:
        raise AuditError(
            f"model {model.name!r} has no known input shape; build it on an input first "
            "(e.g. keras.Input(shape=(H, W, C)))"
        )
    if isinstance(shape, list):
        shape = shape[0]
    return tuple(shape)


def output_names(model) -> list[str]:
    """Names of a model's outputs in the order of ``model.outputs``.

    The output layers' names (Keras ``model.output_names``); for a model
    built with a dict of outputs, the dict keys are accepted too (see
    :func:`output_index`).
    """
    names = list(getattr(model, "output_names", None) or [])
    return names or [f"output_{i}" for i in range(len(model.outputs))]


def output_index(model, output: str | None) -> int:
    """Index in ``model.outputs`` of the output named ``output`` (None: the only one).

    Raises:
        AuditError: the model has several outputs and none (or an unknown one) is named.
    """
    names = output_names(model)
    struct = getattr(model, "_outputs_struct", None)
    keys = sorted(struct) if isinstance(struct, dict) else []  # flatten order of a dict
    if output is None:
        if len(names) == 1:
            return 0
        raise AuditError(f"model {model.name!r} has {len(names)} outputs ({', '.join(names)}); "
                         "choose the classifier output with model.output: NAME (audit explain / audit layers: --output NAME)")
    if output in names:
        return names.index(output)
    if output in keys and len(keys) == len(names):
        return keys.index(output)
    raise AuditError(f"model {model.name!r} has no output {output!r}; outputs: {', '.join(names)}")


def trace(model, capture=(), capture_inputs=(), input_shape=None, token_grid=None, output=None) -> Trace:
    """Re-run ``model`` symbolically and record every leaf layer call.

    Args:
        model: a Functional or Sequential Keras model (nested ones are entered).
        capture: layer paths whose output is kept in ``Trace.captured``.  A
            token layer with a grid is captured as its (N, h, w, C) view, and
            the model continues from the tokens rebuilt from that view, so the
            captured tensor lies on the gradient path.
        capture_inputs: layer paths whose first input is kept in ``Trace.captured_in``.
        input_shape: (N, H, W, C) to trace with; default the model's own.
        token_grid: (h, w) of the patch tokens of every token layer; default
            found per layer (:func:`find_grid`).
        output: the output to follow in a model with several (see :func:`output_index`).

    Returns:
        The :class:`Trace`.

    Raises:
        AuditError: a subclassed model, a model without a known input shape,
            or one with several outputs and none (or an unknown one) named.
    """
    shape = tuple(input_shape) if input_shape else _model_input_shape(model)
    x = keras.Input(shape=shape[1:], batch_size=shape[0])
    t = Trace(inputs=[x], input_ids=[id(x)], model=model,
              token_grid=tuple(int(v) for v in token_grid) if token_grid else None, output_choice=output)
    outs = _flat(Walk(_Recorder(t, set(capture), set(capture_inputs))).run(model, x))
    chosen = outs[output_index(model, output)] if len(outs) > 1 or output is not None else outs[0]
    t.output, t.output_id = chosen, id(chosen)
    return t


@dataclass
class Walk:
    """A symbolic walk through a model that enters nested Sequential and Functional models.

    ``leaf(layer, path, args, kwargs)`` is called at each leaf layer and gives
    its output: it records the call (:func:`trace`) or replaces the layer
    (``audit.engine.backprop.guided_model``).  ``training``/``mask`` kwargs are
    the leaf's to drop.
    """

    leaf: Callable

    def run(self, model, x):
        """Walk ``model`` from the input ``x``; returns its (symbolic) output structure.

        The outer model's own name is not part of the paths: "conv5_block3_out",
        or "mobilenetv2_1.00_224/out_relu" for a nested base model.

        Raises:
            AuditError: a subclassed model.
        """
        if _is_sequential(model):
            return self._sequential(model, "", x)
        if _is_functional(model):
            return model._run_through_graph(x, operation_fn=lambda op: (lambda *a, **k: self.visit(op, "", a, k)))
        raise AuditError(
            f"model {model.name!r} is a subclassed keras.Model; its layers cannot be "
            "traced. Build it with the Functional or Sequential API."
        )

    def _sequential(self, model, prefix: str, h):
        for sub in model.layers:
            if not isinstance(sub, keras.layers.InputLayer):
                h = self.visit(sub, prefix, (h,), {})
        return h

    def visit(self, layer, prefix: str, args, kwargs):
        """Call ``layer`` on ``args``, entering a nested Sequential or Functional model."""
        path = f"{prefix}{layer.name}"
        if _is_sequential(layer):
            (h,) = args[:1] or [kwargs.get("inputs")]
            return self._sequential(layer, path + "/", h)
        if _is_functional(layer):
            inputs = args if len(args) > 1 else args[0]
            return layer._run_through_graph(
                inputs,
                operation_fn=lambda op: (lambda *a, **k: self.visit(op, path + "/", a, k)),
            )
        return self.leaf(layer, path, args, kwargs)


@dataclass
class _Recorder:
    """The leaf of :func:`trace`'s walk: records each leaf call and captures the asked-for tensors."""

    trace: Trace
    capture: set
    capture_inputs: set
    maps: list = field(default_factory=list)  # (h, w) of the 4-D outputs so far: the patch embedding's grid hints a token grid

    def __call__(self, layer, path: str, args, kwargs):
        """Call a leaf layer, record the :class:`Call`, capture its output/input if asked."""
        t = self.trace
        kwargs = {k: v for k, v in kwargs.items() if k not in ("training", "mask")}
        out = layer(*args, **kwargs)
        ins = [a for a in _flat((args, kwargs)) if isinstance(a, keras.KerasTensor)]
        outs = _flat(out)
        oshape = tuple(outs[0].shape)
        grid = find_grid(oshape[1], self.maps, t.token_grid) if len(oshape) == 3 else None
        if len(oshape) == 4:
            self.maps.append(oshape[1:3])
        call = Call(path, layer, [id(a) for a in ins], [id(o) for o in outs], oshape, grid)
        t.calls.append(call)
        if path in self.capture:
            if grid is not None and len(outs) == 1:
                t.captured[path], out = _token_view(outs[0], grid, path)
                call.outputs.append(id(out))
            else:
                t.captured[path] = outs[0]
        if path in self.capture_inputs and ins:
            t.captured_in[path] = ins[0]
        return out


# ----------------------------------------------------------------------------
# Token layers (vision transformers)
# ----------------------------------------------------------------------------


def find_grid(tokens, earlier_maps=(), token_grid=None) -> TokenGrid | None:
    """The patch grid of a sequence of ``tokens`` tokens, or None.

    The first rule that applies (docs/layers.md, "Token layers"):

    1. ``token_grid`` (h, w) given: the last h x w tokens are the patches and
       the ``tokens - h*w`` before them are extra (None when h*w > tokens).
    2. The patch embedding: the deepest earlier 4-D map (h, w) with
       ``h*w <= tokens < 2*h*w``; the tokens beyond h*w are extra.
    3. The largest square: s = floor(sqrt(tokens)) >= 2, extra = tokens - s*s
       (a class token and up to 2s register tokens).

    Args:
        tokens: T, the sequence length (None when unknown: no grid).
        earlier_maps: (h, w) of the 4-D outputs before the layer, in network order.
        token_grid: the user's (h, w), or None.

    Returns:
        A :class:`TokenGrid`, or None when the tokens form no grid.
    """
    if tokens is None:
        return None
    t = int(tokens)
    if token_grid:
        h, w = (int(v) for v in token_grid)
        return TokenGrid(t - h * w, h, w) if 0 < h * w <= t else None
    for h, w in reversed(list(earlier_maps)):
        if h is not None and w is not None and h * w > 1 and h * w <= t < 2 * h * w:
            return TokenGrid(t - h * w, int(h), int(w))
    s = math.isqrt(t)
    return TokenGrid(t - s * s, s, s) if s >= 2 else None


def _token_view(tokens, grid: TokenGrid, path: str):
    """(N, T, C) tokens -> ((N, h, w, C) view of the patches, tokens rebuilt from the view).

    Two layers with names of their own: ops applied to the symbolic tensors
    would be auto-named (``get_item``) and clash with the same ops of a model
    loaded from a file.
    """
    name = "audit_" + "".join(ch if ch.isalnum() else "_" for ch in path)
    view = _PatchView(grid, name=f"{name}_view")(tokens)
    return view, _Rebuild(grid, name=f"{name}_tokens")([tokens, view])


class _PatchView(keras.layers.Layer):
    """Tokens (N, T, C) -> the patch tokens as a map (N, h, w, C)."""

    def __init__(self, grid: TokenGrid, **kwargs):
        super().__init__(**kwargs)
        self.grid = grid

    def call(self, tokens):
        g = self.grid
        return keras.ops.reshape(tokens[:, g.extra:], (-1, g.h, g.w, tokens.shape[-1]))


class _Rebuild(keras.layers.Layer):
    """[tokens, view] -> the extra tokens followed by the view's cells: the model continues from the view."""

    def __init__(self, grid: TokenGrid, **kwargs):
        super().__init__(**kwargs)
        self.grid = grid

    def call(self, inputs):
        tokens, view = inputs
        g = self.grid
        patches = keras.ops.reshape(view, (-1, g.h * g.w, view.shape[-1]))
        return keras.ops.concatenate([tokens[:, :g.extra], patches], axis=1) if g.extra else patches


def patch_tokens_reach(t: Trace, calls) -> dict[str, bool]:
    """Whether the patch tokens of each token layer in ``calls`` change the model output.

    A class-token head reads token 0 only: after the last attention, the
    patch tokens pass through per-token layers and are dropped, so their
    gradient (and every map) is zero.  Tested, not guessed: one forward and
    backward pass on two random images, of a random mix of the outputs.

    Args:
        t: a trace of the model (its ``model`` and ``token_grid`` are reused).
        calls: token-layer calls of ``t``; those without a grid are skipped.

    Returns:
        path -> True when some patch token has a non-zero gradient.
    """
    import numpy as np
    import tensorflow as tf

    paths = [c.path for c in calls if c.grid is not None and c.path not in t.reach]
    if paths:
        t2 = trace(t.model, capture=paths, input_shape=tuple(t.inputs[0].shape), token_grid=t.token_grid,
                   output=t.output_choice)
        m = keras.Model(t2.inputs[0], [t2.captured[p] for p in paths] + [t2.output])
        rng = np.random.default_rng(0)
        x = rng.standard_normal((2, *t2.inputs[0].shape[1:])).astype(np.float32)
        with tf.GradientTape() as tape:
            outs = m(x, training=False)
            y = tf.cast(outs[-1], tf.float32)
            mix = tf.constant(rng.standard_normal(tuple(y.shape[1:])), tf.float32)
            score = tf.reduce_sum(y * mix)
        grads = tape.gradient(score, list(outs[:-1]))
        for p, g in zip(paths, grads):
            t.reach[p] = g is not None and bool(tf.reduce_any(tf.not_equal(g, 0)))
    return {c.path: t.reach.get(c.path, False) for c in calls}


# ----------------------------------------------------------------------------
# Layer choice
# ----------------------------------------------------------------------------


def through_every_path(t: Trace, call: Call) -> bool:
    """True when removing ``call`` disconnects the model input from its output."""
    reach = set(t.input_ids)
    for c in t.calls:  # calls are in topological order
        if c is call:
            continue
        if any(i in reach for i in c.inputs):
            reach.update(c.outputs)
    return t.output_id not in reach


def is_spatial(call: Call) -> bool:
    """True when the layer gives a map of more than one cell (4-D, or tokens with a grid)."""
    hw = call.map_shape
    return hw is not None and (None in hw or hw[0] * hw[1] > 1)


def candidates(t: Trace) -> list[Call]:
    """Layers with a map of h x w > 1 cells that are not pure pooling/padding/reshaping layers."""
    return [c for c in t.calls if is_spatial(c) and c.kind not in _PASSIVE]


_WHY_AUTO = "deepest layer with an h x w > 1 map that every input-to-output path passes through"


def auto_layer(t: Trace) -> tuple[Call, str]:
    """The automatic target layer and the reason it was chosen.

    The deepest candidate (:func:`candidates`) that every input-to-output path
    passes through; a token layer also needs patch tokens that reach the
    output (:func:`patch_tokens_reach`).

    Raises:
        AuditError: no such layer (a 1x1-only network at this input size, an MLP).
    """
    cands = candidates(t)
    for c in reversed(cands):  # deepest first; stops at the first layer on every path (CNNs)
        if not through_every_path(t, c):
            continue
        if not c.is_tokens:
            return c, _WHY_AUTO
        # one gradient pass answers for every token layer on every path
        tokens = [d for d in cands if d.is_tokens and through_every_path(t, d)]
        if patch_tokens_reach(t, tokens)[c.path]:
            return c, f"{_WHY_AUTO}; its patch tokens ({c.grid}) reach the output"
    ones = [c for c in t.calls if len(c.shape) == 4 and not is_spatial(c) and c.kind not in _PASSIVE]
    hint = (f"; its deepest map, {ones[-1].path!r}, is 1x1: use a larger input size"
            if ones else "")
    raise AuditError(
        "the model has no layer with a spatial map (h x w > 1) or a grid of patch tokens that every "
        f"path passes through; Grad-CAM needs a convolutional feature map{hint}"
    )


def unusable_reason(t: Trace, call: Call) -> str | None:
    """Why ``call`` cannot be a target layer (one clause), or None when it can."""
    if len(call.shape) == 4:
        return None if is_spatial(call) else (
            f"its output {call.shape[1:]} is 1x1, so its map would be one constant value")
    if call.is_tokens:
        if call.grid is None:
            if t.token_grid:
                h, w = t.token_grid
                return f"explain.token_grid {h}x{w} needs {h * w} patch tokens but it has {call.shape[1]}"
            return (f"its {call.shape[1]} tokens form no grid (give it as explain.token_grid: [h, w], "
                    "--token-grid H W)")
        if not is_spatial(call):
            return f"its token grid is {call.grid}, one cell, so its map would be one constant value"
        if not patch_tokens_reach(t, [call])[call.path]:
            return ("its patch tokens do not reach the output (after the last attention the head reads "
                    "only the class token); take a layer before the last attention")
        return None
    return f"its output {call.shape} is not a spatial (N, H, W, C) map or a token sequence (N, T, C)"


def _lookup(t: Trace, name: str) -> Call | None:
    paths = t.by_path()
    call = paths.get(name)
    if call is None:
        # Accept a bare name when it is unique among the nested paths.
        hits = [p for p in paths if p.split("/")[-1] == name]
        call = paths[hits[0]] if len(hits) == 1 else None
    return call


def resolve_layers(t: Trace, layers) -> list[str]:
    """Turn ``"auto"`` or a list of names into validated layer paths.

    Args:
        t: the model's trace.
        layers: ``"auto"``/None, a name, or a list of names and ``"auto"``.
            A name is a path (``base/out_relu``) or a bare name unique in the model.

    Returns:
        The layer paths, without duplicates, in the order given.

    Raises:
        AuditError: an unknown layer (the candidates are listed), or one that
            cannot be a target layer (the reason and the automatic choice).
    """
    if layers is None or layers == "auto":
        return [auto_layer(t)[0].path]
    if isinstance(layers, str):
        layers = [layers]
    spatial = [c.path for c in candidates(t)]
    out = []
    for name in layers:
        if name == "auto":
            out.append(auto_layer(t)[0].path)
            continue
        call = _lookup(t, name)
        if call is None:
            raise AuditError(
                f"unknown layer {name!r}; candidate layers: {', '.join(spatial[-12:])}"
                + (" (see `audit layers MODEL` for all)" if len(spatial) > 12 else "")
            )
        reason = unusable_reason(t, call)
        if reason:
            raise AuditError(f"layer {name!r} cannot be a target layer: {reason}{_suggest(t)}")
        out.append(call.path)
    return list(dict.fromkeys(out))


def _suggest(t: Trace) -> str:
    try:
        return f"; the automatic choice is {auto_layer(t)[0].path!r} (layers: auto)"
    except AuditError:
        return ""


@dataclass
class LayerInfo:
    """One row of `audit layers`: a layer with a 4-D or token output."""

    call: Call
    all_paths: bool  # every input-to-output path passes through it
    reason: str | None  # why it cannot be a target layer; None when it can


def map_layers(t: Trace) -> list[Call]:
    """Every layer with a 4-D or token-sequence output, pooling/padding/reshaping left out."""
    return [c for c in t.calls if len(c.shape) in (3, 4) and c.kind not in _PASSIVE]


def describe(t: Trace, calls) -> list[LayerInfo]:
    """:class:`LayerInfo` of each call (whether it is on every path, why it cannot be a target layer)."""
    patch_tokens_reach(t, [c for c in calls if c.is_tokens])  # one gradient pass for all of them
    return [LayerInfo(c, through_every_path(t, c), unusable_reason(t, c)) for c in calls]
