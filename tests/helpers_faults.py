"""Faults injected into a job's actors, for tests/test_faults.py and tests/test_storage.py.

:func:`worker_with` replaces ``audit.runner.scheduler.remote_worker``: the
job's actor class, whose process first runs ``setup(*args)`` (a file-size
limit, a kill in the upload path).  In-process jobs monkeypatch the
scheduler with it; :func:`driver` starts ``audit run`` in a subprocess whose
scheduler is patched the same way (:func:`_driver_main`), so the test can
SIGKILL that driver as a lost head node would be.

:func:`kill_in_upload` is the object-storage fault: the actor dies while
committing a shard, either halfway through the PUT of the shard's Parquet
object (the request is on the wire, its body half sent) or between that
object and the shard's manifest entry (the object is complete and no entry
names it: an orphan).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker_with(setup, *args):
    """A stand-in for ``scheduler.remote_worker``: actors that run ``setup(*args)`` before anything else.

    The scheduler's own actor class around a subclass of the worker, so the
    faulty actors are the job's actors in all else.
    """

    from audit.runner import scheduler

    # the scheduler's own, also when a stand-in replaces it already (the factory below replaces it next)
    remote_worker = getattr(scheduler.remote_worker, "original", scheduler.remote_worker)

    def factory():
        from ray import cloudpickle

        from audit.runner.worker import AuditWorker

        # the actors get setup's code itself: the test modules are not importable in Ray's workers
        cloudpickle.register_pickle_by_value(sys.modules[setup.__module__])

        class Faulty(AuditWorker):
            def __init__(self, *a, **kw):
                setup(*args)
                super().__init__(*a, **kw)

        return remote_worker(Faulty)

    factory.original = remote_worker
    return factory


# -- the object-storage fault ----------------------------------------------------------------------


def _first_time(marks: str, name: str, note: dict) -> bool:
    """True for the first process of any node of this machine to get here (a marker file, O_EXCL)."""
    try:
        fd = os.open(os.path.join(marks, name), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        json.dump(note, f)
    return True


def _half_put(uri: str, data: bytes) -> None:
    """Start a signed PUT of ``data`` to ``uri`` and send half its body (the process then dies)."""
    import http.client
    import urllib.parse

    import boto3

    bucket, _, key = uri[len("s3://"):].partition("/")
    url = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"], region_name="us-east-1") \
        .generate_presigned_url("put_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=600)
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    conn.putrequest("PUT", f"{u.path}?{u.query}", skip_accept_encoding=True)
    conn.putheader("Content-Length", str(len(data)))
    conn.endheaders()
    conn.send(data[: len(data) // 2])


def kill_in_upload(marks: str, mid_object: int, after_object: int, driver_pid: int) -> None:
    """Arm this actor process: it dies in the commit of shard ``mid_object`` and of ``after_object``.

    Once per shard on the machine (a marker file in ``marks`` records the
    object's key): shard ``mid_object``'s actor dies with its PUT half sent;
    shard ``after_object``'s actor writes the object whole, SIGKILLs the
    driver ``driver_pid`` (no end-of-job clean-up runs) and dies before the
    manifest entry.
    """
    from audit.data import fs

    write = fs.write_bytes

    def faulty_write(path, data):
        for shard, how in ((mid_object, "mid_object"), (after_object, "after_object")):
            if f"/records/part-{shard:05d}-" in path and _first_time(marks, how, {"key": path}):
                if how == "mid_object":
                    _half_put(path, data)
                else:
                    write(path, data)
                    os.kill(driver_pid, signal.SIGKILL)
                os._exit(1)
        write(path, data)

    fs.write_bytes = faulty_write


def slow_commits(seconds: float) -> None:
    """Each shard commit of this actor waits ``seconds`` first (a slow disk: a driver paused at
    random then lands mid-run, and often mid-commit)."""
    import time

    from audit.data import io

    write = io.write_shard

    def slow_write(*a, **kw):
        time.sleep(seconds)
        return write(*a, **kw)

    io.write_shard = slow_write


def _driver_main(argv) -> int:
    """``audit ARGS`` whose actors run ``kill_in_upload(marks, mid, after, <this pid>)``, or
    ``slow_commits(s)`` when the fault is ``{"slow_commits": s}``."""
    from audit.cli import main
    from audit.runner import scheduler

    fault, args = json.loads(argv[0]), argv[1:]
    if "slow_commits" in fault:
        scheduler.remote_worker = worker_with(slow_commits, fault["slow_commits"])
        slow_commits(fault["slow_commits"])  # a job run in the driver itself (audit.runner.inprocess)
    else:
        scheduler.remote_worker = worker_with(kill_in_upload, fault["marks"], fault["mid_object"],
                                              fault["after_object"], os.getpid())
    return main(args)


def driver(args, fault: dict | None = None, env_extra: dict | None = None) -> subprocess.Popen:
    """``audit ARGS`` in a subprocess with its private local Ray; with ``fault``, actors armed by
    :func:`kill_in_upload` (``fault``: its ``marks``, ``mid_object``, ``after_object``) or slowed by
    :func:`slow_commits` (``{"slow_commits": seconds}``); ``env_extra``: more environment variables."""
    from helpers_jobs import env_without_ray

    env = env_without_ray()
    if fault is not None and "marks" in fault:  # the kills are armed in actors: never a job run in the driver
        env["AUDIT_IN_PROCESS"] = "0"
    env.update(env_extra or {})
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests")])
    if fault is None:
        cmd = [sys.executable, "-m", "audit", *args]
    else:
        cmd = [sys.executable, "-c", "import sys, helpers_faults; sys.exit(helpers_faults._driver_main(sys.argv[1:]))",
               json.dumps(fault), *args]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
