"""Two Ray nodes and no shared directory: the model, the dataset and the output only in a bucket.

A local S3-compatible server (moto, :mod:`helpers_s3`) and a Ray cluster of
a head (no CPUs: the driver only) and two 1-CPU worker nodes on this
machine (``ray.cluster_utils.Cluster``, as in tests/test_cluster.py).  The
files the bucket was filled from are deleted before the job starts, so no
node can read anything from a local path.  (The nodes are processes of this
machine: their workers share the test's working directory, which holds no
job file.)
"""

from __future__ import annotations

import shutil

import helpers_jobs as h
import helpers_s3
import pytest

from audit.data import fs, io
from audit.runner.job import run_job


@pytest.fixture(scope="module")
def s3():
    server = helpers_s3.S3Server()  # before the nodes start: they inherit the AWS_* variables
    yield server
    server.stop()


@pytest.fixture(scope="module")
def cluster(s3):
    import ray
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    nodes = [c.add_node(num_cpus=1), c.add_node(num_cpus=1)]
    ray.init(address=c.address, log_to_driver=False)
    c.wait_for_nodes()
    yield c, nodes
    ray.shutdown()
    c.shutdown()


def test_two_nodes_with_everything_in_a_bucket(s3, cluster, tmp_path):
    c, nodes = cluster
    src = tmp_path / "src"
    src.mkdir()
    h.make_model(src / "model.keras")
    h.make_folder(src / "data", 24, masks=True)
    s3.bucket("cluster-data")
    s3.bucket("cluster-results")
    s3.upload(src / "data", "s3://cluster-data/data")
    s3.upload(src / "data_masks", "s3://cluster-data/masks")
    s3.upload(src / "model.keras", "s3://cluster-data/model.keras")
    ids = h.folder_ids(src / "data")
    shutil.rmtree(src)  # nothing local is left for any node to read

    spec = {"name": "two-nodes", "model": {"path": "s3://cluster-data/model.keras", "preprocess": "scale_0_1"},
            "dataset": {"format": "folder", "path": "s3://cluster-data/data", "masks": "s3://cluster-data/masks",
                        "shard_size": 4},
            "explain": {"methods": ["gradcam", "gradcam++"], "layers": "auto"},
            "resources": {"actors": 2, "cpus_per_actor": 1, "batch_size": 4, "decode_threads": 2},
            "output": "s3://cluster-results/run"}
    facts = []
    s = run_job(spec, progress=False, base_dir=tmp_path, on_event=lambda k, p: facts.append(p)
                if k == "actor_ready" else None)
    assert s["status"] == "ok" and s["images_done"] == 48 and s["errors"] == 0
    worker_nodes = {n.node_id for n in nodes}
    used = {f["node"] for f in facts}
    # every actor ran on a worker node (the head has no CPU); two were started, one per node (1 CPU each,
    # spread); under load the first may finish every shard before the second is ready
    assert used and used <= worker_nodes and s["actors"] >= 2
    df = h.assert_exactly_once("s3://cluster-results/run", ids)
    assert df.image_id.nunique() == 48
    assert io.read_job("s3://cluster-results/run")["status"] == "ok"
    assert len(io.committed_shards("s3://cluster-results/run")) == s["shards"] == 12
    assert not fs.exists("s3://cluster-results/run/_lock.json")

