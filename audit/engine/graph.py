"""The model as a graph of layers: tracing, nested models, target-layer choice.

Keras does not let you take ``model.get_layer(...).output`` of a layer inside a
base model nested in a larger model (the graph is "disconnected").  We avoid
the problem by re-running the model *symbolically*, layer by layer, descending
into nested Functional and Sequential models.  Every leaf layer call is
recorded with its path (``outer/inner``) and the tensors it reads and writes.
The same walk can capture any layer's output (or input), which is how
:class:`audit.Explainer` builds its one gradient model.

Layer choice (DESIGN.md, "Target layer, automatically"): the deepest layer
with a spatial (4-D) output that every path from input to output passes
through, and that is not a pure pooling or padding layer.
"""

from __future__ import annotations

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
)


@dataclass
class Call:
    """One leaf-layer call seen while tracing."""

    path: str
    layer: keras.layers.Layer
    inputs: list[int]  # ids of the symbolic tensors read
    outputs: list[int]  # ids of the symbolic tensors written
    shape: tuple  # output shape (first output), batch dim included

    @property
    def kind(self) -> str:
        return type(self.layer).__name__


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


def trace(model, capture=(), capture_inputs=(), input_shape=None) -> Trace:
    """Re-run ``model`` symbolically and record every leaf layer call.

    ``capture`` / ``capture_inputs``: layer paths whose output / first input
    tensor should be kept in ``Trace.captured`` / ``Trace.captured_in``.
    """
    capture, capture_inputs = set(capture), set(capture_inputs)
    shape = tuple(input_shape) if input_shape else _model_input_shape(model)
    x = keras.Input(shape=shape[1:], batch_size=shape[0])
    t = Trace(inputs=[x], input_ids=[id(x)])

    def leaf(layer, path, args, kwargs):
        kwargs = {k: v for k, v in kwargs.items() if k not in ("training", "mask")}
        out = layer(*args, **kwargs)
        ins = [a for a in _flat((args, kwargs)) if isinstance(a, keras.KerasTensor)]
        outs = _flat(out)
        t.calls.append(
            Call(path, layer, [id(a) for a in ins], [id(o) for o in outs], tuple(outs[0].shape))
        )
        if path in capture:
            t.captured[path] = outs[0]
        if path in capture_inputs and ins:
            t.captured_in[path] = ins[0]
        return out

    def visit(layer, prefix, args, kwargs):
        path = f"{prefix}{layer.name}"
        if _is_sequential(layer):
            (h,) = args[:1] or [kwargs.get("inputs")]
            for sub in layer.layers:
                if isinstance(sub, keras.layers.InputLayer):
                    continue
                h = visit(sub, path + "/", (h,), {})
            return h
        if _is_functional(layer):
            inputs = args if len(args) > 1 else args[0]
            return layer._run_through_graph(
                inputs,
                operation_fn=lambda op: (lambda *a, **k: visit(op, path + "/", a, k)),
            )
        return leaf(layer, path, args, kwargs)

    # The outer model's own name is not part of the paths: "conv5_block3_out",
    # or "mobilenetv2_1.00_224/out_relu" for a nested base model.
    if _is_sequential(model):
        h = x
        for sub in model.layers:
            if not isinstance(sub, keras.layers.InputLayer):
                h = visit(sub, "", (h,), {})
        out = h
    elif _is_functional(model):
        out = model._run_through_graph(
            x, operation_fn=lambda op: (lambda *a, **k: visit(op, "", a, k))
        )
    else:
        raise AuditError(
            f"model {model.name!r} is a subclassed keras.Model; its layers cannot be "
            "traced. Build it with the Functional or Sequential API."
        )
    outs = _flat(out)
    if len(outs) != 1:
        raise AuditError(f"model {model.name!r} has {len(outs)} outputs; a classifier has one")
    t.output, t.output_id = outs[0], id(outs[0])
    return t


def through_every_path(t: Trace, call: Call) -> bool:
    """True when removing ``call`` disconnects the model input from its output."""
    producer = {}
    for i, c in enumerate(t.calls):
        for o in c.outputs:
            producer[o] = i
    reach = set(t.input_ids)
    for c in t.calls:  # calls are in topological order
        if c is call:
            continue
        if any(i in reach for i in c.inputs):
            reach.update(c.outputs)
    return t.output_id not in reach


def is_spatial(call: Call) -> bool:
    return len(call.shape) == 4


def candidates(t: Trace) -> list[Call]:
    """Layers with a spatial output that are not pure pooling/padding layers."""
    return [c for c in t.calls if is_spatial(c) and c.kind not in _PASSIVE]


def auto_layer(t: Trace) -> tuple[Call, str]:
    """The automatic target layer and the reason it was chosen."""
    for c in reversed(candidates(t)):
        if through_every_path(t, c):
            return c, "deepest spatial layer that every input-to-output path passes through"
    raise AuditError(
        "the model has no layer with a spatial (4-D) output that every path passes "
        "through; Grad-CAM needs a convolutional feature map"
    )


def resolve_layers(t: Trace, layers) -> list[str]:
    """Turn ``"auto"`` or a list of names into validated layer paths."""
    if layers is None or layers == "auto":
        return [auto_layer(t)[0].path]
    if isinstance(layers, str):
        layers = [layers]
    paths = t.by_path()
    spatial = [c.path for c in candidates(t)]
    out = []
    for name in layers:
        if name == "auto":
            out.append(auto_layer(t)[0].path)
            continue
        call = paths.get(name)
        if call is None:
            # Accept a bare name when it is unique among the nested paths.
            hits = [p for p in paths if p.split("/")[-1] == name]
            call = paths[hits[0]] if len(hits) == 1 else None
        if call is None:
            raise AuditError(
                f"unknown layer {name!r}; candidate layers: {', '.join(spatial[-12:])}"
                + (" (see `audit layers MODEL` for all)" if len(spatial) > 12 else "")
            )
        if not is_spatial(call):
            raise AuditError(
                f"layer {name!r} has output shape {call.shape}, not a spatial (N, H, W, C) "
                f"map; candidate layers: {', '.join(spatial[-12:])}"
            )
        out.append(call.path)
    return list(dict.fromkeys(out))
