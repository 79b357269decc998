"""Running an audit job on Ray: plan shards, drive actors, commit exactly once.

:func:`run_job` is the library entry point (``audit run`` and ``audit demo``
call it).  The driver stays small: it holds shard descriptors (a few numbers
each, never per-image objects), the refs in flight and counters, so its memory
does not grow with the dataset.  Actors (:class:`audit.runner.worker.AuditWorker`)
read, decode, explain and write their shards themselves, straight into the
output directory (which must be on a filesystem every node can reach).

Faults: an actor that dies (killed, OOM, its node lost) fails the calls in
flight on it; the driver puts those shards back in the queue (counting one
attempt each, up to ``resources.max_retries``) and starts a replacement actor.
A shard whose code raises is retried the same way.  Shards that exhaust their
retries are reported as failed; the job ends ``incomplete`` and
``--resume`` picks them up.  A user mistake found by an actor (an unknown
layer, a model the dataset does not fit) stops the job with that one line.
"""

from __future__ import annotations

import collections
import contextlib
import os
import platform
import sys
import time
import uuid
from pathlib import Path

from audit.errors import AuditError
from audit.runner.cluster import ray_init
from audit.runner.resume import drop, notes, reconcile, resume_mode

QUEUE_DEPTH = 2  # shards in flight per actor: the next one is queued while one runs
STALL_TIMEOUT_S = 300.0  # no live actor and none starting for this long: give up


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


def _check_resumable(spec: dict, previous: dict, sha: str | None) -> None:
    old = previous.get("spec") or {}
    for section in ("dataset", "explain", "model"):
        d = _first_difference(old.get(section), spec.get(section), section)
        if d:
            raise AuditError(
                f"cannot resume: {d[0]} is {d[2]!r} now but {d[1]!r} in the job in {spec['output']}; "
                "resume needs the same dataset, model and explain settings"
            )
    old_sha = (previous.get("model") or {}).get("sha256")
    if old_sha and sha and old_sha != sha:
        raise AuditError(f"cannot resume: the model file {spec['model']['path']} changed since the job started")


def plan_resources(spec: dict, cluster: dict, nodes: list[dict], n_shards: int) -> dict:
    """Actors, CPUs and GPUs per actor from the spec and the cluster (a pure function).

    ``actors: auto`` is one actor per GPU when the cluster has GPUs, else one
    per pair of CPUs (at least one); never more actors than shards.
    """
    res = spec["resources"]
    gpus = float(cluster.get("GPU", 0))
    cpus = float(cluster.get("CPU", 0))
    gpa = res["gpus_per_actor"]
    gpa = (1.0 if gpus >= 1 else 0.0) if gpa == "auto" else float(gpa)
    if gpa > 0 and gpus < gpa:
        raise AuditError(f"resources.gpus_per_actor is {gpa:g} but the cluster has {gpus:g} GPUs")
    actors = res["actors"]
    if actors == "auto":
        actors = int(gpus // gpa) if gpa > 0 else max(1, int(cpus // 2))
    actors = max(1, min(int(actors), max(1, n_shards)))
    cpa = res["cpus_per_actor"]
    if cpa == "auto":
        cpa = 1.0 if gpa > 0 else max(1.0, float(int(cpus // actors)) if cpus else 1.0)
    cpa = float(cpa)
    biggest = max((float(n.get("Resources", {}).get("CPU", 0)) for n in nodes if n.get("Alive")), default=cpus)
    if cpa > biggest:
        raise AuditError(f"resources.cpus_per_actor is {cpa:g} but the largest node has {biggest:g} CPUs")
    return {"actors": actors, "cpus_per_actor": cpa, "gpus_per_actor": gpa}


class _Progress:
    def __init__(self, total, initial, errors, enabled, name):
        self.bar = None
        self.committed = initial
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="img", desc=name, dynamic_ncols=True,
                            smoothing=0.1, file=sys.stderr)
            self.bar.set_postfix(errors=errors)

    @property
    def enabled(self) -> bool:
        return self.bar is not None

    def update(self, n, errors):
        """``n`` more images committed."""
        self.committed += n
        self.show(0, errors)

    def show(self, live, errors=None):
        """Show committed images plus ``live`` images done in shards not yet committed.

        The count never goes back (a shard retried after a failure is not taken
        off again); it always ends at the committed count.
        """
        if self.bar is not None:
            n = min(self.committed + live, self.bar.total)
            if n > self.bar.n:
                self.bar.update(n - self.bar.n)
            if errors is not None:
                self.bar.set_postfix(errors=errors, refresh=False)

    def write(self, msg):
        if self.bar is not None:
            self.bar.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _cause(e):
    return getattr(e, "cause", None) or e


def run_job(spec, *, address=None, resume=False, overrides=(), progress=True, on_event=None,
            base_dir=None) -> dict:
    """Run an audit job; returns a summary dict (also stored in ``OUT/job.json``).

    ``spec``: a YAML path or a dict (see DESIGN.md).  ``address``: None for an
    embedded local Ray (or the one already initialised in this process),
    ``auto`` or ``ray://host:10001`` for a cluster.  ``resume`` (True or
    ``"replan"``) continues a job in a non-empty output, skipping the committed
    shards that still hold what the new plan says (see
    :mod:`audit.runner.resume`).  ``overrides``:
    ``key.path=value`` strings.  ``on_event(kind, payload)``, if given, is
    called on the driver thread for ``actor_ready``, ``shard_done`` and (with
    ``progress``, about once a second) ``progress`` (monitoring hooks; tests
    use them to inject faults).
    """
    from audit.data import datasets, io
    from audit.engine.models import fingerprint
    from audit.runner.spec import load_spec

    t_start = time.time()
    spec = load_spec(spec, overrides, base_dir)
    mode = resume_mode(resume)
    out = Path(spec["output"])
    previous = io.read_job(out) if mode else None
    io.check_output(out, bool(mode))  # nothing is created before the dataset is planned
    sha = fingerprint(spec["model"].get("path"))
    if previous:
        _check_resumable(spec, previous, sha)
    job_id = previous["job_id"] if previous else uuid.uuid4().hex[:12]

    t0 = time.perf_counter()
    plan = datasets.plan(spec["dataset"])
    plan_s = time.perf_counter() - t0
    if plan.total == 0:
        raise AuditError(f"dataset {spec['dataset']['path']} has no images")
    found = reconcile(out, plan, spec["dataset"], job_id, mode)
    committed = found.entries
    todo = [s for s in plan.shards if s.id not in committed]
    # join the cluster before writing anything: one we cannot join leaves no output behind
    started_ray = ray_init(address) if todo else False
    try:
        io.prepare_output(out, bool(mode))
        drop(out, found)
    except BaseException:
        if started_ray:
            import ray

            ray.shutdown()
        raise
    for line in notes(found):
        print(line, file=sys.stderr)
    done_images = found.images

    record = {
        "job_id": job_id,
        "name": spec["name"],
        "status": "running",
        "spec": spec,
        "model": {"path": spec["model"].get("path"), "application": spec["model"].get("application"),
                  "sha256": sha},
        "classes": plan.classes,
        "dataset": {"images": plan.total, "shards": len(plan.shards)},
        "versions": versions(),
        "timings": {"started": t_start, "plan_s": round(plan_s, 3)},
        "runs": (previous or {}).get("runs", []),
    }
    if previous:
        for k in ("layers", "layer_shapes", "input_size"):
            if k in previous:
                record[k] = previous[k]
        record["timings"]["first_started"] = (previous.get("timings") or {}).get(
            "first_started", (previous.get("timings") or {}).get("started"))
    io.atomic_write_json(out / io.JOB_JSON, record)

    state = {"images": 0, "errors": 0, "flat": 0, "rows": 0, "correct": 0, "labelled": 0,
             "retries": 0, "actors_started": 0, "actor_deaths": 0, "failed": {}, "actor_facts": []}
    status = "ok"
    bar = None
    actors: dict = {}
    run_t0 = time.perf_counter()
    setup_s = None
    try:
        if todo:
            import ray

            res = plan_resources(spec, ray.cluster_resources(), ray.nodes(), len(todo))
            record["resources"] = res
            bar = _Progress(plan.total, done_images, found.errors, progress, spec["name"])
            setup_s = _drive(spec, job_id, plan.classes, todo, res, state, actors, bar, on_event, record)
        status = "incomplete" if state["failed"] else "ok"
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    except BaseException:
        status = "failed"
        raise
    finally:
        _kill_all(actors)
        if bar is not None:
            bar.close()
        run_s = time.perf_counter() - run_t0
        known = {s.id for s in plan.shards}
        all_done = {k: v for k, v in io.committed_shards(out, rows=False).items() if k in known}
        record["status"] = status
        record["timings"].update({"run_s": round(run_s, 3), "total_s": round(time.time() - t_start, 3),
                                  "first_actor_ready_s": setup_s, "finished": time.time()})
        record["runs"] = record["runs"] + [{"started": t_start, "status": status, "shards": len(todo),
                                            "images": state["images"], "seconds": round(run_s, 3),
                                            "actors": state["actor_facts"]}]
        record["shards"] = {"total": len(plan.shards), "committed": len(all_done),
                            "failed": sorted(state["failed"])}
        record["failed_shards"] = {str(k): v for k, v in state["failed"].items()}
        summary = _summary(spec, job_id, plan, all_done, committed, state, run_s, status, out)
        record["summary"] = summary
        try:
            io.atomic_write_json(out / io.JOB_JSON, record)
        finally:
            if started_ray:
                import ray

                ray.shutdown()
    return summary


#: What each actor reports on start-up, kept per run in job.json (``runs[-1].actors``).
ACTOR_FACTS = ("pid", "node", "gpus", "visible_devices", "memory_growth", "threads", "mixed_precision", "setup_s")


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


def _summary(spec, job_id, plan, all_done, skipped, state, run_s, status, out) -> dict:
    tot = collections.Counter()
    for e in all_done.values():
        for k in ("errors", "flat", "correct", "labelled", "rows"):
            tot[k] += int(e.get(k, 0))
    images_done = sum(int(e["inputs"]["stop"]) - int(e["inputs"]["start"]) for e in all_done.values())
    return {
        "job_id": job_id,
        "name": spec["name"],
        "output": str(out),
        "status": status,
        "images": plan.total,
        "images_done": images_done,
        "images_this_run": state["images"],
        "errors": tot["errors"],
        "flat_maps": tot["flat"],
        "rows": tot["rows"],
        "accuracy": (tot["correct"] / tot["labelled"]) if tot["labelled"] else None,
        "shards": len(plan.shards),
        "shards_skipped": len(skipped),
        "shards_failed": sorted(state["failed"]),
        "retries": state["retries"],
        "actors": state["actors_started"],
        "devices": describe_devices(state["actor_facts"]),
        "actor_deaths": state["actor_deaths"],
        "seconds": round(run_s, 2),
        "images_per_s": round(state["images"] / run_s, 2) if run_s > 0 and state["images"] else None,
        "classes": plan.classes,
    }


SWITCH_INTERVAL_S = 0.001  # GIL hand-over in actors (Python's default: 5 ms)
PROGRESS_POLL_S = 1.0  # the progress bar counts images inside shards at least this often
KILL_WAIT_S = 10.0  # how long the driver waits for killed actors to be gone


def _kill_all(actors):
    """Fence every busy actor, then kill them all.

    ``ray.kill`` fails the calls in flight at once, but the actor's process may
    live on a moment and could still commit a shard after :func:`run_job`
    returned (an interrupted job must not change its output behind a
    ``--resume`` that has already planned).  A fenced actor commits nothing
    more, and its ``fence`` call returns only once no commit is in progress.
    It runs in the actors' control group, so it is answered while both shard
    slots are busy.  Waits are bounded by ``KILL_WAIT_S``.
    """
    if not actors:
        return
    import ray

    inflight = [ref for a in actors.values() for ref in a["inflight"]]
    fences = [a["handle"].fence.remote() for a in actors.values() if a["ready"] and a["inflight"]]
    if fences:
        with contextlib.suppress(Exception):
            ray.wait(fences, num_returns=len(fences), timeout=KILL_WAIT_S)
    for a in list(actors.values()):
        with contextlib.suppress(Exception):
            ray.kill(a["handle"], no_restart=True)
    if inflight:
        with contextlib.suppress(Exception):
            ray.wait(inflight, num_returns=len(inflight), timeout=KILL_WAIT_S)
    actors.clear()


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


def _poll_progress(actors, polls, live):
    """Collect the answers to earlier progress polls; poll every busy actor not asked yet."""
    import ray

    if polls:
        done, _ = ray.wait(list(polls), num_returns=len(polls), timeout=0)
        for ref in done:
            key = polls.pop(ref)
            try:
                live[key] = ray.get(ref)
            except Exception:  # the actor died: its shards are requeued elsewhere
                live.pop(key, None)
    asked = set(polls.values())
    for key, a in actors.items():
        if a["ready"] and a["inflight"] and key not in asked:
            polls[a["handle"].progress.remote()] = key
    for key in [k for k in live if k not in actors]:
        del live[key]


def _drive(spec, job_id, classes, todo, res, state, actors, bar, on_event, record):
    """The scheduling loop. Returns seconds until the first actor was ready."""
    import ray
    from ray import exceptions as rex

    max_retries = int(spec["resources"]["max_retries"])
    n_actors = res["actors"]
    Worker = remote_worker()
    env = {"TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "3"),
           "OPENCV_IO_MAX_IMAGE_PIXELS": str(int(spec["dataset"]["max_pixels"]))}
    # max_concurrency: the queued shard starts reading/decoding while the running one computes,
    # and the running one writes while the queued one computes (see audit.runner.worker)
    opts = {"num_cpus": res["cpus_per_actor"], "num_gpus": res["gpus_per_actor"], "max_restarts": 0,
            "max_task_retries": 0, "max_concurrency": QUEUE_DEPTH, "runtime_env": {"env_vars": env}}
    if n_actors > 1:
        opts["scheduling_strategy"] = "SPREAD"
    pending = collections.deque(todo)
    attempts = collections.Counter()
    refs: dict = {}  # ref -> (kind, actor key, shard)
    budget = {"replacements": n_actors * max(1, max_retries) + 2}
    t0 = time.perf_counter()
    first_ready = None
    last_alive = time.perf_counter()
    polls: dict = {}  # progress ref -> actor key
    last_poll = 0.0
    live: dict = {}  # actor key -> {shard id: images done, not yet committed}

    def emit(kind, payload):
        if on_event is not None:
            on_event(kind, payload)

    def start_actor():
        key = uuid.uuid4().hex[:8]
        h = Worker.options(**opts).remote(spec, out_dir=spec["output"], job_id=job_id, classes=classes,
                                          cpus=res["cpus_per_actor"])
        actors[key] = {"handle": h, "ready": False, "inflight": {}, "info": None}
        refs[h.setup.remote()] = ("setup", key, None)
        state["actors_started"] += 1

    def retire(key, why):
        a = actors.pop(key, None)
        if a is None:
            return
        state["actor_deaths"] += 1
        for ref, shard in a["inflight"].items():
            refs.pop(ref, None)
            requeue(shard, why)
        with contextlib.suppress(Exception):
            ray.kill(a["handle"], no_restart=True)
        if (pending or any(x["inflight"] for x in actors.values())) and budget["replacements"] > 0:
            budget["replacements"] -= 1
            start_actor()

    def requeue(shard, why):
        attempts[shard.id] += 1
        if attempts[shard.id] > max_retries:
            state["failed"][shard.id] = why
            bar.write(f"shard {shard.id} failed after {attempts[shard.id]} attempts: {why}")
        else:
            state["retries"] += 1
            pending.appendleft(shard)

    for _ in range(n_actors):
        start_actor()

    while pending or any(a["inflight"] for a in actors.values()):
        # hand out work to ready actors: one shard each first, then a queued second one
        # when there is enough work left for the actors still idle or starting
        idle = sum(1 for a in actors.values() if not a["inflight"])
        for key, a in actors.items():
            while a["ready"] and pending and len(a["inflight"]) < QUEUE_DEPTH:
                if a["inflight"] and len(pending) <= idle:
                    break
                if not a["inflight"]:
                    idle -= 1
                shard = pending.popleft()
                ref = a["handle"].process_shard.remote(shard)
                a["inflight"][ref] = shard
                refs[ref] = ("shard", key, shard)
        if not refs:
            if not actors:
                raise AuditError("every actor died and the retry budget is spent; "
                                 "continue later with --resume")
            continue
        ready, _ = ray.wait(list(refs), num_returns=1, timeout=PROGRESS_POLL_S)
        if bar.enabled and time.perf_counter() - last_poll >= PROGRESS_POLL_S:  # a bar to feed
            last_poll = time.perf_counter()
            _poll_progress(actors, polls, live)
            inside = 0
            for key, done in live.items():  # images inside the shards each actor still holds
                held = {sh.id for sh in actors[key]["inflight"].values()}  # (live holds live actors only)
                inside += sum(n for sid, n in done.items() if sid in held)
            bar.show(inside)
            emit("progress", {"committed": bar.committed, "inside_shards": inside})
        if not ready:
            if any(a["ready"] for a in actors.values()):
                last_alive = time.perf_counter()
            elif time.perf_counter() - last_alive > STALL_TIMEOUT_S:
                raise AuditError(f"no actor could start for {STALL_TIMEOUT_S:.0f} s (needs "
                                 f"{res['cpus_per_actor']:g} CPU, {res['gpus_per_actor']:g} GPU each); "
                                 "continue later with --resume")
            continue
        for ref in ready:
            if ref not in refs:
                continue
            kind, key, shard = refs.pop(ref)
            a = actors.get(key)
            try:
                result = ray.get(ref)
            except rex.RayTaskError as e:
                cause = _cause(e)
                if isinstance(cause, AuditError):
                    raise AuditError(str(cause).splitlines()[0]) from None
                msg = f"{type(cause).__name__}: {str(cause).strip().splitlines()[-1] if str(cause).strip() else ''}"
                if kind == "setup":
                    raise AuditError(f"an actor could not load the model: {msg}") from None
                if a is not None:
                    a["inflight"].pop(ref, None)
                requeue(shard, msg)
                continue
            except (rex.RayActorError, rex.WorkerCrashedError, rex.ObjectLostError,
                    rex.OwnerDiedError, rex.NodeDiedError) as e:
                if a is not None:
                    a["inflight"].pop(ref, None)
                if shard is not None:
                    requeue(shard, f"actor died ({type(e).__name__})")
                retire(key, f"actor died ({type(e).__name__})")
                continue
            if kind == "setup":
                a["ready"], a["info"] = True, result
                last_alive = time.perf_counter()
                if first_ready is None:
                    first_ready = round(time.perf_counter() - t0, 3)
                    for k in ("layers", "layer_shapes", "input_size", "classes"):
                        record[k] = result.get(k)
                state["actor_facts"].append({k: result.get(k) for k in ACTOR_FACTS})
                emit("actor_ready", result)
                continue
            a["inflight"].pop(ref, None)
            for k in ("images", "errors", "flat", "rows", "correct", "labelled"):
                state[k] += int(result.get(k, 0))
            bar.update(result["images"], state["errors"])
            emit("shard_done", result)
    return first_ready
