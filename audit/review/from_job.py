"""What `audit explain --job OUT` takes from a job: model, preprocessing, classes, layers, methods, images.

The job's ``job.json`` is read with :func:`audit.data.io.read_job`, as the scan
reads it for its causal tests, so an explanation sees the model exactly as the
job and the scan saw it (its preprocessing above all: a model trained on 0-1
inputs and fed 0-255 pixels explains nothing).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from audit.data import fs
from audit.data.jobspec import JobSpec, read_job_record
from audit.data.query import load, original_image, records_dataset
from audit.errors import AuditError

RESCALING_LAYERS = ("Rescaling", "Normalization")  # a model that takes 0-255 pixels itself


@dataclass(frozen=True)
class JobInputs:
    """The settings of a job that an explanation of its images reuses."""

    out: str
    model_path: str | None
    application: str | None
    weights: str | None
    input_size: tuple | None
    trust_code: bool
    output: str | None
    preprocess: str
    classes: list | None
    layers: list | None
    methods: list | None
    token_grid: tuple | None


def job_inputs(out) -> JobInputs:
    """The model, preprocessing, classes, layers and methods of the job in ``out``.

    Raises:
        AuditError: ``out`` has no readable ``job.json``.
    """
    record = read_job_record(out)
    if record is None:
        raise AuditError(f"--job {out}: no job.json there (give the `output` folder of an audit job)")
    spec = record.spec or JobSpec()
    model, explain = spec.model, spec.explain
    grid = explain.token_grid
    return JobInputs(
        out=str(out), model_path=model.path, application=model.application,
        weights=model.weights, input_size=model.size,
        trust_code=bool(model.trust_code), output=model.output,
        preprocess=model.preprocess or "none", classes=record.classes or None,
        layers=record.layers or None,
        methods=(list(explain.methods or []) or None) if record.spec is not None else None,
        token_grid=tuple(grid) if grid else None)


def resolve_images(out, names, folder) -> list[str]:
    """Image files for ``names``: each a file, or an ``image_id`` of the job in ``out``.

    An image the job read from a Parquet or TFRecord dataset (no file of its
    own) is decoded and written as PNG under ``folder/inputs/``.

    Raises:
        AuditError: a name is neither a file nor an image id of the job.
    """
    files = {n: n for n in names if fs.is_file(n)}
    ids = [n for n in names if n not in files]
    if ids:
        files.update(_files_of_ids(out, ids, Path(folder) / "inputs"))
    return [files[n] for n in names]


def _files_of_ids(out, ids, inputs: Path) -> dict:
    import cv2

    rows = load(out, columns=["image_id", "path", "path_bytes"], filters=[("image_id", "in", list(ids))])
    rows = rows.drop_duplicates("image_id").set_index("image_id", drop=False)
    missing = [i for i in ids if i not in rows.index]
    if missing:
        raise AuditError(f"{missing[0]!r} is neither an image file nor an image id of the job in {out} "
                         f"(ids look like {_example_id(out)!r})")
    found = {}
    for i in ids:
        path = str(rows.loc[i, "path"])
        if fs.is_file(path):
            found[i] = path
            continue
        inputs.mkdir(parents=True, exist_ok=True)
        dest = inputs / (re.sub(r"[^A-Za-z0-9._-]+", "_", i) + ".png")
        cv2.imwrite(str(dest), original_image(rows.loc[i])[:, :, ::-1])
        found[i] = str(dest)
    return found


def _example_id(out) -> str:
    t = records_dataset(out).head(1, columns=["image_id"])
    return t.column("image_id")[0].as_py() if t.num_rows else ""


def rescales_inputs(model) -> bool:
    """True when the model scales its own inputs (a Rescaling or Normalization layer before any weights)."""
    import keras

    for layer in _first_layers(model):
        kind = type(layer).__name__
        if kind in RESCALING_LAYERS:
            return True
        if layer.weights and not isinstance(layer, keras.layers.InputLayer):
            return False
    return False


def _first_layers(model, depth: int = 0):
    """The model's layers in order, nested models entered (a base model wrapped in a Sequential)."""
    for layer in getattr(model, "layers", []):
        if hasattr(layer, "layers") and depth < 3:
            yield from _first_layers(layer, depth + 1)
        else:
            yield layer


def preprocess_warning(model, model_path, preprocess: str) -> str | None:
    """The one-line warning for a model that takes 0-255 pixels as they are, or None."""
    if preprocess != "none" or rescales_inputs(model):
        return None
    return (f"audit: warning: {model_path} has no Rescaling layer and --preprocess is none, so it gets 0-255 "
            "pixels; if it was trained on scaled inputs, give --preprocess scale_0_1 (or scale_-1_1, caffe, "
            "torch), or --job OUT to take the job's")
