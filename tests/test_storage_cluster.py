"""Two Ray nodes and no shared directory: the model, the dataset and the output only in a bucket.

A local S3-compatible server (moto, :mod:`helpers_s3`) and a Ray cluster of
a head (no CPUs: the driver only) and two 1-CPU worker nodes on this
machine (``ray.cluster_utils.Cluster``, as in tests/test_faults.py).  Each
node has a Ray temp directory of its own (sessions, logs, spilled objects)
and its own empty working directory, which its actors inherit; the files the
bucket was filled from are deleted before the job starts, so no node can
read anything from a local path.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import tempfile

import helpers_jobs as h
import helpers_s3
import pytest

from audit.data import fs, io
from audit.runner.job import run_job

pytestmark = pytest.mark.slow  # a 3-node cluster, a job and an S3 server: left out of the quick loop


@pytest.fixture(scope="module")
def s3():
    server = helpers_s3.S3Server()  # before the nodes start: they inherit the AWS_* variables
    yield server
    server.stop()


@contextlib.contextmanager
def _cwd(path):
    back = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(back)


@pytest.fixture(scope="module")
def cluster(s3):
    """(cluster, {node id: (its temp dir, its working directory)}) for the two worker nodes."""
    import ray
    from ray.cluster_utils import Cluster

    # short paths under /tmp: Ray's Unix sockets live in the temp dirs (108-byte limit)
    dirs = [tempfile.mkdtemp(prefix="ray-node", dir="/tmp") for _ in range(3)]
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False,
                                                      "temp_dir": dirs[0]})
    nodes = {}
    for d in dirs[1:]:
        os.makedirs(f"{d}/cwd")
        with _cwd(f"{d}/cwd"):  # the raylet starts here; its workers inherit the directory
            node = c.add_node(num_cpus=1, temp_dir=f"{d}/ray")
        nodes[node.node_id] = (f"{d}/ray", f"{d}/cwd")
    ray.init(address=c.address, log_to_driver=False)
    c.wait_for_nodes()
    yield c, nodes
    ray.shutdown()
    c.shutdown()
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)


def test_two_nodes_with_everything_in_a_bucket(s3, cluster, tmp_path):
    _, nodes = cluster
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

    def on_event(kind, payload):
        if kind == "actor_ready":  # the actor is alive now: where does its process stand?
            facts.append({**payload, "cwd": os.readlink(f"/proc/{payload['pid']}/cwd")})

    s = run_job(spec, progress=False, base_dir=tmp_path, on_event=on_event)
    assert s["status"] == "ok" and s["images_done"] == 48 and s["errors"] == 0
    # every actor ran on a worker node (the head has no CPU); two were started, one per node (1 CPU each,
    # spread); under load the first may finish every shard before the second is ready
    assert facts and {f["node"] for f in facts} <= set(nodes) and s["actors"] >= 2
    for f in facts:  # in its node's own working directory, logging into its node's own temp dir
        temp, cwd = nodes[f["node"]]
        assert f["cwd"] == cwd and os.listdir(cwd) == []
        assert glob.glob(f"{temp}/session_*/logs/worker-*-{f['pid']}.out"), f
    df = h.assert_exactly_once("s3://cluster-results/run", ids)
    assert df.image_id.nunique() == 48
    assert io.read_job("s3://cluster-results/run")["status"] == "ok"
    assert len(io.committed_shards("s3://cluster-results/run")) == s["shards"] == 12
    assert not fs.exists("s3://cluster-results/run/_lock.json")

