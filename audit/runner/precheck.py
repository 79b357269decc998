"""Checks a job runs before its actors start, so a mistake costs seconds, not a cluster start.

Two stages:

* :func:`check_model_file` needs no TensorFlow: a ``.keras`` file is a zip
  whose ``config.json`` lists every layer, so layer names asked for in
  ``explain.layers`` and ``Lambda`` layers (refused unless
  ``model.trust_code``) are checked from it in milliseconds;
* :func:`check_with_model` loads the model in the driver the way each actor
  will (:meth:`audit.runner.worker.AuditWorker.setup`): an unknown or
  unusable layer, a bad target, a class count that does not fit the model,
  a model input the images cannot feed are found there, before any actor
  starts.  The driver keeps TensorFlow off its GPUs.
"""

from __future__ import annotations

import contextlib
import json
import zipfile
from pathlib import Path

from audit.errors import AuditError

NESTED = ("Functional", "Sequential", "Model")  # layer classes that hold layers of their own


def keras_layers(path) -> list[tuple[str, str]] | None:
    """(layer path, class name) of every layer in a ``.keras`` file, nested ones as ``outer/inner``.

    None when the file is not a ``.keras`` zip with a readable ``config.json``
    (an ``.h5`` file, say): the checks are then left to :func:`check_with_model`.
    """
    if Path(path).suffix != ".keras":
        return None
    try:
        with zipfile.ZipFile(path) as z:
            cfg = json.loads(z.read("config.json"))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None
    out: list[tuple[str, str]] = []
    _walk(cfg, "", out)
    return out


def _walk(node: dict, prefix: str, out: list) -> None:
    for layer in (node.get("config") or {}).get("layers") or []:
        cls = layer.get("class_name", "")
        name = (layer.get("config") or {}).get("name") or layer.get("name") or ""
        path = f"{prefix}{name}"
        out.append((path, cls))
        if cls in NESTED or (layer.get("config") or {}).get("layers"):
            _walk(layer, f"{path}/", out)


def check_model_file(spec: dict) -> None:
    """What the ``.keras`` file's config tells without TensorFlow: layer names, Lambda layers.

    Raises:
        AuditError: a layer in ``explain.layers`` that the model does not have
            (its layers listed), or a Lambda layer without ``model.trust_code``.
    """
    m = spec["model"]
    layers = keras_layers(m["path"]) if m.get("path") else None
    if layers is None:
        return
    if not m.get("trust_code") and any(cls == "Lambda" for _, cls in layers):
        raise AuditError(
            f"{m['path']} contains a Lambda layer (arbitrary Python code), which Keras refuses to load in "
            "safe mode; if you trust this file, set model.trust_code: true in the job spec (or add "
            "--set model.trust_code=true to audit run)")
    asked = spec["explain"].get("layers")
    if asked in (None, "auto"):
        return
    paths = [p for p, cls in layers if cls != "InputLayer"]
    known = set(paths) | {p.rsplit("/", 1)[-1] for p in paths}
    for name in [asked] if isinstance(asked, str) else asked:
        if name != "auto" and name not in known:
            shown = [p for p, cls in layers if cls not in ("InputLayer", "Dense", "Dropout", "Flatten")
                     and "Pooling" not in cls]
            raise AuditError(f"unknown layer {name!r}; the model's layers: {', '.join(shown[-12:])}"
                             + (" (see `audit layers MODEL` for the candidates)" if len(shown) > 12 else ""))


def check_with_model(spec: dict, classes) -> dict:
    """Load the model and build the Explainer in the driver, as each actor will; returns its facts.

    Raises:
        AuditError: whatever an actor's setup would raise (unknown layer, bad
            target, classes that do not fit the model, unusable input).
    """
    from audit.quiet import import_tensorflow

    tf = import_tensorflow()
    # the driver needs no GPU: leave them to the actors (RuntimeError: TensorFlow already runs here)
    with contextlib.suppress(RuntimeError, ValueError):
        tf.config.set_visible_devices([], "GPU")
    from audit.runner.worker import AuditWorker

    worker = AuditWorker(spec, classes=classes)
    try:
        return worker.setup()
    finally:
        worker.close()
