"""A job with its dataset, model and output in Google Cloud Storage, against a local GCS emulator.

``gcp-storage-emulator`` (the ``test`` extra) runs on 127.0.0.1 and
``STORAGE_EMULATOR_HOST`` points pyarrow's GCS client at it
(:mod:`helpers_gcs`); Ray starts after it, so the actors inherit the
variable.
"""

from __future__ import annotations

import helpers_gcs
import helpers_jobs as h
import pytest

from audit.data import fs, io
from audit.runner.job import run_job

pytestmark = [pytest.mark.skipif(not helpers_gcs.available(), reason="gcp-storage-emulator is not installed"),
              pytest.mark.slow]  # an emulator, a local Ray and a job: left out of the quick loop


@pytest.fixture(scope="module")
def gcs():
    server = helpers_gcs.GcsServer("audits")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def ray_gcs(gcs):
    ray = h.ray_init_local(num_cpus=1)
    yield ray
    ray.shutdown()


def test_folder_job_in_a_gcs_bucket(gcs, ray_gcs, tmp_path):
    import audit

    h.make_model(tmp_path / "model.keras")
    h.make_folder(tmp_path / "data", 4, masks=False)
    gcs.upload(tmp_path / "data", "gs://audits/data")
    gcs.upload(tmp_path / "model.keras", "gs://audits/model.keras")
    out = "gs://audits/runs/one"
    spec = {"name": "gcs", "model": {"path": "gs://audits/model.keras", "preprocess": "scale_0_1"},
            "dataset": {"format": "folder", "path": "gs://audits/data", "shard_size": 4},
            "explain": {"methods": ["gradcam"], "layers": "auto"},
            "resources": {"actors": 1, "cpus_per_actor": 1, "batch_size": 4, "decode_threads": 2},
            "output": out}
    s = run_job(spec, progress=False, base_dir=tmp_path)
    assert s["status"] == "ok" and s["images_done"] == 8 and s["errors"] == 0
    df = h.assert_exactly_once(out, h.folder_ids(tmp_path / "data"), methods=("gradcam",))
    assert sorted(set(df.image_id)) == h.folder_ids(tmp_path / "data")
    entries = io.committed_shards(out)
    assert sorted(entries) == [0, 1] and all(e["file"].startswith(io.part_name(k) + "-") for k, e in entries.items())
    assert sorted(rel for rel, _ in fs.list_files(fs.join(out, io.RECORDS))) == sorted(e["file"] for e in entries.values())
    assert io.read_job(out)["status"] == "ok" and not fs.exists(fs.join(out, io.LOCK))
    local = audit.load(out, columns=["image_id", "pred"])
    assert len(local) == 8
