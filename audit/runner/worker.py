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

The worker is put together from named collaborators: the model holder
(:class:`audit.runner.model_holder.ModelHolder`: TensorFlow set up, model,
head, Explainer, input size and channels), the decode pipeline (the producer
and its thread pool, below), the row builder
(:class:`audit.runner.rows.RowBuilder`: statistics and Arrow rows) and the
committer (:meth:`AuditWorker._process_shard`: fenced write of the shard).

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

from audit.data.jobspec import DatasetSpec, JobSpec
from audit.errors import AuditError
from audit.runner.model_holder import ModelHolder, runs_mixed, to_mixed_precision  # noqa: F401  (public here)
from audit.runner.rows import RowBuilder

BATCHES_AHEAD = 2  # prepared input batches queued for the model thread


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
        """The collaborators: the model holder (model, head, Explainer), the row builder, the thread pools."""
        from audit.data import identity
        from audit.data.schema import SCHEMA_VERSION, records_schema

        t0 = time.perf_counter()
        identity.clear_cache()  # object listings of an earlier job in this process may be stale
        held = self.held = ModelHolder.load(self.spec, self.classes, self.cpus)
        self.classes, self.explainer, self.size, self.channels = held.classes, held.explainer, held.size, held.channels
        self.regions = dict(self.spec.explain.regions or {})
        self.schema = records_schema(list(self.regions))
        self.schema_version = SCHEMA_VERSION
        self.rows = RowBuilder(self.classes, self.schema, self.size, self.regions)
        self.pool = ThreadPoolExecutor(max_workers=self.spec.resources.decode_threads, thread_name_prefix="decode")
        self.post = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rows")
        self._warm_up()
        self.info = {
            "pid": os.getpid(),
            "node": _node_id(),
            "layers": list(self.explainer.layers),
            "layer_shapes": {k: list(v) for k, v in self.explainer.layer_shapes.items()},
            "input_size": list(self.size),
            "num_outputs": held.head.units,
            "classes": self.classes,
            "setup_s": round(time.perf_counter() - t0, 3),
            "process_cpu_s": time.process_time(),  # CPU seconds of this process so far (monitoring)
            **held.tfinfo,
        }
        self._ready = True

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
                    pending.append(self.post.submit(self.rows.rows, batch, res, shard_id, self.explainer.layers, self.explainer.methods))
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
                    if not put(("errors", (self.rows.error_rows([(idx, item, str(res), None)], shard_id),
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
    def _prepare(self, batch, shard_id) -> list:
        """Messages for the model thread: error rows for bad labels, then the batch's input array."""
        from audit.engine.models import model_input

        ex = self.explainer
        msgs = []
        if ex.target == "label":
            n_cls = len(self.classes)
            bad = [b for b in batch if b[1].label is None or not 0 <= b[1].label < n_cls]
            if bad:
                table = self.rows.error_rows(
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


def _node_id() -> str | None:
    try:
        import ray

        if ray.is_initialized():
            return ray.get_runtime_context().get_node_id()
    except Exception:
        return None
    return None
