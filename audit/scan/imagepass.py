"""The per-image pass: cue evidence for every image of a job (``OUT/summary/images.parquet``).

A second pass over the job's shards, after the scan named its cues
(:func:`audit.scan.perimage.cues_of`).  Each shard is done by
:class:`CueWorker` (a plain class; a Ray actor when Ray runs) and committed
exactly once with the output store's own machinery
(:func:`audit.data.io.write_shard`) into a store of its own,
``OUT/summary/_images/`` (``records/part-NNNNN.parquet`` then
``_manifest/part-NNNNN.json``).  A killed actor or driver costs the shards in
flight: the next run (:func:`run_pass`) skips the shards committed for the
same cues and view, and the merge reads each committed shard once, so every
image appears once per cue.  The merged table is written atomically to
``OUT/summary/images.parquet``, and the cost columns of ``classes.parquet``
(:mod:`audit.scan.cost`) are filled from it.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from audit.data import fs, io
from audit.data.jobspec import read_job_record
from audit.data.query import records_dataset
from audit.data.schema import SCHEMA_VERSION, arrow_schema
from audit.engine.models import model_input
from audit.errors import AuditError
from audit.runner.cluster import ray_init
from audit.scan import imagetable, perimage
from audit.scan.grids import grids_from_raw
from audit.scan.intervene import Intervener
from audit.scan.perimage import Cue
from audit.scan.probes.edits import Levels, spare_masks
from audit.scan.read import _regions

STORE = "_images"  # OUT/summary/_images: the per-shard store of the pass
MAX_TRIES = 3  # attempts per shard before the pass gives up on it


@dataclass
class PassResult:
    """What :func:`run_pass` did."""

    cues: list  # [Cue]
    shards: int = 0
    done_now: int = 0  # shards computed by this run
    skipped: int = 0  # shards already committed for the same cues
    rows: int = 0
    forwards: int = 0  # extra forward passes (images x cues) this run
    actor_deaths: int = 0
    failed: list = field(default_factory=list)  # shards given up
    seconds: float = 0.0


def _summary(out):
    return fs.join(str(out), "summary") if fs.is_uri(str(out)) else Path(out) / "summary"


def store_of(out):
    """The pass's per-shard store, ``OUT/summary/_images``."""
    s = _summary(out)
    return fs.join(str(s), STORE) if fs.is_uri(str(out)) else s / STORE


def signature(cues: list, layer: str, method: str, job_id: str) -> str:
    """What a committed shard of the store was computed for (a changed cue or view redoes it)."""
    blob = json.dumps({"cues": [asdict(c) for c in cues], "layer": layer, "method": method, "job": job_id},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class PassSpec:
    """Everything a worker needs: the job output, the view, the cues and their signature."""

    out: str
    layer: str
    method: str
    cues: tuple
    sig: str
    job_id: str
    regions: dict
    grid: int = 16


@dataclass
class CueInputs:
    """What the cue edits of a batch of images need."""

    images: np.ndarray  # (N, H, W, 3) uint8 at the model input
    objects: np.ndarray | None  # (N, H, W) bool object masks, or None without masks
    maps: np.ndarray  # (N, h, w) raw maps of the scan's view
    spare: np.ndarray | None  # (N, H, W) bool: where each object is taken to be
    levels: object  # intervene.Levels of the batch
    size: tuple
    ref: np.ndarray | None = None  # multi-label: predictions of the unmodified images, once computed


class CueWorker:
    """Computes and commits one shard of the pass; loads the job's model once, lazily.

    Runs as is on the driver, or as a Ray actor (:func:`_remote`).
    """

    def __init__(self, spec: PassSpec):
        self.spec = spec
        self._iv = None
        self._predict = None
        self.forwards = 0

    @property
    def intervener(self):
        if self._iv is None:
            self._iv = Intervener(self.spec.out)
        return self._iv

    def ping(self) -> int:
        return 1

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Predictions of uint8 images at the input size through :class:`FixedPredict` (the job's preprocessing)."""
        iv = self.intervener
        if self._predict is None:
            self._predict = FixedPredict(iv.model, iv.head)
        mode = iv.spec.model.preprocess
        return self._predict(model_input(images, iv.model.inputs[0].shape[-1], mode))

    def process_shard(self, shard: int) -> dict:
        """Evidence rows of every image of ``shard`` and every cue, committed; returns the manifest entry."""
        table = self.shard_table(shard)
        return io.write_shard(store_of(self.spec.out), shard, table, job_id=self.spec.job_id,
                              schema_version=SCHEMA_VERSION, inputs={"sig": self.spec.sig},
                              counts={"images": int(table.num_rows // max(1, len(self.spec.cues))),
                                      "forwards": int(self.forwards)})

    def shard_table(self, shard: int):
        """The shard's rows as an Arrow table with the ``images`` schema."""
        import pyarrow as pa

        recs = self.read_records(shard)
        rows = self.evidence(recs, shard)
        return pa.Table.from_pylist(rows, schema=arrow_schema("images"))

    def read_records(self, shard: int):
        """The shard's records of the view (one row per image), with their maps."""
        import pyarrow.compute as pc

        ds = records_dataset(self.spec.out)
        flt = (pc.field("shard") == int(shard)) & (
            ((pc.field("layer") == self.spec.layer) & (pc.field("method") == self.spec.method))
            | (pc.field("status") == "error"))
        cols = [c for c in ("image_id", "path", "shard", "label", "pred", "correct", "status", "cam", "cam_h",
                            "cam_w", "width", "height") if c in ds.schema.names]
        df = ds.to_table(columns=cols, filter=flt).to_pandas()
        return df.drop_duplicates("image_id").reset_index(drop=True)

    def evidence(self, recs, shard: int) -> list[dict]:
        """One row per image and cue (error rows without evidence)."""
        ok = (recs["status"] != "error").to_numpy() if len(recs) else np.zeros(0, bool)
        good = recs[ok].reset_index(drop=True)
        per_cue = self.cue_columns(good) if len(good) else {}
        rows = []
        for cue in self.spec.cues:
            cols = per_cue.get(cue)
            for i, r in enumerate(good.itertuples()):
                rows.append(_row(r, shard, cue, {k: v[i] for k, v in cols.items()}))
            for r in recs[~ok].itertuples():
                rows.append(_row(r, shard, cue, {"status": "error"}))
        return rows

    def inputs(self, good) -> CueInputs:
        """The images of ``good`` (records with maps) at the model input, their objects, maps and spared areas."""
        size = self.intervener.size
        images, objects = self.intervener.load(good["image_id"].astype(str).tolist())
        maps = _maps(good)
        grids = _grids(maps, self.spec.grid)
        spare = spare_masks(size, object_masks=objects) if objects is not None else spare_masks(size, grids=grids)
        return CueInputs(images, objects, maps, spare, Levels.of(images), size)

    def pixels(self, cue: Cue, x: CueInputs) -> np.ndarray:
        """(N, H, W) bool: the pixels the cue's edit touches in each image."""
        return perimage.cue_pixels(cue, x.size, regions=self.spec.regions, objects=x.objects, spare=x.spare,
                                   n=len(x.images))

    def cue_columns(self, good) -> dict:
        """{cue: {column: (N,) values}} for the images that decoded in the job."""
        x = self.inputs(good)
        base = good["pred"].to_numpy(dtype=np.int64, na_value=-1)
        out = {}
        for cue in self.spec.cues:
            px = self.pixels(cue, x)
            share = perimage.cue_share(x.maps, px)
            new, dec = self.without_cue(cue, x, px, base)
            area = perimage.area_of(px)
            out[cue] = {"cue_area": area, "cue_share": share, "pred_without_cue": new, "cue_decides": dec,
                        "cue_present": perimage.cue_present(share, dec, area),
                        "cue_pixels": perimage.pixel_features(x.images, px),
                        "status": good["status"].astype(str).to_numpy()}
        return out

    def without_cue(self, cue: Cue, x: CueInputs, px: np.ndarray, base: np.ndarray):
        """(pred_without_cue, cue_decides) of every image for ``cue``.

        Single-label: the extra forward pass runs only on the images predicted
        as the cue's class (:func:`audit.scan.perimage.candidates`); the others
        keep their prediction and the cue does not decide it.  Multi-label:
        every image, its cue-class label against the unmodified image's.
        """
        if self.multi_label:
            new = np.asarray(self.predict(perimage.remove_cue(x.images, cue, px, x.objects, x.levels)))
            if x.ref is None:  # the unmodified images, once for every cue
                x.ref = np.asarray(self.predict(x.images))
                self.forwards += len(x.images)
            ref = x.ref
            self.forwards += len(x.images)
            new, ref = new[:, cue.class_id].astype(np.int64), ref[:, cue.class_id].astype(np.int64)
            return new, perimage.decides(ref, new)
        idx = np.nonzero(perimage.candidates(base, cue.class_id))[0]
        new = base.copy()
        if len(idx):
            sub = CueInputs(x.images[idx], None if x.objects is None else x.objects[idx], x.maps[idx],
                            None if x.spare is None else x.spare[idx], x.levels, x.size)
            edited = perimage.remove_cue(sub.images, cue, px[idx], sub.objects, sub.levels)
            new[idx] = np.asarray(self.predict(edited)).astype(np.int64)
            self.forwards += len(idx)
        return new, perimage.decides(base, new)

    @property
    def multi_label(self) -> bool:
        return self.intervener.head.kind == "multilabel"


class FixedPredict:
    """A model's predictions through one compiled graph of a fixed batch shape (the last batch padded):
    on small models a fixed shape runs markedly faster than a graph traced for any batch size."""

    def __init__(self, model, head, batch: int = 32):
        import tensorflow as tf

        self.head, self.batch = head, int(batch)
        shape = [self.batch, *[int(d) for d in model.inputs[0].shape[1:]]]
        self._fn = tf.function(lambda x: model(x, training=False), input_signature=[tf.TensorSpec(shape, tf.float32)])

    def __call__(self, x: np.ndarray) -> np.ndarray:
        out = []
        for s in range(0, len(x), self.batch):
            part = np.asarray(x[s:s + self.batch], np.float32)
            k = len(part)
            if k < self.batch:
                part = np.concatenate([part, np.zeros((self.batch - k, *part.shape[1:]), np.float32)])
            y = self._fn(part)
            y = [np.asarray(t)[:k] for t in y] if isinstance(y, (list, tuple)) else \
                ({n: np.asarray(t)[:k] for n, t in y.items()} if isinstance(y, dict) else np.asarray(y)[:k])
            out.append(self.head.predict(y))
        return np.concatenate(out) if out else np.zeros(0, int)


def _maps(df) -> np.ndarray:
    """(N, h, w) raw maps of the records (zeros for a missing map)."""
    h, w = int(df["cam_h"].max()), int(df["cam_w"].max())
    out = np.zeros((len(df), h, w), np.float32)
    for i, (c, ch, cw) in enumerate(zip(df["cam"], df["cam_h"], df["cam_w"])):
        if c is not None and len(c) == h * w and int(ch) == h and int(cw) == w:
            out[i] = np.asarray(c, np.float32).reshape(h, w)
    return out


def _grids(maps: np.ndarray, grid: int) -> np.ndarray:
    return grids_from_raw(maps, grid)


def _val(v, kind=float):
    if v is None:
        return None
    try:
        if kind is float and not np.isfinite(v):
            return None
    except TypeError:
        return None
    return kind(v)


def _row(r, shard: int, cue: Cue, cols: dict) -> dict:
    label = getattr(r, "label", None)
    correct = getattr(r, "correct", None)
    return {"image_id": str(r.image_id), "path": str(getattr(r, "path", "") or ""), "shard": int(shard),
            "label": _val(label, int) if label is not None and label == label else None,
            "pred": _val(r.pred, int) if r.pred is not None and r.pred == r.pred else None,
            "correct": bool(correct) if correct is not None and correct == correct else None,
            "cue": cue.name, "cue_class": cue.class_id, "cue_place": cue.place,
            "cue_area": _val(cols.get("cue_area")), "cue_share": _val(cols.get("cue_share")),
            "pred_without_cue": _val(cols.get("pred_without_cue"), int),
            "cue_decides": _val(cols.get("cue_decides"), bool), "cue_present": _val(cols.get("cue_present"), bool),
            "cue_confidence": None,
            "cue_pixels": cols["cue_pixels"].tolist() if cols.get("cue_pixels") is not None else None,
            "status": str(cols.get("status", "ok"))}


# ----------------------------------------------------------------------------
# The driver
# ----------------------------------------------------------------------------


def pass_spec(out, cues: list, grid: int = 16) -> PassSpec:
    """The pass's :class:`PassSpec` for a scanned job output (the scan's view, from classes.parquet)."""
    imagetable.require(out, "classes")
    classes = read_summary(out, "classes")
    record = read_job_record(out)
    if record is None or record.spec is None:
        raise AuditError(f"{io.job_path(out)} not found: the per-image pass needs the job's model and dataset")
    layer = str(classes["layer"].dropna().iloc[0]) if classes["layer"].notna().any() else ""
    method = str(classes["method"].dropna().iloc[0]) if classes["method"].notna().any() else ""
    job_id = record.job_id
    regions = _regions(record.spec, [f"energy_{r}" for r in (record.spec.explain.regions or {})])
    return PassSpec(str(out), layer, method, tuple(cues), signature(cues, layer, method, job_id), job_id,
                    regions, grid)


def read_summary(out, name: str, columns: list | None = None):
    """``OUT/summary/<name>.parquet`` as pandas (only ``columns`` when given), or None when missing."""
    import pyarrow.parquet as pq

    path = fs.join(str(_summary(out)), f"{name}.parquet") if fs.is_uri(str(out)) else _summary(out) / f"{name}.parquet"
    if not fs.exists(str(path)):
        return None
    src = fs.open_input(str(path)) if fs.is_uri(str(out)) else path
    return pq.read_table(src, columns=columns).to_pandas()


def run_pass(out, *, cues: list | None = None, address: str | None = None, actors: int | None = None,
             quiet: bool = False, worker_cls=None, local: bool = False) -> PassResult:
    """Per-image cue evidence for every image of a scanned job; writes ``OUT/summary/images.parquet``.

    Args:
        out: the job output, scanned (its classes.parquet names the cues).
        cues: the cues (default: those of the suspected classes, :func:`audit.scan.perimage.cues_of`).
        address: a Ray cluster to run the shards on (``auto``, ``ray://...``); None: the Ray this
            process has already joined, else the shards are done here, one after the other.
        actors: Ray actors (default: one per two CPUs of the cluster, at most one per shard).
        quiet: print nothing.
        worker_cls: the worker class (tests pass a subclass that fails).
        local: do the shards here even when Ray runs (small jobs: no actor start-up).

    Returns:
        A :class:`PassResult`.

    Raises:
        AuditError: no scan, no job.json, or the job's model or data cannot be loaded.
    """
    import time

    t0 = time.perf_counter()
    if cues is None:
        cues = perimage.cues_of(read_summary(out, "classes"), read_summary(out, "interventions"))
    spec = pass_spec(out, cues)
    res = PassResult(cues=list(cues))
    shards = sorted(io.committed_shards(out, rows=False))
    res.shards = len(shards)
    if cues:
        _prepare_store(out)
        done = {s for s, e in io.committed_shards(store_of(out)).items() if (e.get("inputs") or {}).get("sig") == spec.sig}
        todo = [s for s in shards if s not in done]
        res.skipped = len(shards) - len(todo)
        _execute(spec, todo, res, address, actors, worker_cls or CueWorker, local)
    res.rows = merge(out, spec, shards)
    from audit.scan.cost import update_classes  # a cycle: the cost lines read this pass's summary

    update_classes(out)
    res.seconds = time.perf_counter() - t0
    if not quiet:
        print(describe(res, out))
    return res


def _prepare_store(out) -> None:
    if fs.is_uri(str(out)):
        return
    st = Path(store_of(out))
    (st / io.RECORDS).mkdir(parents=True, exist_ok=True)
    (st / io.MANIFEST).mkdir(parents=True, exist_ok=True)


def _execute(spec: PassSpec, todo: list, res: PassResult, address, actors, worker_cls, local: bool) -> None:
    """Run the shards left: on Ray actors when Ray is (or can be) joined, else here."""
    if not todo:
        return
    import importlib.util

    use_ray = False
    if not local and importlib.util.find_spec("ray") is not None:
        import ray

        if address and not ray.is_initialized():
            ray_init(address)
        use_ray = ray.is_initialized()
    if not use_ray:
        w = worker_cls(spec)
        for s in todo:
            w.process_shard(s)
            res.done_now += 1
        res.forwards += w.forwards
        return
    _on_ray(spec, todo, res, actors, worker_cls)


def _on_ray(spec: PassSpec, todo: list, res: PassResult, actors, worker_cls) -> None:
    """Hand the shards to Ray actors one at a time; a dead actor is replaced and its shard retried."""
    import ray

    cls = ray.remote(num_cpus=1, max_restarts=0, max_task_retries=0)(worker_cls)
    n = max(1, min(len(todo), actors or max(1, int(ray.cluster_resources().get("CPU", 2)) // 2)))
    queue = list(todo)
    tries = dict.fromkeys(todo, 0)
    free = [cls.remote(spec) for _ in range(n)]
    busy = {}  # ref -> (actor, shard)
    while queue or busy:
        while queue and free:
            a, s = free.pop(), queue.pop(0)
            tries[s] += 1
            busy[a.process_shard.remote(s)] = (a, s)
        ready, _ = ray.wait(list(busy), num_returns=1)
        a, s = busy.pop(ready[0])
        try:
            entry = ray.get(ready[0])
            res.done_now += 1
            res.forwards += int(entry.get("forwards", 0))
            free.append(a)
        except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError):
            res.actor_deaths += 1
            free.append(cls.remote(spec))
            (queue.append(s) if tries[s] < MAX_TRIES else res.failed.append(s))
        except ray.exceptions.RayTaskError as e:
            raise (e.cause if isinstance(getattr(e, "cause", None), AuditError) else e) from None
    for a in free:
        ray.kill(a)


def merge(out, spec: PassSpec, shards: list) -> int:
    """Stream the committed shards of the store (each once) into ``summary/images.parquet``.

    Two reads of the store, one shard at a time: the first draws the presence
    detectors' bounded training sample (:class:`Sample`), the second applies
    them and writes each shard's rows, cast to the declared schema, into one
    Parquet writer.  The driver holds one shard and the samples, whatever
    the size of the dataset.
    """
    schema = arrow_schema("images").with_metadata({"schema_version": SCHEMA_VERSION, "table": "images",
                                                   "signature": spec.sig})
    files = _committed_files(out, spec, shards)
    detectors = fit_detectors(files, spec.cues)
    rows = 0
    with _parquet_sink(_target(out), schema) as writer:
        for f in files:
            table = detect(_read_part(f), spec.cues, detectors)
            writer.write_table(table.replace_schema_metadata(schema.metadata))
            rows += table.num_rows
    return rows


def _target(out):
    return fs.join(str(_summary(out)), "images.parquet") if fs.is_uri(str(out)) else _summary(out) / "images.parquet"


def _committed_files(out, spec: PassSpec, shards: list) -> list:
    """The store's files committed for ``spec`` (its signature), by shard."""
    if not spec.cues:
        return []
    entries = io.committed_shards(store_of(out))
    return [fs.join(str(store_of(out)), io.RECORDS, entries[s]["file"]) for s in shards
            if s in entries and (entries[s].get("inputs") or {}).get("sig") == spec.sig]


def _read_part(f, columns=None):
    import pyarrow.parquet as pq

    schema = arrow_schema("images")
    t = pq.read_table(fs.open_input(str(f)) if fs.is_uri(str(f)) else f, columns=columns)
    return t.cast(_schema_of(schema, t.schema.names))


def _schema_of(schema, names):
    import pyarrow as pa

    return pa.schema([schema.field(n) for n in names])


class _parquet_sink:
    """A context manager: a ``pq.ParquetWriter`` into a temp file, put in place (rename, or one upload of a
    bucket object, visible only when complete) when the block ends without an error."""

    def __init__(self, target, schema):
        self.target, self.schema = target, schema

    def __enter__(self):
        import tempfile

        import pyarrow.parquet as pq

        where = None if fs.is_uri(str(self.target)) else str(Path(self.target).parent)
        fd, self.tmp = tempfile.mkstemp(prefix=".images.", suffix=".tmp", dir=where)
        os.close(fd)
        self.writer = pq.ParquetWriter(self.tmp, self.schema, compression="zstd")
        return self.writer

    def __exit__(self, kind, err, tb):
        try:
            self.writer.close()
            if kind is None:
                if fs.is_uri(str(self.target)):
                    _upload(self.tmp, str(self.target))
                else:
                    with open(self.tmp, "rb+") as f:
                        os.fsync(f.fileno())
                    os.replace(self.tmp, self.target)
        finally:
            if os.path.exists(self.tmp):
                os.unlink(self.tmp)
        return False


def _upload(local: str, uri: str) -> None:
    """Copy a local file to one bucket object, in chunks (a multipart upload, complete only at the end)."""
    fsys, p = fs.resolve(uri)
    try:
        with open(local, "rb") as src, fsys.open_output_stream(p) as dst:
            while chunk := src.read(8 << 20):
                dst.write(chunk)
    except OSError as e:
        fs.raise_storage(e, uri, "write")


SAMPLE_COLUMNS = ["cue", "status", "pred", "label", "pred_without_cue", "cue_decides", "cue_pixels"]


@dataclass
class Sample:
    """A bounded uniform sample (at most ``cap``) of feature rows seen one shard at a time: each row gets a
    random key and the ``cap`` smallest keys are kept (reservoir sampling by keys)."""

    cap: int
    rng: np.random.Generator
    keys: np.ndarray = field(default_factory=lambda: np.zeros(0))
    rows: np.ndarray | None = None

    def add(self, x: np.ndarray) -> None:
        if not len(x):
            return
        keys = np.concatenate([self.keys, self.rng.random(len(x))])
        rows = x if self.rows is None else np.concatenate([self.rows, x])
        keep = np.argsort(keys)[:self.cap]
        self.keys, self.rows = keys[keep], rows[keep]

    @property
    def features(self) -> np.ndarray:
        return np.zeros((0, 0), np.float32) if self.rows is None else self.rows


def _confident(d, cue: Cue):
    """(features, took, negative) of the rows ``d`` (one cue, ok, with features) of a shard."""
    pred = d["pred"].to_numpy(dtype=np.float64, na_value=np.nan)
    label = d["label"].to_numpy(dtype=np.float64, na_value=np.nan)
    took = perimage.decides_for(pred, d["pred_without_cue"].to_numpy(dtype=np.float64, na_value=np.nan),
                                cue.class_id)
    other = np.where(np.isfinite(label), label != cue.class_id, True)
    negative = other & (pred != cue.class_id) & ~d["cue_decides"].fillna(False).to_numpy(bool)
    return np.stack(d["cue_pixels"].to_numpy()).astype(np.float32), took, negative


def _rows_of(df, cue: Cue) -> np.ndarray:
    return ((df["cue"] == cue.name) & (df["status"] != "error") & df["cue_pixels"].notna()).to_numpy()


def fit_detectors(files: list, cues, seed: int = 0) -> dict:
    """{cue: :class:`audit.scan.perimage.Detector` or None}, fitted on a bounded sample of each cue's confident
    carriers and non-carriers (at most :data:`audit.scan.perimage.MAX_TRAIN` of each) over the shards."""
    rng = np.random.default_rng(seed)
    samples = {c: (Sample(perimage.MAX_TRAIN, rng), Sample(perimage.MAX_TRAIN, rng)) for c in cues}
    for f in files:
        df = _read_part(f, SAMPLE_COLUMNS).to_pandas()
        for cue, (pos, neg) in samples.items():
            sel = _rows_of(df, cue)
            if sel.any():
                x, took, negative = _confident(df[sel], cue)
                pos.add(x[took])
                neg.add(x[negative])
    return {c: perimage.fit_presence(p.features, n.features) for c, (p, n) in samples.items()}


def detect(table, cues: list, detectors: dict):
    """One shard's rows with ``cue_present`` and ``cue_confidence`` from each cue's presence detector
    (``detectors``, from :func:`fit_detectors`), ``cue_pixels`` dropped, cast to the ``images`` schema."""
    import pyarrow as pa

    df = table.to_pandas()
    for cue in cues:
        det = detectors.get(cue)
        sel = _rows_of(df, cue)
        if det is None or not sel.any():
            continue
        x, took, _ = _confident(df[sel], cue)
        prob = det(x)
        df.loc[sel, "cue_present"] = took | (prob > 0.5)
        df.loc[sel, "cue_confidence"] = prob.astype(np.float32)
    df["cue_pixels"] = None  # kept in the per-shard store only (768 floats per image and cue)
    return pa.Table.from_pandas(df, schema=arrow_schema("images"), preserve_index=False)


def describe(res: PassResult, out) -> str:
    """One paragraph: what the pass found per cue."""
    if not res.cues:
        return "per-image pass: no class is suspected, nothing to do"
    counts = _present_counts(out)
    lines = [f"per-image pass: {res.rows:,} rows ({len(res.cues)} cue(s) x images) in {res.seconds:.1f} s, "
             f"{res.done_now} shards done, {res.skipped} already committed, {res.forwards:,} extra forward passes"
             + (f", {res.actor_deaths} actors died" if res.actor_deaths else "")
             + (f"; FAILED shards {res.failed}" if res.failed else "")]
    for c in res.cues:
        n, present, dec = counts.get(c.class_id, (0, 0, 0))
        lines.append(f"  {c.class_name}, cue {c.name}: present on {present:,} of {n:,} "
                     f"images, decides {dec:,} predictions")
    from audit.scan.cost import cost_lines

    classes = read_summary(out, "classes")
    lines += cost_lines(classes) if classes is not None else []
    lines.append(f"  table {_summary(out)}/images.parquet")
    return "\n".join(lines)


def _present_counts(out) -> dict:
    """{cue class: (images, cue_present, cue_decides)} of ``images.parquet``, read a batch at a time."""
    out_: dict = {}
    for df in imagetable.batches(out, ["cue_class", "cue_present", "cue_decides"], imagetable.ok_rows()):
        for cid, d in df.groupby("cue_class"):
            n, p, k = out_.get(int(cid), (0, 0, 0))
            out_[int(cid)] = (n + len(d), p + int(d["cue_present"].fillna(False).sum()),
                              k + int(d["cue_decides"].fillna(False).sum()))
    return out_


def say(msg: str) -> None:
    print(msg, file=sys.stderr)
