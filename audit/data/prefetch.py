"""Fetching objects ahead of decoding: many small images from object storage at cluster speed.

An object store answers each request after tens of milliseconds whatever its
size, so an actor that fetched each image in a decode thread would spend
most of its time waiting.  :class:`Prefetcher` keeps up to ``depth`` image
(and mask) objects of a shard in flight on a thread pool of its own, in the
shard's order, and hands each item its bytes when a decode thread asks for
them.  The depth bounds the requests (and the bytes held) per actor; the
store's client retries throttling and transient errors with backoff
(:mod:`audit.data.fs`), and an object that still cannot be read is the
image's error row (or its ``mask_error``).  Local files are not prefetched.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor

from audit.data import fs
from audit.data.datasets import read_object
from audit.data.decode import DecodeError

FETCH_DEPTH = 32  # objects in flight (and held) per actor


def wants_prefetch(items) -> bool:
    """True when any item's image or mask is an object in a bucket."""
    return any(fs.is_uri(it.file or "") or fs.is_uri(it.mask_file or "") for it in items)


class Prefetcher:
    """Fetch the objects of ``items`` ``depth`` ahead on ``pool``; :meth:`fill` hands them over.

    Args:
        pool: the thread pool the fetches run on (one per actor, reused).
        items: the shard's :class:`audit.data.datasets.Item` s, in order.
        max_bytes: ``dataset.max_image_bytes`` (larger objects are refused unread).
        depth: the most objects in flight or fetched and not yet taken.
    """

    def __init__(self, pool: ThreadPoolExecutor, items, max_bytes: int, depth: int = FETCH_DEPTH):
        self.pool, self.items, self.max_bytes, self.depth = pool, list(items), max_bytes, max(1, depth)
        self.index = {id(it): k for k, it in enumerate(self.items)}
        self.futures: dict[int, Future] = {}
        self.next = 0
        self.lock = threading.Lock()
        self._submit_upto(self.depth)

    def _submit_upto(self, stop: int) -> None:
        with self.lock:
            while self.next < min(stop, len(self.items)):
                self.futures[self.next] = self.pool.submit(self._fetch, self.items[self.next])
                self.next += 1

    def _fetch(self, item):
        data = mask = None
        if item.error is None and item.data is None and fs.is_uri(item.file or ""):
            try:
                data = read_object(item.file, self.max_bytes)
            except DecodeError as e:
                data = e
        if item.mask_data is None and fs.is_uri(item.mask_file or ""):
            try:
                mask = read_object(item.mask_file, self.max_bytes, "mask")
            except DecodeError:
                mask = None  # read again by the decoder, whose mask_error then names the reason
        return data, mask

    def fill(self, item) -> None:
        """Wait for ``item``'s objects and set ``item.data`` / ``item.mask_data``; fetch further ahead.

        Raises:
            DecodeError: the image object could not be read (its error row).
        """
        k = self.index.get(id(item))
        if k is None:
            return
        self._submit_upto(k + 1 + self.depth)
        with self.lock:
            fut = self.futures.pop(k, None)
        if fut is None:
            return
        data, mask = fut.result()
        if isinstance(data, Exception):
            raise data
        if data is not None:
            item.data = data
        if mask is not None:
            item.mask_data = mask

    @staticmethod
    def release(item) -> None:
        """Drop the bytes of a decoded item (the shard's items live until its rows are written)."""
        if item.file is not None:
            item.data = None
        if item.mask_file is not None:
            item.mask_data = None

    def cancel(self) -> None:
        with self.lock:
            for fut in self.futures.values():
                fut.cancel()
            self.futures.clear()
            self.next = len(self.items)
