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
head, Explainer, input size and channels), the decode pipeline
(:class:`audit.runner.pipeline.DecodePipeline`: the producer thread, its
decode and fetch pools), the row builder (:class:`audit.runner.rows.RowBuilder`:
statistics and Arrow rows) and the committer
(:class:`audit.runner.committer.ShardCommitter`: the fenced exactly-once write
of a shard).  The worker itself only runs the model passes and counts progress.

Shards pipeline inside one worker: the job runs each actor with two calls in
flight (``max_concurrency=2``), and only the model passes take turns (a lock
held from a shard's first batch to its last).  So the next shard is read and
its first batches decoded while this one computes, and this shard's last rows,
sort and Parquet commit run while the next one computes.  Each shard still
commits on its own (temp file, rename, manifest entry) before its call
returns.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from audit.data import datasets, fs, identity
from audit.data.identity import shard_identity
from audit.data.jobspec import JobSpec
from audit.data.schema import SCHEMA_VERSION, records_schema
from audit.engine.methods import METHODS
from audit.errors import AuditError
from audit.runner.committer import ShardCommitter
from audit.runner.model_holder import ModelHolder, runs_mixed, to_mixed_precision  # noqa: F401  (public here)
from audit.runner.pipeline import BATCHES_AHEAD, DecodePipeline  # noqa: F401  (public here)
from audit.runner.rows import RowBuilder


class AuditWorker:
    """Process shards of a job.  Cheap to construct; the model loads on first use.

    >>> w = AuditWorker(spec, classes=["cat", "dog"])
    >>> table = w.process_items(items)           # in-process, no Ray
    >>> w.process_shard(shard_descriptor)        # reads, explains, commits to spec.output
    """

    def __init__(self, spec: JobSpec, *, out_dir=None, job_id: str = "", classes=None, cpus=None,
                 largest_shard: int | None = None, lock_token: str | None = None, generation: int = 0):
        if not isinstance(spec, JobSpec):
            raise TypeError(f"AuditWorker takes a JobSpec, not {type(spec).__name__} (a dict: JobSpec.from_partial(d))")
        self.spec = spec
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
        self.committer = ShardCommitter(self.out_dir, job_id, lock_token, generation)
        self.pipeline = self.post = None  # made by setup()

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
        t0 = time.perf_counter()
        identity.clear_cache()  # object listings of an earlier job in this process may be stale
        held = self.held = ModelHolder.load(self.spec, self.classes, self.cpus)
        self.classes, self.explainer, self.size, self.channels = held.classes, held.explainer, held.size, held.channels
        self.regions = dict(self.spec.explain.regions or {})
        self.schema = records_schema(list(self.regions))
        self.schema_version = SCHEMA_VERSION
        self.rows = RowBuilder(self.classes, self.schema, self.size, self.regions)
        res = self.spec.resources
        self.pipeline = DecodePipeline(self.spec.dataset, self.size, self.channels, self.spec.model.preprocess,
                                       res.batch_size, res.decode_threads, self.rows, self.explainer.target)
        self.pool = self.pipeline.pool  # the decode threads
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
        return self.committer.fence()

    # -- one shard ----------------------------------------------------------------
    def process_shard(self, shard, commit: bool = True) -> dict:
        """Read, explain and (with ``commit``) write one shard; returns its counts."""
        self.setup()
        if isinstance(shard, dict):
            shard = datasets.Shard(**shard)
        self._live[shard.id] = 0
        try:
            return self._process_shard(shard, commit)
        finally:
            self._live.pop(shard.id, None)

    def _process_shard(self, shard, commit) -> dict:
        t0 = time.perf_counter()
        # before the images are read: a file replaced while they are read then differs on --resume
        identity = shard_identity(self.spec.dataset, shard, self._plan_classes).to_dict() if commit else None
        items = list(datasets.read_shard(self.spec.dataset, shard, self.classes))
        table, counts = self.process_items(items, shard_id=shard.id)
        summary = {"shard": shard.id, "images": len(items), "rows": table.num_rows, **counts,
                   "seconds": round(time.perf_counter() - t0, 3), "pid": os.getpid(),
                   "process_cpu_s": time.process_time()}
        if commit:
            self.committer.commit(shard, table, items, counts, identity)
            return summary
        summary["table"] = table
        return summary

    def process_items(self, items, shard_id: int = 0):
        """Rows for a list of :class:`audit.data.datasets.Item` as an Arrow table cast to the schema.

        Args:
            items: the items, in the order their rows are written.
            shard_id: the ``shard`` column (and the progress counter of a shard in progress).

        Returns:
            (table sorted by item then layer x method block, counts: errors, flat, correct, labelled).
        """
        self.setup()
        out = _Collected()
        # the producer starts now, so the next shard's first batches are ready while it waits for its turn
        with self.pipeline.batches(items, shard_id) as batches:
            pending = self._model_passes(batches, shard_id, out)
        for fut in pending:
            out.merge(*fut.result())
        if not out.parts:
            return self.schema.empty_table(), out.counts
        table = pa.concat_tables(out.parts)
        order = np.argsort(np.concatenate(out.keys), kind="stable")
        return table.take(pa.array(order)), out.counts

    def _model_passes(self, batches, shard_id, out: _Collected) -> list:
        """Run the model on every batch the decode pipeline prepares; returns the row futures."""
        pending = []
        with self._turn:  # model passes: one shard at a time; its rows/commit overlap the next one's
            for kind, payload in batches:
                if kind == "errors":
                    table, key, n_bad = payload
                    out.merge([table], [key], {"errors": n_bad})
                    self._count(shard_id, n_bad)
                    continue
                batch, x, labels = payload
                res = self.explainer(x, labels=labels)
                self._count(shard_id, len(batch))
                # statistics and rows overlap with the next batch's model pass
                pending.append(self.post.submit(self.rows.rows, batch, res, shard_id, self.explainer.layers,
                                                self.explainer.methods))
        return pending

    def _count(self, shard_id, n):
        if shard_id in self._live:  # a shard of process_shard (not a bare process_items call)
            self._live[shard_id] += n

    def close(self) -> None:
        if getattr(self, "pipeline", None) is not None:
            self.pipeline.close()
        if getattr(self, "post", None) is not None:
            self.post.shutdown(wait=False)


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


def _node_id() -> str | None:
    try:
        import ray

        if ray.is_initialized():
            return ray.get_runtime_context().get_node_id()
    except Exception:
        return None
    return None
