"""The actor pool of a job: how many worker actors, which are ready, pending or gone.

:class:`ActorPool` asks Ray for actors up to its ceiling (an ``actors: auto``
pool raises the ceiling as nodes join), knows which are ready and which wait
for a node, drops dead ones, releases the pending ones once no shard waits,
shows the pool while actors wait for a node, and fences and kills every actor
at the end.  It never sees a shard's result: the scheduler
(:class:`audit.runner.scheduler.Scheduler`) hands out shards, retries them
and registers the calls in flight.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from audit import quiet
from audit.runner.pool import Resources, auto_count, missing

QUEUE_DEPTH = 2  # shards in flight per actor: the next one is queued while one runs
KILL_WAIT_S = 10.0  # how long the driver waits for killed actors to be gone
GROW_POLL_S = 5.0  # how often an ``actors: auto`` pool looks for capacity that joined
PLACING_POLL_S = 1.0  # how often Ray is asked which actors wait for a node
#: An actor Ray has not created this long after it was asked for counts as pending (waiting for a
#: node); before that it may just be a worker process starting, which is not worth a line.
PENDING_NOTICE_S = 10.0


@dataclass
class Actor:
    """One worker actor as the driver sees it."""

    key: str
    handle: Any
    ready: bool = False
    inflight: dict = field(default_factory=dict)  # ref -> Shard
    setup_ref: Any = None
    requested: float = 0.0  # perf_counter() when it was asked for


def _actor_hex(handle) -> str | None:
    try:
        return handle._actor_id.hex()
    except Exception:  # noqa: BLE001 - a handle type without it (Ray Client, a newer Ray): not known
        return None


class ActorPool:
    """The job's actors.

    Args:
        ray: the ``ray`` module.
        spec: the resolved job spec (the pixel bound goes into the actors' environment).
        res: :class:`audit.runner.pool.Resources`.
        state: the run state (:class:`audit.runner.scheduler.RunState`): actor counters.
        bar: the progress display.
        new_handle: ``new_handle(options)`` creates one actor with these Ray options; returns its handle.
    """

    def __init__(self, ray, spec, res: Resources, state, bar, new_handle):
        self.ray, self.spec, self.res, self.state, self.bar = ray, spec, res, state, bar
        self.new_handle = new_handle
        self.actors: dict[str, Actor] = {}
        self.replacements = res.actors * max(1, int(spec.resources.max_retries)) + 2  # actors started after crashes
        self.ceiling = res.actors  # the most actors at once (an ``auto`` pool raises it as nodes join)
        self.last_grow = time.perf_counter()
        self.shown = None  # (running, starting, pending) last shown while actors wait for a node
        self.last_placing, self.waiting_ids = 0.0, set()

    def running(self) -> int:
        return sum(1 for a in self.actors.values() if a.ready)

    def inflight(self) -> int:
        return sum(len(a.inflight) for a in self.actors.values())

    def options(self) -> dict:
        """Ray options of every actor: resources, one call queued behind the running one, a quiet environment."""
        env = {**quiet.quiet_env(), "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "3"),
               "AUDIT_VERBOSE": os.environ.get("AUDIT_VERBOSE", ""),
               "OPENCV_IO_MAX_IMAGE_PIXELS": str(int(self.spec.dataset.max_pixels))}
        # max_concurrency: the queued shard starts reading/decoding while the running one computes,
        # and the running one writes while the queued one computes (see audit.runner.worker)
        opts = {"num_cpus": self.res.cpus_per_actor, "num_gpus": self.res.gpus_per_actor, "max_restarts": 0,
                "max_task_retries": 0, "max_concurrency": QUEUE_DEPTH, "runtime_env": {"env_vars": env}}
        if self.res.custom:
            opts["resources"] = dict(self.res.custom)
        if self.res.accelerator_type:
            opts["accelerator_type"] = self.res.accelerator_type
        if self.ceiling > 1:
            opts["scheduling_strategy"] = "SPREAD"
        return opts

    def fill(self, work: int, total: int) -> list[Actor]:
        """Actors up to the ceiling and ``work`` (shards waiting or in flight); returns the new ones.

        ``total``: the shards of the run (an ``auto`` pool never grows past it).
        """
        self.grow(total)
        want, new = min(self.ceiling, work), []
        while len(self.actors) < want and self.replacements >= 0:
            actor = Actor(uuid.uuid4().hex[:8], self.new_handle(self.options()), requested=time.perf_counter())
            actor.setup_ref = actor.handle.setup.remote()
            self.actors[actor.key] = actor
            self.state.actors_started += 1
            new.append(actor)
        return new

    def grow(self, total: int) -> None:
        """``actors: auto``: about every ``GROW_POLL_S``, count again what the cluster holds now."""
        now = time.perf_counter()
        if not self.res.grows or now - self.last_grow < GROW_POLL_S:
            return
        self.last_grow = now
        try:
            cluster = self.ray.cluster_resources()
        except Exception:  # noqa: BLE001 - a GCS hiccup: look again next time
            return
        n = min(auto_count(cluster, self.res.gpus_per_actor, self.res.custom), total)
        if n > self.ceiling:
            self.bar.write(f"audit: the cluster grew: up to {n} {self.res.kind()} actors (was {self.ceiling})")
            self.ceiling = n

    def drop(self, key: str, preempted: bool = False) -> Actor | None:
        """An actor died: out of the pool (killed, to be sure); returns it (None if gone already).

        A crash spends one replacement; a drained or preempted node does not
        (that is the cluster's doing, not the job's).
        """
        actor = self.actors.pop(key, None)
        if actor is None:
            return None
        self.state.actor_deaths += 1
        if preempted:
            self.state.preempted += 1
        else:
            self.replacements -= 1
        with contextlib.suppress(Exception):
            self.ray.kill(actor.handle, no_restart=True)
        return actor

    def release_pending(self) -> list[Actor]:
        """No shard waits: kill the actors not ready yet (so their requests stop holding or adding nodes).

        Said in a line only when some of them were waiting for a node: one
        still loading the model at the end of a small job is not news.
        Returns the actors released.
        """
        released = [a for a in self.actors.values() if not a.ready]
        if not released:
            return []
        waited = len(self.pending())
        for a in released:
            del self.actors[a.key]
            with contextlib.suppress(Exception):
                self.ray.kill(a.handle, no_restart=True)
        self.state.released += len(released)
        if waited:
            self.bar.write(f"audit: released {waited} actor request{'s' if waited > 1 else ''} still waiting for "
                           "a node: no shard left to hand out")
        return released

    def pending(self) -> list[Actor]:
        """Actors still not created ``PENDING_NOTICE_S`` after they were asked for: waiting for a node."""
        now = time.perf_counter()
        old = [a for a in self.actors.values() if not a.ready and now - a.requested >= PENDING_NOTICE_S]
        if not old:
            return []
        waiting = self.placing()
        return [a for a in old if _actor_hex(a.handle) in waiting]

    def placing(self) -> set:
        """Ids of this job's actors that wait for a node (Ray's ``PENDING_CREATION``), asked about once a second."""
        now = time.perf_counter()
        if now - self.last_placing >= PLACING_POLL_S:
            self.last_placing = now
            try:
                from ray._private.state import state  # Ray, imported already by the driver

                job = self.ray.get_runtime_context().get_job_id()
                self.waiting_ids = set(state.actor_table(None, job_id=self.ray.JobID.from_hex(job),
                                                         actor_state_name="PENDING_CREATION"))
            except Exception:  # noqa: BLE001 - Ray Client, or Ray changed: say nothing rather than guess
                self.waiting_ids = set()
        return self.waiting_ids

    def show(self, queued: bool) -> dict | None:
        """A line when the pool changes while actors wait for a node; returns the counts shown, else None.

        ``queued``: shards wait (only then do pending actors count as waiting).
        """
        running = self.running()
        self.state.peak_running = max(self.state.peak_running, running)
        pending = len(self.pending()) if queued else 0
        starting = len(self.actors) - running - pending
        shown = (running, starting, pending) if pending else None
        if shown == self.shown:
            return None
        kind, n = self.res.kind(), len(self.actors)
        if shown:
            also = f"{starting} starting, " if starting else ""
            self.bar.pool(f"waiting for {n} {kind} actor{'s' if n != 1 else ''}: {running} running, {also}"
                          f"{pending} pending", waiting=True)
        else:
            also = f", {starting} starting" if starting else ""
            self.bar.pool(f"{n} {kind} actor{'s' if n != 1 else ''} on nodes: {running} running{also}, none pending",
                          waiting=False)
        self.shown = shown
        return {"running": running, "starting": starting, "pending": pending, "ceiling": self.ceiling}

    def timeout_line(self) -> str:
        """One line naming the resource that never appeared (or that stayed busy)."""
        try:
            absent = missing(self.res.needs(), self.ray.nodes())
        except Exception:  # noqa: BLE001 - the line is still worth saying without it
            absent = []
        # the most specific first: a custom resource or accelerator type, then GPU; CPU only when alone
        absent = sorted((k for k in absent if k != "CPU"), key=lambda k: k == "GPU") or absent
        running, need = self.running(), self.res.describe()
        what = (f"{' and '.join(absent)} never appeared: no node with {need} joined" if absent
                else f"the nodes with {need} stayed busy")
        return (f"{what} within resources.start_timeout_s = {self.res.start_timeout_s:g} s "
                f"({running} actor{'s' if running != 1 else ''} running, {self.res.min_actors} needed, "
                f"{len(self.actors) - running} pending); the committed shards are kept: continue later with --resume")

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
