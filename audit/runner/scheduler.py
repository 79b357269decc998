"""The scheduler: actors take shards from one queue; failures are retried.

:class:`Scheduler` runs one job's shards on Ray actors in named steps:

* :meth:`~Scheduler.start_actors` starts the actors (each loads the model once);
* :meth:`~Scheduler.hand_out` gives queued shards to ready actors, one each
  first, then a second one queued on an actor while there is enough work for
  the actors still idle or starting (an actor that becomes ready late gets
  work at once, from the same queue);
* :meth:`~Scheduler.collect` takes one finished call: an actor ready, a shard
  committed, a shard that raised, an actor that died;
* :meth:`~Scheduler.retry` puts a shard back at the head of the queue (one
  attempt counted; after ``max_retries`` it is reported failed) and
  :meth:`~Scheduler.retire` replaces a dead actor;
* :meth:`~Scheduler.stop` fences and kills every actor when the run ends.

The driver holds shard descriptors, refs and counters only: its memory does
not grow with the dataset.
"""

from __future__ import annotations

import collections
import contextlib
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from audit.errors import AuditError

QUEUE_DEPTH = 2  # shards in flight per actor: the next one is queued while one runs
STALL_TIMEOUT_S = 300.0  # no live actor and none starting for this long: give up
SWITCH_INTERVAL_S = 0.001  # GIL hand-over in actors (Python's default: 5 ms)
PROGRESS_POLL_S = 1.0  # the progress bar counts images inside shards at least this often
KILL_WAIT_S = 10.0  # how long the driver waits for killed actors to be gone

#: What each actor reports on start-up, kept per run in job.json (``runs[-1].actors``).
ACTOR_FACTS = ("pid", "node", "gpus", "visible_devices", "memory_growth", "threads", "mixed_precision", "setup_s")
#: Counters summed over the shards committed in a run.
SHARD_COUNTS = ("images", "errors", "flat", "rows", "correct", "labelled")


@dataclass
class Resources:
    """Actors and what each one reserves (:func:`audit.runner.job.plan_resources`)."""

    actors: int
    cpus_per_actor: float
    gpus_per_actor: float


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
    failed: dict[int, str] = field(default_factory=dict)  # shard id -> last reason
    actor_facts: list[dict] = field(default_factory=list)
    first_ready_s: float | None = None  # seconds until the first actor was ready
    model_info: dict | None = None  # the first ready actor's facts (layers, input size, classes)

    def add_shard(self, result: dict) -> None:
        for k in SHARD_COUNTS:
            setattr(self, k, getattr(self, k) + int(result.get(k, 0)))


@dataclass
class Actor:
    """One worker actor as the driver sees it."""

    key: str
    handle: Any
    ready: bool = False
    inflight: dict = field(default_factory=dict)  # ref -> Shard


@dataclass(frozen=True)
class Call:
    """What a pending ref stands for."""

    kind: str  # "setup" | "shard"
    actor: str
    shard: Any = None


def remote_worker():
    """:class:`audit.runner.worker.AuditWorker` as a Ray actor class.

    ``progress`` and ``fence`` run in a concurrency group of their own, so they
    are answered at once instead of queueing behind the shards in flight.
    """
    import ray

    from audit.runner.worker import AuditWorker

    class Worker(AuditWorker):
        def __init__(self, *args, **kwargs):
            # The actor's process is ours: Python hands the GIL over every 5 ms by
            # default, so the model thread, back from a batch, would wait that long
            # behind the decode and row threads while the CPUs (or the GPU) sit idle.
            if sys.getswitchinterval() > SWITCH_INTERVAL_S:
                sys.setswitchinterval(SWITCH_INTERVAL_S)
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
            ``shard_done``, ``progress``).
        lock: the output lock (:class:`audit.data.lock.OutputLock`) or None;
            the run stops when another driver took it over.
    """

    def __init__(self, spec, job_id, classes, res: Resources, state: RunState, bar, on_event=None, lock=None):
        import ray

        self.ray = ray
        self.spec, self.job_id, self.classes, self.res = spec, job_id, classes, res
        self.state, self.bar, self.on_event, self.lock = state, bar, on_event, lock
        self.max_retries = int(spec["resources"]["max_retries"])
        self.queue: collections.deque = collections.deque()
        self.attempts: collections.Counter = collections.Counter()
        self.actors: dict[str, Actor] = {}
        self.calls: dict = {}  # ref -> Call
        self.replacements = res.actors * max(1, self.max_retries) + 2
        self.t0 = self.last_alive = time.perf_counter()
        self.polls: dict = {}  # progress ref -> actor key
        self.last_poll = 0.0
        self.live: dict = {}  # actor key -> {shard id: images done, not yet committed}
        self.worker_class = remote_worker()
        self.tracebacks_shown: set = set()  # one-line forms of the errors whose traceback was printed

    # -- the loop -----------------------------------------------------------------
    def run(self, shards) -> RunState:
        """Process ``shards``; returns the run state (also ``self.state``)."""
        self.queue.extend(shards)
        self.start_actors()
        try:
            while self.busy():
                self.hand_out()
                self.check_lock()
                if not self.calls:
                    if not self.actors:
                        raise AuditError("every actor died and the retry budget is spent; "
                                         "continue later with --resume")
                    continue
                ready, _ = self.ray.wait(list(self.calls), num_returns=1, timeout=PROGRESS_POLL_S)
                self.show_progress()
                if not ready:
                    self.check_stall()
                for ref in ready:
                    self.collect(ref)
        finally:
            self.stop()
        return self.state

    def busy(self) -> bool:
        return bool(self.queue) or any(a.inflight for a in self.actors.values())

    def emit(self, kind, payload) -> None:
        if self.on_event is not None:
            self.on_event(kind, payload)

    # -- actors -------------------------------------------------------------------
    def actor_options(self) -> dict:
        env = {"TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "3"),
               "OPENCV_IO_MAX_IMAGE_PIXELS": str(int(self.spec["dataset"]["max_pixels"]))}
        # max_concurrency: the queued shard starts reading/decoding while the running one computes,
        # and the running one writes while the queued one computes (see audit.runner.worker)
        opts = {"num_cpus": self.res.cpus_per_actor, "num_gpus": self.res.gpus_per_actor, "max_restarts": 0,
                "max_task_retries": 0, "max_concurrency": QUEUE_DEPTH, "runtime_env": {"env_vars": env}}
        if self.res.actors > 1:
            opts["scheduling_strategy"] = "SPREAD"
        return opts

    def start_actors(self) -> None:
        for _ in range(self.res.actors):
            self.start_actor()

    def start_actor(self) -> None:
        key = uuid.uuid4().hex[:8]
        handle = self.worker_class.options(**self.actor_options()).remote(
            self.spec, out_dir=self.spec["output"], job_id=self.job_id, classes=self.classes,
            cpus=self.res.cpus_per_actor)
        self.actors[key] = Actor(key, handle)
        self.calls[handle.setup.remote()] = Call("setup", key)
        self.state.actors_started += 1

    def retire(self, key: str, why: str) -> None:
        """An actor died: its shards go back to the queue; a replacement starts while budget lasts."""
        actor = self.actors.pop(key, None)
        if actor is None:
            return
        self.state.actor_deaths += 1
        for ref, shard in actor.inflight.items():
            self.calls.pop(ref, None)
            self.retry(shard, why)
        with contextlib.suppress(Exception):
            self.ray.kill(actor.handle, no_restart=True)
        if self.busy() and self.replacements > 0:
            self.replacements -= 1
            self.start_actor()

    # -- shards -------------------------------------------------------------------
    def hand_out(self) -> None:
        """Queued shards to ready actors: one each first, then a second where work is left over."""
        idle = sum(1 for a in self.actors.values() if not a.inflight)  # ready or still starting
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

    def retry(self, shard, why: str) -> None:
        """Back to the head of the queue, or failed after ``max_retries`` retries."""
        self.attempts[shard.id] += 1
        if self.attempts[shard.id] > self.max_retries:
            self.state.failed[shard.id] = why
            self.bar.write(f"shard {shard.id} failed after {self.attempts[shard.id]} attempts: {why}")
        else:
            self.state.retries += 1
            self.queue.appendleft(shard)

    def collect(self, ref) -> None:
        """One finished call: dispatch on what it was and how it ended."""
        from ray import exceptions as rex

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
            why = f"actor died ({type(e).__name__})"
            if call.shard is not None:
                self.retry(call.shard, why)
            self.retire(call.actor, why)
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
            self.bar.write(f"shard {call.shard.id} raised {why} (a bug of shortcut-audit, not a fault in the "
                           f"data; retried up to resources.max_retries times):\n{remote_traceback.rstrip()}")
        self.retry(call.shard, why)

    def on_ready(self, actor: Actor | None, info: dict) -> None:
        if actor is None:
            return
        actor.ready = True
        self.last_alive = time.perf_counter()
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

    def check_stall(self) -> None:
        if any(a.ready for a in self.actors.values()):
            self.last_alive = time.perf_counter()
        elif time.perf_counter() - self.last_alive > STALL_TIMEOUT_S:
            raise AuditError(f"no actor could start for {STALL_TIMEOUT_S:.0f} s (needs "
                             f"{self.res.cpus_per_actor:g} CPU, {self.res.gpus_per_actor:g} GPU each); "
                             "continue later with --resume")

    def show_progress(self) -> None:
        """About once a second: ask busy actors how far their shards are; show it."""
        if not self.bar.enabled or time.perf_counter() - self.last_poll < PROGRESS_POLL_S:
            return
        self.last_poll = time.perf_counter()
        self.poll_actors()
        inside = 0
        for key, done in self.live.items():  # images inside the shards each actor still holds
            held = {sh.id for sh in self.actors[key].inflight.values()}  # (live holds live actors only)
            inside += sum(n for sid, n in done.items() if sid in held)
        self.bar.show(inside)
        self.emit("progress", {"committed": self.bar.committed, "inside_shards": inside})

    def poll_actors(self) -> None:
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
        for key, a in self.actors.items():
            if a.ready and a.inflight and key not in asked:
                self.polls[a.handle.progress.remote()] = key
        for key in [k for k in self.live if k not in self.actors]:
            del self.live[key]

    # -- the end ------------------------------------------------------------------
    def stop(self) -> None:
        """Fence every busy actor, then kill them all.

        ``ray.kill`` fails the calls in flight at once, but the actor's process
        may live on a moment and could still commit a shard after the run
        returned (an interrupted job must not change its output behind a
        ``--resume`` that has already planned).  A fenced actor commits nothing
        more, and its ``fence`` call returns only once no commit is in
        progress.  It runs in the actors' control group, so it is answered
        while both shard slots are busy.  Waits are bounded by ``KILL_WAIT_S``.
        """
        if not self.actors:
            return
        ray = self.ray
        inflight = [ref for a in self.actors.values() for ref in a.inflight]
        fences = [a.handle.fence.remote() for a in self.actors.values() if a.ready and a.inflight]
        if fences:
            with contextlib.suppress(Exception):
                ray.wait(fences, num_returns=len(fences), timeout=KILL_WAIT_S)
        for a in list(self.actors.values()):
            with contextlib.suppress(Exception):
                ray.kill(a.handle, no_restart=True)
        if inflight:
            with contextlib.suppress(Exception):
                ray.wait(inflight, num_returns=len(inflight), timeout=KILL_WAIT_S)
        self.actors.clear()
