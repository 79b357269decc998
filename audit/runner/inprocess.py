"""Small local jobs run in the driver: no Ray start, no actor start, the same output.

A job of a few hundred images on a laptop spends most of its time starting
things: a local Ray, an actor, TensorFlow in that actor, the model loaded a
second time.  Such a job (no ``--address``, ``resources.actors`` ``auto`` or 1,
at most :data:`MAX_IMAGES` images to do, no Ray already running in this
process) runs in the driver instead, with the same worker class
(:class:`audit.runner.worker.AuditWorker`) and the same exactly-once commit
(:func:`audit.data.io.write_shard` with its manifest entry), one shard after
another.  ``AUDIT_IN_PROCESS=0`` in the environment always starts Ray;
``AUDIT_IN_PROCESS=1`` runs any local job in the driver.
"""

from __future__ import annotations

import os
import sys
import time
import traceback

from audit.data.jobspec import JobSpec
from audit.errors import AuditError
from audit.runner.pool import Resources
from audit.runner.scheduler import ACTOR_FACTS, RunState, bug_message
from audit.runner.worker import AuditWorker

MAX_IMAGES = 2000  # more: the actors' parallelism pays for their start


def runs_in_process(spec: JobSpec, address, todo) -> bool:
    """Whether the shards ``todo`` of this job run in the driver (see the module's docstring)."""
    forced = os.environ.get("AUDIT_IN_PROCESS", "")
    if address or not todo or forced == "0":
        return False
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():  # the caller started Ray on purpose: use it
        return False
    if forced == "1":
        return True
    return spec.resources.actors in ("auto", 1) and sum(s.size for s in todo) <= MAX_IMAGES


def ready_worker(spec: JobSpec, job_id: str, classes, lock=None, todo=()):
    """The driver's worker with its model loaded (what an actor's setup checks, raised the same way).

    ``lock``: the output lock the driver holds; each commit is fenced by it, as
    an actor's is (:func:`audit.data.lock.guard`).  ``todo``: the shards to run
    (the largest sizes the warm-up batch).

    Raises:
        AuditError: an unknown layer, a bad target, classes that do not fit the model, ...
    """
    worker = AuditWorker(spec, out_dir=spec.output, job_id=job_id, classes=classes, cpus=os.cpu_count(),
                         largest_shard=max((s.size for s in todo), default=None),
                         lock_token=lock.info.token if lock is not None else None,
                         generation=lock.generation if lock is not None else 0)
    t0 = time.perf_counter()
    try:
        worker.setup()
    except BaseException:
        worker.close()
        raise
    worker.setup_s = round(time.perf_counter() - t0, 3)
    return worker


def resources() -> Resources:
    """What the driver's run reserves: one worker with the machine's CPUs."""
    return Resources(actors=1, cpus_per_actor=float(os.cpu_count() or 1), gpus_per_actor=0.0)


class InProcessRunner:
    """Runs shards on the driver's worker until each is committed or failed ``max_retries`` times.

    The same arguments and events as :class:`audit.runner.scheduler.Scheduler`
    (``actor_ready`` once, ``shard_done`` per shard), so :func:`audit.runner.job.execute`
    records the run the same way.
    """

    def __init__(self, worker, spec, state: RunState, bar, on_event=None, lock=None):
        self.worker, self.state, self.bar, self.on_event, self.lock = worker, state, bar, on_event, lock
        self.max_retries = int(spec.resources.max_retries)
        self.tracebacks_shown: set[str] = set()

    def run(self, shards) -> RunState:
        """Process ``shards`` in order; returns the run state."""
        info = dict(self.worker.info)
        info.setdefault("setup_s", getattr(self.worker, "setup_s", None))
        info.setdefault("pid", os.getpid())
        self.state.first_ready_s = 0.0  # the model was loaded before the run began (see ready_worker)
        self.state.model_info = info
        self.state.actors_started = self.state.peak_running = 1
        self.state.actor_facts.append({k: info.get(k) for k in ACTOR_FACTS})
        self._emit("actor_ready", info)
        for shard in shards:
            self._check_lock()
            result = self._attempts(shard)
            if result is not None:
                self.state.add_shard(result)
                self.bar.update(result["images"], self.state.errors)
                self._emit("shard_done", result)
        return self.state

    def _attempts(self, shard) -> dict | None:
        why = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                self.state.retries += 1
            try:
                return self.worker.process_shard(shard)
            except AuditError:
                raise
            except Exception as e:  # noqa: BLE001 - a bug, not a fault in the data (those are error rows)
                why = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
                if why not in self.tracebacks_shown:  # the traceback once per distinct error, as from actors
                    self.tracebacks_shown.add(why)
                    self.bar.write(bug_message(shard.id, why, traceback.format_exc()))
        self.state.failed[shard.id] = why
        return None

    def _check_lock(self) -> None:
        if self.lock is not None and self.lock.lost:
            raise AuditError(f"stopped: {self.lock.lost}; this run commits nothing more")

    def _emit(self, kind, payload) -> None:
        if self.on_event is not None:
            self.on_event(kind, payload)
