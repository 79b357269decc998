"""The job spec as typed objects, and ``OUT/job.json`` read back into them.

:func:`audit.runner.spec.load_spec` validates a spec once against
``schemas/job.schema.json`` and returns a :class:`JobSpec`; everything else
reads its fields as attributes (``spec.dataset.shard_size``).  ``job.json``
holds ``spec.to_dict()``; :func:`read_job_record` reads it back into a
:class:`JobRecord` (the spec plus what the run found: classes, layers, input
size), the one reader the scan, the report, ``audit explain --job`` and
``audit.load`` share.

The sections are not mappings: ``spec.dataset["path"]`` and
``spec.dataset.get("path")`` fail.  A script or test holding a plain dict
builds the typed spec once with :meth:`JobSpec.from_partial` (defaults for
the keys it lacks) or validates it with :func:`audit.runner.spec.load_spec`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, fields

from audit.data import fs, io, resources
from audit.engine.models import load_model
from audit.errors import AuditError


class _Section:
    """What every spec section does: to and from the plain dict ``job.json`` holds."""

    def to_dict(self) -> dict:
        """The section as the plain JSON-able dict ``job.json`` holds (nested sections included)."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = v.to_dict() if isinstance(v, _Section) else copy.deepcopy(v)
        return out

    @classmethod
    def from_dict(cls, d: dict, where: str):
        """The section from a dict holding every field (a validated, defaulted spec)."""
        names = {f.name for f in fields(cls)}
        extra = sorted(set(d) - names)
        if extra:
            raise AuditError(f"spec error: unknown key {where + '.' if where else ''}{extra[0]}")
        missing = sorted(n for n in names if n not in d)
        if missing:
            raise AuditError(f"spec error: missing key {where + '.' if where else ''}{missing[0]}")
        return cls(**{k: copy.deepcopy(v) for k, v in d.items()})

    @classmethod
    def from_partial(cls, d: dict):
        """The section of a dict holding some of its keys (the rest at their defaults; unknown keys ignored).

        For scripts and tests that build a spec by hand, and a ``job.json`` of
        an older version; not validated (see :func:`audit.runner.spec.load_spec`).
        """
        if not isinstance(d, dict):
            raise TypeError(f"{cls.__name__}.from_partial takes a dict, not {type(d).__name__}")
        names = {f.name for f in fields(cls)}
        return cls(**{k: copy.deepcopy(v) for k, v in d.items() if k in names})


@dataclass(frozen=True)
class ModelSpec(_Section):
    """``model:`` (docs/jobs.md): the Keras model and how its input is made."""

    path: str | None = None
    application: str | None = None
    weights: str | None = None
    num_classes: int | None = None
    preprocess: str = "none"
    input_size: list | None = None
    output: str | None = None
    trust_code: bool = False

    @property
    def size(self) -> tuple[int, int] | None:
        """``input_size`` as (H, W), or None (then it comes from the model)."""
        return (int(self.input_size[0]), int(self.input_size[1])) if self.input_size else None


@dataclass(frozen=True)
class DatasetSpec(_Section):
    """``dataset:``: the images, their labels and masks, and how they are sharded."""

    format: str = "folder"
    path: str = ""
    classes: list | None = None
    masks: str | None = None
    shard_size: int = 512
    limit: int | None = None
    max_pixels: int = 100_000_000
    max_image_bytes: int = 268_435_456
    resize_masks: bool = False


@dataclass(frozen=True)
class ExplainSpec(_Section):
    """``explain:``: the methods, layers, target and named regions."""

    methods: list = field(default_factory=lambda: ["gradcam", "gradcam++"])
    layers: object = "auto"  # "auto" or a list of layer paths
    target: object = "predicted"  # "predicted" | "label" | a class name or index
    token_grid: list | None = None
    regions: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ResourcesSpec(_Section):
    """``resources:``: the actors and what each one uses."""

    actors: object = "auto"  # "auto", N, or {min, max}
    gpus_per_actor: object = "auto"
    cpus_per_actor: object = "auto"
    custom: dict = field(default_factory=dict)
    accelerator_type: str | None = None
    start_timeout_s: float = 900
    batch_size: int = 64
    decode_threads: int = 4
    mixed_precision: bool = False
    max_retries: int = 3


_SECTIONS = {"model": ModelSpec, "dataset": DatasetSpec, "explain": ExplainSpec, "resources": ResourcesSpec}


@dataclass(frozen=True)
class JobSpec(_Section):
    """A validated job spec with every default filled in and paths resolved."""

    name: str = "job"
    model: ModelSpec = field(default_factory=ModelSpec)
    dataset: DatasetSpec = field(default_factory=DatasetSpec)
    explain: ExplainSpec = field(default_factory=ExplainSpec)
    resources: ResourcesSpec = field(default_factory=ResourcesSpec)
    output: str = ""

    @classmethod
    def from_dict(cls, d: dict, where: str = "") -> JobSpec:
        """A :class:`JobSpec` from a validated, defaulted spec dict (``job.json``'s ``spec``).

        Raises:
            AuditError: a key the spec does not have, or a missing one.
        """
        d = dict(d)
        extra = sorted(set(d) - {f.name for f in fields(cls)})
        if extra:
            raise AuditError(f"spec error: unknown key {extra[0]}")
        for key, section in _SECTIONS.items():
            d[key] = d[key] if isinstance(d.get(key), section) else section.from_dict(d.get(key) or {}, key)
        return cls(name=str(d.get("name") or "job"), model=d["model"], dataset=d["dataset"],
                   explain=d["explain"], resources=d["resources"], output=str(d["output"]))

    @classmethod
    def from_partial(cls, d: dict) -> JobSpec:
        """The :class:`JobSpec` of a (possibly partial) spec dict, defaults filled, not validated.

        For scripts and tests that build a spec by hand; :func:`audit.runner.spec.load_spec`
        is the way in that validates (and resolves paths).
        """
        if not isinstance(d, dict):
            raise TypeError(f"JobSpec.from_partial takes a dict, not {type(d).__name__}")
        return cls(name=str(d.get("name") or "job"), output=str(d.get("output") or ""),
                   **{k: sec.from_partial(d.get(k) or {}) for k, sec in _SECTIONS.items()})


def dataset_of(spec) -> DatasetSpec:
    """The :class:`DatasetSpec` of a :class:`JobSpec`, or the section itself.

    Raises:
        TypeError: anything else (a plain dict: build it with ``from_partial`` first).
    """
    if isinstance(spec, JobSpec):
        return spec.dataset
    if isinstance(spec, DatasetSpec):
        return spec
    raise TypeError(f"a JobSpec or DatasetSpec, not {type(spec).__name__} (a dict: DatasetSpec.from_partial(d))")


def load_job_model(model: ModelSpec):
    """The job's Keras model as ``model:`` says (a local copy of a file in a bucket): the one way
    the actors and the scan's causal tests load it.

    Raises:
        AuditError: the file cannot be read or is not a model (see :func:`audit.engine.models.load_model`).
    """
    path = fs.local_copy(model.path) if fs.is_uri(model.path) else model.path  # Keras opens local files
    return load_model(path, application=model.application, weights=model.weights, input_size=model.input_size,
                      num_classes=model.num_classes, trust_code=bool(model.trust_code))


@dataclass
class JobRecord:
    """``OUT/job.json``: the spec, and what the run found out."""

    spec: JobSpec | None
    classes: list | None = None  # the plan's class names
    layers: list | None = None  # the resolved target layers
    input_size: tuple | None = None  # (H, W) of the model input, as the actors found it
    job_id: str = ""
    model_sha256: str | None = None  # the model file's fingerprint when the job ran
    raw: dict = field(default_factory=dict)  # the whole file (history, timings, versions, ...)

    @property
    def size(self) -> tuple[int, int] | None:
        """The model input (H, W): what the actors found, else the spec's ``model.input_size``, else None."""
        if self.input_size:
            return int(self.input_size[0]), int(self.input_size[1])
        return self.spec.model.size if self.spec is not None else None

    @property
    def class_names(self) -> list:
        """The class names of the job: the plan's, else the spec's ``dataset.classes``, else []."""
        if self.classes:
            return list(self.classes)
        return list(self.spec.dataset.classes or []) if self.spec is not None else []


def record_of(doc: dict | None) -> JobRecord | None:
    """The :class:`JobRecord` of a ``job.json`` document (a job.json without a usable spec keeps ``spec=None``)."""
    if doc is None:
        return None
    spec = None
    if isinstance(doc.get("spec"), dict):
        try:
            spec = JobSpec.from_dict(_with_defaults(doc["spec"]))
        except (AuditError, KeyError, TypeError):  # hand-written or partial: what it has, defaults for the rest
            try:
                spec = JobSpec.from_partial(doc["spec"])
            except (TypeError, ValueError, AttributeError):
                spec = None
    size = doc.get("input_size")
    return JobRecord(spec=spec, classes=doc.get("classes"), layers=doc.get("layers"),
                     input_size=tuple(int(v) for v in size) if size else None,
                     job_id=str(doc.get("job_id") or ""), model_sha256=(doc.get("model") or {}).get("sha256"),
                     raw=doc)


def _with_defaults(d: dict) -> dict:
    """A spec dict of an older job.json, with the keys added to the schema since at their defaults."""
    schema = resources.schema("job")
    out = copy.deepcopy(d)
    for key, sub in schema["properties"].items():
        if "properties" not in sub:
            continue
        node = out.setdefault(key, {}) if isinstance(out.get(key, {}), dict) else out[key]
        for k, s in sub["properties"].items():
            if k not in node and "default" in s:
                node[k] = copy.deepcopy(s["default"])
    return out


def read_job_record(out) -> JobRecord | None:
    """``OUT/job.json`` as a :class:`JobRecord`, or None when missing or unreadable."""
    return record_of(io.read_job(out))
