"""A dead --address is one line within seconds.

The dead addresses run ``audit run`` in a subprocess, as a user would (the
one line on the real stderr, nothing written).  That a job without
``--address`` runs on a private Ray even when ``RAY_ADDRESS`` names a cluster
(one line says so; the Ray is shut down at the job's end) is checked by the
Ray run of tests/test_inprocess.py::test_same_records_as_on_ray, through the
CLI's ``main()``: one private Ray and actor start for both.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import helpers_jobs as h
import pytest

from audit.errors import AuditError
from audit.runner.cluster import check_reachable

DEAD = "127.0.0.1:1"  # nothing listens on port 1


@pytest.fixture(scope="module")
def small_job(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("private")
    h.make_model(tmp / "model.keras")
    h.make_folder(tmp / "data", 4, masks=False)
    spec = h.write_spec(tmp / "job.yaml", dataset={"format": "folder", "path": "data", "shard_size": 4},
                        resources={"actors": 1, "cpus_per_actor": 1, "batch_size": 4})
    return tmp, spec


def _audit(*args, **env):
    base = h.env_without_ray()
    base["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1]), base.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "audit", *args], env={**base, **env},
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("address, env, words", [
    (DEAD, {}, f"cannot connect to the Ray cluster at {DEAD}"),
    ("auto", {"RAY_ADDRESS": DEAD}, f"cannot connect to the Ray cluster at {DEAD} (from auto)"),
    ("ray://127.0.0.1:1", {}, "cannot connect to the Ray cluster at ray://127.0.0.1:1"),
])
def test_dead_address_is_one_line(small_job, address, env, words):
    tmp, spec = small_job
    out = tmp / "out_dead"
    r = _audit("run", spec, "--no-progress", "--address", address, "--set", f"output={out}", **env)
    assert r.returncode == 2, r.stderr[-3000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("audit: error: ") and words in lines[0], r.stderr[-3000:]
    assert not out.exists()  # nothing written for a job that could not start


def test_check_reachable_cases(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    check_reachable(None)  # no address: nothing to check
    check_reachable("local")
    with pytest.raises(AuditError, match="expected 'auto', HOST:PORT"):
        check_reachable("nonsense")
    with pytest.raises(AuditError, match=f"cannot connect to the Ray cluster at {DEAD}:"):
        check_reachable(DEAD)
    import socket

    with socket.socket() as srv:  # something listening: accepted
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        check_reachable(f"127.0.0.1:{srv.getsockname()[1]}")
        check_reachable(f"ray://127.0.0.1:{srv.getsockname()[1]}")
