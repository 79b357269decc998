"""Loading models and preprocessing images, as the job spec names them."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from audit.engine.modelfile import check_model_path
from audit.errors import AuditError

PREPROCESS_MODES = ("none", "scale_0_1", "scale_-1_1", "caffe", "torch")

_CAFFE_MEAN_BGR = np.array([103.939, 116.779, 123.68], np.float32)
_TORCH_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
_TORCH_STD = np.array([0.229, 0.224, 0.225], np.float32)


def preprocess(images: np.ndarray, mode: str = "none") -> np.ndarray:
    """Map uint8-range images (N, H, W, C) to the model's input range.

    ``mode`` is one of :data:`PREPROCESS_MODES` or the name of a
    ``keras.applications`` module (``resnet50``, ``mobilenet_v2``...), whose
    ``preprocess_input`` is used.  ``none`` and the two ``scale`` modes work
    for any channel count; the others hold per-channel RGB constants and need
    C = 3 (an AuditError otherwise).
    """
    x = np.asarray(images, dtype=np.float32)
    if mode in (None, "none"):
        return x
    if mode == "scale_0_1":
        return x / 255.0
    if mode == "scale_-1_1":
        return x / 127.5 - 1.0
    if x.shape[-1] != 3:
        raise AuditError(f"preprocess {mode!r} is for RGB images (3 channels) but the model takes "
                         f"{x.shape[-1]}; use none, scale_0_1 or scale_-1_1")
    if mode == "caffe":
        return x[..., ::-1] - _CAFFE_MEAN_BGR
    if mode == "torch":
        return (x / 255.0 - _TORCH_MEAN) / _TORCH_STD
    return _applications_preprocess(mode)(x)


CHANNEL_COUNTS = (1, 2, 3, 4)  # what to_channels makes from RGB images


def to_channels(images: np.ndarray, channels: int) -> np.ndarray:
    """uint8 RGB (or gray) images as the ``channels`` the model takes.

    The one rule for the worker, the intervention and ``audit explain``
    (docs/jobs.md, "Channels"); images are decoded to RGB first, so:

    * 1: gray, the luma Y = 0.299 R + 0.587 G + 0.114 B (ITU-R BT.601; OpenCV's
      ``COLOR_RGB2GRAY`` and PIL's ``"L"``), rounded to uint8;
    * 2: gray and an opaque alpha channel (255);
    * 3: RGB (a gray input is repeated);
    * 4: RGB and an opaque alpha channel (255).

    Args:
        images: uint8 (N, H, W, 3) or (H, W, 3) RGB; a gray (..., 1) input is
            taken as R = G = B; an alpha channel (..., 2 or 4) is dropped first.
        channels: the model input's channel count.

    Returns:
        uint8 (..., channels); the input itself when it already has them.

    Raises:
        AuditError: a channel count other than 1-4 (an RGB image has nothing
            to fill a fifth channel with).
    """
    import cv2

    check_channels(channels)
    x = np.asarray(images)
    c = x.shape[-1]
    if c == channels:
        return x
    if c in (2, 4):  # gray or RGB with alpha (a converted image, e.g. to show it): alpha dropped
        x, c = x[..., : c - 1], c - 1
        if c == channels:
            return x
    if c not in (1, 3):
        raise AuditError(f"expected gray (1), RGB (3) or either with alpha images, got {c} channels")
    lead = x.shape[:-1]
    if channels <= 2:
        gray = x if c == 1 else cv2.cvtColor(x.reshape(-1, lead[-1], 3), cv2.COLOR_RGB2GRAY).reshape(*lead, 1)
        base = gray
    else:
        base = np.repeat(x, 3, axis=-1) if c == 1 else x
    if channels in (2, 4):
        base = np.concatenate([base, np.full((*lead, 1), 255, base.dtype)], axis=-1)
    return base


def check_channels(channels: int) -> None:
    """One line when a model takes a channel count :func:`to_channels` cannot make."""
    if int(channels) not in CHANNEL_COUNTS:
        raise AuditError(f"the model takes {channels} input channels; images are audited as gray (1), "
                         "gray + alpha (2), RGB (3) or RGBA (4)")


def model_input(images: np.ndarray, channels: int, mode: str = "none") -> np.ndarray:
    """uint8 RGB images -> the float32 input of a model with ``channels`` channels.

    :func:`to_channels`, then :func:`preprocess` with ``mode``.
    """
    return preprocess(to_channels(images, channels), mode)


def _applications_preprocess(mode: str):
    import keras

    module = getattr(keras.applications, str(mode), None)
    fn = getattr(module, "preprocess_input", None)
    if fn is None:
        raise AuditError(
            f"unknown preprocess {mode!r}; expected one of {', '.join(PREPROCESS_MODES)} "
            "or a keras.applications module name such as 'resnet50' or 'mobilenet_v2'"
        )
    return lambda x: np.asarray(fn(x.copy()), np.float32)


def check_preprocess(mode: str) -> None:
    """Fail early (one line) on an unknown preprocessing mode (before TensorFlow is imported)."""
    if mode in PREPROCESS_MODES or mode is None:
        return
    known = _application_modules()
    if known is None:  # keras laid out otherwise: ask keras itself
        _applications_preprocess(mode)
    elif str(mode) not in known:
        raise AuditError(
            f"unknown preprocess {mode!r}; expected one of {', '.join(PREPROCESS_MODES)} "
            "or a keras.applications module name such as 'resnet50' or 'mobilenet_v2'"
        )


def _application_modules() -> set | None:
    """The keras.applications modules that have a preprocess_input, read from keras's files (no import)."""
    import importlib.util

    spec = importlib.util.find_spec("keras")
    if spec is None or not spec.submodule_search_locations:
        return None
    apps = Path(list(spec.submodule_search_locations)[0]) / "applications"
    if not apps.is_dir():
        return None
    return {p.parent.name for p in apps.glob("*/__init__.py") if "preprocess_input" in p.read_text(errors="ignore")}


MODEL_SUFFIXES = (".keras", ".h5", ".hdf5")  # the model files load_model opens


def load_model(path=None, *, application=None, weights=None, input_size=None,
               num_classes=None, trust_code=False):
    """Load a Keras model from a file or build a ``keras.applications`` model.

    Nothing is ever downloaded.

    Args:
        path: a ``.keras`` file or a legacy ``.h5``/``.hdf5`` file.
        application: a ``keras.applications`` name (``ResNet50``) instead of a file.
        weights: a local weights file for ``application`` (None: random weights).
        input_size: (H, W): the application's input size; a model file that
            accepts any image size gets its input fixed to it (:func:`with_input_size`).
        num_classes: classes of an ``application`` model (its top layer).
        trust_code: turn Keras ``safe_mode`` off, allowing ``Lambda`` layers
            (arbitrary code).  Off by default: such a model is refused with a
            message saying how to allow it.

    Returns:
        The Keras model (compile=False).

    Raises:
        AuditError: neither path nor application, a missing file, a directory
            (SavedModel), a wrong suffix, a file Keras cannot load, a Lambda
            layer without ``trust_code``, an unknown application, a missing
            weights file or weights that do not fit, or an input size the
            application or model cannot take.
    """
    if application:
        return _build_application(application, weights, input_size, num_classes)
    if not path:
        raise AuditError("model: give either 'path' (a .keras or .h5 file) or 'application'")

    p = check_model_path(path)  # before TensorFlow: a PNG, a SavedModel folder, weights only
    import keras

    try:
        model = keras.models.load_model(p, compile=False, safe_mode=not trust_code)
    except Exception as e:  # Keras raises bare ValueError/OSError for everything
        msg = " ".join(str(e).split())
        if "safe_mode" in msg or "Lambda" in msg:
            raise AuditError(
                f"{p} contains a Lambda layer (arbitrary Python code), which Keras refuses "
                "to load in safe mode; if you trust this file, pass --trust-code (audit layers, "
                "audit explain) or set model.trust_code: true in the job spec (audit run: "
                "--set model.trust_code=true)"
            ) from None
        raise AuditError(f"cannot load model {p}: {msg[:300]}") from None
    check_single_input(model, str(p))
    return with_input_size(model, input_size) if input_size else model


def check_single_input(model, where: str = "the model") -> None:
    """Refuse a model with several inputs in one line naming them.

    Grad-CAM needs the image as the model's only input; the other inputs of
    a multi-input model (metadata, a second image) have no value to give.

    Raises:
        AuditError: the model has more than one input.
    """
    inputs = list(getattr(model, "inputs", None) or [])
    if len(inputs) <= 1:
        return
    names = ", ".join(f"{_input_name(t, k)} {list(t.shape[1:])}" for k, t in enumerate(inputs))
    raise AuditError(
        f"{where} has {len(inputs)} inputs ({names}); shortcut-audit explains models with one image "
        "input: save a model of the image branch alone (keras.Model(image_input, output), the other "
        "inputs fixed inside it) and audit that"
    )


def _input_name(tensor, k: int) -> str:
    history = getattr(tensor, "_keras_history", None)
    op = getattr(history, "operation", None)
    return getattr(op, "name", None) or getattr(tensor, "name", None) or f"input {k}"


def _build_application(name, weights, input_size, num_classes):
    import keras

    fn = getattr(keras.applications, str(name), None)
    if fn is None or not callable(fn):
        known = [n for n in dir(keras.applications) if n[:1].isupper()]
        raise AuditError(f"unknown keras.applications model {name!r}; known: {', '.join(known)}")
    if weights and not Path(weights).is_file():
        raise AuditError(f"weights file not found: {weights}")
    kwargs = {"weights": None}
    if input_size:
        kwargs["input_shape"] = (int(input_size[0]), int(input_size[1]), 3)
    if num_classes:
        kwargs["classes"] = int(num_classes)
    try:
        model = fn(**kwargs)
    except ValueError as e:  # e.g. an input size below the architecture's minimum
        raise AuditError(f"cannot build {name}: {' '.join(str(e).split())[:300]}") from None
    if weights:
        try:
            model.load_weights(weights)
        except Exception as e:
            raise AuditError(f"cannot load weights {weights} into {name}: {e}") from None
    return model


def input_size_of(model) -> tuple[int, int]:
    """(H, W) of the model input; an error when the model accepts any size."""
    shape = model.inputs[0].shape
    if len(shape) != 4:
        raise AuditError(f"model input has shape {tuple(shape)}; an image model takes (N, H, W, C)")
    h, w = shape[1], shape[2]
    if h is None or w is None:
        raise AuditError("the model accepts any image size; set model.input_size: [H, W] "
                         "(audit explain / audit layers: --input-size H W)")
    return int(h), int(w)


def with_input_size(model, size):
    """``model`` with its input fixed to ``size`` (H, W) when it accepts any size.

    A model saved with ``Input((None, None, 3))`` takes images of any size, but
    the compiled explain step needs one.  The model is rebuilt from its config
    with the input layer's shape set (same layers, same names, same weights),
    so the layer names of a spec still apply.  A model with fixed sizes is
    returned as it is (the caller compares the sizes).
    """
    shape = tuple(model.inputs[0].shape)
    if len(shape) != 4 or (shape[1] is not None and shape[2] is not None):
        return model
    h, w = int(size[0]), int(size[1])
    try:
        cfg = model.get_config()
        inputs = [ly for ly in cfg.get("layers", []) if ly.get("class_name") == "InputLayer"]
        if len(inputs) != 1 or len(inputs[0]["config"].get("batch_shape") or ()) != 4:
            raise ValueError(f"{len(inputs)} input layers")
        bs = list(inputs[0]["config"]["batch_shape"])
        inputs[0]["config"]["batch_shape"] = [bs[0], h, w, bs[3]]
        if cfg.get("build_input_shape"):  # Sequential
            cfg["build_input_shape"] = [bs[0], h, w, bs[3]]
        new = model.__class__.from_config(cfg)
        new.set_weights(model.get_weights())
    except Exception as e:  # subclassed or multi-input models
        raise AuditError(f"the model accepts any image size and its input could not be fixed to {h}x{w} "
                         f"({type(e).__name__}: {' '.join(str(e).split())[:200]}); save it with "
                         f"keras.Input(({h}, {w}, channels)) instead") from None
    return new


def fingerprint(path) -> str | None:
    """sha256 of a model file (None when the model is not a file)."""
    if not path or not os.path.isfile(path):
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
