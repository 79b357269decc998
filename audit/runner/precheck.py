"""Checks a job runs before its actors start, so a mistake costs seconds, not a cluster start.

Two stages:

* :func:`check_model_file` needs no TensorFlow: a ``.keras`` file is a zip
  whose ``config.json`` lists every layer (an ``.h5`` file keeps the same in
  its ``model_config``), so layer names asked for in
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

from audit.data import fs
from audit.data.jobspec import JobSpec
from audit.engine.modelfile import check_layers, check_model_path, model_layers
from audit.quiet import import_tensorflow
from audit.runner.worker import AuditWorker


def keras_layers(path) -> list[tuple[str, str]] | None:
    """(layer path, class name) of every layer in a ``.keras`` or ``.h5`` file, nested ones as ``outer/inner``.

    None when the file has no readable model configuration: the checks are
    then left to :func:`check_with_model`.
    """
    return model_layers(path)


def check_model_file(spec: JobSpec) -> None:
    """What the model file tells without TensorFlow: what it is, layer names, Lambda layers.

    Raises:
        AuditError: not a Keras model file (a PNG, a SavedModel folder, weights
            only), a layer in ``explain.layers`` that the model does not have
            (its layers listed), or a Lambda layer without ``model.trust_code``.
    """
    m = spec.model
    if not m.path or fs.is_uri(m.path):
        return
    check_model_path(m.path)
    check_layers(m.path, spec.explain.layers, bool(m.trust_code),
                 allow="set model.trust_code: true in the job spec (or add --set model.trust_code=true to audit run)")


def check_with_model(spec: JobSpec, classes) -> dict:
    """Load the model and build the Explainer in the driver, as each actor will; returns its facts.

    Raises:
        AuditError: whatever an actor's setup would raise (unknown layer, bad
            target, classes that do not fit the model, unusable input).
    """
    tf = import_tensorflow()
    # the driver needs no GPU: leave them to the actors (RuntimeError: TensorFlow already runs here)
    with contextlib.suppress(RuntimeError, ValueError):
        tf.config.set_visible_devices([], "GPU")

    worker = AuditWorker(spec, classes=classes)
    try:
        return worker.setup()
    finally:
        worker.close()
