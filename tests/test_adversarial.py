"""A driver that wakes up late never overwrites: SIGSTOP, takeover, SIGCONT (issue 22.1).

Driver A (`audit run` in a subprocess, its own local Ray) is stopped with
SIGSTOP after a random number of commits and a random pause; its lock is aged
as if 130 s had passed; driver B takes the output over (``--resume``, or an
image added and ``--resume=replan``) and finishes; A is continued.  A must
stop in one line and commit nothing; every current input is in the output
exactly once; ``job.json`` holds both runs.  For a local disk and for S3 (moto).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import helpers_jobs as h
import helpers_s3
import pytest

from audit.data import fs, io
from audit.data import lock as lk

pytestmark = pytest.mark.slow

METHODS = ("gradcam",)
N_PER_CLASS = 20  # 2 classes, shards of 4: 10 shards


@pytest.fixture(scope="module")
def s3():
    server = helpers_s3.S3Server()
    server.bucket("fence")
    yield server
    server.stop()


def _driver(spec, out, *extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["PYTHONPATH"] = str(Path(__file__).parents[1])
    return subprocess.Popen([sys.executable, "-m", "audit", "run", spec, "--no-progress", "--no-scan",
                             "--set", f"output={out}", "--set", "resources.actors=1", *extra],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _entries(out) -> int:
    return len(io.manifest_entries(out)) if (fs.is_uri(out) or Path(out).is_dir()) else 0


def _wait_for_commits(out, n, proc, timeout=300):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if _entries(out) >= n:
            return
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    raise AssertionError("no commits")


def _age_lock(out, seconds):
    """What 130 s of SIGSTOP look like to another driver: the heartbeat (only) grows old."""
    path = fs.join(out, lk.LOCK) if fs.is_uri(out) else str(Path(out) / lk.LOCK)
    d = json.loads(fs.read_bytes(path))
    d["heartbeat"] -= seconds
    if fs.is_uri(out):
        fs.write_bytes(path, json.dumps(d).encode())
    else:
        Path(path).write_text(json.dumps(d))


@pytest.mark.parametrize("store,mode", [("local", "replan"), ("local", "resume"), ("s3", "replan")])
def test_a_paused_driver_never_overwrites_the_one_that_took_over(tmp_path, request, store, mode):
    rng = random.Random(f"{store}-{mode}")
    ws = h.folder_workspace(tmp_path, N_PER_CLASS, METHODS, {"actors": 1, "batch_size": 4, "max_retries": 1})
    out = str(tmp_path / "out")
    if store == "s3":
        request.getfixturevalue("s3")
        out = f"s3://fence/{store}-{mode}"
    a = _driver(ws["spec"], out)
    try:
        _wait_for_commits(out, rng.randint(1, 3), a)
        time.sleep(rng.uniform(0, 1.0))  # a random point: mid-shard, mid-commit, between shards
        os.kill(a.pid, signal.SIGSTOP)
        ids = list(ws["ids"])
        if mode == "replan":  # an image added while A sleeps: only B's plan has it
            h.write_png(tmp_path / "data" / "cat" / "img_000b.png", h.image(77, 0)[0])
            ids = h.folder_ids(tmp_path / "data")
        _age_lock(out, 130)
        b = _driver(ws["spec"], out, f"--resume={mode}" if mode == "replan" else "--resume")
        b_out, b_err = b.communicate(timeout=600)
        assert b.returncode == 0, b_err[-3000:]
        assert "took over the stale lock" in b_err
    finally:
        os.kill(a.pid, signal.SIGCONT)
    a_out, a_err = a.communicate(timeout=300)
    lines = a_err.strip().splitlines()
    assert a.returncode == 2 and lines[-1].startswith("audit: error: stopped: "), a_err[-3000:]
    assert "commits nothing more" in lines[-1]
    h.assert_exactly_once(out, ids, methods=METHODS)
    job = json.loads(fs.read_bytes(io.job_path(out)) if fs.is_uri(out) else Path(io.job_path(out)).read_text())
    runs = [(r["generation"], r["status"]) for r in job["runs"]]
    assert runs == [(1, "abandoned"), (2, "ok")], runs
    assert job["generation"] == 2 and job["status"] == "ok"
    assert lk.read_lock(out) is None  # B released it; A did not write it back
    assert {e.get("generation") for e in io.manifest_entries(out).values()} <= {1, 2}
