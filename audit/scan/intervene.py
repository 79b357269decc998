"""A finished job's model and data for the causal tests (:mod:`audit.scan.probes`).

:class:`Intervener` wires the probes to a finished job: model,
preprocessing, head and dataset from ``OUT/job.json``; :class:`SafeIntervener`
turns a model or dataset that cannot be loaded into one warning.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from audit.data import fs, io
from audit.data.datasets import load_images
from audit.data.jobspec import load_job_model, read_job_record
from audit.engine.heads import Head
from audit.engine.models import input_size_of, model_input
from audit.errors import AuditError

BATCH = 64  # images per model call (larger batches run no faster on a CPU; a speed setting)


# ----------------------------------------------------------------------------
# A finished job's model and data
# ----------------------------------------------------------------------------


class Intervener:
    """The model, head and dataset of a finished job (``OUT/job.json``), for :func:`causal_tests`.

    The model is loaded lazily, once, on first use.
    """

    def __init__(self, out_dir, *, fill: str = "mean", batch_size: int | None = None):
        self.out = str(out_dir) if fs.is_uri(str(out_dir)) else Path(out_dir)
        record = read_job_record(self.out)
        if record is None or record.spec is None:
            raise AuditError(f"{io.job_path(self.out)} not found: intervention needs the job's model and dataset")
        self.record = record
        self.spec = record.spec
        self.fill = fill
        # the job's own batch (chosen for this model and machine), else BATCH
        self.batch_size = int(batch_size or getattr(record.spec.resources, "batch_size", 0) or BATCH)
        self._model = None
        self._head = None
        self._size = None
        self._predict = None
        self.forwards = 0  # images predicted so far (the cost of the tests)

    @property
    def size(self) -> tuple[int, int]:
        if self._size is None:
            self._size = self.record.size
            if self._size is None:  # a job.json without it: the model says

                self._size = input_size_of(self.model)
        return self._size

    @property
    def model(self):
        if self._model is None:
            self._model = load_job_model(self.spec.model)  # as the job's actors loaded it
        return self._model

    @property
    def head(self):
        """The model's classifier head: how its outputs become class ids (binary and multi-label too)."""
        if self._head is None:
            self._head = Head.of(self.model, self.spec.model.output)
        return self._head

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Predictions for uint8 RGB images at the input size: (N,) ids, or (N, C) bool (multi-label)."""
        if self._predict is None:
            self._predict = CompiledPredict(self.model, self.head, self.batch_size)
        mode = self.spec.model.preprocess
        self.forwards += len(images)
        return self._predict(model_input(images, self.model.inputs[0].shape[-1], mode))

    def load(self, image_ids):
        """(images, object masks or None) of the sample at the model input size."""
        images, masks, has_mask = load_images(self.spec, list(image_ids), self.size)
        if masks is not None:
            masks = masks & np.asarray(has_mask, bool)[:, None, None]
        return images, masks


class CompiledPredict:
    """A model's predictions through one compiled graph, traced once for any batch size (an eager
    Keras call costs several times a compiled one on small models).  A short batch is padded to the
    next power of two (:func:`audit.engine.explainer.bucket_for`, as the job's Explainer does): a
    backend sets a convolution up anew for every batch shape it meets, and the stages of the causal
    tests end in batches of every size."""

    def __init__(self, model, head, batch: int = BATCH):
        import tensorflow as tf

        self.head, self.batch = head, int(batch)
        shape = [None, *[int(d) if d is not None else None for d in model.inputs[0].shape[1:]]]
        # one trace for every batch size (a None batch dimension)
        self._fn = tf.function(lambda x: model(x, training=False),
                               input_signature=[tf.TensorSpec(shape, tf.float32)])

    def __call__(self, x: np.ndarray) -> np.ndarray:
        from audit.engine.explainer import bucket_for  # deferred: it imports Keras (a model is loaded by now)

        out = []
        for s in range(0, len(x), self.batch):
            part = np.asarray(x[s:s + self.batch], np.float32)
            k = len(part)
            size = bucket_for(k, self.batch)
            if size > k:
                part = np.concatenate([part, np.zeros((size - k, *part.shape[1:]), np.float32)])
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
