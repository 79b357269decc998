"""A worker node lost from a multi-node cluster costs a shard retry, not the job.

Uses ``ray.cluster_utils.Cluster``: a head with no CPUs (only the driver) and
two 1-CPU worker nodes on this machine; one node is removed mid-job.
"""

from __future__ import annotations

import json

import helpers_jobs as h
import pytest

from audit.data import io
from audit.runner.job import run_job

pytestmark = pytest.mark.slow  # a 3-node cluster and a job: left out of the quick loop


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    nodes = [c.add_node(num_cpus=1), c.add_node(num_cpus=1)]
    ray.init(address=c.address, log_to_driver=False)
    c.wait_for_nodes()
    yield c, nodes
    ray.shutdown()
    c.shutdown()


def test_node_lost_mid_job(cluster, tmp_path):
    c, nodes = cluster
    h.make_model(tmp_path / "model.keras")
    h.make_folder(tmp_path / "data", 40, masks=False)
    spec = h.write_spec(tmp_path / "job.yaml",
                        dataset={"format": "folder", "path": "data", "shard_size": 8},
                        resources={"actors": 2, "cpus_per_actor": 1, "batch_size": 8})
    by_node = {n.node_id: n for n in nodes}
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
            c.remove_node(node)

    s = run_job(spec, progress=False, on_event=track)
    assert removed, "the test did not get to remove a node"
    assert s["status"] == "ok" and s["images_done"] == 80 and s["errors"] == 0
    assert s["actor_deaths"] >= 1 and s["retries"] >= 1
    out = tmp_path / "out"
    assert len(io.committed_shards(out)) == s["shards"] == 10
    import audit

    df = audit.load(out, columns=["image_id", "method"])
    assert len(df) == 160 and not df.duplicated().any() and df.image_id.nunique() == 80
    assert json.loads((out / "job.json").read_text())["status"] == "ok"
