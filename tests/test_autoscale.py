"""Autoscaling clusters: actors asked for before their nodes exist, a pool that grows and shrinks.

One fake autoscaling Ray cluster per module (Ray's ``fake_multinode`` node
provider, :mod:`helpers_autoscale`): a head with no CPUs and worker nodes of
one type, ``{CPU: 1, GPU: 1}`` (a fake GPU: Ray counts it, TensorFlow sees
none), that the autoscaler launches for pending actors and terminates after a
few idle seconds.  Every job asks for ``gpus_per_actor: 1``: it can only run
on nodes the autoscaler adds.  Afterwards every (image, layer, method) is in
the output exactly once.
"""

from __future__ import annotations

import json
import time

import helpers_autoscale as ha
import helpers_jobs as h
import pytest

from audit.errors import AuditError
from audit.runner.job import run_job

pytestmark = pytest.mark.xdist_group("fake_autoscaling_cluster")

N_PER_CLASS = 16  # 2 classes, shards of 4: 8 shards
METHODS = ("gradcam",)
MAX_NODES = 3
IDLE_MINUTES = 0.1  # idle worker nodes go after ~6 s: each test starts from what the last one left, shrinking
NODE_WAIT_S = 240.0  # generous: a loaded 2-core machine starts a fake node's raylet slowly
GPU_ARGS = ["resources.gpus_per_actor=1", "resources.cpus_per_actor=1"]


@pytest.fixture(scope="module")
def fake():
    import ray

    c = ha.FakeAutoscalingCluster(ha.gpu_worker_type(max_workers=MAX_NODES), idle_timeout_minutes=IDLE_MINUTES)
    try:
        ray.init(address=c.start(), log_to_driver=False)
        yield c
    finally:
        ray.shutdown()
        c.stop()


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return h.folder_workspace(tmp_path_factory.mktemp("autoscale"), N_PER_CLASS, METHODS,
                              {"actors": 1, "batch_size": 4, "max_retries": 1, "start_timeout_s": NODE_WAIT_S})


def _run(ws, out, *overrides, **kw):
    return run_job(ws["spec"], overrides=[f"output={out}", *GPU_ARGS, *overrides], progress=False, **kw)


def _job(out) -> dict:
    return json.loads((out / "job.json").read_text())


def _worker_ids(fake) -> set:
    return {n["NodeID"] for n in fake.worker_nodes()}


def _grow_when_pending(fake, pools, n_pending, kind, payload):
    """Record pool events; once ``n_pending`` actors wait for nodes, let the autoscaler add them."""
    if kind == "pool":
        pools.append(payload)
        if payload["pending"] == n_pending:
            fake.set_max_workers("gpu_worker", MAX_NODES)


@pytest.mark.slow
def test_job_starts_with_zero_gpu_nodes_and_finishes_on_added_ones(fake, ws, capsys):
    fake.set_max_workers("gpu_worker", 0)  # until the job shows its actors pending: no race with a fast node
    fake.wait_for(lambda: not fake.worker_nodes(), NODE_WAIT_S, "the idle worker nodes to go")
    out, pools = ws["dir"] / "out_zero", []
    try:
        s = _run(ws, out, "resources.actors=2", on_event=lambda k, p: _grow_when_pending(fake, pools, 2, k, p))
    finally:
        fake.set_max_workers("gpu_worker", MAX_NODES)
    err = capsys.readouterr().err
    assert s["status"] == "ok" and s["images_done"] == len(ws["ids"])
    h.assert_exactly_once(out, ws["ids"], methods=METHODS)
    nodes = {a["node"] for a in _job(out)["runs"][-1]["actors"]}
    assert nodes and all(n.startswith("ffffffff") and not n.endswith("00000") for n in nodes)  # fake workers
    assert "audit: waiting for 2 GPU actors: 0 running, 2 pending" in err, err  # asked for before any GPU node
    # the cluster shrinks after: the job left nothing that holds a node
    fake.wait_for(lambda: not fake.worker_nodes(), NODE_WAIT_S, "the cluster to scale down after the job")


@pytest.mark.slow
def test_pool_grows_as_nodes_join(fake, ws, monkeypatch):
    """One node first; more join once 2 actors are seen pending: each late actor gets work from the queue."""
    from audit.runner.scheduler import Scheduler

    fake.set_max_workers("gpu_worker", 1)
    hand_out = Scheduler.hand_out

    def held_for_three(self):  # after the first commit, the queue waits for all 3 actors (no timing race)
        if self.state.images and self.pool.running() < 3:
            return
        hand_out(self)

    monkeypatch.setattr(Scheduler, "hand_out", held_for_three)
    pools, by_pid = [], {}

    def watch(kind, payload):
        _grow_when_pending(fake, pools, 2, kind, payload)
        if kind == "shard_done":
            by_pid[payload["pid"]] = by_pid.get(payload["pid"], 0) + 1

    out = ws["dir"] / "out_grow"
    try:
        s = _run(ws, out, "resources.actors={min: 1, max: 3}", on_event=watch)
    finally:
        fake.set_max_workers("gpu_worker", MAX_NODES)
    assert s["status"] == "ok"
    h.assert_exactly_once(out, ws["ids"], methods=METHODS)
    assert any(p["pending"] == 2 for p in pools), pools  # 2 waited for nodes that did not exist yet
    assert len(by_pid) == 3 and all(n >= 1 for n in by_pid.values()), by_pid  # every actor got work
    run = _job(out)["runs"][-1]
    assert len({a["node"] for a in run["actors"]}) == 3 and run["pool"]["peak_running"] == 3


@pytest.mark.slow
def test_pending_actors_that_never_start_do_not_block(fake, ws):
    """The cluster may add 1 node only: 2 of 3 actors never start; the job runs on 1 and releases the 2."""
    fake.set_max_workers("gpu_worker", 1)
    fake.wait_for(lambda: len(fake.worker_nodes()) <= 1, NODE_WAIT_S, "at most 1 worker node")
    out = ws["dir"] / "out_capped"
    try:
        s = _run(ws, out, "resources.actors={min: 1, max: 3}")
    finally:
        fake.set_max_workers("gpu_worker", MAX_NODES)
    assert s["status"] == "ok"
    h.assert_exactly_once(out, ws["ids"], methods=METHODS)
    pool = _job(out)["runs"][-1]["pool"]
    assert pool == {"requested": 3, "peak_running": 1, "preempted": 0, "released": 2}, pool


@pytest.mark.slow
def test_preempted_node_mid_job(fake, ws):
    """A node drained as preempted, then killed: its shards go back (no attempt counted), the job ends ok."""
    import ray

    where, lost = {}, []

    def preempt_first(kind, payload):
        if kind == "actor_ready":
            where[payload["pid"]] = payload["node"]
        elif kind == "shard_done" and not lost:  # its next shard is in flight on it
            lost.append(where[payload["pid"]])
            fake.preempt(where[payload["pid"]], payload["pid"])

    out = ws["dir"] / "out_preempt"
    s = _run(ws, out, "resources.actors=2", "resources.max_retries=0", on_event=preempt_first)
    assert lost and s["status"] == "ok" and s["shards_failed"] == [] and s["actor_deaths"] >= 1
    h.assert_exactly_once(out, ws["ids"], methods=METHODS)
    run = _job(out)["runs"][-1]
    assert run["pool"]["preempted"] >= 1  # with max_retries 0, a counted attempt would have failed the shard
    fake.wait_for(lambda: lost[0] not in {n["NodeID"] for n in ray.nodes() if n["Alive"]}, NODE_WAIT_S,
                  "the preempted node to be gone")


@pytest.mark.slow
def test_resource_that_never_appears_ends_in_one_line(fake, ws):
    out = ws["dir"] / "out_never"
    t0 = time.monotonic()
    with pytest.raises(AuditError) as e:
        _run(ws, out, "resources.custom={tpu_v9: 1}", "resources.start_timeout_s=5")
    took = time.monotonic() - t0
    line = str(e.value)
    assert "\n" not in line and line.startswith("tpu_v9")
    assert "never appeared: no node with 1 GPU + tpu_v9: 1 + 1 CPU joined" in line
    assert "resources.start_timeout_s = 5 s" in line and "continue later with --resume" in line
    assert 5 <= took < 5 + 120  # it waited the limit, and not much more
    job = _job(out)
    assert job["status"] == "failed" and job["error"] == line and job["runs"][-1]["error"] == line
    s = _run(ws, out, "resources.custom={}", resume=True)  # the cluster it can run on: --resume finishes
    assert s["status"] == "ok" and s["images_this_run"] == len(ws["ids"])
    h.assert_exactly_once(out, ws["ids"], methods=METHODS)


def test_pool_line_in_the_progress_bar(capsys):
    from audit.runner.progress import Progress

    bar = Progress(10, 0, 0, True, "job")
    bar.pool("waiting for 4 GPU actors: 1 running, 3 pending", waiting=True)
    assert bar.bar.desc.startswith("job (waiting for 4 GPU actors: 1 running, 3 pending)")
    bar.pool("4 GPU actors on nodes: 4 running, none pending", waiting=False)
    assert bar.bar.desc.rstrip(": ") == "job"
    bar.close()
    err = capsys.readouterr().err
    assert "audit: waiting for 4 GPU actors: 1 running, 3 pending" in err
    assert "audit: 4 GPU actors on nodes: 4 running, none pending" in err
