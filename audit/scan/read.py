"""Reading a job's output for the scan: which view (layer, method), which records, which classes."""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.compute as pc

from audit.data import fs
from audit.data.jobspec import JobRecord, JobSpec, read_job_record
from audit.data.query import records_dataset
from audit.errors import AuditError
from audit.scan.config import METHOD_PREFERENCE

OBJECT_COLUMNS = ("energy_object", "pointing_hit", "object_x", "object_y")
UNKNOWN_SIZE = (224, 224)  # records without a job.json: region areas are taken at this input size


@dataclass
class ScanView:
    """The records of one view (one layer, one method) and what the scan needs about the job."""

    out: Path
    dataset: object  # pyarrow.dataset.Dataset of OUT/records
    filter: object  # pyarrow.compute.Expression selecting the view
    df: object  # pandas DataFrame: the view's records without the cam column
    layer: str
    method: str
    record: JobRecord | None = None  # OUT/job.json (None: records without one)
    regions: dict = field(default_factory=dict)  # {name: box}
    names: dict = field(default_factory=dict)  # {class id: class name}
    size: tuple = UNKNOWN_SIZE  # model input (H, W): the job's, as its actors found it
    errors: int = 0  # unreadable images in the records
    masked: bool = False  # some image of the view has an object mask (whatever the dataset format)

    @property
    def spec(self) -> JobSpec | None:
        """The job's spec (None when the output has no usable job.json)."""
        return self.record.spec if self.record is not None else None


def choose_view(pairs, auto_layers=None, layer=None, method=None) -> tuple[str, str]:
    """The (layer, method) the verdict uses.

    ``pairs``: the (layer, method) combinations present.  Default layer: the
    first of the job's resolved layers (the automatic choice under ``layers:
    auto``), else the layer with the most combinations; default method: the
    first of :data:`METHOD_PREFERENCE` present for it.
    """
    pairs = sorted({(str(a), str(b)) for a, b in pairs})
    if not pairs:
        raise AuditError("the records hold no heatmaps (every image failed?)")
    layers = sorted({a for a, _ in pairs})
    if layer is not None:
        if layer not in layers:
            raise AuditError(f"layer {layer!r} is not in the records; layers: {', '.join(layers)}")
    else:
        auto = [lyr for lyr in (auto_layers or []) if lyr in layers]
        layer = auto[0] if auto else max(layers, key=lambda lyr: sum(a == lyr for a, _ in pairs))
    methods = [b for a, b in pairs if a == layer]
    if method is not None:
        if method not in methods:
            raise AuditError(f"method {method!r} is not in the records for layer {layer}; "
                             f"methods: {', '.join(methods)}")
    else:
        method = next((m for m in METHOD_PREFERENCE if m in methods), methods[0])
    return layer, method


def hashed(ids) -> list:
    """``ids`` in a deterministic order that mixes them (by CRC32, then by name): unlike their sorted
    order, which groups a folder dataset's ids by class, any first few are a sample of all."""
    return sorted(ids, key=lambda s: (zlib.crc32(str(s).encode()), str(s)))


def sample_ids(ids, k: int) -> set:
    """A deterministic sample of at most ``k`` ids (smallest CRC32)."""
    ids = list(ids)
    if len(ids) <= k:
        return set(ids)
    return set(hashed(ids)[:k])


def class_names(record: JobRecord | None, df) -> dict:
    """{class id: name} from job.json, else from the records' pred/label names."""
    names = {}
    for k, v in enumerate(record.class_names if record is not None else []):
        names[k] = str(v)
    for idcol, ncol in (("pred", "pred_name"), ("label", "label_name")):
        if idcol in df and ncol in df:
            sub = df[[idcol, ncol]].dropna().drop_duplicates(idcol)
            for i, nm in zip(sub[idcol], sub[ncol]):
                names.setdefault(int(i), str(nm))
    return names


def _regions(spec: JobSpec | None, columns) -> dict:
    """Named regions of the job that the records hold, plus ``energy_*`` columns of a job without job.json."""
    regions = dict(spec.explain.regions or {}) if spec is not None else {}
    names_in = set(columns)
    regions = {r: b for r, b in regions.items() if f"energy_{r}" in names_in}
    for c in columns:
        if c.startswith("energy_") and c not in ("energy_object", "energy_border") and c[7:] not in regions:
            regions[c[7:]] = None
    if any(b is None for b in regions.values()):
        regions = {r: (b if b is not None else (0.0, 0.0, 1.0, 1.0)) for r, b in regions.items()}
    return regions


def read_view(out_dir, layer: str | None = None, method: str | None = None, use_masks: bool = True) -> ScanView:
    """Open ``OUT/records`` and read the records of one view (without their maps).

    Args:
        out_dir: the job output.
        layer, method: the view; default see :func:`choose_view`.
        use_masks: False blanks the object columns (judge from the heatmaps alone).

    Returns:
        A :class:`ScanView`.

    Raises:
        AuditError: no such directory, no records, or no such layer/method.
    """
    out = str(out_dir) if fs.is_uri(str(out_dir)) else Path(out_dir)  # a URI: the job output in a bucket
    if not fs.exists(str(out)):
        raise AuditError(f"{out} does not exist")
    ds = records_dataset(out)
    record = read_job_record(out)
    spec = record.spec if record is not None else None
    pairs_t = ds.to_table(columns=["layer", "method"], filter=pc.field("layer").is_valid())
    pairs = set(zip(pairs_t.column("layer").to_pylist(), pairs_t.column("method").to_pylist()))
    layer, method = choose_view(pairs, record.layers if record is not None else None, layer, method)
    flt = (pc.field("layer") == layer) & (pc.field("method") == method)
    df = ds.to_table(columns=[c for c in ds.schema.names if c != "cam"], filter=flt).to_pandas()
    errors = ds.count_rows(filter=pc.field("status") == "error") if "status" in ds.schema.names else 0
    if not use_masks:
        for c in OBJECT_COLUMNS:
            if c in df:
                df[c] = np.nan
    masked = bool(any(c in df and df[c].notna().any() for c in OBJECT_COLUMNS))
    size = (record.size if record is not None else None) or UNKNOWN_SIZE
    return ScanView(out=out, dataset=ds, filter=flt, df=df, layer=layer, method=method, record=record,
                    regions=_regions(spec, ds.schema.names), names=class_names(record, df), size=size,
                    errors=errors, masked=masked)
