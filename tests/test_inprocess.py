"""Small local jobs run in the driver: no Ray, the same records, committed exactly once."""

from __future__ import annotations

import json
import sys

import pytest
from helpers_jobs import assert_exactly_once, folder_workspace

from audit.data.jobspec import JobSpec


@pytest.fixture()
def ws(tmp_path):
    return folder_workspace(tmp_path, 5, ["gradcam", "gradcam++"], {"actors": "auto", "batch_size": 4})


def test_small_job_runs_in_the_driver_exactly_once(ws, monkeypatch):
    from audit.runner.job import run_job

    monkeypatch.delenv("AUDIT_IN_PROCESS", raising=False)
    s = run_job(ws["spec"], progress=False, base_dir=ws["dir"])
    assert s["status"] == "ok" and s["images_done"] == 10 and s["shards"] == 4
    assert "in the driver" in s["devices"]
    assert s["startup_s"] > 0 and s["compute_s"] > 0 and s["images_per_s"] == pytest.approx(10 / s["compute_s"], 0.02)
    ray = sys.modules.get("ray")
    assert ray is None or not ray.is_initialized()  # no Ray was started
    assert_exactly_once(ws["dir"] / "out", ws["ids"])
    job = json.loads((ws["dir"] / "out" / "job.json").read_text())
    assert job["resources"]["in_process"] is True and job["layers"] == ["conv2"]
    assert job["timings"]["startup_s"] == s["startup_s"]
    entries = [json.loads(p.read_text()) for p in (ws["dir"] / "out" / "_manifest").glob("part-*.json")]
    assert len(entries) == 4 and {e["generation"] for e in entries} == {job["runs"][-1]["generation"]} != {0}
    # a resume finds everything committed: nothing to do, still no Ray
    s2 = run_job(ws["spec"], resume=True, progress=False, base_dir=ws["dir"])
    assert s2["images_this_run"] == 0 and s2["shards_skipped"] == 4


def test_when_a_job_runs_in_process(ws, monkeypatch):
    from audit.data.datasets import Shard
    from audit.runner.inprocess import MAX_IMAGES, runs_in_process

    spec = JobSpec.from_partial({"resources": {"actors": "auto"}})
    small, big = [Shard(0, "a", 0, 100)], [Shard(0, "a", 0, MAX_IMAGES + 1)]
    monkeypatch.delenv("AUDIT_IN_PROCESS", raising=False)
    assert runs_in_process(spec, None, small)
    assert not runs_in_process(spec, None, big)
    assert not runs_in_process(spec, "auto", small)  # a cluster: actors
    four = JobSpec.from_partial({"resources": {"actors": 4}})
    assert not runs_in_process(four, None, small)  # the user asked for actors
    monkeypatch.setenv("AUDIT_IN_PROCESS", "0")
    assert not runs_in_process(spec, None, small)
    monkeypatch.setenv("AUDIT_IN_PROCESS", "1")
    assert runs_in_process(spec, None, big)


def test_setup_mistake_leaves_no_output(ws):
    from audit import AuditError
    from audit.runner.job import run_job

    with pytest.raises(AuditError, match="target"):
        run_job(ws["spec"], overrides=["explain.target=7"], progress=False, base_dir=ws["dir"])
    assert not (ws["dir"] / "out").exists()


DEAD = "127.0.0.1:1"  # nothing listens on port 1


@pytest.mark.slow
def test_same_records_as_on_ray(ws, tmp_path, monkeypatch, capsys):
    """The records of a job run in the driver equal those of the same job on a private Ray, which
    ``audit run`` (through the CLI's ``main()`` here) starts without ``--address`` even when
    ``RAY_ADDRESS`` names a cluster, saying so in one line, and shuts down at the job's end."""
    import numpy as np
    import ray

    import audit
    from audit.cli import main
    from audit.runner.job import run_job

    monkeypatch.setenv("AUDIT_IN_PROCESS", "1")
    run_job(ws["spec"], progress=False, base_dir=ws["dir"])
    assert not ray.is_initialized()
    monkeypatch.setenv("AUDIT_IN_PROCESS", "0")  # a job this small would otherwise run in the driver
    monkeypatch.setenv("RAY_ADDRESS", DEAD)
    capsys.readouterr()
    code = main(["run", ws["spec"], "--no-progress", "--no-scan", "--set", f"output={tmp_path / 'ray'}",
                 "--set", "resources.actors=1"])
    r = capsys.readouterr()
    assert code == 0, r.err[-3000:]
    assert not ray.is_initialized()  # the job's private Ray, shut down at its end
    assert "10 of 10 audited" in r.out and "1 actor on CPU" in r.out  # on Ray, not in the driver
    said = [ln for ln in r.err.splitlines() if "RAY_ADDRESS" in ln]
    assert said == [f"audit: RAY_ADDRESS={DEAD} is ignored: without --address the job runs on a private "
                    f"local Ray (use --address {DEAD} to run there)"]
    cols = ["image_id", "layer", "method", "pred", "score", "cam", "energy_border", "status"]
    a = audit.load(ws["dir"] / "out", columns=cols).sort_values(["image_id", "method"]).reset_index(drop=True)
    b = audit.load(tmp_path / "ray", columns=cols).sort_values(["image_id", "method"]).reset_index(drop=True)
    assert list(a.image_id) == list(b.image_id) and list(a.pred) == list(b.pred)
    np.testing.assert_allclose(np.stack(a.cam), np.stack(b.cam), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(a.energy_border, b.energy_border, rtol=1e-4)


def test_lock_taken_over_mid_run_commits_nothing_more(ws):
    """The driver's commits are fenced by its lock, as an actor's: another driver's lock stops the run."""
    from audit import AuditError
    from audit.runner.job import run_job

    lock = ws["dir"] / "out" / "_lock.json"

    def steal(kind, payload):
        if kind == "shard_done":
            info = json.loads(lock.read_text())
            lock.write_text(json.dumps({**info, "token": "another-driver", "pid": 1}))

    with pytest.raises(AuditError, match="stopped"):
        run_job(ws["spec"], progress=False, base_dir=ws["dir"], on_event=steal)
    assert len(list((ws["dir"] / "out" / "_manifest").glob("part-*.json"))) == 1
