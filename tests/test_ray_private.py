"""The embedded Ray is private; a dead --address is one line within seconds.

The dead addresses run ``audit run`` in a subprocess, as a user would (the
one line on the real stderr, nothing written).  The private Ray runs ``audit
run`` through the CLI's ``main()`` here: no Ray is running in this process
when a test starts (the module-scoped Rays of other modules end with their
module), and ``RAY_ADDRESS`` is read from this process's environment when the
job starts its Ray, so the same code decides, and a fresh process would prove
nothing more; it saves a TensorFlow start.
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


@pytest.mark.slow
def test_run_without_address_ignores_ray_address(small_job, monkeypatch, capsys):
    import ray

    from audit.cli import main

    tmp, spec = small_job
    out = tmp / "out_env"
    assert not ray.is_initialized()
    monkeypatch.setenv("RAY_ADDRESS", DEAD)
    monkeypatch.setenv("AUDIT_IN_PROCESS", "0")  # a job this small would otherwise run in the driver, without Ray
    code = main(["run", spec, "--no-progress", "--no-scan", "--set", f"output={out}"])
    r = capsys.readouterr()
    assert code == 0, r.err[-3000:]
    assert not ray.is_initialized()  # the job's private Ray, shut down at its end
    assert "8 of 8 audited" in r.out and "actor on CPU" in r.out  # on Ray, not in the driver
    said = [ln for ln in r.err.splitlines() if "RAY_ADDRESS" in ln]
    assert said == [f"audit: RAY_ADDRESS={DEAD} is ignored: without --address the job runs on a private "
                    f"local Ray (use --address {DEAD} to run there)"]
    assert len(list((out / "records").glob("part-*.parquet"))) == 2


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
