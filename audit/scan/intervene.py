"""A finished job's model and data for the causal tests (:mod:`audit.scan.probes`).

:class:`Intervener` wires the probes to a finished job: model,
preprocessing, head and dataset from ``OUT/job.json``; :class:`SafeIntervener`
turns a model or dataset that cannot be loaded into one warning.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from audit.errors import AuditError

BATCH = 64  # images per model call (larger batches run no faster on a CPU; a speed setting)


# ----------------------------------------------------------------------------
# A finished job's model and data
# ----------------------------------------------------------------------------


class Intervener:
    """The model, head and dataset of a finished job (``OUT/job.json``), for :func:`causal_tests`.

    The model is loaded lazily, once, on first use.
    """

    def __init__(self, out_dir, *, fill: str = "mean", batch_size: int = BATCH):
        from audit.data import fs, io

        self.out = str(out_dir) if fs.is_uri(str(out_dir)) else Path(out_dir)
        job = io.read_job(self.out)
        if job is None:
            raise AuditError(f"{io.job_path(self.out)} not found: intervention needs the job's model and dataset")
        self.job = job
        self.spec = self.job.get("spec") or {}
        self.fill = fill
        self.batch_size = batch_size
        self._model = None
        self._head = None
        self._size = None
        self._predict = None
        self.forwards = 0  # images predicted so far (the cost of the tests)

    @property
    def size(self) -> tuple[int, int]:
        if self._size is None:
            size = self.job.get("input_size") or (self.spec.get("model") or {}).get("input_size")
            if size:
                self._size = (int(size[0]), int(size[1]))
            else:
                from audit.engine.models import input_size_of

                self._size = input_size_of(self.model)
        return self._size

    @property
    def model(self):
        if self._model is None:
            from audit.data import fs
            from audit.engine.models import load_model

            m = self.spec.get("model") or {}
            path = fs.local_copy(m["path"]) if fs.is_uri(m.get("path")) else m.get("path")
            self._model = load_model(path, application=m.get("application"),
                                     weights=m.get("weights"), input_size=m.get("input_size"),
                                     num_classes=m.get("num_classes"),
                                     trust_code=bool(m.get("trust_code")))
        return self._model

    @property
    def head(self):
        """The model's classifier head: how its outputs become class ids (binary and multi-label too)."""
        if self._head is None:
            from audit.engine.heads import Head

            self._head = Head.of(self.model, (self.spec.get("model") or {}).get("output"))
        return self._head

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Predictions for uint8 RGB images at the input size: (N,) ids, or (N, C) bool (multi-label)."""
        from audit.engine.models import model_input

        if self._predict is None:
            self._predict = CompiledPredict(self.model, self.head, self.batch_size)
        mode = (self.spec.get("model") or {}).get("preprocess", "none")
        self.forwards += len(images)
        return self._predict(model_input(images, self.model.inputs[0].shape[-1], mode))

    def load(self, image_ids):
        """(images, object masks or None) of the sample at the model input size."""
        from audit.data.datasets import load_images

        images, masks, has_mask = load_images(self.spec, list(image_ids), self.size)
        if masks is not None:
            masks = masks & np.asarray(has_mask, bool)[:, None, None]
        return images, masks


class CompiledPredict:
    """A model's predictions through one compiled graph, traced once for any batch size (an eager
    Keras call costs several times a compiled one on small models)."""

    def __init__(self, model, head, batch: int = BATCH):
        import tensorflow as tf

        self.head, self.batch = head, int(batch)
        shape = [None, *[int(d) if d is not None else None for d in model.inputs[0].shape[1:]]]
        # one trace for every batch size (a None batch dimension)
        self._fn = tf.function(lambda x: model(x, training=False),
                               input_signature=[tf.TensorSpec(shape, tf.float32)])

    def __call__(self, x: np.ndarray) -> np.ndarray:
        out = []
        for s in range(0, len(x), self.batch):
            part = np.asarray(x[s:s + self.batch], np.float32)
            k = len(part)
            y = self._fn(part)
            y = [np.asarray(t)[:k] for t in y] if isinstance(y, (list, tuple)) else \
                ({n: np.asarray(t)[:k] for n, t in y.items()} if isinstance(y, dict) else np.asarray(y)[:k])
            out.append(self.head.predict(y))
        return np.concatenate(out) if out else np.zeros(0, int)


class SafeIntervener:
    """An intervention that cannot run (model or data moved) warns once; later calls return None."""

    def __init__(self, inner, quiet: bool):
        self.inner, self.quiet, self.failed = inner, quiet, None

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def call(self, fn, *a, **k):
        """``fn(*a, **k)``, or None once the job's model or data could not be loaded."""
        if self.failed:
            return None
        try:
            return fn(*a, **k)
        except AuditError as e:
            self.failed = str(e)
            if not self.quiet:
                import sys

                print(f"audit: scan: causal tests skipped ({e})", file=sys.stderr)
            return None
