"""Single-model visualisations (``audit explain``): the pictures of the seed notes.

For one or a few images this writes PNG figures and an ``index.html``:

* CAM overlays in a grid of target layers x methods (Grad-CAM, Grad-CAM++,
  CAM where the head is GAP -> Dense, guided Grad-CAM), JET colormap;
* input gradients: plain gradient, guided backpropagation (Springenberg et al.
  2015) and deconvnet (Zeiler & Fergus 2014), which differ only in what the
  backward pass does at a ReLU;
* feature-map grids of chosen layers, each channel normalised on its own
  (mean 128, 64 grey levels per standard deviation, as in the seeds);
* the first convolution's filter weights;
* filter patterns: the input that maximises a filter's mean activation,
  found by normalised gradient ascent from a noisy grey image (40 steps of
  one grey level, as in the seeds).

The gradients themselves (guided backpropagation, deconvnet, filter
patterns) are computed by :mod:`audit.engine.backprop`; this module only
chooses what to show and draws it.  The drawing is pure functions on arrays
(:func:`deprocess`, :func:`feature_grid`, :func:`filter_grid`).
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from audit.data import fs, resources
from audit.data.datasets import read_object
from audit.data.decode import DecodeError, decode_image, resize_image
from audit.data.files import DEFAULT_MAX_IMAGE_BYTES, read_regular_file
from audit.engine import backprop
from audit.engine.backprop import affine_of, all_methods, cam_methods, filter_patterns  # noqa: F401
from audit.engine.models import check_channels, input_size_of, preprocess, to_channels
from audit.errors import AuditError
from audit.review import viz

DEFAULT_METHODS = ("gradcam", "gradcam++", "cam", "guided", "guided-gradcam", "deconvnet")

_MERGE_KINDS = ("Add", "Concatenate", "Multiply", "Average", "Maximum", "Minimum", "Subtract")


# ----------------------------------------------------------------------------
# Images in
# ----------------------------------------------------------------------------


def read_image(path, size=None, channels: int = 3) -> np.ndarray:
    """Read an image file as uint8 with the model's ``channels`` (RGB for 3), resized to ``size`` (H, W).

    Decoding is the job's (:mod:`audit.data.decode`): grayscale, RGBA and 16-bit
    images work, and a header claiming too many pixels is refused before decoding.
    """
    p = str(path) if fs.is_uri(str(path)) else Path(path)
    try:
        if isinstance(p, str):  # an object in a bucket
            data = read_object(p, DEFAULT_MAX_IMAGE_BYTES)
        else:
            data = read_regular_file(str(p))  # never a FIFO or a device; bounded
    except DecodeError as e:
        raise AuditError(f"image not found: {p}" if str(e).startswith("file not found")
                         else f"cannot read image {p}: {e}") from None
    try:
        img = decode_image(data)
    except DecodeError as e:
        raise AuditError(f"cannot decode image {p}: {e}") from None
    if size is not None:
        img = resize_image(img, size)
    return to_channels(img, channels)  # the job's rule (audit.engine.models.to_channels)


# ----------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------


def _is_conv(call) -> bool:
    kernel = getattr(call.layer, "kernel", None)
    return "Conv" in call.kind and kernel is not None and len(kernel.shape) == 4


def default_layers(t) -> list[str]:
    """The seeds' comparison of target layers, found in any model.

    The automatic layer (deepest layer every path passes through), the last
    convolution at or before it (ResNet50 ``conv5_block3_3_conv``, InceptionV3
    ``conv2d_93``) and the last merge layer (``conv5_block3_add``, ``mixed10``,
    DenseNet ``conv5_block32_concat``), in network order.
    """
    from audit.engine import graph

    auto = graph.auto_layer(t)[0]
    cands = graph.candidates(t)
    upto = cands[: cands.index(auto) + 1] if auto in cands else cands
    picked = {auto.path}
    convs = [c for c in upto if _is_conv(c)]
    if convs:
        picked.add(convs[-1].path)
    merges = [c for c in upto if c.kind in _MERGE_KINDS]
    if merges:
        picked.add(merges[-1].path)
    earlier = [c for c in convs if c.path not in picked]
    if len(picked) < 2 and earlier:  # a plain CNN: compare with the convolution before
        picked.add(earlier[-1].path)
    return [c.path for c in cands if c.path in picked]


def default_feature_layers(t) -> list[str]:
    """First convolution, a layer half-way down, and the automatic layer (shallow to deep).

    The middle one is taken among the layers every path passes through (in a
    ResNet the block outputs), so it is never a side branch.
    """
    from audit.engine import graph

    cands = graph.candidates(t)
    auto = graph.auto_layer(t)[0]
    convs = [c for c in cands if _is_conv(c)]
    picked = [convs[0].path] if convs else []
    upto = cands[: cands.index(auto)] if auto in cands else cands
    upto = [c for c in upto if c.path not in picked]
    trunk = [c for c in upto if graph.through_every_path(t, c)] or upto
    if trunk:
        picked.append(trunk[len(trunk) // 2].path)
    picked.append(auto.path)
    return list(dict.fromkeys(picked))


def first_conv(t):
    """The first convolution call (its kernel is what the seeds show as 'filters')."""
    for c in t.calls:
        if _is_conv(c):
            return c
    return None


# ----------------------------------------------------------------------------
# Guided backpropagation and deconvnet
# ----------------------------------------------------------------------------




# ----------------------------------------------------------------------------
# Preprocessing as an affine map (to do gradient steps in grey levels)
# ----------------------------------------------------------------------------



def deprocess(x) -> np.ndarray:
    """The seeds' ``deprocess_image``: centre, std 0.1, shift to 0.5, clip, uint8."""
    x = np.asarray(x, np.float64)
    x = x - x.mean()
    x = x / (x.std() + 1e-5) * 0.1 + 0.5
    out = np.uint8(np.clip(x, 0, 1) * 255)
    if out.ndim == 3 and out.shape[-1] == 1:
        out = np.repeat(out, 3, axis=-1)
    return out


def gradient_image(g, percentile: float = 99.0) -> np.ndarray:
    """An input gradient as a picture: grey 0.5 at zero, +-0.5 at the ``percentile`` of |g - mean|.

    A robust stretch: the seeds' ``deprocess`` (std 0.1) leaves sparse guided
    gradients almost uniformly grey.
    """
    g = np.asarray(g, np.float64)
    g = g - g.mean()
    top = np.percentile(np.abs(g), percentile) if g.size else 0.0
    if not np.isfinite(top) or top <= 0:
        top = np.abs(g).max() or 1.0
    out = np.uint8(np.clip(0.5 + 0.5 * g / top, 0, 1) * 255)
    if out.ndim == 3 and out.shape[-1] == 1:
        out = np.repeat(out, 3, axis=-1)
    return out


# ----------------------------------------------------------------------------
# Feature maps and filters
# ----------------------------------------------------------------------------


def normalize_channel(a) -> np.ndarray:
    """One channel as the seeds show it: (a - mean) / std * 64 + 128, clipped; a constant channel is 0."""
    a = np.asarray(a, np.float64)
    sd = a.std()
    if not np.isfinite(sd) or sd == 0:
        return np.zeros(a.shape, np.uint8)
    return np.uint8(np.clip((a - a.mean()) / sd * 64 + 128, 0, 255))


def feature_grid(act, max_channels: int = 32, cols: int = 8, cell: int = 48) -> np.ndarray:
    """(h, w, K) activations -> a grid of the first channels, each normalised, viridis."""
    import cv2

    act = np.asarray(act)
    k = min(int(max_channels), act.shape[-1])
    tiles = []
    for i in range(k):
        u8 = normalize_channel(act[..., i])
        rgb = cv2.cvtColor(cv2.applyColorMap(u8, cv2.COLORMAP_VIRIDIS), cv2.COLOR_BGR2RGB)
        tile = viz.fit(rgb, max(cell, min(act.shape[0], 96)), cv2.INTER_NEAREST)
        tiles.append(viz.caption(tile, str(i), height=13))
    return viz.grid(tiles, cols=cols, pad=2)


def filter_grid(kernel, max_filters: int = 64, cols: int = 16, cell: int = 32) -> np.ndarray:
    """First-layer kernel (kh, kw, cin, cout) -> one tile per filter, min-max normalised per filter.

    RGB when the layer reads 3 channels, else the mean over input channels in grey.
    """
    import cv2

    k = np.asarray(kernel, np.float64)
    tiles = []
    for i in range(min(int(max_filters), k.shape[-1])):
        f = k[..., i]
        f = f if f.shape[-1] == 3 else f.mean(axis=-1, keepdims=True)
        lo, hi = f.min(), f.max()
        f = (f - lo) / (hi - lo) if hi > lo else np.zeros_like(f)
        u8 = np.uint8(np.clip(f, 0, 1) * 255)
        if u8.shape[-1] == 1:
            u8 = np.repeat(u8, 3, axis=-1)
        tiles.append(viz.fit(u8, cell, cv2.INTER_NEAREST))
    return viz.grid(tiles, cols=cols, pad=2)




def _safe(path: str) -> str:
    return re.sub(r"[^0-9A-Za-z_.-]", "_", path)


def _tile_size(h: int, w: int) -> int:
    return int(min(max(max(h, w), 160), 256))


def _text_tile(text, size) -> np.ndarray:
    """A column title: one line of text, as wide as a cell."""
    return viz.caption(np.full((0, size, 3), 255, np.uint8), text, height=20)


def _na_tile(size, why="n/a") -> np.ndarray:
    tile = np.full((size, size, 3), 235, np.uint8)
    return viz.caption(tile[: size - 18], why, height=18)


@dataclass
class Figure:
    kind: str
    title: str
    file: str
    note: str = ""


@dataclass
class _Setup:
    """What :func:`explain` resolved before reading any image."""

    layers: list
    feature_layers: list
    methods: list
    size: tuple  # (H, W)
    channels: int
    explainer: object  # the Explainer of the CAM methods (not cam)
    cam_explainer: object = None  # the Explainer of 'cam' on the layers where the head allows it
    cam_notes: list = field(default_factory=list)


def _setup(model, t, layers, feature_layers, methods, target, classes, output, n_images) -> _Setup:
    """Resolve layers and methods and build the Explainers (they check the target and classes)."""
    from audit.engine import graph
    from audit.engine.explainer import Explainer, cam_dense

    explicit_cam = methods is not None and "cam" in methods  # asked for: fail if the head has no GAP
    methods = list(dict.fromkeys(methods or DEFAULT_METHODS))
    known = all_methods()
    bad = [m for m in methods if m not in known]
    if bad:
        raise AuditError(f"unknown method {bad[0]!r}; expected some of {', '.join(known)}")
    layers = graph.resolve_layers(t, layers) if layers else default_layers(t)
    feature_layers = graph.resolve_layers(t, feature_layers) if feature_layers else default_feature_layers(t)
    h, w = input_size_of(model)
    ch = int(model.inputs[0].shape[-1])
    check_channels(ch)  # what to_channels can make: 1-4
    cams = [m for m in methods if m in cam_methods() and m != "cam"]
    if "guided-gradcam" in methods and "gradcam" not in cams:
        cams.append("gradcam")
    ex = Explainer(model, layers=layers, methods=tuple(cams) or ("gradcam",), target=target,
                   batch_size=n_images, classes=classes, output=output,
                   token_grid=t.token_grid)
    setup = _Setup(layers, feature_layers, methods, (h, w), ch, ex)
    if "cam" in methods:
        ok_layers = []
        for p in layers:
            try:
                cam_dense(t, p)
                ok_layers.append(p)
            except AuditError as e:
                if explicit_cam:
                    raise
                setup.cam_notes.append(str(e))
        if ok_layers:
            setup.cam_explainer = Explainer(model, layers=ok_layers, methods=("cam",), target=target,
                                            batch_size=n_images, classes=classes, output=output,
                                            token_grid=t.token_grid)
    return setup



def explain(model, image_paths, out_dir, *, layers=None, methods=None, preprocess_mode="none",
            feature_layers=None, filters: int = 8, steps: int = 40, channels: int = 32,
            target="predicted", classes=None, patterns: bool = True, seed: int = 0, output=None,
            token_grid=None) -> Path:
    """Write the figures for ``image_paths`` into ``out_dir``.

    Args:
        model: a Keras classifier (see :class:`audit.engine.explainer.Explainer`).
        image_paths: image files (any format :mod:`audit.data.decode` reads).
        out_dir: output folder (created).
        layers: target layers (default: the automatic one, the last convolution
            before it and the last merge layer).
        methods: CAM methods of the registry and/or gradient, guided, deconvnet,
            guided-gradcam (default: :data:`DEFAULT_METHODS`; ``cam`` there only
            where the head is GAP -> Dense).
        preprocess_mode: see :func:`audit.engine.models.preprocess`.
        feature_layers: layers for feature-map grids and filter patterns.
        filters, steps, channels: filter patterns per layer, gradient-ascent steps,
            channels per feature grid.
        target: ``predicted`` (multi-label heads: a page per label above 0.5),
            or a class name or index (names first).
        classes: class names in output order.
        patterns, seed: draw filter patterns; their random start.
        output: the classifier output of a multi-output model.
        token_grid: (h, w) of a vision transformer's patch tokens (default: found per layer,
            see :func:`audit.engine.graph.find_grid`).

    Returns:
        The path of ``out_dir/index.html``.

    Raises:
        AuditError: an unknown method or layer, a bad target or class list,
            an unreadable image, an output folder that cannot be created.
    """
    from audit.engine import graph

    sources = [str(p) for p in image_paths]  # as given: a URI must not go through Path
    if not sources:
        raise AuditError("give at least one image")
    t = graph.trace(model, output=output, token_grid=token_grid)
    st = _setup(model, t, layers, feature_layers, methods, target, classes, output, len(sources))
    out = _check_out(Path(out_dir))
    inp = _read_inputs(sources, st, preprocess_mode)  # an unreadable image: no output folder made
    _make_out(out)
    run = _run_methods(model, st, inp, output)
    name_of = _namer(classes)
    size = _tile_size(*st.size)
    shown = [viz.fit(im, size) for im in inp.rgb]
    pages = []
    for r, i in enumerate(run.res.image):
        row = _Row(r, int(i), inp.paths[i], shown[i], name_of)
        pages.append(_page(model, out, row, run.res, run.maps, run.grads, run.replaced, inp.x, st, size, channels))
    figures = _model_figures(model, t, out, st, inp.affine, filters, steps, seed, size, patterns)
    page = _render_index(pages, figures, _index_info(model, st, preprocess_mode, inp.affine))
    index = out / "index.html"
    index.write_text(page, encoding="utf-8")
    return index


def _check_out(out: Path) -> Path:
    if out.exists() and not out.is_dir():
        raise AuditError(f"output {out} exists and is not a directory")
    return out


def _make_out(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise AuditError(f"cannot create the output folder {out}: {e.strerror or e}") from None


@dataclass
class _Inputs:
    """The images of :func:`explain`, read and preprocessed."""

    paths: list  # Path of each image (for names)
    rgb: np.ndarray  # (N, H, W, 3) uint8: shown in colour whatever the model takes
    x: np.ndarray  # the model's input
    affine: tuple | None  # (M, b) of an affine preprocessing (see affine_of), or None


def _read_inputs(sources, st: _Setup, preprocess_mode) -> _Inputs:
    """Read and preprocess the images at the model's size and channels."""
    images = np.stack([read_image(p, st.size, st.channels) for p in sources])
    x = preprocess(images, preprocess_mode)
    affine = affine_of(lambda a: preprocess(a, preprocess_mode), st.channels)
    return _Inputs([Path(p) for p in sources], to_channels(images, 3), x, affine)


@dataclass
class _Results:
    """What the methods gave for every explained (image, class) row."""

    res: object  # the CAM Explanation (rows, targets, predictions)
    maps: dict  # (layer, method) -> (rows, h, w)
    grads: dict  # backward mode -> (rows, H, W, C) input gradients
    replaced: list  # ReLU paths given a custom gradient


def _run_methods(model, st: _Setup, inp: _Inputs, output) -> _Results:
    """The CAM maps (the CAM explainer where the head allows it) and the input gradients."""
    res = st.explainer(inp.x)
    maps = dict(res.maps)
    if st.cam_explainer is not None:
        maps.update(st.cam_explainer(inp.x).maps)
    xr = inp.x[res.image]  # one row per explained (image, class)
    grads, replaced = backprop.mode_gradients(model, xr, res.target, st.methods, inp.affine, output)
    return _Results(res, maps, grads, replaced)


def _namer(classes):
    """Class index -> its name (``none`` for -1, the index when there is no name)."""
    def name_of(c):
        c = int(c)
        if c < 0:
            return "none"
        return classes[c] if classes is not None and 0 <= c < len(classes) else str(c)

    return name_of


def _index_info(model, st: _Setup, preprocess_mode, affine) -> dict:
    """The run's summary at the top of index.html."""
    h, w = st.size
    return {
        "model": getattr(model, "name", "model"), "layers": st.layers, "feature_layers": st.feature_layers,
        "methods": st.methods, "preprocess": preprocess_mode, "input": f"{h}x{w}x{st.channels}",
        "notes": sorted(set(st.cam_notes)) + ([] if affine is not None else
                                              ["preprocessing is not affine: gradients shown in model-input space"]),
    }


@dataclass
class _Row:
    """One explained (image, class) of :func:`explain`."""

    r: int  # row in the Explanation
    i: int  # image index
    path: Path
    shown: np.ndarray  # the image as a tile
    name_of: object


def _cam_figure(out, row, res, maps, grads, st, size, stem) -> Figure:
    """The grid of target layers x CAM methods for one row."""
    h, w = st.size
    col_methods = [m for m in st.methods if m in cam_methods() or m == "guided-gradcam"]
    r = row.r
    pred_txt = f"pred {row.name_of(res.pred[r])} ({res.score[r]:.2f})"
    header = [_text_tile(pred_txt, size)] + [_text_tile(m, size) for m in col_methods]
    tiles = []
    for layer in st.layers:
        hh, ww = st.explainer.layer_shapes[layer]
        tiles.append(viz.caption(row.shown[: size - 18], f"{layer.split('/')[-1]} {hh}x{ww}"))
        for m in col_methods:
            if m == "guided-gradcam":
                gc = viz.resize_map(viz.normalize(maps[(layer, "gradcam")][r]), (h, w))
                tile = viz.fit(gradient_image(grads["guided"][r] * gc[..., None]), size)
                tiles.append(viz.caption(tile[: size - 18], "guided x gradcam"))
            elif (layer, m) in maps:
                m01 = viz.normalize(maps[(layer, m)][r])
                note = "flat map" if not m01.any() else f"max {maps[(layer, m)][r].max():.3g}"
                tiles.append(viz.caption(viz.overlay_image(row.shown, m01)[: size - 18], note))
            else:
                tiles.append(_na_tile(size, "n/a: head not GAP->Dense"))
    fig = np.concatenate([viz.grid(header, cols=len(header)), viz.grid(tiles, cols=len(header))[4:]])
    name = f"{stem}_cams.png"
    (out / name).write_bytes(viz.png_bytes(fig))
    return Figure("cams", f"{row.path.name}: target layers x methods (target {row.name_of(res.target[r])})", name,
                  "JET overlays; each map normalised by its own maximum.")


def _gradient_figure(out, row, res, grads, replaced, st, size, stem):
    """Plain / guided / deconvnet input gradients of one row, or None."""
    r = row.r
    gtiles = [viz.caption(row.shown, f"pred {row.name_of(res.pred[r])} ({res.score[r]:.2f})")]
    titles = {"gradient": "gradient", "guided": "guided backprop", "deconvnet": "deconvnet"}
    for mode, title in titles.items():
        if mode in grads and mode in st.methods:
            gtiles.append(viz.caption(viz.fit(gradient_image(grads[mode][r]), size), title))
    if len(gtiles) == 1:
        return None
    name = f"{stem}_gradients.png"
    (out / name).write_bytes(viz.png_bytes(viz.grid(gtiles, cols=len(gtiles))))
    return Figure("gradients", f"{row.path.name}: input gradients", name,
                  f"d logit / d input; ReLUs with a custom gradient: {len(replaced)}.")


def _page(model, out, row, res, maps, grads, replaced, x, st, size, channels) -> dict:
    """The figures of one explained row (image, class) and its entry in index.html."""
    r = row.r
    label = "" if len(res.image) == len(set(res.image.tolist())) else f"_{_safe(row.name_of(res.target[r]))}"
    stem = f"{row.i:02d}_{_safe(row.path.stem)}{label}"
    figs = [_cam_figure(out, row, res, maps, grads, st, size, stem)]
    gfig = _gradient_figure(out, row, res, grads, replaced, st, size, stem)
    if gfig is not None:
        figs.append(gfig)
    acts = _activations(model, x[row.i:row.i + 1], st.feature_layers, st.explainer.head.output,
                        st.explainer.token_grid)
    for layer in st.feature_layers:
        a = acts[layer][0]
        name = f"{stem}_features_{_safe(layer)}.png"
        (out / name).write_bytes(viz.png_bytes(feature_grid(a, max_channels=channels)))
        figs.append(Figure("features", f"{layer} {a.shape[0]}x{a.shape[1]}x{a.shape[2]}", name,
                           f"channels 0-{min(channels, a.shape[-1]) - 1} of {a.shape[-1]}, "
                           "each normalised on its own (viridis)"))
    return {"image": row.path.name, "pred": row.name_of(res.pred[r]), "score": float(res.score[r]),
            "target": row.name_of(res.target[r]), "top": _top(res.probs[r], row.name_of), "figures": figs}


def _model_figures(model, t, out, st, affine, filters, steps, seed, size, patterns) -> list:
    """The first layer's filters and the filter patterns of the feature layers."""
    figures = []
    fc = first_conv(t)
    if fc is not None:
        kernel = np.asarray(fc.layer.kernel)
        name = f"filters_{_safe(fc.path)}.png"
        (out / name).write_bytes(viz.png_bytes(filter_grid(kernel)))
        figures.append(Figure("filters", f"first layer filters: {fc.path} {tuple(kernel.shape)}", name,
                              "each filter min-max normalised on its own"))
    if not patterns or filters <= 0:
        return figures
    for layer in st.feature_layers:
        k = int(t.by_path()[layer].shape[-1])
        idx = list(range(min(int(filters), k)))
        u = filter_patterns(model, layer, idx, affine=affine, steps=steps, seed=seed,
                            output=st.explainer.head.output, token_grid=t.token_grid)
        tiles = [viz.caption(viz.fit(deprocess(im), min(size, 128)), f"filter {f}") for f, im in zip(idx, u)]
        name = f"patterns_{_safe(layer)}.png"
        (out / name).write_bytes(viz.png_bytes(viz.grid(tiles, cols=8)))
        figures.append(Figure("patterns", f"filter patterns: {layer}", name,
                              f"gradient ascent, {steps} normalised steps from a noisy grey image"))
    return figures


def _top(probs, name_of, k=5):
    order = np.argsort(-probs)[:k]
    return [(name_of(c), float(probs[c])) for c in order]


def _activations(model, x, layers, output=None, token_grid=None):
    import keras

    from audit.engine import graph

    t = graph.trace(model, capture=layers, output=output, token_grid=token_grid)  # token layers: (h, w, C)
    fm = keras.Model(t.inputs[0], [t.captured[p] for p in layers])
    outs = fm(np.asarray(x, np.float32), training=False)
    outs = outs if isinstance(outs, (list, tuple)) else [outs]
    return {p: np.asarray(o) for p, o in zip(layers, outs)}


def _render_index(pages, figures, info) -> str:
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(resources.path("audit.templates", ""))),
        autoescape=jinja2.select_autoescape(["html", "j2"]),
    )
    return env.get_template("explain.html.j2").render(pages=pages, figures=figures, info=info,
                                                      escape=html.escape)
