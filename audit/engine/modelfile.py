"""What a model file says before TensorFlow is imported (which alone takes seconds).

A ``.keras`` file is a zip whose ``config.json`` lists every layer; a legacy
``.h5`` file keeps the same JSON in its ``model_config`` attribute.  From them
(and from the first bytes of anything else) the commands refuse a file that is
no model, a SavedModel folder, a weights-only file, an unknown layer or a
Lambda layer in milliseconds, before any model is loaded.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

from audit.errors import AuditError

MODEL_SUFFIXES = (".keras", ".h5", ".hdf5")
NESTED = ("Functional", "Sequential", "Model")  # layer classes that hold layers of their own
MAGIC = ((b"PK\x03\x04", "a zip file"), (b"\x89HDF\r\n\x1a\n", "an HDF5 file"), (b"\x89PNG", "a PNG image"),
         (b"\xff\xd8\xff", "a JPEG image"), (b"GIF8", "a GIF image"), (b"RIFF", "a RIFF (WebP?) file"),
         (b"%PDF", "a PDF document"), (b"II*\x00", "a TIFF image"), (b"MM\x00*", "a TIFF image"),
         (b"BM", "a BMP image"))
SAVEDMODEL_HINT = ("Keras 3 loads a SavedModel only as an opaque inference layer, which hides the convolutional "
                   "layers Grad-CAM needs; convert it once (pip install tf_keras, then "
                   "tf_keras.models.load_model('{p}').save('model.h5')) and audit model.h5, or save the "
                   "model as .keras (model.save('model.keras'))")


def what_is(path: Path) -> str:
    """A few words on what a file is, from its first bytes ("a PNG image", "a text file")."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError:
        return "unreadable"
    for magic, name in MAGIC:
        if head.startswith(magic):
            return name
    if not head:
        return "an empty file"
    return "a text file" if all(32 <= b < 127 or b in b"\t\r\n" for b in head) else "not a model file"


def check_model_path(path) -> Path:
    """Refuse what is no Keras model file, without TensorFlow; returns the path.

    Raises:
        AuditError: a missing path, a folder (a SavedModel: how to convert it),
            a wrong suffix, a file whose content does not match its suffix, a
            ``.keras`` zip without ``config.json`` or an ``.h5`` file of weights
            only.
    """
    p = Path(path)
    if not p.exists():
        raise AuditError(f"model file not found: {p}")
    if p.is_dir():
        saved = (p / "saved_model.pb").is_file()
        raise AuditError(f"{p} is a {'TensorFlow SavedModel ' if saved else ''}folder, not a model file. "
                         + SAVEDMODEL_HINT.format(p=p))
    kind = what_is(p)
    if p.suffix.lower() not in MODEL_SUFFIXES:
        raise AuditError(f"model file {p} must end in .keras, .h5 or .hdf5 (it is {kind})")
    want = "a zip file" if p.suffix.lower() == ".keras" else "an HDF5 file"
    if kind != want:
        raise AuditError(f"{p} is not a Keras model: a {p.suffix} model file is {want}, this one is {kind}")
    if model_layers(p) is None:
        raise AuditError(f"{p} holds no model configuration: " + (
            "a .keras file needs its config.json" if want == "a zip file" else
            "an .h5 file of weights only? Build the model in code and load the weights, or save the whole "
            "model (model.save('model.keras'))"))
    return p


def model_layers(path) -> list[tuple[str, str]] | None:
    """(layer path, class name) of every layer of a ``.keras`` or ``.h5`` file, nested ones as ``outer/inner``.

    None when the file holds no readable model configuration.
    """
    cfg = _config(Path(path))
    if cfg is None:
        return None
    out: list[tuple[str, str]] = []
    _walk(cfg, "", out)
    return out


def _config(p: Path) -> dict | None:
    if p.suffix.lower() == ".keras":
        try:
            with zipfile.ZipFile(p) as z:
                return json.loads(z.read("config.json"))
        except (OSError, KeyError, ValueError, zipfile.BadZipFile):
            return None
    if p.suffix.lower() in (".h5", ".hdf5"):
        try:
            import h5py

            with h5py.File(p, "r") as f:
                raw = f.attrs.get("model_config")
        except (OSError, ValueError, ImportError):
            return None
        if raw is None:
            return None
        try:
            return json.loads(raw.decode() if isinstance(raw, bytes) else raw)
        except ValueError:
            return None
    return None


def _walk(node: dict, prefix: str, out: list) -> None:
    for layer in (node.get("config") or {}).get("layers") or []:
        cls = layer.get("class_name", "")
        name = (layer.get("config") or {}).get("name") or layer.get("name") or ""
        path = f"{prefix}{name}"
        out.append((path, cls))
        if cls in NESTED or (layer.get("config") or {}).get("layers"):
            _walk(layer, f"{path}/", out)


def check_layers(path, layers, trust_code: bool, allow: str = "pass --trust-code") -> None:
    """Layer names and Lambda layers, from the file's configuration (no TensorFlow).

    Args:
        path: a ``.keras`` or ``.h5`` file (anything else: nothing is checked).
        layers: the layer names asked for (None or "auto": none).
        trust_code: Lambda layers allowed.
        allow: how the command at hand allows them (said in the message).

    Raises:
        AuditError: a Lambda layer without ``trust_code``, or a layer the model
            does not have (its layers listed).
    """
    found = model_layers(path)
    if found is None:
        return
    if not trust_code and any(cls == "Lambda" for _, cls in found):
        raise AuditError(
            f"{path} contains a Lambda layer (arbitrary Python code), which Keras refuses to load in "
            f"safe mode; if you trust this file, {allow}")
    if layers in (None, "auto"):
        return
    paths = [p for p, cls in found if cls != "InputLayer"]
    known = set(paths) | {p.rsplit("/", 1)[-1] for p in paths}
    for name in [layers] if isinstance(layers, str) else layers:
        if name != "auto" and name not in known:
            shown = [p for p, cls in found if cls not in ("InputLayer", "Dense", "Dropout", "Flatten")
                     and "Pooling" not in cls]
            raise AuditError(f"unknown layer {name!r}; the model's layers: {', '.join(shown[-12:])}"
                             + (" (see `audit layers MODEL` for the candidates)" if len(shown) > 12 else ""))
