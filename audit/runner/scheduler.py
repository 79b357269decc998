"""The scheduler: actors take shards from one queue; failures are retried.

:class:`Scheduler` runs one job's shards on Ray actors in named steps:

* :meth:`~Scheduler.resize` keeps the pool as large as the work: it has the
  pool request actors up to its ceiling while shards wait, even when no node
  can hold them yet (an autoscaler adds nodes for pending actors; an
  ``actors: auto`` pool raises its ceiling as nodes join), and release the
  actors still pending once no shard waits (so the cluster can scale down);
* :meth:`~Scheduler.hand_out` gives queued shards to ready actors, one each
  first, then a second one queued on an actor while there is enough work for
  the actors still idle or starting (an actor that becomes ready late gets
  work at once, from the same queue);
* :meth:`~Scheduler.collect` takes one finished call: an actor ready, a shard
  committed, a shard that raised, an actor that died;
* :meth:`~Scheduler.retry` puts a shard back at the head of the queue (one
  attempt counted, none when its node was drained or preempted; after
  ``max_retries`` it is reported failed) and :meth:`~Scheduler.retire` drops a
  dead actor (the pool shrinks; :meth:`~Scheduler.resize` requests another);
* :meth:`~Scheduler.check_floor` stops the job when shards have waited
  ``resources.start_timeout_s`` with fewer than ``actors.min`` actors running;
* the pool fences and kills every actor when the run ends.

Three collaborators hold their own state: :class:`ShardQueue` (the shards
waiting, their attempts, the run's size), the actor pool
(:class:`audit.runner.actor_pool.ActorPool`: the actors, ready, starting or
waiting for a node, the pool's ceiling, the replacement budget) and
:class:`ProgressPoller` (the images inside the shards in flight, asked of the
actors about once a second).  The scheduler keeps the calls in flight and
what to do when each ends.

The driver holds shard descriptors, refs and counters only: its memory does
not grow with the dataset.
"""

from __future__ import annotations

import collections
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from audit import quiet
from audit.errors import AuditError
from audit.runner.actor_pool import QUEUE_DEPTH, Actor, ActorPool
from audit.runner.pool import Resources
from audit.runner.worker import AuditWorker

__all__ = ["Scheduler", "Resources", "RunState", "remote_worker", "QUEUE_DEPTH", "SWITCH_INTERVAL_S"]

SWITCH_INTERVAL_S = 0.001  # GIL hand-over in actors (Python's default: 5 ms)
PROGRESS_POLL_S = 1.0  # the progress bar counts images inside shards at least this often

#: What each actor reports on start-up, kept per run in job.json (``runs[-1].actors``).
ACTOR_FACTS = ("pid", "node", "gpus", "visible_devices", "memory_growth", "threads", "mixed_precision", "setup_s")
#: Counters summed over the shards committed in a run.
SHARD_COUNTS = ("images", "errors", "flat", "rows", "correct", "labelled")


@dataclass
class RunState:
    """What a run did, for the summary and job.json."""

    images: int = 0
    errors: int = 0
    flat: int = 0
    rows: int = 0
    correct: int = 0
    labelled: int = 0
    retries: int = 0
    actors_started: int = 0
    actor_deaths: int = 0
    preempted: int = 0  # actors lost with their node (drained or preempted): no attempt counted
    released: int = 0  # pending actors killed once no shard waited
    peak_running: int = 0  # the most actors ready at once
    failed: dict[int, str] = field(default_factory=dict)  # shard id -> last reason
    actor_facts: list[dict] = field(default_factory=list)
    first_ready_s: float | None = None  # seconds until the first actor was ready
    model_info: dict | None = None  # the first ready actor's facts (layers, input size, classes)

    def add_shard(self, result: dict) -> None:
        for k in SHARD_COUNTS:
            setattr(self, k, getattr(self, k) + int(result.get(k, 0)))


@dataclass(frozen=True)
class Call:
    """What a pending ref stands for."""

    kind: str  # "setup" | "shard"
    actor: str
    shard: Any = None


def remote_worker(base=None):
    """:class:`audit.runner.worker.AuditWorker` (or ``base``, a subclass of it) as a Ray actor class.

    ``progress`` and ``fence`` run in a concurrency group of their own, so they
    are answered at once instead of queueing behind the shards in flight.

    Args:
        base: the worker class to wrap; None for ``AuditWorker`` (the fault
            tests pass a subclass that limits its process, e.g. a full disk).

    Returns:
        The ``ray.remote`` actor class, named ``AuditWorker``.
    """
    import ray

    class Worker(base or AuditWorker):
        def __init__(self, *args, **kwargs):
            # The actor's process is ours: Python hands the GIL over every 5 ms by
            # default, so the model thread, back from a batch, would wait that long
            # behind the decode and row threads while the CPUs (or the GPU) sit idle.
            if sys.getswitchinterval() > SWITCH_INTERVAL_S:
                sys.setswitchinterval(SWITCH_INTERVAL_S)
            quiet.install()  # the actor's own TF import: no C++ start-up lines (unless --verbose)
            super().__init__(*args, **kwargs)

        def setup(self):
            if not self._ready:
                self.check_paths()  # this node sees the job's files (a shared filesystem)
            return super().setup()

        @ray.method(concurrency_group="control")
        def progress(self):
            return super().progress()

        @ray.method(concurrency_group="control")
        def fence(self):
            return super().fence()

    Worker.__name__ = Worker.__qualname__ = "AuditWorker"  # the name `ray list actors` shows
    return ray.remote(concurrency_groups={"control": 1})(Worker)


def _cause(e):
    return getattr(e, "cause", None) or e


def _one_line(cause) -> str:
    text = str(cause).strip()
    return f"{type(cause).__name__}: {text.splitlines()[-1] if text else ''}"


def bug_message(shard_id: int, why: str, traceback_text: str) -> str:
    """What a shard that raised prints, once per distinct error, on actors and in the driver alike."""
    return (f"shard {shard_id} raised {why} (a bug of shortcut-audit, not a fault in the data; retried up to "
            f"resources.max_retries times):\n{traceback_text.rstrip()}")


@dataclass
class ShardQueue:
    """The shards waiting for an actor, and how often each was tried."""

    max_retries: int
    waiting: collections.deque = field(default_factory=collections.deque)
    attempts: collections.Counter = field(default_factory=collections.Counter)
    total: int = 0  # shards of the run
    largest: int | None = None  # images in the largest shard (the actors' warm-up batch)

    def load(self, shards) -> None:
        self.waiting.extend(shards)
        self.total = len(self.waiting)
        self.largest = max((s.size for s in self.waiting), default=None)

    def __len__(self) -> int:
        return len(self.waiting)

    def popleft(self):
        return self.waiting.popleft()

    def retry(self, shard, counted: bool = True) -> bool:
        """Back to the head of the queue (True), or False once ``max_retries`` counted attempts are spent."""
        self.attempts[shard.id] += int(counted)
        if self.attempts[shard.id] > self.max_retries:
            return False
        self.waiting.appendleft(shard)
        return True


class ProgressPoller:
    """About once a second, asks the busy actors how far their shards are and shows it on the bar."""

    def __init__(self, ray, bar, emit):
        self.ray, self.bar, self.emit = ray, bar, emit
        self.polls: dict = {}  # progress ref -> actor key
        self.last_poll = 0.0
        self.live: dict = {}  # actor key -> {shard id: images done, not yet committed}

    def show(self, actors: dict) -> None:
        """Poll (at most once per ``PROGRESS_POLL_S``) and show the images inside the shards in flight."""
        if not self.bar.enabled or time.perf_counter() - self.last_poll < PROGRESS_POLL_S:
            return
        self.last_poll = time.perf_counter()
        self.poll(actors)
        inside = 0
        for key, done in self.live.items():  # images inside the shards each actor still holds
            held = {sh.id for sh in actors[key].inflight.values()}  # (live holds live actors only)
            inside += sum(n for sid, n in done.items() if sid in held)
        self.bar.show(inside)
        self.emit("progress", {"committed": self.bar.committed, "inside_shards": inside})

    def poll(self, actors: dict) -> None:
        """Collect the answers to earlier progress polls; poll every busy actor not asked yet."""
        if self.polls:
            done, _ = self.ray.wait(list(self.polls), num_returns=len(self.polls), timeout=0)
            for ref in done:
                key = self.polls.pop(ref)
                try:
                    self.live[key] = self.ray.get(ref)
                except Exception:  # the actor died: its shards are requeued elsewhere
                    self.live.pop(key, None)
        asked = set(self.polls.values())
        for key, a in actors.items():
            if a.ready and a.inflight and key not in asked:
                self.polls[a.handle.progress.remote()] = key
        for key in [k for k in self.live if k not in actors]:
            del self.live[key]


class Scheduler:
    """Runs shards on actors until each is committed or has failed ``max_retries`` times.

    Args:
        spec: the resolved job spec.
        job_id: the job's id (written into every part file).
        classes: the plan's class names (given to every actor).
        res: :class:`Resources`.
        state: :class:`RunState`, filled in as shards commit.
        bar: the progress display (:class:`audit.runner.progress.Progress`).
        on_event: ``on_event(kind, payload)`` hook or None (``actor_ready``,
            ``shard_done``, ``pool``, ``progress``).
        lock: the output lock (:class:`audit.data.lock.OutputLock`) or None;
            the run stops when another driver took it over.
    """

    def __init__(self, spec, job_id, classes, res: Resources, state: RunState, bar, on_event=None, lock=None):
        import ray  # the driver's Ray, started by the job (see the module head of audit.runner.job)

        self.ray = ray
        self.spec, self.job_id, self.classes, self.res = spec, job_id, classes, res
        self.state, self.bar, self.on_event, self.lock = state, bar, on_event, lock
        self.max_retries = int(spec.resources.max_retries)
        self.queue = ShardQueue(self.max_retries)  # the shards waiting for an actor
        self.calls: dict = {}  # ref -> Call
        self.t0 = self.floor_met = time.perf_counter()
        self.progress = ProgressPoller(ray, bar, self.emit)  # images inside the shards in flight
        self.worker_class = remote_worker()
        self.pool = ActorPool(ray, spec, res, state, bar, self.new_handle)
        self.tracebacks_shown: set = set()  # one-line forms of the errors whose traceback was printed

    @property
    def actors(self) -> dict[str, Actor]:
        return self.pool.actors

    # -- the loop -----------------------------------------------------------------
    def run(self, shards) -> RunState:
        """Process ``shards``; returns the run state (also ``self.state``)."""
        self.queue.load(shards)
        try:
            while self.busy():
                self.hand_out()
                self.resize()  # after hand_out: the queue it just emptied releases the pending actors at once
                self.check_lock()
                if not self.calls:
                    if not self.actors:
                        raise AuditError("every actor died and the retry budget is spent; "
                                         "continue later with --resume")
                    continue
                ready, _ = self.ray.wait(list(self.calls), num_returns=1, timeout=PROGRESS_POLL_S)
                self.show_progress()
                self.show_pool()
                self.check_floor()
                for ref in ready:
                    self.collect(ref)
        finally:
            self.pool.stop()
        return self.state

    def busy(self) -> bool:
        return bool(self.queue) or self.pool.inflight() > 0

    def emit(self, kind, payload) -> None:
        if self.on_event is not None:
            self.on_event(kind, payload)

    # -- actors -------------------------------------------------------------------
    def new_handle(self, options: dict):
        """One worker actor with these Ray options (the pool's ``new_handle``)."""
        return self.worker_class.options(**options).remote(
            self.spec, out_dir=self.spec.output, job_id=self.job_id, classes=self.classes,
            cpus=self.res.cpus_per_actor, largest_shard=self.queue.largest,
            lock_token=self.lock.info.token if self.lock else None,
            generation=self.lock.generation if self.lock else 0)

    def resize(self) -> None:
        """Actors up to the pool's ceiling while shards wait (pending ones included); none waiting: release."""
        if not self.queue:
            for a in self.pool.release_pending():
                self.calls.pop(a.setup_ref, None)
            return
        for a in self.pool.fill(len(self.queue) + self.pool.inflight(), self.queue.total):
            self.calls[a.setup_ref] = Call("setup", a.key)

    def retire(self, key: str, why: str, preempted: bool = False) -> None:
        """An actor died: its shards go back to the queue and the pool shrinks.

        :meth:`resize` requests another while shards wait: after a crash only
        while the replacement budget lasts; after a drained or preempted node
        always (that is the cluster's doing, not the job's).
        """
        actor = self.pool.drop(key, preempted)
        if actor is None:
            return
        for ref, shard in actor.inflight.items():
            self.calls.pop(ref, None)
            self.retry(shard, why, counted=not preempted)

    # -- shards -------------------------------------------------------------------
    def hand_out(self) -> None:
        """Queued shards to ready actors: one each first, then a second where work is left over."""
        # ready or still starting; not those waiting for a node, which may never come
        idle = sum(1 for a in self.actors.values() if not a.inflight) - (len(self.pool.pending()) if self.queue else 0)
        for actor in self.actors.values():
            while actor.ready and self.queue and len(actor.inflight) < QUEUE_DEPTH:
                if actor.inflight and len(self.queue) <= idle:
                    break  # keep the rest for the actors that have nothing
                if not actor.inflight:
                    idle -= 1
                shard = self.queue.popleft()
                ref = actor.handle.process_shard.remote(shard)
                actor.inflight[ref] = shard
                self.calls[ref] = Call("shard", actor.key, shard)

    def retry(self, shard, why: str, counted: bool = True) -> None:
        """Back to the head of the queue, or failed after ``max_retries`` counted attempts.

        A shard lost with a drained or preempted node is not counted: that
        costs time only.
        """
        if self.queue.retry(shard, counted):
            self.state.retries += 1
        else:
            self.state.failed[shard.id] = why
            self.bar.write(f"shard {shard.id} failed after {self.queue.attempts[shard.id]} attempts: {why}")

    def collect(self, ref) -> None:
        """One finished call: dispatch on what it was and how it ended."""
        from ray import exceptions as rex  # Ray: the driver's, imported already (see __init__)

        call = self.calls.pop(ref, None)
        if call is None:
            return
        actor = self.actors.get(call.actor)
        if actor is not None:
            actor.inflight.pop(ref, None)
        try:
            result = self.ray.get(ref)
        except rex.RayTaskError as e:
            self.on_raised(call, _cause(e), remote_traceback=str(e))
            return
        except (rex.RayActorError, rex.WorkerCrashedError, rex.ObjectLostError,
                rex.OwnerDiedError, rex.NodeDiedError) as e:
            preempted = bool(getattr(e, "preempted", False))
            why = f"actor died ({type(e).__name__}{', node preempted' if preempted else ''})"
            if call.shard is not None:
                self.retry(call.shard, why, counted=not preempted)
            self.retire(call.actor, why, preempted)
            return
        if call.kind == "setup":
            self.on_ready(actor, result)
        else:
            self.on_committed(result)

    def on_raised(self, call: Call, cause, remote_traceback: str = "") -> None:
        """A call raised in the actor: a user mistake stops the job; our error retries the shard.

        Faults in the data never raise (they are error rows), so what gets here
        is a bug: its traceback is printed once per distinct error (the job log).
        """
        if isinstance(cause, AuditError):
            raise AuditError(str(cause).splitlines()[0]) from None
        if call.kind == "setup":
            raise AuditError(f"an actor could not load the model: {_one_line(cause)}") from None
        why = _one_line(cause)
        if remote_traceback and why not in self.tracebacks_shown:
            self.tracebacks_shown.add(why)
            self.bar.write(bug_message(call.shard.id, why, remote_traceback))
        self.retry(call.shard, why)

    def on_ready(self, actor: Actor | None, info: dict) -> None:
        if actor is None:
            return
        actor.ready = True
        actor.setup_ref = None
        if self.state.first_ready_s is None:
            self.state.first_ready_s = round(time.perf_counter() - self.t0, 3)
            self.state.model_info = info
        self.state.actor_facts.append({k: info.get(k) for k in ACTOR_FACTS})
        self.emit("actor_ready", info)

    def on_committed(self, result: dict) -> None:
        self.state.add_shard(result)
        self.bar.update(result["images"], self.state.errors)
        self.emit("shard_done", result)

    # -- watching -----------------------------------------------------------------
    def check_lock(self) -> None:
        if self.lock is not None and self.lock.lost:
            raise AuditError(f"stopped: {self.lock.lost}; this run commits nothing more")

    def check_floor(self) -> None:
        """Stop when shards have waited ``start_timeout_s`` with fewer than ``actors.min`` actors running."""
        now = time.perf_counter()
        if not self.queue or self.pool.running() >= min(self.res.min_actors, self.pool.ceiling):
            self.floor_met = now
        elif now - self.floor_met > self.res.start_timeout_s:
            raise AuditError(self.pool.timeout_line())

    def show_pool(self) -> None:
        """A line when the pool changes while actors wait for a node (an autoscaler adds them)."""
        shown = self.pool.show(queued=bool(self.queue))
        if shown is not None:
            self.emit("pool", shown)

    def show_progress(self) -> None:
        """About once a second: ask busy actors how far their shards are; show it."""
        self.progress.show(self.actors)
