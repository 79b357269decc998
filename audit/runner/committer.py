"""The committer of a worker: each shard's rows written exactly once, fenced.

A shard commits on its own (temp file, rename, manifest entry:
:func:`audit.data.io.write_shard`) under two fences:

* the driver's fence (:meth:`ShardCommitter.fence`): before the driver kills
  an actor it fences it; a fenced committer commits nothing more, and
  ``fence`` returns only once no commit is in progress, so a killed actor
  cannot land a shard behind a ``--resume`` that has already planned;
* the lock token: with one, every commit first checks that the driver still
  holds ``OUT/_lock.json`` with this token (:func:`audit.data.lock.guard`), so
  an actor of a driver whose lock was taken over commits nothing.
"""

from __future__ import annotations

import os
import threading

from audit.data import io
from audit.data.lock import guard
from audit.data.schema import SCHEMA_VERSION


class ShardCommitter:
    """Writes committed shards to ``out_dir`` for one job, until fenced.

    Args:
        out_dir: the job's output folder or URI.
        job_id: written into every part file.
        lock_token, generation: the driver's output lock (None: no lock check).
    """

    def __init__(self, out_dir, job_id: str, lock_token: str | None = None, generation: int = 0):
        self.out_dir, self.job_id = out_dir, job_id
        self.lock_token, self.generation = lock_token, int(generation)
        self.schema_version = SCHEMA_VERSION
        self._lock = threading.Lock()  # held for a whole commit; see fence()
        self._fenced = False

    def fence(self) -> int:
        """Commit nothing from now on.  Returns (the pid) once no commit is in progress."""
        with self._lock:
            self._fenced = True
        return os.getpid()

    def commit(self, shard, table, items, counts: dict, identity: dict | None) -> None:
        """Write ``table`` as ``shard``'s part file and manifest entry.

        Args:
            shard: the :class:`audit.data.datasets.Shard`.
            table: its rows, cast to the records schema.
            items: the shard's items as read (the first and last ids are recorded).
            counts: errors, flat, correct, labelled.
            identity: the shard's input identity (for ``--resume``), taken before the images were read.

        Raises:
            RuntimeError: the committer was fenced.
            audit.data.lock.LockLost: the driver's lock is no longer held with this token.
        """
        inputs = {**shard.to_dict(), "first": items[0].image_id if items else None,
                  "last": items[-1].image_id if items else None}
        with self._lock:
            if self._fenced:
                raise RuntimeError(f"shard {shard.id} not committed: this worker was fenced")
            io.write_shard(self.out_dir, shard.id, table, job_id=self.job_id, schema_version=self.schema_version,
                           inputs=inputs, counts=counts, identity=identity, guard=self._guard(shard.id),
                           generation=self.generation)

    def _guard(self, shard_id: int):
        if not self.lock_token:
            return None
        return guard(self.out_dir, self.lock_token, self.generation, f"shard {shard_id}")
