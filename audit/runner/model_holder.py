"""The model holder of a worker: TensorFlow set up, the job's model loaded once, the Explainer built.

:meth:`ModelHolder.load` does what an actor's setup checks (unknown layer, bad
target, classes that do not fit the head, unusable input), so the driver can
run it first and fail in one line before any actor starts.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import numpy as np

from audit.data.jobspec import JobSpec, load_job_model
from audit.engine.heads import Head
from audit.engine.models import check_channels, check_preprocess, input_size_of, model_input
from audit.errors import AuditError
from audit.quiet import import_tensorflow


@dataclass
class ModelHolder:
    """The job's model and what was found out about it."""

    model: object
    head: object  # audit.engine.heads.Head
    explainer: object  # audit.engine.explainer.Explainer
    size: tuple  # (H, W) of the model input
    channels: int
    classes: list
    tfinfo: dict  # devices, threads, mixed precision

    @classmethod
    def load(cls, spec: JobSpec, classes, cpus) -> ModelHolder:
        """Configure TensorFlow for ``cpus``, load the model, check ``classes`` and build the Explainer.

        Raises:
            AuditError: a model, head, layer, target or input the job cannot use (one line).
        """
        import cv2  # deferred, like TensorFlow below: the driver imports this module before Ray starts

        tfinfo = _configure_tensorflow(cpus, gpu=True, mixed_precision=spec.resources.mixed_precision)
        cv2.setNumThreads(1)
        model = _load_model(spec, tfinfo)
        head = Head.of(model, spec.model.output)
        classes = check_classes(classes, head)
        explainer, size, channels = _build_explainer(spec, model, classes)
        return cls(model, head, explainer, size, channels, classes, tfinfo)


def _load_model(spec: JobSpec, tfinfo: dict):
    """The job's model (a local copy of one in a bucket), rebuilt for mixed precision if asked."""
    check_preprocess(spec.model.preprocess)
    model = load_job_model(spec.model)
    if tfinfo["mixed_precision"]:
        model = to_mixed_precision(model)
        tfinfo["mixed_precision"] = runs_mixed(model)  # what the model runs, not what was asked
    return model


def check_classes(classes, head) -> list:
    """The dataset's classes match the head (numbered 0..n-1 when the dataset has none)."""
    n_out = head.units
    if classes is None:
        return [str(i) for i in range(head.num_classes)]
    if len(classes) != head.num_classes:
        raise AuditError(
            f"the dataset has {len(classes)} classes ({', '.join(classes[:6])}"
            f"{'...' if len(classes) > 6 else ''}) but the model has {n_out} outputs"
            f"{' (one unit: 2 classes)' if head.num_classes != n_out else ''}; "
            "set dataset.classes to the model's classes in output order"
        )
    return list(classes)


def _build_explainer(spec: JobSpec, model, classes):
    """(the Explainer, the input size, the channels), checked against the spec and preprocessing."""
    from audit.engine.explainer import Explainer

    m, ex, res = spec.model, spec.explain, spec.resources
    explainer = Explainer(model, layers=ex.layers, methods=tuple(ex.methods), target=ex.target,
                          batch_size=res.batch_size, classes=classes, output=m.output, token_grid=ex.token_grid)
    size = m.size or input_size_of(model)
    if tuple(explainer.input_shape[:2]) != size:
        raise AuditError(f"model input is {explainer.input_shape[:2]}, model.input_size says {list(size)}")
    channels = int(explainer.input_shape[2])
    check_channels(channels)  # images are converted by models.to_channels
    model_input(np.zeros((1, 1, 1, 3), np.uint8), channels, m.preprocess)  # fails here, not per batch
    return explainer, size, channels


def _configure_tensorflow(cpus: float | None, gpu: bool, mixed_precision: bool) -> dict:
    """TF threads = this worker's CPU share; GPU memory growth on. Call before any TF op runs."""
    tf = import_tensorflow()

    info = {"gpus": 0, "threads": None, "mixed_precision": False, "memory_growth": [],
            "visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}  # Ray sets it per actor
    gpus = tf.config.list_physical_devices("GPU")
    for g in gpus:
        with contextlib.suppress(RuntimeError, ValueError):  # already initialised (in-process use)
            tf.config.experimental.set_memory_growth(g, True)
        info["memory_growth"].append(bool(tf.config.experimental.get_memory_growth(g)))
    info["gpus"] = len(gpus)
    if cpus:
        n = max(1, int(round(cpus)))
        try:
            tf.config.threading.set_intra_op_parallelism_threads(n)
            tf.config.threading.set_inter_op_parallelism_threads(min(2, n))
            info["threads"] = n
        except RuntimeError:  # TF already running in this process (tests): keep its setting
            pass
    if mixed_precision and gpus:
        import keras

        keras.mixed_precision.set_global_policy("mixed_float16")
        info["mixed_precision"] = True
    return info


def _strip_dtypes(cfg):
    """A model config with every layer's dtype policy removed (inputs keep theirs)."""
    if isinstance(cfg, dict):
        out = {}
        is_input = cfg.get("class_name") == "InputLayer"
        for k, v in cfg.items():
            if k == "config" and isinstance(v, dict) and not is_input:
                v = {kk: _strip_dtypes(vv) for kk, vv in v.items() if kk != "dtype"}
            else:
                v = _strip_dtypes(v)
            out[k] = v
        return out
    if isinstance(cfg, list):
        return [_strip_dtypes(v) for v in cfg]
    return cfg


def to_mixed_precision(model):
    """Rebuild a Functional/Sequential model under the global mixed_float16 policy."""
    import keras

    try:
        cfg = _strip_dtypes(model.get_config())
        new = model.__class__.from_config(cfg)
        new.set_weights(model.get_weights())
        return new
    except Exception:  # subclassed or exotic models: stay in float32
        keras.mixed_precision.set_global_policy("float32")
        return model


def runs_mixed(model) -> bool:
    """Does any layer of ``model`` compute in float16 (a ``mixed_float16`` policy)?"""
    for layer in getattr(model, "layers", ()):
        policy = getattr(layer, "dtype_policy", None)
        if getattr(policy, "compute_dtype", None) == "float16":
            return True
    return False


