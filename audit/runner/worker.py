"""The audit worker: one model, one Explainer, whole shards in, Parquet out.

:class:`AuditWorker` is a plain class: it runs in-process on one shard (or on
a list of items) without Ray, which is how the tests drive it.  The job wraps
it as a Ray actor (``ray.remote(AuditWorker)``), so every actor loads the
model once and builds one gradient model with a fixed batch shape.

Per shard, three stages run at once so the model is never kept waiting:

* a producer thread has items read and decoded by a thread pool (OpenCV
  releases the GIL) a bounded window ahead, stacks and preprocesses full
  batches and queues them (``BATCHES_AHEAD``);
* the calling thread only runs the model on queued batches (one forward + one
  backward pass for every layer and method);
* a post-processing thread turns each explained batch's maps into statistics
  (:func:`audit.engine.stats.map_stats`) and rows (one per image x layer x method,
  cast to the records schema) while the model runs the next batch.  An image that cannot be read is
ONE row with ``status=error``, ``error=<reason>`` and null
``layer``/``method``/``cam``/statistics: every input appears in the output.

Shards pipeline inside one worker: the job runs each actor with two calls in
flight (``max_concurrency=2``), and only the model passes take turns (a lock
held from a shard's first batch to its last).  So the next shard is read and
its first batches decoded while this one computes, and this shard's last rows,
sort and Parquet commit run while the next one computes.  Each shard still
commits on its own (temp file, rename, manifest entry) before its call
returns.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import os
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from audit.data.jobspec import DatasetSpec, JobSpec, load_job_model
from audit.errors import AuditError

BATCHES_AHEAD = 2  # prepared input batches queued for the model thread


def _configure_tensorflow(cpus: float | None, gpu: bool, mixed_precision: bool) -> dict:
    """TF threads = this worker's CPU share; GPU memory growth on. Call before any TF op runs."""
    from audit.quiet import import_tensorflow

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


class AuditWorker:
    """Process shards of a job.  Cheap to construct; the model loads on first use.

    >>> w = AuditWorker(spec, classes=["cat", "dog"])
    >>> table = w.process_items(items)           # in-process, no Ray
    >>> w.process_shard(shard_descriptor)        # reads, explains, commits to spec.output
    """

    def __init__(self, spec: dict, *, out_dir=None, job_id: str = "", classes=None, cpus=None,
                 largest_shard: int | None = None, lock_token: str | None = None, generation: int = 0):
        self.spec = JobSpec.coerce(spec)
        self.largest_shard = largest_shard  # images in the job's largest shard, when the driver knows it
        self.out_dir = out_dir or self.spec.output or None
        self.job_id = job_id
        # fencing: every commit first checks that the driver still holds OUT/_lock.json with this token
        self.lock_token, self.generation = lock_token, int(generation)
        self.classes = list(classes) if classes else None
        self._plan_classes = self.classes  # as the driver planned them: shard identities use these
        self.cpus = cpus
        self._ready = False
        self.info: dict = {}
        self._setup_lock = threading.Lock()
        self._turn = threading.Lock()  # the model passes of one shard at a time
        self._live: dict[int, int] = {}  # shard id -> images done so far, for shards in progress
        self._commit_lock = threading.Lock()  # held for a whole commit; see fence()
        self._fenced = False

    # -- setup ------------------------------------------------------------------
    def setup(self) -> dict:
        """Load the model and build the Explainer (once).  Returns facts for the driver."""
        if self._ready:
            return self.info
        with self._setup_lock:
            if not self._ready:
                self._setup()
        return self.info

    def check_paths(self) -> None:
        """The job's model, dataset and output exist where this process runs.

        On a multi-node cluster they must be on a filesystem every node sees at
        the same path; without this check, an actor on a node that lacks the
        dataset would turn every image into an error row, and one that lacks
        the output would fail every shard.
        """
        import socket

        from audit.data import fs

        m = self.spec.model
        paths = [("model.path", m.path), ("model.weights", m.weights),
                 ("dataset.path", self.spec.dataset.path),
                 ("output", self.out_dir and os.path.join(self.out_dir, "records"))]
        # a URI is the same object from every node: only local paths need a shared filesystem
        missing = [f"{key} {p}" for key, p in paths if p and not fs.is_uri(p) and not os.path.exists(p)]
        node = _node_id()
        where = f"on {socket.gethostname()}{f' (Ray node {node[:12]})' if node else ''}"
        uri = self.spec.dataset.path
        if fs.is_uri(uri):  # this node's credentials: one request now, not an error row per image
            try:
                fs.info(uri)
            except AuditError as e:
                raise AuditError(f"{where}: {e}") from None
        if missing:
            raise AuditError(f"{where}: not found: {'; '.join(missing)}. On a multi-node cluster the model, the "
                             "dataset and the output must be in a bucket or on a filesystem every node sees at "
                             "the same path")

    def _setup(self) -> None:
        t0 = time.perf_counter()
        m, res = self.spec.model, self.spec.resources
        tfinfo = _configure_tensorflow(self.cpus, gpu=True, mixed_precision=res.mixed_precision)
        import cv2

        cv2.setNumThreads(1)
        from audit.data import identity
        from audit.engine.heads import Head

        identity.clear_cache()  # object listings of an earlier job in this process may be stale

        model = self._load_model(tfinfo)
        head = Head.of(model, m.output)
        self._check_classes(head)
        self._build_explainer(model)
        from audit.data.schema import SCHEMA_VERSION, records_schema

        self.regions = dict(self.spec.explain.regions or {})
        self.schema = records_schema(list(self.regions))
        self.schema_version = SCHEMA_VERSION
        self.pool = ThreadPoolExecutor(max_workers=res.decode_threads, thread_name_prefix="decode")
        self.post = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rows")
        self._warm_up()
        self.info = {
            "pid": os.getpid(),
            "node": _node_id(),
            "layers": list(self.explainer.layers),
            "layer_shapes": {k: list(v) for k, v in self.explainer.layer_shapes.items()},
            "input_size": list(self.size),
            "num_outputs": head.units,
            "classes": self.classes,
            "setup_s": round(time.perf_counter() - t0, 3),
            "process_cpu_s": time.process_time(),  # CPU seconds of this process so far (monitoring)
            **tfinfo,
        }
        self._ready = True

    def _load_model(self, tfinfo: dict):
        """The job's model (a local copy of one in a bucket), rebuilt for mixed precision if asked."""
        from audit.engine.models import check_preprocess

        check_preprocess(self.spec.model.preprocess)
        model = load_job_model(self.spec.model)
        if tfinfo["mixed_precision"]:
            model = to_mixed_precision(model)
            tfinfo["mixed_precision"] = runs_mixed(model)  # what the model runs, not what was asked
        return model

    def _check_classes(self, head) -> None:
        """The dataset's classes match the head (numbered 0..n-1 when the dataset has none)."""
        n_out = head.units
        if self.classes is None:
            self.classes = [str(i) for i in range(head.num_classes)]
        elif len(self.classes) != head.num_classes:
            raise AuditError(
                f"the dataset has {len(self.classes)} classes ({', '.join(self.classes[:6])}"
                f"{'...' if len(self.classes) > 6 else ''}) but the model has {n_out} outputs"
                f"{' (one unit: 2 classes)' if head.num_classes != n_out else ''}; "
                "set dataset.classes to the model's classes in output order"
            )

    def _build_explainer(self, model) -> None:
        """The Explainer, the input size and channels, checked against the spec and preprocessing."""
        from audit.engine.explainer import Explainer
        from audit.engine.models import check_channels, input_size_of, model_input

        m, ex, res = self.spec.model, self.spec.explain, self.spec.resources
        self.explainer = Explainer(model, layers=ex.layers, methods=tuple(ex.methods),
                                   target=ex.target, batch_size=res.batch_size, classes=self.classes,
                                   output=m.output, token_grid=ex.token_grid)
        size = m.size or input_size_of(model)
        if tuple(self.explainer.input_shape[:2]) != size:
            raise AuditError(f"model input is {self.explainer.input_shape[:2]}, model.input_size says {list(size)}")
        self.size = size
        self.channels = int(self.explainer.input_shape[2])
        check_channels(self.channels)  # images are converted by models.to_channels
        model_input(np.zeros((1, 1, 1, 3), np.uint8), self.channels, m.preprocess)  # fails here, not per batch

    def _warm_up(self) -> None:
        """Trace the compiled step for a full batch now, not on the first shard."""
        from audit.engine.methods import METHODS

        ex = self.explainer
        n_warm = 1 if any(METHODS[m].needs.own_pass for m in ex.methods) else self.warm_up_size()
        ex(np.zeros((n_warm, *ex.input_shape), np.float32),
           labels=np.zeros(n_warm, np.int32) if ex.target == "label" else None)

    def warm_up_size(self) -> int:
        """Images in the warm-up batch: a full batch, but never more than a shard of the data can hold."""
        ds = self.spec.dataset
        bounds = [self.spec.resources.batch_size, ds.shard_size, ds.limit, self.largest_shard]
        return max(1, min(int(b) for b in bounds if b))

    def ping(self) -> int:
        return os.getpid()

    def progress(self) -> dict[int, int]:
        """Images done so far in each shard in progress (explained or failed, not yet committed)."""
        return dict(self._live)

    def fence(self) -> int:
        """Commit nothing from now on.  Returns (its pid) once no commit is in progress.

        The driver fences an actor before killing it: ``ray.kill`` fails the calls
        in flight at once, but the process may live on a moment and could still
        commit a shard behind a ``--resume`` that has already planned.
        """
        with self._commit_lock:
            self._fenced = True
        return os.getpid()

    # -- one shard ----------------------------------------------------------------
    def process_shard(self, shard, commit: bool = True) -> dict:
        """Read, explain and (with ``commit``) write one shard; returns its counts."""
        from audit.data import datasets

        self.setup()
        if isinstance(shard, dict):
            shard = datasets.Shard(**shard)
        self._live[shard.id] = 0
        try:
            return self._process_shard(shard, commit)
        finally:
            self._live.pop(shard.id, None)

    def _process_shard(self, shard, commit) -> dict:
        from audit.data import datasets, io
        from audit.data.identity import shard_identity

        t0 = time.perf_counter()
        # before the images are read: a file replaced while they are read then differs on --resume
        identity = shard_identity(self.spec.dataset, shard, self._plan_classes).to_dict() if commit else None
        items = list(datasets.read_shard(self.spec.dataset, shard, self.classes))
        table, counts = self.process_items(items, shard_id=shard.id)
        summary = {"shard": shard.id, "images": len(items), "rows": table.num_rows, **counts,
                   "seconds": round(time.perf_counter() - t0, 3), "pid": os.getpid(),
                   "process_cpu_s": time.process_time()}
        if commit:
            inputs = {**shard.to_dict(), "first": items[0].image_id if items else None,
                      "last": items[-1].image_id if items else None}
            with self._commit_lock:
                if self._fenced:
                    raise RuntimeError(f"shard {shard.id} not committed: this worker was fenced")
                io.write_shard(self.out_dir, shard.id, table, job_id=self.job_id,
                               schema_version=self.schema_version, inputs=inputs, counts=counts,
                               identity=identity, guard=self._guard(shard.id), generation=self.generation)
            return summary
        summary["table"] = table
        return summary

    def _guard(self, shard_id: int):
        if not self.lock_token:
            return None
        from audit.data.lock import guard

        return guard(self.out_dir, self.lock_token, self.generation, f"shard {shard_id}")

    def process_items(self, items, shard_id: int = 0):
        """Rows for a list of :class:`audit.data.datasets.Item` as an Arrow table cast to the schema.

        Args:
            items: the items, in the order their rows are written.
            shard_id: the ``shard`` column (and the progress counter of a shard in progress).

        Returns:
            (table sorted by item then layer x method block, counts: errors, flat, correct, labelled).
        """
        import pyarrow as pa

        from audit.data.prefetch import Prefetcher, wants_prefetch

        self.setup()
        max_bytes = self._max_image_bytes()
        # objects in a bucket: fetched a bounded window ahead on their own threads
        prefetch = Prefetcher(self._fetch_pool(), items, max_bytes) if wants_prefetch(items) else None
        load = _Loader.of(self.spec.dataset, self.size, max_bytes, prefetch)
        out = _Collected()
        try:
            pending = self._model_passes(items, load, shard_id, out)
        finally:
            if prefetch is not None:
                prefetch.cancel()
        for fut in pending:
            out.merge(*fut.result())
        if not out.parts:
            return self.schema.empty_table(), out.counts
        table = pa.concat_tables(out.parts)
        order = np.argsort(np.concatenate(out.keys), kind="stable")
        return table.take(pa.array(order)), out.counts

    def _max_image_bytes(self) -> int:
        return int(self.spec.dataset.max_image_bytes)

    def _model_passes(self, items, load, shard_id, out: _Collected) -> list:
        """Run the model on every batch the producer prepares; returns the row futures.

        A producer thread decodes (on the pool, a bounded window ahead), batches and
        preprocesses; this thread only runs the model.  The producer starts now, so
        the next shard's first batches are ready while it waits for its turn.
        """
        bs = int(self.spec.resources.batch_size)
        window = 2 * bs + int(self.spec.resources.decode_threads)
        ready: queue.Queue = queue.Queue(maxsize=BATCHES_AHEAD)
        stop = threading.Event()
        producer = threading.Thread(target=self._produce, args=(items, load, bs, window, shard_id, ready, stop),
                                    name="batches", daemon=True)
        producer.start()
        pending = []
        try:
            with self._turn:  # model passes: one shard at a time; its rows/commit overlap the next one's
                while (msg := ready.get()) is not None:
                    kind, payload = msg
                    if kind == "raise":
                        raise payload
                    if kind == "errors":
                        table, key, n_bad = payload
                        out.merge([table], [key], {"errors": n_bad})
                        self._count(shard_id, n_bad)
                        continue
                    batch, x, labels = payload
                    res = self.explainer(x, labels=labels)
                    self._count(shard_id, len(batch))
                    # statistics and rows overlap with the next batch's model pass
                    pending.append(self.post.submit(self._rows, batch, res, shard_id))
        finally:
            stop.set()
            while producer.is_alive():  # unblock a producer waiting on a full queue
                with contextlib.suppress(queue.Empty):
                    ready.get(timeout=0.05)
            producer.join()
        return pending

    def _count(self, shard_id, n):
        if shard_id in self._live:  # a shard of process_shard (not a bare process_items call)
            self._live[shard_id] += n

    def _produce(self, items, load, bs, window, shard_id, ready, stop):
        """Producer thread of :meth:`process_items`: ("errors", ...) and ("batch", ...) messages, then None."""

        def put(msg):
            while not stop.is_set():
                try:
                    ready.put(msg, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        try:
            batch = []
            for idx, (item, res) in enumerate(zip(items, self._ahead(load, items, window))):
                if stop.is_set():
                    return
                if isinstance(res, Exception):
                    if not put(("errors", (self._error_rows([(idx, item, str(res), None)], shard_id),
                                           np.array([idx * 1000], np.int64), 1))):
                        return
                    continue
                batch.append((idx, item, res))
                if len(batch) == bs:
                    if not all(put(m) for m in self._prepare(batch, shard_id)):
                        return
                    batch = []
            if batch and not all(put(m) for m in self._prepare(batch, shard_id)):
                return
        except BaseException as e:  # re-raised by the model thread
            put(("raise", e))
            return
        put(None)

    def _ahead(self, fn, items, window):
        """``map(fn, items)`` on the decode pool, at most ``window`` results ahead.

        The first window is submitted before this returns; the iterator keeps
        ``window`` items in flight as results are taken, in order.
        """
        it = iter(items)
        inflight = collections.deque(self.pool.submit(fn, x) for x in itertools.islice(it, max(1, window)))

        def results():
            try:
                while inflight:
                    fut = inflight.popleft()
                    for x in itertools.islice(it, 1):
                        inflight.append(self.pool.submit(fn, x))
                    yield fut.result()
            finally:
                for fut in inflight:
                    fut.cancel()

        return results()

    # -- rows ---------------------------------------------------------------------
    def _name(self, i):
        if i is None:
            return None
        return self.classes[i] if 0 <= i < len(self.classes) else str(i)

    def _error_rows(self, bad, shard_id):
        import pyarrow as pa

        from audit.data.files import escape_text

        n = len(bad)
        cols = {name: pa.nulls(n, self.schema.field(name).type) for name in self.schema.names}
        cols["image_id"] = pa.array([b[1].image_id for b in bad], pa.string())
        cols["path"] = pa.array([b[1].path for b in bad], pa.string())
        cols["path_bytes"] = pa.array([b[1].path_bytes for b in bad], pa.binary())
        cols["mask_error"] = pa.array([b[1].mask_error for b in bad], pa.string())
        cols["shard"] = pa.array([shard_id] * n, pa.int32())
        cols["label"] = pa.array([b[1].label for b in bad], pa.int32())
        cols["label_name"] = pa.array([self._name(b[1].label) for b in bad], pa.string())
        cols["status"] = pa.array(["error"] * n, pa.string())
        cols["error"] = pa.array([escape_text(b[2]) for b in bad], pa.string())
        cols["has_mask"] = pa.array([b[1].has_mask for b in bad], pa.bool_())
        sizes = [b[3] for b in bad]
        cols["width"] = pa.array([s[0] if s else None for s in sizes], pa.int32())
        cols["height"] = pa.array([s[1] if s else None for s in sizes], pa.int32())
        return pa.table(cols, schema=self.schema)

    def _prepare(self, batch, shard_id) -> list:
        """Messages for the model thread: error rows for bad labels, then the batch's input array."""
        from audit.engine.models import model_input

        ex = self.explainer
        msgs = []
        if ex.target == "label":
            n_cls = len(self.classes)
            bad = [b for b in batch if b[1].label is None or not 0 <= b[1].label < n_cls]
            if bad:
                table = self._error_rows(
                    [(i, it, "target=label but the image has no valid label", r[2]) for i, it, r in bad], shard_id)
                msgs.append(("errors", (table, np.array([i * 1000 for i, _, _ in bad], np.int64), len(bad))))
                gone = {b[0] for b in bad}
                batch = [b for b in batch if b[0] not in gone]  # the rest: a short batch of its own
                if not batch:
                    return msgs
        labels = [b[1].label for b in batch]
        imgs = np.stack([b[2][0] for b in batch])
        x = model_input(imgs, self.channels, self.spec.model.preprocess)
        lab = np.array([-1 if v is None else v for v in labels], np.int32)
        msgs.append(("batch", (batch, x, np.maximum(lab, 0) if ex.target == "label" else None)))
        return msgs

    def _rows(self, batch, res, shard_id):
        """Statistics and Arrow rows of an explained batch (post-processing thread)."""
        ex = self.explainer
        parts, keys = [], []
        counts = {"flat": 0, "correct": 0, "labelled": 0}
        correct, counts["labelled"], counts["correct"] = _correct(batch, res)
        # one row per explained row: several per image for a multi-label head
        batch = [batch[i] for i in res.image]
        has_mask, masks = self._masks(batch)
        common = self._common_columns(batch, res, correct, has_mask, shard_id)
        n_blocks = 0
        for layer in ex.layers:
            for method in ex.methods:
                table, n_flat = self._block(common, layer, method, res.maps[(layer, method)], masks, has_mask)
                counts["flat"] += n_flat
                parts.append(table)
                keys.append(np.array([b[0] * 1000 + n_blocks for b in batch], np.int64))
                n_blocks += 1
        return parts, keys, counts

    def _masks(self, batch):
        """(has_mask per row, (n, H, W) bool masks or None when no row has one)."""
        has_mask = np.array([b[2][1] is not None for b in batch])
        if not has_mask.any():
            return has_mask, None
        masks = np.zeros((len(batch), *self.size), bool)
        for k, b in enumerate(batch):
            if b[2][1] is not None:
                masks[k] = b[2][1]
        return has_mask, masks

    def _common_columns(self, batch, res, correct, has_mask, shard_id) -> dict:
        """The columns every layer x method block of these rows shares."""
        import pyarrow as pa

        labels = [b[1].label for b in batch]
        n = len(batch)
        pred = res.pred.astype(np.int32)
        return {
            "image_id": pa.array([b[1].image_id for b in batch], pa.string()),
            "path": pa.array([b[1].path for b in batch], pa.string()),
            "path_bytes": pa.array([b[1].path_bytes for b in batch], pa.binary()),
            "mask_error": pa.array([b[1].mask_error for b in batch], pa.string()),
            "shard": pa.array(np.full(n, shard_id, np.int32)),
            "label": pa.array([None if v is None else int(v) for v in labels], pa.int32()),
            "label_name": pa.array([self._name(v) for v in labels], pa.string()),
            "pred": pa.array([None if p < 0 else int(p) for p in pred], pa.int32()),  # -1: no label above 0.5
            "pred_name": pa.array([None if p < 0 else self._name(int(p)) for p in pred], pa.string()),
            "score": pa.array(res.score.astype(np.float32)),
            "correct": pa.array([correct[i] for i in res.image], pa.bool_()),
            "target": pa.array(res.target.astype(np.int32)),
            "width": pa.array([b[2][2][0] for b in batch], pa.int32()),
            "height": pa.array([b[2][2][1] for b in batch], pa.int32()),
            "has_mask": pa.array(has_mask),
            "error": pa.nulls(n, pa.string()),
        }

    def _block(self, common, layer, method, maps, masks, has_mask):
        """(the rows of one layer x method, cast to the schema; how many of its maps are flat)."""
        import pyarrow as pa

        from audit.engine.stats import map_stats, to_arrow_columns

        n, h, w = maps.shape
        st = map_stats(maps, self.size, masks=masks, has_mask=has_mask, regions=self.regions)
        # the engine zeroes the maps it flags as degenerate, so map_stats already
        # reports them flat with null statistics
        status = st["status"].astype(str)
        offsets = pa.array(np.arange(n + 1, dtype=np.int32) * (h * w))
        cols = {
            **common,
            "layer": pa.array([layer] * n, pa.string()),
            "method": pa.array([method] * n, pa.string()),
            "cam": pa.ListArray.from_arrays(offsets, pa.array(maps.reshape(-1).astype(np.float32))),
            "cam_h": pa.array(np.full(n, h, np.int32)),
            "cam_w": pa.array(np.full(n, w, np.int32)),
            "status": pa.array(status.tolist(), pa.string()),
            **to_arrow_columns(st),
        }
        table = pa.table({name: cols[name] for name in self.schema.names}, schema=self.schema)
        return table, int((status == "flat").sum())

    def _fetch_pool(self) -> ThreadPoolExecutor:
        """The actor's pool for object fetches (made on the first shard read from a bucket)."""
        from audit.data.prefetch import FETCH_DEPTH

        with self._setup_lock:
            if getattr(self, "fetch", None) is None:
                self.fetch = ThreadPoolExecutor(max_workers=FETCH_DEPTH, thread_name_prefix="fetch")
        return self.fetch

    def close(self) -> None:
        for name in ("pool", "post", "fetch"):
            pool = getattr(self, name, None)
            if pool is not None:
                pool.shutdown(wait=False)


@dataclass
class _Collected:
    """Row tables of a shard as they come, with their sort keys and counts."""

    parts: list = field(default_factory=list)  # Arrow tables
    keys: list = field(default_factory=list)  # int64 sort key per row of each table: item * 1000 + block
    counts: dict = field(default_factory=lambda: {"errors": 0, "flat": 0, "correct": 0, "labelled": 0})

    def merge(self, parts, keys, counts) -> None:
        self.parts += parts
        self.keys += keys
        for name, v in counts.items():
            self.counts[name] += v


@dataclass
class _Loader:
    """Reads and decodes one item on a decode thread (its object prefetched first, if from a bucket)."""

    size: tuple  # (H, W) of the model input
    max_px: int
    max_bytes: int
    resize_masks: bool
    prefetch: object = None  # audit.data.prefetch.Prefetcher, or None

    @classmethod
    def of(cls, ds: DatasetSpec, size, max_bytes: int, prefetch) -> _Loader:
        return cls(size, int(ds.max_pixels), max_bytes, bool(ds.resize_masks), prefetch)

    def __call__(self, item):
        """The decoded item, or the DecodeError that makes it an error row."""
        from audit.data import datasets
        from audit.data.decode import DecodeError

        # Only a fault in the user's data becomes an error row; anything else is a bug
        # of ours and fails the shard with its traceback.
        try:
            if self.prefetch is not None:
                self.prefetch.fill(item)
            return datasets.load_item(item, self.size, self.max_px, max_bytes=self.max_bytes,
                                      resize_masks=self.resize_masks)
        except DecodeError as e:
            return e
        finally:
            if self.prefetch is not None:
                self.prefetch.release(item)


def _correct(batch, res):
    """(per image: label predicted or None when unlabelled, labelled count, correct count).

    Single-label heads: the label is the predicted class.  Multi-label heads:
    the label is among the labels above 0.5.
    """
    predicted = [set() for _ in batch]
    for i, p in zip(res.image, res.pred):
        if p >= 0:
            predicted[i].add(int(p))
    correct = [None if b[1].label is None else int(b[1].label) in s for b, s in zip(batch, predicted)]
    return correct, sum(c is not None for c in correct), sum(bool(c) for c in correct)


def _node_id() -> str | None:
    try:
        import ray

        if ray.is_initialized():
            return ray.get_runtime_context().get_node_id()
    except Exception:
        return None
    return None
