"""Running an audit job on Ray: prepare, own the output, schedule, finish.

:func:`run_job` is the library entry point (``audit run`` and ``audit demo``
call it).  It runs in named steps:

1. :func:`prepare` loads and checks the spec, the model file (layer names
   from the ``.keras`` config, before TensorFlow is imported) and the dataset
   plan; nothing is written;
2. :func:`own_output` takes ``OUT/_lock.json`` (:mod:`audit.data.lock`),
   works out which committed shards the new plan keeps
   (:mod:`audit.runner.resume`), loads the model in the driver as each actor
   will (:func:`audit.runner.precheck.check_with_model`: an unknown layer, a
   bad target, classes that do not fit are found before any actor starts),
   joins or starts Ray
   (:mod:`audit.runner.cluster`) and creates the output folders;
3. :func:`execute` runs the shards left to do on actors
   (:class:`audit.runner.scheduler.Scheduler`): actors read, decode, explain
   and commit their shards themselves (:mod:`audit.data.io`), straight into
   the output directory (a filesystem every node can reach);
4. :func:`finish` writes ``job.json`` with this run appended to its history and
   returns the summary.

Faults: an actor that dies (killed, OOM, its node lost) fails the calls in
flight on it; the scheduler puts those shards back in the queue (one attempt
each, up to ``resources.max_retries``; none when the node was drained or
preempted) and requests a replacement actor.  On a cluster the job joins, the
actors are requested even when no node has their resources yet (an
autoscaler adds nodes for them); shards that wait ``resources.start_timeout_s``
with fewer than ``actors.min`` actors running stop the job in one line.  A
shard whose code raises is retried the same way.  Shards that exhaust their
retries are reported as failed; the job ends ``incomplete`` and
``--resume`` picks them up.  A user mistake found by an actor (an unknown
layer, a model the dataset does not fit) stops the job with that one line.
"""

from __future__ import annotations

import collections
import contextlib
import platform
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from audit.data import datasets, fs, io
from audit.data.jobspec import JobSpec, record_of
from audit.data.lock import LockLost, OutputLock, check_free
from audit.data.predictions import one_class_warning
from audit.engine.models import fingerprint
from audit.errors import AuditError
from audit.runner import inprocess, pool
from audit.runner.cluster import check_reachable, ray_init
from audit.runner.precheck import check_model_file, check_with_model
from audit.runner.progress import Progress
from audit.runner.resume import Committed, drop, notes, reconcile, resume_mode
from audit.runner.scheduler import (
    QUEUE_DEPTH,
    SWITCH_INTERVAL_S,
    Resources,
    RunState,
    Scheduler,
    remote_worker,
)
from audit.runner.spec import load_spec

__all__ = ["run_job", "prepare", "own_output", "execute", "finish", "plan_resources", "describe_devices",
           "QUEUE_DEPTH", "SWITCH_INTERVAL_S", "remote_worker"]


def versions() -> dict:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for dist in ("shortcut-audit", "tensorflow", "keras", "ray", "pyarrow", "numpy", "pandas",
                 "opencv-python-headless"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def _first_difference(a, b, path=""):
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            d = _first_difference(a.get(k), b.get(k), f"{path}.{k}" if path else k)
            if d:
                return d
        return None
    return (path, a, b) if a != b else None


def _check_resumable(spec: JobSpec, previous: dict, sha: str | None) -> None:
    # a key added to the schema since the job started compares as its default (record_of fills it)
    was = record_of(previous)
    old = was.spec.to_dict() if was.spec is not None else {}
    for section in ("dataset", "explain", "model"):
        d = _first_difference(old.get(section), getattr(spec, section).to_dict(), section)
        if d:
            raise AuditError(
                f"cannot resume: {d[0]} is {d[2]!r} now but {d[1]!r} in the job in {spec.output}; "
                "resume needs the same dataset, model and explain settings"
            )
    old_sha = was.model_sha256
    if old_sha and sha and old_sha != sha:
        raise AuditError(f"cannot resume: the model file {spec.model.path} changed since the job started")


def plan_resources(spec: JobSpec, cluster: dict, nodes: list[dict], n_shards: int, fixed: bool = True) -> Resources:
    """Actors, CPUs and GPUs per actor from the spec and the cluster (a pure function).

    ``actors: auto`` is one actor per GPU when the cluster has GPUs, else one
    per pair of CPUs (at least one); never more actors than shards.  With
    ``fixed`` False (a cluster nodes can join) nothing is refused for want of
    a resource: the actors wait for it (see :func:`audit.runner.pool.plan`).
    """
    return pool.plan(spec, cluster, nodes, n_shards, fixed=fixed)


@dataclass
class JobContext:
    """What :func:`prepare` found out, before anything is written."""

    spec: JobSpec
    out: Path | str  # a local folder, or a URI (s3://...)
    mode: str | None  # None (fresh), "check" or "replan" (see audit.runner.resume)
    previous: dict | None  # job.json of the job being resumed
    sha: str | None  # the model file's sha256
    job_id: str
    plan: object  # audit.data.datasets.Plan
    plan_s: float
    t_start: float


@dataclass
class Owned:
    """The output while this driver holds it (:func:`own_output`)."""

    lock: object  # audit.data.lock.OutputLock
    found: Committed  # the committed shards this run skips
    todo: list  # the shards to run
    started_ray: bool
    private: bool = False  # the job's own local Ray: no node can join it
    local: bool = False  # no --address: a Ray on this machine (the job's own, or one the caller started)
    worker: object = None  # the driver's own worker when the job runs in-process (audit.runner.inprocess)
    timings: dict = None  # seconds of the driver's steps before the run: model_check_s or model_load_s, ray_start_s


def run_job(spec, *, address=None, resume=False, overrides=(), progress=True, on_event=None,
            base_dir=None) -> dict:
    """Run an audit job; returns a summary dict (also stored in ``OUT/job.json``).

    Args:
        spec: a YAML path or a dict (see docs/jobs.md).
        address: None for a private local Ray (or the one already initialised
            in this process), ``auto``, ``HOST:PORT`` or ``ray://host:10001``.
        resume: False; True to continue a job in a non-empty output, skipping
            the committed shards that still hold what the new plan says;
            ``"replan"`` to keep those before the first that changed and redo
            the rest (see :mod:`audit.runner.resume`).
        overrides: ``key.path=value`` strings.
        progress: show a progress bar.
        on_event: ``on_event(kind, payload)``, called on the driver thread for
            ``actor_ready``, ``shard_done``, ``pool`` (the actors running,
            starting and pending changed while some wait for a node) and (with
            ``progress``, about once a second) ``progress`` (monitoring hooks;
            tests inject faults).
        base_dir: what relative paths of a dict spec resolve against.

    Returns:
        The summary (``status`` ok | incomplete, counts, seconds, devices).

    Raises:
        AuditError: a user mistake, in one line (bad spec, busy or non-empty
            output, a changed dataset on resume, an unknown layer, ...).
        KeyboardInterrupt: after the run was recorded as ``interrupted``.
    """
    check_reachable(address)  # a dead address is one line before anything else is done
    ctx = prepare(spec, overrides=overrides, base_dir=base_dir, resume=resume)
    with own_output(ctx, address) as owned:
        return execute(ctx, owned, progress=progress, on_event=on_event)


def prepare(spec, *, overrides=(), base_dir=None, resume=False) -> JobContext:
    """Load and check the spec, the output, the model file and the dataset plan (writes nothing).

    Raises:
        AuditError: a spec mistake, a busy or non-empty output, a model file
            whose config lacks a requested layer, a dataset with no images.
    """
    t_start = time.time()
    spec = load_spec(spec, overrides, base_dir)
    check_model_file(spec)  # layer names and Lambda layers from the .keras config: no TensorFlow yet
    mode = resume_mode(resume)
    out = spec.output if fs.is_uri(spec.output) else Path(spec.output)
    check_free(out)  # a running driver is named before "not empty" is said
    previous = io.read_job(out) if mode else None
    io.check_output(out, bool(mode))
    sha = fs.sha256(spec.model.path) if fs.is_uri(spec.model.path) else fingerprint(spec.model.path)
    if previous:
        _check_resumable(spec, previous, sha)
    job_id = previous["job_id"] if previous else uuid.uuid4().hex[:12]
    t0 = time.perf_counter()
    plan = datasets.plan(spec.dataset)
    plan_s = time.perf_counter() - t0
    if plan.total == 0:
        raise AuditError(f"dataset {spec.dataset.path} has no images")
    return JobContext(spec, out, mode, previous, sha, job_id, plan, round(plan_s, 3), t_start)


@contextlib.contextmanager
def own_output(ctx: JobContext, address):
    """Hold ``OUT`` for the run: lock, committed shards, the model check, Ray, output folders.

    The lock is taken before anything else is written.  The model is loaded in
    the driver (:func:`audit.runner.precheck.check_with_model`) only when
    there are shards to do, after a resume's check of the committed ones.  When Ray cannot be
    joined or the output not prepared, an output this call created is removed
    again (a rerun does not find a "non-empty" output).
    """
    created = _make_dir(ctx.out)
    lock = OutputLock(ctx.out, ctx.job_id, warn=_say)
    ready, started_ray, worker = False, False, None
    try:
        # a named cluster is joined before the lock: a refused token or a dead head leaves OUT untouched
        started_ray = ray_init(address) if address else False
        lock.acquire()
        found = reconcile(ctx.out, ctx.plan, ctx.spec.dataset, ctx.job_id, ctx.mode)
        todo = [s for s in ctx.plan.shards if s.id not in found.entries]
        steps, t0 = {}, time.perf_counter()
        if todo and inprocess.runs_in_process(ctx.spec, address, todo):  # a small local job: no Ray
            worker = inprocess.ready_worker(ctx.spec, ctx.job_id, ctx.plan.classes, lock, todo)
            steps["model_load_s"] = round(time.perf_counter() - t0, 3)
        elif todo:  # what an actor's setup would refuse, found before a private Ray or any actor starts
            check_with_model(ctx.spec, ctx.plan.classes)
            steps["model_check_s"] = round(time.perf_counter() - t0, 3)
        if todo and not address and worker is None:
            t0 = time.perf_counter()
            started_ray = ray_init(address)
            steps["ray_start_s"] = round(time.perf_counter() - t0, 3)
        io.prepare_output(ctx.out, bool(ctx.mode))
        drop(ctx.out, found)
        for line in notes(found):
            _say(line)
        ready = True
        yield Owned(lock, found, todo, started_ray, private=started_ray and not address,
                    local=not address, worker=worker, timings=steps)
    finally:
        if worker is not None:
            worker.close()
        if started_ray:
            import ray

            ray.shutdown()
        lock.release()
        if created and not ready:
            _remove_if_empty(ctx.out)


def _say(line: str) -> None:
    print(line, file=sys.stderr)


def _make_dir(out: Path) -> bool:
    """Create OUT (and its parents); True when it did not exist."""
    if isinstance(out, str) or out.is_dir():  # a URI: prefixes need no creating
        return False
    try:
        out.mkdir(parents=True)
    except FileExistsError:
        return False
    except OSError as e:
        raise AuditError(f"cannot create output directory {out}: {e.strerror or e}") from None
    return True


def _remove_if_empty(out: Path) -> None:
    """Remove an output this run created and left empty (rmdir only: another driver's files stay)."""
    for p in (out / io.RECORDS, out / io.MANIFEST, out):
        with contextlib.suppress(OSError):
            p.rmdir()


def execute(ctx: JobContext, owned: Owned, *, progress=True, on_event=None) -> dict:
    """Run the shards left to do; record the run in job.json whatever happens. Returns the summary."""
    record = job_record(ctx, owned)
    record["timings"].update(owned.timings or {})
    owned.lock.check()  # fencing: job.json is written only while this driver holds the lock
    io.write_job(ctx.out, record)
    state, status, bar = RunState(), "ok", None
    run_t0, run_wall = time.perf_counter(), time.time()
    try:
        if owned.todo and owned.worker is not None:
            res = inprocess.resources()
            record["resources"] = {**asdict(res), "in_process": True}
            bar = Progress(ctx.plan.total, owned.found.images, owned.found.errors, progress, ctx.spec.name)
            inprocess.InProcessRunner(owned.worker, ctx.spec, state, bar, on_event, owned.lock).run(owned.todo)
        elif owned.todo:
            import ray

            res = plan_resources(ctx.spec, ray.cluster_resources(), ray.nodes(), len(owned.todo),
                                 fixed=owned.private)
            record["resources"] = asdict(res)
            _note_cpu_fallback(ctx.spec, res, owned.private or owned.local)
            bar = Progress(ctx.plan.total, owned.found.images, owned.found.errors, progress, ctx.spec.name)
            Scheduler(ctx.spec, ctx.job_id, ctx.plan.classes, res, state, bar, on_event, owned.lock).run(owned.todo)
        status = "incomplete" if state.failed else "ok"
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    except AuditError as e:
        status, record["error"] = "failed", str(e)
        raise
    except BaseException:
        status = "failed"
        raise
    finally:
        if bar is not None:
            bar.close()
        # start-up: from `audit run` to the first worker ready (plan, lock, Ray, actors, model load)
        record["timings"]["startup_s"] = round(run_wall - ctx.t_start + (state.first_ready_s or 0.0), 3)
        summary = finish(ctx, owned, record, state, status, time.perf_counter() - run_t0)
    return summary


def _note_cpu_fallback(spec: JobSpec, res: Resources, local: bool) -> None:
    """On a joined cluster without GPUs now, ``gpus_per_actor: auto`` means CPU actors: say how to ask for GPUs.

    Not on a Ray of this machine (no ``--address``): no autoscaler adds nodes there.
    """
    if not local and spec.resources.gpus_per_actor == "auto" and not res.gpus_per_actor:
        _say("audit: note: the cluster has no GPU now, so resources.gpus_per_actor auto = 0 (CPU actors); "
             "set it to 1 to have an autoscaler add GPU nodes for the job")


def job_record(ctx: JobContext, owned: Owned) -> dict:
    """job.json at the start of a run (status ``running``); history from the file as it is now."""
    spec, previous = ctx.spec, ctx.previous
    now = io.read_job(ctx.out) if ctx.mode else None  # read under the lock: no run of another driver is lost
    record = {
        "job_id": ctx.job_id,
        "name": spec.name,
        "status": "running",
        "spec": spec.to_dict(),
        "model": {"path": spec.model.path, "application": spec.model.application,
                  "sha256": ctx.sha},
        "classes": ctx.plan.classes,
        "dataset": {"images": ctx.plan.total, "shards": len(ctx.plan.shards)},
        "versions": versions(),
        "timings": {"started": ctx.t_start, "plan_s": ctx.plan_s},
        "generation": owned.lock.generation,
        "runs": history((now or previous or {}).get("runs", []), _run_started(ctx, owned)),
    }
    if previous:
        for k in ("layers", "layer_shapes", "input_size"):
            if k in previous:
                record[k] = previous[k]
        timings = previous.get("timings") or {}
        record["timings"]["first_started"] = timings.get("first_started", timings.get("started"))
    return record


def _run_started(ctx: JobContext, owned: Owned) -> dict:
    """This run's entry in the history while it runs."""
    info = owned.lock.info
    return {"generation": info.generation, "started": ctx.t_start, "status": "running", "host": info.host,
            "pid": info.pid, "resume": ctx.mode}


def history(runs: list, run: dict) -> list:
    """The runs of job.json with ``run`` put in: appended, or replacing its own entry (same generation).

    Earlier runs are never dropped; one still ``running`` with a lower generation
    lost the output to a later driver (stopped, killed, or paused and taken
    over): it is marked ``abandoned``.
    """
    gen = run.get("generation")
    out = []
    for r in runs:
        if not isinstance(r, dict) or (gen is not None and r.get("generation") == gen):
            continue
        if r.get("status") == "running" and gen is not None and int(r.get("generation") or 0) < gen:
            r = {**r, "status": "abandoned", "taken_over_by": gen}
        out.append(r)
    return out + [run]


def finish(ctx: JobContext, owned: Owned, record: dict, state: RunState, status: str, run_s: float) -> dict:
    """Append this run to job.json's history and write it (unless another driver took OUT); the summary.

    Raises:
        audit.data.lock.LockLost: another driver took the output over (the run ended, but commits nothing).
    """
    with contextlib.suppress(LockLost):
        owned.lock.check()  # a loss is kept in owned.lock.lost
    known = {s.id for s in ctx.plan.shards}
    if not owned.lock.lost:  # every actor is stopped: an object no entry names is an orphan
        for name in io.remove_orphans(ctx.out):
            _say(f"audit: removed {io.RECORDS}/{name} (an attempt no manifest entry commits)")
    all_done = {k: v for k, v in io.committed_shards(ctx.out, rows=False).items() if k in known}
    if state.model_info:
        for k in ("layers", "layer_shapes", "input_size", "classes"):
            record[k] = state.model_info.get(k)
    record["status"] = status
    record["timings"].update({"run_s": round(run_s, 3), "total_s": round(time.time() - ctx.t_start, 3),
                              "first_actor_ready_s": state.first_ready_s, "finished": time.time()})
    run = {
        "generation": owned.lock.generation, "started": ctx.t_start, "status": status, "shards": len(owned.todo), "images": state.images,
        "seconds": round(run_s, 3), "host": owned.lock.info.host, "pid": owned.lock.info.pid,
        "resume": ctx.mode, "replanned_from": owned.found.replanned_from,
        "redone_broken": sorted(owned.found.broken), "actors": state.actor_facts,
        "error": record.get("error"),
        "pool": {"requested": state.actors_started, "peak_running": state.peak_running,
                 "preempted": state.preempted, "released": state.released}}
    record["shards"] = {"total": len(ctx.plan.shards), "committed": len(all_done), "failed": sorted(state.failed)}
    record["failed_shards"] = {str(k): v for k, v in state.failed.items()}
    summary = _summary(ctx, all_done, owned.found.entries, state, run_s, status)
    summary.update(_speed(record["timings"].get("startup_s"), state, run_s))
    if (record.get("resources") or {}).get("in_process") and summary.get("devices"):
        summary["devices"] = summary["devices"].replace("1 actor on", "in the driver (a small local job: no Ray) on")
    record["summary"] = summary
    if not owned.lock.lost:
        now = io.read_job(ctx.out) or {}  # under the lock: the history as it is on disk, never shortened
        record["runs"] = history(now.get("runs") or record["runs"], run)
        io.write_job(ctx.out, record)
    elif status in ("ok", "incomplete"):
        raise LockLost(f"stopped: {owned.lock.lost}; this run (generation {owned.lock.generation}) "
                       "commits nothing more")
    return summary


def _speed(startup_s, state: RunState, run_s: float) -> dict:
    """Start-up and throughput apart: images/s over the seconds after the first worker was ready."""
    compute_s = max(0.0, run_s - (state.first_ready_s or 0.0))
    return {"startup_s": startup_s, "compute_s": round(compute_s, 2),
            "images_per_s": round(state.images / compute_s, 2) if compute_s > 0 and state.images else None}


def describe_devices(facts: list[dict]) -> str | None:
    """One line on where the actors of a run computed, e.g. ``2 actors on GPU (memory growth on)``."""
    if not facts:
        return None
    n = len(facts)
    who = f"{n} actor{'s' if n != 1 else ''}"
    on_gpu = [f for f in facts if (f.get("gpus") or 0) > 0]
    if on_gpu:
        growth = all(all(f.get("memory_growth") or [False]) for f in on_gpu)
        extras = [f"{min(f['gpus'] for f in on_gpu)} GPU each" if len(on_gpu) == n else f"{len(on_gpu)} with a GPU",
                  "memory growth on" if growth else "memory growth OFF"]
        if any(f.get("mixed_precision") for f in on_gpu):
            extras.append("mixed precision")
        return f"{who} on GPU ({', '.join(extras)})"
    threads = sorted({f.get("threads") for f in facts if f.get("threads")})
    t = f", {'/'.join(map(str, threads))} TensorFlow thread{'s' if threads != [1] else ''} each" if threads else ""
    return f"{who} on CPU (no GPU visible{t})"


def _summary(ctx: JobContext, all_done: dict, skipped: dict, state: RunState, run_s: float, status: str) -> dict:
    tot = collections.Counter()
    for e in all_done.values():
        for k in ("errors", "flat", "correct", "labelled", "rows"):
            tot[k] += int(e.get(k, 0))
    images_done = sum(int(e["inputs"]["stop"]) - int(e["inputs"]["start"]) for e in all_done.values())
    plan = ctx.plan
    return {
        "job_id": ctx.job_id,
        "name": ctx.spec.name,
        "output": str(ctx.out),
        "status": status,
        "images": plan.total,
        "images_done": images_done,
        "images_this_run": state.images,
        "errors": tot["errors"],
        "flat_maps": tot["flat"],
        "rows": tot["rows"],
        "accuracy": (tot["correct"] / tot["labelled"]) if tot["labelled"] else None,
        "shards": len(plan.shards),
        "shards_done": len(all_done),
        "shards_skipped": len(skipped),
        "shards_failed": sorted(state.failed),
        "retries": state.retries,
        "actors": state.actors_started,
        "devices": describe_devices(state.actor_facts),
        "actor_deaths": state.actor_deaths,
        "seconds": round(run_s, 2),
        "images_per_s": round(state.images / run_s, 2) if run_s > 0 and state.images else None,
        "classes": plan.classes,
        "model_warning": _model_warning(ctx, all_done),
    }


def _model_warning(ctx: JobContext, all_done: dict) -> str | None:
    """A model that predicts one class for every image (NaN weights, a collapsed head), in one sentence."""
    if not all_done:
        return None
    try:
        return one_class_warning(ctx.out, ctx.plan.classes)
    except (OSError, AuditError):  # the summary is still worth having without it
        return None
