"""The decode pipeline of a worker: items in, model-ready batches out, a bounded window ahead.

A producer thread has items read and decoded by a thread pool (OpenCV releases
the GIL) at most ``window`` items ahead, stacks and preprocesses full batches
and queues them (``BATCHES_AHEAD``), so the model thread only runs the model.
An item that cannot be read, or has no valid label when the job explains the
label, becomes an ``errors`` message (its error rows) instead of a batch entry.
Objects in a bucket are fetched ahead on a pool of their own
(:class:`audit.data.prefetch.Prefetcher`).  No model here: the pipeline only
knows the input size, channels and preprocessing.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from audit.data import datasets
from audit.data.decode import DecodeError
from audit.data.jobspec import DatasetSpec
from audit.data.prefetch import FETCH_DEPTH, Prefetcher, wants_prefetch
from audit.engine.models import model_input
from audit.runner.rows import RowBuilder

BATCHES_AHEAD = 2  # prepared input batches queued for the model thread


@dataclass
class Loader:
    """Reads and decodes one item on a decode thread (its object prefetched first, if from a bucket)."""

    size: tuple  # (H, W) of the model input
    max_px: int
    max_bytes: int
    resize_masks: bool
    prefetch: Prefetcher | None = None

    @classmethod
    def of(cls, ds: DatasetSpec, size, prefetch) -> Loader:
        return cls(size, int(ds.max_pixels), int(ds.max_image_bytes), bool(ds.resize_masks), prefetch)

    def __call__(self, item):
        """The decoded item, or the DecodeError that makes it an error row."""
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


class DecodePipeline:
    """The decode and fetch thread pools of one worker, and the batches they prepare.

    Args:
        dataset: the job's dataset section (pixel and byte bounds, mask resizing).
        size, channels, preprocess: the model input (H, W), its channels and preprocessing.
        batch_size, threads: images per batch; decode threads.
        rows: the row builder (error rows for unreadable or unlabelled items).
        target: the Explainer's target (``"label"`` makes an item without a valid label an error row).
    """

    def __init__(self, dataset: DatasetSpec, size, channels, preprocess, batch_size: int, threads: int,
                 rows: RowBuilder, target):
        self.dataset, self.size, self.channels, self.preprocess = dataset, size, channels, preprocess
        self.batch_size, self.threads, self.rows, self.target = int(batch_size), int(threads), rows, target
        self.pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="decode")
        self.fetch: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def batches(self, items, shard_id: int) -> Batches:
        """Start preparing ``items``; iterate the result for its messages, close it when done."""
        prefetch = Prefetcher(self._fetch_pool(), items, int(self.dataset.max_image_bytes)) \
            if wants_prefetch(items) else None
        return Batches(self, items, shard_id, Loader.of(self.dataset, self.size, prefetch))

    def _fetch_pool(self) -> ThreadPoolExecutor:
        """The pool for object fetches (made on the first shard read from a bucket)."""
        with self._lock:
            if self.fetch is None:
                self.fetch = ThreadPoolExecutor(max_workers=FETCH_DEPTH, thread_name_prefix="fetch")
        return self.fetch

    def ahead(self, fn, items, window):
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

    def prepare(self, batch, shard_id) -> list:
        """Messages for the model thread: error rows for bad labels, then the batch's input array."""
        msgs = []
        if self.target == "label":
            n_cls = len(self.rows.classes)
            bad = [b for b in batch if b[1].label is None or not 0 <= b[1].label < n_cls]
            if bad:
                table = self.rows.error_rows(
                    [(i, it, "target=label but the image has no valid label", r[2]) for i, it, r in bad], shard_id)
                msgs.append(("errors", (table, np.array([i * 1000 for i, _, _ in bad], np.int64), len(bad))))
                gone = {b[0] for b in bad}
                batch = [b for b in batch if b[0] not in gone]  # the rest: a short batch of its own
                if not batch:
                    return msgs
        imgs = np.stack([b[2][0] for b in batch])
        x = model_input(imgs, self.channels, self.preprocess)
        lab = np.array([-1 if b[1].label is None else b[1].label for b in batch], np.int32)
        msgs.append(("batch", (batch, x, np.maximum(lab, 0) if self.target == "label" else None)))
        return msgs

    def close(self) -> None:
        for pool in (self.pool, self.fetch):
            if pool is not None:
                pool.shutdown(wait=False)


class Batches:
    """The messages of one list of items, prepared by a producer thread started on construction.

    Iterating yields ``("errors", (table, sort keys, n))`` and ``("batch", (entries,
    x, labels))`` in item order; an exception of the producer is raised there.
    :meth:`close` (or leaving the ``with`` block) stops the producer and the prefetch.
    """

    def __init__(self, pipeline: DecodePipeline, items, shard_id: int, load: Loader):
        self.pipeline, self.items, self.shard_id, self.load = pipeline, items, shard_id, load
        self.ready: queue.Queue = queue.Queue(maxsize=BATCHES_AHEAD)
        self.stop = threading.Event()
        self.producer = threading.Thread(target=self._produce, name="batches", daemon=True)
        self.producer.start()

    def __enter__(self) -> Batches:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __iter__(self):
        while (msg := self.ready.get()) is not None:
            if msg[0] == "raise":
                raise msg[1]
            yield msg

    def close(self) -> None:
        self.stop.set()
        while self.producer.is_alive():  # unblock a producer waiting on a full queue
            with contextlib.suppress(queue.Empty):
                self.ready.get(timeout=0.05)
        self.producer.join()
        if self.load.prefetch is not None:
            self.load.prefetch.cancel()

    def _put(self, msg) -> bool:
        while not self.stop.is_set():
            try:
                self.ready.put(msg, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self) -> None:
        """The producer thread: messages in item order, then None (or ("raise", exception))."""
        p, shard_id = self.pipeline, self.shard_id
        try:
            batch = []
            window = 2 * p.batch_size + p.threads
            for idx, (item, res) in enumerate(zip(self.items, p.ahead(self.load, self.items, window))):
                if self.stop.is_set():
                    return
                if isinstance(res, Exception):
                    table = p.rows.error_rows([(idx, item, str(res), None)], shard_id)
                    if not self._put(("errors", (table, np.array([idx * 1000], np.int64), 1))):
                        return
                    continue
                batch.append((idx, item, res))
                if len(batch) == p.batch_size:
                    if not all(self._put(m) for m in p.prepare(batch, shard_id)):
                        return
                    batch = []
            if batch and not all(self._put(m) for m in p.prepare(batch, shard_id)):
                return
        except BaseException as e:  # re-raised by the model thread
            self._put(("raise", e))
            return
        self._put(None)
