"""Build a zoo case: write its training split as a ``folder`` dataset with masks, train a small CNN.

:func:`ensure` builds a case once into the user cache (like
:mod:`audit.tanksky`), keyed by a hash of the zoo version and the case's
parameters, and returns a :class:`Built`.  The model is checked on a held-out
split rendered twice, with and without the planted cues: the accuracy of a
planted class drops when its cue is gone if the model learned the cue.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from audit.tanksky import cache_dir, stop_when_accurate
from audit.zoo.cases import Case, Sample, make_split

VERSION = "zoo-1"


@dataclass
class Built:
    """Where a built case lives, and how its model did."""

    root: str
    data: str  # the audited split (folder format): data/train/<class>/*.png
    masks: str  # object masks: data/train_masks/<class>/*.png
    model: str
    train_accuracy: float = float("nan")
    heldout: dict = field(default_factory=dict)  # {"with_cues": acc, "without_cues": acc, per class ...}
    seconds: float = 0.0
    epochs: int = 0

    def learned(self) -> str:
        """One line: accuracy per planted class with and without its cue (held-out split)."""
        h = self.heldout
        parts = [f"held-out accuracy {h.get('with_cues', float('nan')):.0%} -> "
                 f"{h.get('without_cues', float('nan')):.0%} without cues"]
        for name, (a, b) in h.get("planted", {}).items():
            parts.append(f"{name} {a:.0%} -> {b:.0%}")
        return "; ".join(parts)


# ----------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------


def build_model(n_classes: int, binary: bool = False, name: str = "zoo", *, head: str = "",
                arch: str = "cnn", side: int = 64, channels: int = 3, width: float = 1.0):
    """A small classifier: the body ``arch`` (:data:`audit.zoo.cases.ARCHS`), its pooling and the output ``head``.

    ``cnn``: Conv-BN-ReLU x 4 (two 2x2 poolings: 16 x 16 maps at 64 x 64); ``shallow``: three of them
    and one pooling (32 x 32 maps); ``mobile``: a tiny MobileNetV2 (:func:`_mobile_body`, 8 x 8 maps);
    ``resnet``: :func:`_resnet_body` (16 x 16 maps); ``flatten``: Conv-BN-ReLU x 6, four poolings
    (4 x 4 maps), then Flatten instead of GAP (the output Dense reads every cell); ``gmp``: the
    ``cnn`` body and global max pooling; ``deep``: the ``cnn`` body with a third pooling and a fifth
    convolution, for larger images (16 x 16 maps at 128 x 128). ``head``: :data:`audit.zoo.cases.HEADS`
    ("" is softmax, or sigmoid when ``binary``). ``side``: the input's height and width; ``channels``: its
    channels (1 or 3); ``width``: every layer's channels scaled by this (the drawn zoo's tiny models: 0.5).
    """
    import keras

    inp = keras.Input((side, side, channels), name="image")
    if arch == "mobile":
        x = _mobile_body(inp, width)
    elif arch == "resnet":
        x = _resnet_body(inp, width)
    else:
        x = _conv_body(inp, arch, width)
    x = _pool(x, arch)
    out = _head(x, n_classes, head or ("sigmoid" if binary else "softmax"))
    return keras.Model(inp, out, name=name)


def _pool(x, arch: str):
    """Maps to a vector: GAP, global max pooling (``gmp``) or Flatten (``flatten``)."""
    from keras import layers

    if arch == "gmp":
        return layers.GlobalMaxPooling2D(name="gmp")(x)
    if arch == "flatten":  # the output Dense reads every cell: no translation invariance
        return layers.Flatten(name="flatten")(x)
    return layers.GlobalAveragePooling2D(name="gap")(x)


# (width, pool after, dilation) per layer; the shallow body's dilations give its 32 x 32 maps a
# receptive field of 20 px, enough for the zoo's shapes
CONV_BODIES = {"cnn": ((16, True, 1), (32, True, 1), (48, False, 1), (64, False, 1)),
               "shallow": ((16, True, 1), (32, False, 2), (48, False, 2)),
               "flatten": ((16, False, 1), (16, True, 1), (32, False, 1), (32, True, 1), (48, True, 1), (64, True, 1))}
CONV_BODIES["gmp"] = CONV_BODIES["cnn"]
# for larger images: a third pooling and a fifth convolution (16 x 16 maps and a 54 px receptive field at 128)
CONV_BODIES["deep"] = ((16, True, 1), (32, True, 1), (48, True, 1), (64, False, 1), (64, False, 1))


def _scaled(n: int, width: float) -> int:
    return max(4, round(n * width))


def _conv_body(x, arch: str, scale: float = 1.0):
    from keras import layers

    for j, (width, pool, dil) in enumerate(CONV_BODIES[arch], 1):
        x = _conv_bn(x, _scaled(width, scale), f"conv{j}", dilation=dil)
        x = layers.ReLU(name=f"relu{j}")(x)
        if pool:
            x = layers.MaxPooling2D(name=f"pool{j}")(x)
    return x


def _conv_bn(x, width: int, name: str, dilation: int = 1):
    """A 3 x 3 convolution (no bias) and its BatchNorm, named ``name`` and ``bn<suffix>``."""
    from keras import layers

    x = layers.Conv2D(width, 3, padding="same", dilation_rate=dilation, use_bias=False, name=name)(x)
    return layers.BatchNormalization(momentum=0.9, name=name.replace("conv", "bn", 1))(x)  # fast moving stats


# (output channels, pool after) of each residual block after the stem (16 channels, a pooling)
RESNET_BLOCKS = ((32, True), (48, False), (48, False))


def _resnet_body(x, scale: float = 1.0):
    """A small ResNet: a Conv-BN-ReLU stem and a pooling, then residual blocks (Conv-BN-ReLU-Conv-BN,
    added to the input, 1 x 1 projected where the width changes, then ReLU)."""
    from keras import layers

    x = layers.ReLU(name="stem_relu")(_conv_bn(x, _scaled(16, scale), "conv_stem"))
    x = layers.MaxPooling2D(name="stem_pool")(x)
    for j, (width, pool) in enumerate(RESNET_BLOCKS, 1):
        n, width = f"block{j}", _scaled(width, scale)
        y = layers.ReLU(name=f"{n}_relu1")(_conv_bn(x, width, f"conv_{n}a"))
        y = _conv_bn(y, width, f"conv_{n}b")
        skip = x
        if int(x.shape[-1]) != width:
            skip = layers.Conv2D(width, 1, use_bias=False, name=f"{n}_proj")(x)
        x = layers.ReLU(name=f"{n}_relu")(layers.Add(name=f"{n}_add")([skip, y]))
        if pool:
            x = layers.MaxPooling2D(name=f"{n}_pool")(x)
    return x


# (expansion, output channels, stride) of each inverted residual block after the stem
MOBILE_BLOCKS = ((1, 16, 1), (4, 24, 2), (4, 24, 1), (4, 32, 2), (4, 32, 1))


def _mobile_body(x, scale: float = 1.0):
    """A tiny MobileNetV2: a stride-2 stem, inverted residual blocks (1x1 expand, 3x3 depthwise, 1x1
    linear projection, BatchNorm, ReLU6, a residual add where the shape allows) and a 1x1 head conv."""
    from keras import layers

    def bn_relu6(y, name, relu=True):
        y = layers.BatchNormalization(momentum=0.9, name=f"{name}_bn")(y)
        return layers.ReLU(6.0, name=f"{name}_relu")(y) if relu else y

    x = bn_relu6(layers.Conv2D(_scaled(16, scale), 3, strides=2, padding="same", use_bias=False, name="stem")(x),
                 "stem")
    for j, (t, c, s) in enumerate(MOBILE_BLOCKS, 1):
        inp, n, c = x, f"block{j}", _scaled(c, scale)
        if t != 1:
            x = bn_relu6(layers.Conv2D(int(inp.shape[-1]) * t, 1, use_bias=False, name=f"{n}_expand")(x),
                         f"{n}_expand")
        x = bn_relu6(layers.DepthwiseConv2D(3, strides=s, padding="same", use_bias=False, name=f"{n}_dw")(x),
                     f"{n}_dw")
        x = bn_relu6(layers.Conv2D(c, 1, use_bias=False, name=f"{n}_project")(x), f"{n}_project", relu=False)
        if s == 1 and int(inp.shape[-1]) == c:
            x = layers.Add(name=f"{n}_add")([inp, x])
    return bn_relu6(layers.Conv2D(_scaled(96, scale), 1, use_bias=False, name="head_conv")(x), "out")


def _head(x, n_classes: int, head: str):
    from keras import layers

    if head == "sigmoid":
        return layers.Dense(1, activation="sigmoid", name="predictions")(x)
    if head == "logit":
        return layers.Dense(1, name="predictions")(x)
    if head == "logits":
        return layers.Dense(n_classes, name="predictions")(x)
    if head == "softmax_layer":
        return layers.Softmax(name="predictions")(layers.Dense(n_classes, name="logits")(x))
    return layers.Dense(n_classes, activation="softmax", name="predictions")(x)


def _loss(head: str):
    import keras

    return {"sigmoid": "binary_crossentropy", "logit": keras.losses.BinaryCrossentropy(from_logits=True),
            "logits": keras.losses.SparseCategoricalCrossentropy(from_logits=True)}.get(
        head, "sparse_categorical_crossentropy")


def _metric(head: str):
    import keras

    if head == "logit":  # accuracy of a raw unit: class 1 when z > 0
        return keras.metrics.BinaryAccuracy(threshold=0.0, name="accuracy")
    return "accuracy"


def _limit_threads() -> None:
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(2)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:  # already initialised
        pass


def train(case: Case, samples: list[Sample], *, epochs: int | None = None, target_accuracy: float = 0.98):
    """Train :func:`build_model` on the samples (scaled to 0..1: the spec's ``scale_0_1``).

    Stops once the training accuracy (Keras' running figure, in training
    mode) reaches ``target_accuracy`` on two consecutive epochs, or after
    ``epochs`` (default ``case.epochs``).  Returns (model, that accuracy,
    epochs run).
    """
    import keras

    _limit_threads()

    keras.utils.set_random_seed(case.seed + 1)
    head = case.head_kind
    model = build_model(len(case.classes), case.binary, name=f"zoo_{case.name}", head=head, arch=case.arch,
                        side=case.image_size)
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss=_loss(head), metrics=[_metric(head)])
    x, y = arrays(samples)
    hist = model.fit(x, y, batch_size=32, epochs=epochs or case.epochs, shuffle=True, verbose=0,
                     callbacks=[stop_when_accurate(target_accuracy)])
    return model, float(hist.history["accuracy"][-1]), len(hist.history["accuracy"])


def arrays(samples: list[Sample]) -> tuple[np.ndarray, np.ndarray]:
    x = np.stack([s.image for s in samples]).astype(np.float32) / 255.0
    y = np.array([s.label for s in samples])
    return x, y


def predict(model, samples: list[Sample], head: str) -> np.ndarray:
    """Class ids: argmax, or for one unit class 1 when p >= 0.5 (``sigmoid``) or z >= 0 (``logit``)."""
    x, _ = arrays(samples)
    p = model.predict(x, batch_size=128, verbose=0)
    if head in ("sigmoid", "logit"):
        return (p[:, 0] >= (0.5 if head == "sigmoid" else 0.0)).astype(int)
    return p.argmax(axis=1)


def heldout_check(case: Case, model) -> dict:
    """Accuracy on a held-out split with and without the planted cues, overall and per planted class."""
    with_c = make_split(case, "heldout", case.n_heldout, with_cues=True)
    without = make_split(case, "heldout", case.n_heldout, with_cues=False)
    y = np.array([s.label for s in with_c])
    pa, pb = predict(model, with_c, case.head_kind), predict(model, without, case.head_kind)
    res = {"with_cues": float((pa == y).mean()), "without_cues": float((pb == y).mean()), "planted": {}}
    for k, _cue in case.cues:
        sel = np.array([s.label == k and s.cued for s in with_c])
        if sel.any():
            res["planted"][case.classes[k]] = (float((pa[sel] == k).mean()), float((pb[sel] == k).mean()))
    return res


# ----------------------------------------------------------------------------
# Writing and caching
# ----------------------------------------------------------------------------


def write_folder(root: Path, case: Case, samples: list[Sample]) -> None:
    """``root/train/<class>/NNNNN.png`` and the object masks under ``root/train_masks``."""
    import cv2

    counters: dict[int, int] = {}
    for s in samples:
        i = counters.get(s.label, 0)
        counters[s.label] = i + 1
        cls = case.classes[s.label]
        for sub, arr in (("train", cv2.cvtColor(s.image, cv2.COLOR_RGB2BGR)),
                         ("train_masks", s.mask.astype(np.uint8) * 255)):
            d = root / sub / cls
            d.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(d / f"{i:05d}.png"), arr)


NEW_FIELDS = {"head": "", "arch": "cnn", "image_size": 64, "spread": 1.0}  # left out of the key at these values: ...
NEW_CUE_FIELDS = {"spot": ""}  # ... older caches stay valid


def _body(arch: str):
    """The definition of the network ``arch`` that goes into the cache key."""
    if arch == "mobile":
        return MOBILE_BLOCKS
    if arch == "resnet":
        return {"blocks": RESNET_BLOCKS}
    if arch in ("flatten", "gmp", "deep"):
        return {"convs": CONV_BODIES[arch], "pool": arch if arch in ("flatten", "gmp") else "gap"}
    return CONV_BODIES[arch]


def _drop_new_cue_fields(cue):
    if isinstance(cue, dict):
        for f, default in NEW_CUE_FIELDS.items():
            if cue.get(f) == default:
                cue.pop(f)
    return cue


def key(case: Case) -> str:
    """The cache key: a hash of the zoo version, the case's parameters and its network's definition."""
    params = asdict(case)
    params.pop("extra", None)
    for f, default in NEW_FIELDS.items():
        if params.get(f) == default:
            params.pop(f)
    params["cues"] = [[k, _drop_new_cue_fields(c)] for k, c in params["cues"]]
    params["decoy"] = _drop_new_cue_fields(params["decoy"])
    if case.arch != "cnn":  # the body's definition: a changed network is a new build
        params["body"] = _body(case.arch)
    blob = json.dumps({"version": VERSION, **params}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def cache_root() -> Path:
    return cache_dir() / "zoo"


def build(out: Path, case: Case, log=print) -> Built:
    """Generate, write and train one case into ``out``."""
    out = Path(out)
    t0 = time.time()
    samples = make_split(case, "train", case.n_per_class)
    write_folder(out / "data", case, samples)
    model, acc, epochs = train(case, samples)
    model.save(out / "model.keras")
    built = Built(str(out), str(out / "data" / "train"), str(out / "data" / "train_masks"),
                  str(out / "model.keras"), acc, heldout_check(case, model))
    built.seconds = round(time.time() - t0, 1)
    built.epochs = epochs
    log(f"  {case.name}: trained to {acc:.0%} ({epochs} epochs) in {built.seconds:.0f} s; {built.learned()}")
    (out / "built.json").write_text(json.dumps(asdict(built), indent=2))
    return built


def job_spec(case: Case, built: Built, masks: bool, out) -> dict:
    """The job spec (as a dict) that audits the case's training split, with or without its masks."""
    return {
        "name": f"zoo-{case.name}-{'masks' if masks else 'nomasks'}",
        "model": {"path": built.model, "preprocess": "scale_0_1",
                  "input_size": [case.image_size, case.image_size]},
        "dataset": {"format": "folder", "path": built.data, "classes": list(case.classes),
                    "masks": built.masks if masks else None, "shard_size": 250},
        "explain": {"methods": ["gradcam", "gradcam++"], "layers": "auto", "target": "predicted"},
        "resources": {"actors": 1, "batch_size": 64},
        "output": str(out),
    }


def _relocate(built: Built, final: Path) -> Built:
    old = built.root
    for f in ("root", "data", "masks", "model"):
        setattr(built, f, getattr(built, f).replace(old, str(final), 1))
    return built


def ensure(case: Case, root: Path | None = None, log=print) -> Built:
    """The built case from the cache (built on first use, atomically renamed into place)."""
    root = Path(root) if root else cache_root()
    final = root / f"{case.name}-{key(case)}"
    if (final / "built.json").is_file():
        return _relocate(Built(**json.loads((final / "built.json").read_text())), final)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    built = build(tmp, case, log=log)
    try:
        os.replace(tmp, final)
    except OSError:  # another process built it first
        shutil.rmtree(tmp, ignore_errors=True)
    return _relocate(built, final)
