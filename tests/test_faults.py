"""Fault injection: one test per fault; afterwards every (image, layer, method) is in the
output exactly once.

In-process faults run on one module-scoped local cluster (a head without CPUs
and two 1-CPU worker nodes, ``ray.cluster_utils.Cluster``): an actor SIGKILLed,
a worker node killed, a worker node removed (stopped the graceful way) mid-job,
a part file truncated, a manifest entry deleted, the disk full during a write
(RLIMIT_FSIZE in the actors).  The driver's own faults
(SIGINT, SIGKILL, two drivers racing) are in tests/test_faults_driver.py: their
resume runs in the test's process, which must not have joined this cluster.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal

import helpers_faults
import helpers_jobs as h
import pytest

from audit.data import io
from audit.errors import AuditError
from audit.runner.job import run_job

# every test here starts actors on a cluster or `audit run` drivers: the quick loop leaves them out
pytestmark = pytest.mark.slow

N_PER_CLASS = 24  # 2 classes, shards of 4: 12 shards
METHODS = ("gradcam",)


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return h.folder_workspace(tmp_path_factory.mktemp("faults"), N_PER_CLASS, METHODS,
                              {"actors": 2, "cpus_per_actor": 1, "batch_size": 4, "max_retries": 2})


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    for _ in range(2):
        c.add_node(num_cpus=1)
    ray.init(address=c.address, log_to_driver=False)
    c.wait_for_nodes()
    yield c
    ray.shutdown()
    c.shutdown()


def _exactly_once(ws, out):
    return h.assert_exactly_once(out, ws["ids"], methods=METHODS)


def _run(ws, out, *overrides, **kw):
    return run_job(ws["spec"], overrides=[f"output={out}", *overrides], progress=False, **kw)


def test_actor_sigkill(cluster, ws):
    out = ws["dir"] / "out_actor"
    killed = []

    def kill_first(kind, payload):
        if kind == "shard_done" and not killed:  # its next shard is queued on it: retried elsewhere
            killed.append(payload["pid"])
            os.kill(payload["pid"], signal.SIGKILL)

    s = _run(ws, out, on_event=kill_first)
    assert killed and s["status"] == "ok" and s["actor_deaths"] >= 1 and s["retries"] >= 1
    _exactly_once(ws, out)


def test_worker_node_killed(cluster, ws):
    out = ws["dir"] / "out_node"
    nodes = {n.node_id: n for n in cluster.worker_nodes}
    where, lost = {}, []

    def kill_node(kind, payload):
        if kind == "actor_ready":
            where[payload["pid"]] = payload["node"]
        elif kind == "shard_done" and not lost:
            node = nodes[where[payload["pid"]]]
            lost.append(node)
            cluster.remove_node(node, allow_graceful=False)  # its raylet and workers are SIGKILLed
            # ... but under load the actor can outlive the call long enough to finish the job alone;
            # the node is gone now, so is its worker
            with contextlib.suppress(ProcessLookupError):
                os.kill(payload["pid"], signal.SIGKILL)

    try:
        s = _run(ws, out, on_event=kill_node)
    finally:
        if lost:  # the next tests get two worker nodes again
            cluster.add_node(num_cpus=1)
            cluster.wait_for_nodes()
    assert lost and s["status"] == "ok" and s["actor_deaths"] >= 1
    _exactly_once(ws, out)


def test_node_lost_mid_job(cluster, tmp_path):
    """A worker node removed from the cluster (its processes stopped the graceful way) mid-job: the
    other node carries on; the lost node's shards cost a retry, not the job."""
    h.make_model(tmp_path / "model.keras")
    h.make_folder(tmp_path / "data", 40, masks=False)
    spec = h.write_spec(tmp_path / "job.yaml",
                        dataset={"format": "folder", "path": "data", "shard_size": 8},
                        resources={"actors": 2, "cpus_per_actor": 1, "batch_size": 8})
    by_node = {n.node_id: n for n in cluster.worker_nodes}
    pids, removed = {}, []

    def track(kind, payload):
        if kind == "actor_ready":
            pids[payload["pid"]] = payload["node"]
        elif kind == "shard_done" and not removed:
            # the actor that just finished has its next shard queued: lose its whole node.
            # (Not waiting for the second actor: under load the first may finish every
            # shard before the second is up.)  The other node carries on.
            node = by_node[pids[payload["pid"]]]
            removed.append(node.node_id)
            cluster.remove_node(node)

    try:
        s = run_job(spec, progress=False, on_event=track)
    finally:
        if removed:  # the next tests get two worker nodes again
            cluster.add_node(num_cpus=1)
            cluster.wait_for_nodes()
    assert removed, "the test did not get to remove a node"
    assert s["status"] == "ok" and s["images_done"] == 80 and s["errors"] == 0
    assert s["actor_deaths"] >= 1 and s["retries"] >= 1
    out = tmp_path / "out"
    assert len(io.committed_shards(out)) == s["shards"] == 10
    import audit

    df = audit.load(out, columns=["image_id", "method"])
    assert len(df) == 160 and not df.duplicated().any() and df.image_id.nunique() == 80
    assert json.loads((out / "job.json").read_text())["status"] == "ok"


@pytest.fixture(scope="module")
def finished(cluster, ws):
    """An output the job ran to the end in, once per module: the tests below damage copies of it."""
    out = ws["dir"] / "out_finished"
    assert _run(ws, out, "resources.actors=1")["status"] == "ok"  # the damage and resume are the tests
    return out


def test_part_file_truncated(cluster, ws, finished, capsys):
    out = h.copy_tree(finished, ws["dir"] / "out_trunc")
    part = out / "records" / "part-00004.parquet"
    with open(part, "r+b") as f:
        f.truncate(part.stat().st_size - 100)
    capsys.readouterr()
    s = _run(ws, out, resume=True)
    assert "shard 4 is redone: records/part-00004.parquet is" in capsys.readouterr().err
    assert s["status"] == "ok" and s["shards_skipped"] == 11 and s["images_this_run"] == 4
    _exactly_once(ws, out)


def test_manifest_entry_deleted(cluster, ws, finished):
    import audit

    out = h.copy_tree(finished, ws["dir"] / "out_entry")
    (out / "_manifest" / "part-00007.json").unlink()  # its part file stays, uncommitted
    df = audit.load(out, columns=["image_id"])
    assert len(df) == len(ws["ids"]) - 4  # load reads committed shards only
    s = _run(ws, out, resume=True)
    assert s["status"] == "ok" and s["shards_skipped"] == 11 and s["images_this_run"] == 4
    _exactly_once(ws, out)


def _limit_file_size(limit):
    """In the actor: no file larger than ``limit`` bytes may be written (a full disk)."""
    import ctypes
    import resource

    # SIGXFSZ ignored (through libc: any thread), so a write past the limit fails with EFBIG
    ctypes.CDLL(None).signal(int(signal.SIGXFSZ), ctypes.c_void_p(1))
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


def test_disk_full_during_write(cluster, ws, monkeypatch):
    from audit.runner import scheduler

    out = ws["dir"] / "out_full"
    monkeypatch.setattr(scheduler, "remote_worker", helpers_faults.worker_with(_limit_file_size, 2048))  # every part file is larger
    # one actor for both runs (a full disk is no matter of how many: each TensorFlow start fewer counts)
    with pytest.raises(AuditError) as e:  # retrying cannot help: the job stops in one line naming the file
        _run(ws, out, "resources.actors=1")
    line = str(e.value)
    assert "\n" not in line and line.startswith(f"cannot write {out / 'records'}/part-")
    assert line.endswith("File too large (disk full or over quota?)") and "records/part-" in line, line
    job = json.loads((out / "job.json").read_text())
    assert job["status"] == "failed" and job["error"] == line
    assert not io.committed_shards(out) and not list((out / "records").glob(".*"))  # no half file left
    with pytest.raises(AuditError, match="has no committed shards yet"):
        h.assert_exactly_once(out, ws["ids"], methods=METHODS)
    monkeypatch.undo()  # space again
    s = _run(ws, out, "resources.actors=1", resume=True)
    assert s["status"] == "ok" and s["images_this_run"] == len(ws["ids"])
    _exactly_once(ws, out)
