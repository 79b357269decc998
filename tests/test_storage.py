"""Datasets, models and results in object storage, against a real S3-compatible server.

The module starts moto's standalone server (``moto[server]``) on 127.0.0.1
(:mod:`helpers_s3`) and stops it at the end; requests are signed and checked,
so a wrong credential is refused as AWS would refuse it.
"""

from __future__ import annotations

import os

import helpers_jobs as h
import helpers_s3
import numpy as np
import pytest

from audit.data import datasets, fs
from audit.data.jobspec import DatasetSpec, JobSpec
from audit.errors import AuditError


@pytest.fixture(scope="module")
def s3():
    server = helpers_s3.S3Server()
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def _good_credentials(s3):
    s3.set_env()
    yield
    s3.set_env()


@pytest.fixture(scope="module")
def data(s3, tmp_path_factory):
    """Folder, manifest and Parquet datasets and a model, locally and copied into bucket ``data``."""
    tmp = tmp_path_factory.mktemp("s3data")
    folder, masks = h.make_folder(tmp / "folder", 6)
    manifest = h.make_manifest(tmp / "manifest", 10, masks=True)
    parquet = h.make_parquet(tmp / "parquet", 12, files=2)
    (tmp / "tfrecord").mkdir()
    h.make_tfrecord(tmp / "tfrecord" / "a.tfrecord", 10, keys=True)
    tfrecord = str(tmp / "tfrecord")
    model = h.make_model(tmp / "model.keras")
    s3.bucket("data")
    remote = {"folder": s3.upload(folder, "s3://data/folder"),
              "masks": s3.upload(masks, "s3://data/folder_masks"),
              "manifest": s3.upload(tmp / "manifest", "s3://data/manifest") + "/manifest.csv",
              "parquet": s3.upload(parquet, "s3://data/parquet"),
              "tfrecord": s3.upload(tfrecord, "s3://data/tfrecord"),
              "model": s3.upload(model, "s3://data/models/model.keras")}
    local = {"folder": folder, "masks": masks, "manifest": manifest, "parquet": parquet, "tfrecord": tfrecord,
             "model": model}
    return {"dir": tmp, "local": local, "remote": remote}


def _dataset(fmt, where, shard_size=4):
    ds = {"format": fmt, "path": where[fmt], "shard_size": shard_size, "max_pixels": 10**8}
    if fmt == "folder":
        ds["masks"] = where["masks"]
    return DatasetSpec.from_partial(ds)


def _items(ds):
    p = datasets.plan(ds)
    return p, [it for s in p.shards for it in datasets.read_shard(ds, s, p.classes)]


@pytest.mark.parametrize("fmt", ["folder", "manifest", "parquet", "tfrecord"])
def test_dataset_in_a_bucket_reads_as_the_local_copy(data, fmt):
    """Same shards, ids, labels, masks and decoded pixels from the bucket as from the local folder."""
    lp, local = _items(_dataset(fmt, data["local"]))
    rp, remote = _items(_dataset(fmt, data["remote"]))
    assert rp.total == lp.total > 0 and rp.classes == lp.classes
    assert [(s.id, s.start, s.stop) for s in rp.shards] == [(s.id, s.start, s.stop) for s in lp.shards]
    assert [(i.image_id, i.label, i.has_mask) for i in remote] == [(i.image_id, i.label, i.has_mask) for i in local]
    assert all(i.has_mask for i in remote)
    if fmt in ("folder", "manifest"):  # the bytes come from objects
        assert all((i.file or "").startswith("s3://data/") for i in remote)
    for a, b in zip(local, remote):
        img_a, mask_a, wh_a = datasets.load_item(a, (16, 16), 10**8)
        img_b, mask_b, wh_b = datasets.load_item(b, (16, 16), 10**8)
        np.testing.assert_array_equal(img_a, img_b)
        np.testing.assert_array_equal(mask_a, mask_b)
        assert wh_a == wh_b and b.mask_error is None


def test_missing_object_is_an_error_row_reason(s3, data):
    """An image named by a manifest but absent from the bucket: a DecodeError naming it (its error row)."""
    from audit.data.decode import DecodeError

    item = datasets.Item(image_id="x", path="s3://data/folder/cat/nope.png", file="s3://data/folder/cat/nope.png")
    with pytest.raises(DecodeError, match="not found: s3://data/folder/cat/nope.png"):
        datasets.load_item(item, (16, 16), 10**8)
    big = datasets.Item(image_id="y", path="p", file=data["remote"]["folder"] + "/cat/img_000.png")
    with pytest.raises(DecodeError, match="larger than dataset.max_image_bytes=10 bytes"):
        datasets.load_item(big, (16, 16), 10**8, max_bytes=10)


def test_wrong_credential_is_one_line_naming_bucket_and_variable(s3, data):
    s3.set_env(secret="not-the-secret")
    with pytest.raises(AuditError) as e:
        datasets.plan(_dataset("folder", data["remote"]))
    msg = str(e.value)
    assert "\n" not in msg and "s3://data" in msg and "AWS_SECRET_ACCESS_KEY" in msg and "refused" in msg
    s3.set_env(key="AKIANOSUCHKEY0000000")
    with pytest.raises(AuditError, match="access to bucket s3://data .*refused.*AWS_ACCESS_KEY_ID"):
        fs.read_bytes(data["remote"]["model"])


def test_missing_bucket_is_one_line(s3):
    with pytest.raises(AuditError) as e:
        datasets.plan(DatasetSpec.from_partial({"format": "folder", "path": "s3://no-such-bucket/data", "shard_size": 4}))
    msg = str(e.value)
    assert "\n" not in msg and "bucket s3://no-such-bucket does not exist" in msg
    with pytest.raises(AuditError, match="bucket s3://no-such-bucket does not exist"):
        fs.write_bytes("s3://no-such-bucket/x.json", b"{}")
    with pytest.raises(AuditError, match="dataset.path: not found: s3://data/nothing-here"):
        datasets.plan(DatasetSpec.from_partial({"format": "folder", "path": "s3://data/nothing-here", "shard_size": 4}))


def test_one_filesystem_per_bucket(s3, data):
    a, _ = fs.resolve("s3://data/a.png")
    b, _ = fs.resolve("s3://data/b/c.png")
    assert a is b
    s3.set_env(secret="other")  # new credentials: a new client
    c, _ = fs.resolve("s3://data/a.png")
    assert c is not a


def test_uri_joins():
    assert fs.join("s3://b/x/m.csv/..", "img/../a.png") == "s3://b/x/a.png"
    assert fs.dirname("gs://b/x/m.csv") == "gs://b/x"
    assert fs.relpath("s3://b/root/cat/a.png", "s3://b/root") == "cat/a.png"
    assert fs.is_uri("abfs://c/x") and fs.is_uri("S3://b/x") and not fs.is_uri("/tmp/s3://x")
    assert not fs.is_uri("C:/data") and fs.join("/a", "b") == os.path.join("/a", "b")


def test_model_file_in_a_bucket(data):
    """The worker loads model.path from the bucket (one download per object version); same weights."""
    import keras

    from audit.engine.models import fingerprint

    local_copy = fs.local_copy(data["remote"]["model"])
    assert local_copy.endswith(".keras") and fs.local_copy(data["remote"]["model"]) == local_copy
    assert fs.sha256(data["remote"]["model"]) == fingerprint(data["local"]["model"])
    a = keras.models.load_model(data["local"]["model"], compile=False)
    b = keras.models.load_model(local_copy, compile=False)
    for wa, wb in zip(a.get_weights(), b.get_weights()):
        np.testing.assert_array_equal(wa, wb)


def test_spec_keeps_uris(data, tmp_path):
    from audit.runner.spec import load_spec

    spec = load_spec({"name": "t", "model": {"path": data["remote"]["model"], "preprocess": "scale_0_1"},
                      "dataset": {"format": "folder", "path": data["remote"]["folder"],
                                  "masks": data["remote"]["masks"]},
                      "output": "s3://results/t"}, base_dir=tmp_path)
    assert spec.model.path == data["remote"]["model"]
    assert spec.dataset.path == data["remote"]["folder"] and spec.output == "s3://results/t"
    assert spec.dataset.masks == data["remote"]["masks"]
    with pytest.raises(AuditError, match="model.path: model file not found: s3://data/models/none.keras"):
        load_spec({"name": "t", "model": {"path": "s3://data/models/none.keras", "preprocess": "none"},
                   "dataset": {"format": "folder", "path": data["remote"]["folder"]}, "output": "o"},
                  base_dir=tmp_path)


def test_worker_from_bucket_equals_local(data):
    """The worker on the bucket's dataset and model gives the maps it gives on the local copy."""
    from audit.runner.spec import load_spec
    from audit.runner.worker import AuditWorker

    tables = []
    for where in ("local", "remote"):
        d = data[where]
        spec = load_spec({"name": "t", "model": {"path": d["model"], "preprocess": "scale_0_1"},
                          "dataset": {"format": "folder", "path": d["folder"], "masks": d["masks"], "shard_size": 4},
                          "resources": {"batch_size": 4, "decode_threads": 2}, "output": str(data["dir"] / "o")},
                         base_dir=data["dir"])
        p = datasets.plan(spec.dataset)
        w = AuditWorker(spec, classes=p.classes)
        tables.append(w.process_shard(p.shards[0], commit=False)["table"])
        w.close()
    a, b = (t.to_pandas() for t in tables)
    assert len(a) == len(b) > 0 and list(a.image_id) == list(b.image_id)
    assert (b.status == "ok").all()
    np.testing.assert_array_equal(np.stack(a.cam), np.stack(b.cam))
    np.testing.assert_allclose(a.energy_object, b.energy_object)


def test_load_records_from_a_bucket_in_pandas_duckdb_polars(s3, data, tmp_path):
    """A job output copied into a bucket reads back in pandas (audit.load), DuckDB and Polars."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    import audit
    from audit.data import io, query

    out = tmp_path / "out"
    (out / io.RECORDS).mkdir(parents=True)
    (out / io.MANIFEST).mkdir()
    schema = pa.schema([("image_id", pa.string()), ("status", pa.string()), ("score", pa.float32())])
    for sid in range(2):
        t = pa.table({"image_id": [f"i{sid}{k}" for k in range(3)], "status": ["ok"] * 3,
                      "score": np.arange(3, dtype=np.float32) + sid}, schema=schema)
        io.write_shard(out, sid, t, job_id="j", schema_version="1", inputs={}, counts={})
    pq.write_table(pa.table({"image_id": ["orphan"], "status": ["ok"], "score": [9.0]}, schema=schema),
                   out / io.RECORDS / "part-00007.parquet")  # no manifest entry: never read
    s3.bucket("results")
    uri = s3.upload(out, "s3://results/job1")
    df = audit.load(uri)
    assert sorted(df.image_id) == sorted(f"i{s}{k}" for s in range(2) for k in range(3))
    assert float(df.score.sum()) == pytest.approx((0 + 1 + 2) + (1 + 2 + 3))

    import duckdb

    records = query.records_dataset(uri)  # pyarrow dataset over the committed objects, read by DuckDB as is
    got = duckdb.connect().from_arrow(records).aggregate("count(*), sum(score)").fetchall()[0]
    assert got[0] == 6 and got[1] == pytest.approx(float(df.score.sum()))
    files = query.committed_files(uri)
    assert [f.rsplit("/", 1)[1] for f in files] == ["part-00000.parquet", "part-00001.parquet"]
    import polars as pl

    storage = {"aws_endpoint_url": s3.endpoint, "aws_access_key_id": s3.key, "aws_secret_access_key": s3.secret,
               "aws_region": "us-east-1", "aws_allow_http": "true"}
    pdf = pl.read_parquet(files, storage_options=storage)
    assert sorted(pdf["image_id"].to_list()) == sorted(df.image_id)


@pytest.mark.slow
def test_scan_and_report_on_a_bucket_output(s3, data, tmp_path, capsys):
    """audit scan writes summary/ into the bucket (with causal tests reading model and images from
    it); audit report writes report.html into the bucket, or locally with --out.

    Before the module's Ray starts (``ray_s3``, below): its 12-image job runs in the driver, as
    ``audit run`` runs it (the same records as on Ray, tests/test_inprocess.py): no actor to start."""
    import pyarrow.parquet as pq

    import audit
    from audit.cli import main
    from audit.runner.job import run_job

    s3.bucket("scanned")
    out = "s3://scanned/job"
    s = run_job(_bucket_spec(data, out), progress=False, base_dir=data["dir"])
    assert s["status"] == "ok"
    assert main(["scan", out, "--quiet"]) == 0
    keys = s3.keys("scanned", "job/summary/")
    assert keys == ["job/summary/classes.parquet", "job/summary/clusters.parquet", "job/summary/interventions.parquet",
                    "job/summary/scan.json"]
    classes = pq.read_table(fs.open_input(f"{out}/summary/classes.parquet")).to_pandas()
    assert sorted(classes.class_name) == ["cat", "dog"] and classes.n.sum() == 12
    # the causal tests read the model and the images from the bucket (12 images are too few to run them)
    from audit.scan.intervene import Intervener

    iv = Intervener(out)
    ids = ["cat/img_001.png", "dog/img_004.png"]
    images, masks = iv.load(ids)
    for k, i in enumerate(ids):
        local = datasets.Item(image_id=i, path="p", file=os.path.join(data["local"]["folder"], i),
                              mask_file=os.path.join(data["local"]["masks"], i))
        img, mask, _ = datasets.load_item(local, (16, 16), 10**8)
        np.testing.assert_array_equal(images[k], img)
        np.testing.assert_array_equal(masks[k], mask)
    df = audit.load(out, filters=[("method", "=", "gradcam")])
    pred = dict(zip(df.image_id, df.pred))
    assert list(iv.predict(images)) == [pred[i] for i in ids]
    from audit.data import query  # the report's pictures: originals read from the bucket

    row = df[df.image_id == "dog/img_004.png"].iloc[0]
    assert row.path == data["remote"]["folder"] + "/dog/img_004.png"
    import cv2

    want = cv2.cvtColor(cv2.imread(os.path.join(data["local"]["folder"], "dog/img_004.png")), cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(query.original_image(row), want)
    assert audit.overlay(row).shape == (16, 16, 3)
    assert main(["report", out]) == 0
    html = fs.read_bytes(f"{out}/report.html").decode()
    assert "<html" in html.lower() and "data:image/jpeg;base64" in html
    assert main(["report", out, "--out", str(tmp_path / "rep")]) == 0
    assert (tmp_path / "rep" / "report.html").read_text().count("data:image/jpeg;base64") >= 1


@pytest.fixture(scope="module")
def ray_s3(s3):
    """A local Ray started after the server: its workers inherit the AWS_* variables (no runtime_env)."""
    import ray

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    # address="local": a new Ray of this test, never a cluster another process started on this machine
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"TF_CPP_MIN_LOG_LEVEL": "3"}})
    yield ray
    ray.shutdown()


def _bucket_spec(data, out):
    r = data["remote"]
    return {"name": "s3job", "model": {"path": r["model"], "preprocess": "scale_0_1"},
            "dataset": {"format": "folder", "path": r["folder"], "masks": r["masks"], "shard_size": 2},
            "explain": {"methods": ["gradcam", "gradcam++"], "layers": "auto"},
            "resources": {"actors": 1, "cpus_per_actor": 1, "batch_size": 4, "decode_threads": 2},
            "output": out}


@pytest.mark.slow
def test_job_in_a_bucket_killed_then_resumed_exactly_once(s3, ray_s3, data):
    """Dataset, model and output in the bucket; an actor killed, the job interrupted, an attempt's
    object left without its manifest entry (what a kill between the two PUTs leaves); audit.load
    reads only committed objects; --resume completes every (image, layer, method) exactly once and
    removes the orphans."""
    import json

    import pyarrow.parquet as pq

    import audit
    from audit.data import io
    from audit.runner.job import run_job

    s3.bucket("results")
    out = "s3://results/jobs/one"
    seen, killed = [], []

    def on_event(kind, payload):
        if kind == "shard_done":
            seen.append(payload["shard"])
            if not killed:  # its queued shard dies with it and is retried by a new actor
                killed.append(payload["pid"])
                os.kill(payload["pid"], 9)
            elif len(seen) == 3:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_job(_bucket_spec(data, out), progress=False, on_event=on_event, base_dir=data["dir"])
    first = io.committed_shards(out)
    assert set(seen) <= set(first) and len(first) >= 3
    job = io.read_job(out)
    assert job["status"] == "interrupted" and "AWS" not in json.dumps(job) and s3.secret not in json.dumps(job)

    # orphans: a second attempt of a committed shard, an attempt of a shard never committed
    done = min(first)
    todo = max(set(range(12)) - set(first))
    body = fs.read_bytes(fs.join(out, io.RECORDS, first[done]["file"]))
    fs.write_bytes(fs.join(out, io.RECORDS, f"{io.part_name(done)}-deadbeef0001.parquet"), body)
    fs.write_bytes(fs.join(out, io.RECORDS, f"{io.part_name(todo)}-deadbeef0002.parquet"), body)
    before = audit.load(out, columns=["image_id", "shard"])
    assert set(before.shard) == set(first) and len(before) == sum(e["rows"] for e in first.values())

    # the resume in the driver (Ray stopped: a small local job runs there, no actor to start); the
    # actors' reads and commits in the bucket are the first run's above
    ray_s3.shutdown()
    with pytest.raises(AuditError, match="not empty; use --resume"):
        run_job(_bucket_spec(data, out), progress=False, base_dir=data["dir"])
    s = run_job(_bucket_spec(data, out), resume=True, progress=False, base_dir=data["dir"])
    assert s["status"] == "ok" and s["shards_skipped"] == len(first) and s["images_done"] == s["images"] == 12
    assert "in the driver" in s["devices"]
    df = h.assert_exactly_once(out, h.folder_ids(data["local"]["folder"]))
    assert len(df) == s["rows"] == 12 * 2
    entries = io.manifest_entries(out)
    named = sorted(f"jobs/one/records/{e['file']}" for e in entries.values())
    assert [k for k in s3.keys("results", "jobs/one/records/") if not k.endswith("/")] == named  # no orphan
    assert all("-" in e["file"][len("part-00000"):] for e in entries.values())  # attempt-unique names
    meta = pq.read_metadata(fs.open_input(fs.join(out, io.RECORDS, entries[0]["file"])))
    assert meta.metadata[b"shortcut_audit.shard"] == b"0"
    assert not fs.exists(fs.join(out, io.LOCK))  # released


@pytest.mark.slow
def test_actor_killed_mid_upload_then_resumed_exactly_once(s3, data, tmp_path, capsys):
    """Real kills in the upload path (tests/helpers_faults.py), in an `audit run` subprocess with its
    own Ray: shard 1's actor dies with its Parquet PUT half sent (the store keeps nothing; the shard is
    retried by a new actor); shard 4's actor writes its object whole, SIGKILLs the driver (no
    end-of-job clean-up) and dies before the manifest entry.  The orphan is never read: audit.load
    reads committed shards only, and --resume commits every (image, layer, method) exactly once from
    the objects the entries name, then removes the orphan."""
    import json

    import helpers_faults

    import audit
    from audit.data import io

    s3.bucket("killed")
    out = "s3://killed/job"
    spec = h.write_spec(tmp_path / "job.yaml", **_bucket_spec(data, out))
    marks = tmp_path / "marks"
    marks.mkdir()
    args = ["run", spec, "--no-progress", "--no-scan"]
    first = helpers_faults.driver(args, {"marks": str(marks), "mid_object": 1, "after_object": 4})
    _, err = first.communicate(timeout=600)
    assert first.returncode == -9, err[-3000:]  # killed by its actor, right after shard 4's object
    half = json.loads((marks / "mid_object").read_text())["key"]
    orphan = json.loads((marks / "after_object").read_text())["key"]
    keys = set(s3.keys("killed", "job/records/"))
    assert half.startswith(f"{out}/records/part-00001-") and half[len("s3://killed/"):] not in keys
    assert orphan.startswith(f"{out}/records/part-00004-") and orphan[len("s3://killed/"):] in keys
    done = io.committed_shards(out)
    assert 1 in done and 4 not in done and len(done) < 6  # shard 1 retried and committed; 4 not
    assert orphan.rsplit("/", 1)[1] not in {e["file"] for e in done.values()}
    before = audit.load(out, columns=["image_id", "shard"])
    assert set(before.shard) == set(done) and len(before) == sum(e["rows"] for e in done.values())

    # the resume through the CLI's main() here: a small local job, run in the driver as in a fresh
    # `audit run` (the takeover is decided from what the killed driver left in the lock, its dead pid)
    import ray

    from audit.cli import main

    assert not ray.is_initialized()
    capsys.readouterr()
    code = main([*args, "--resume"])
    err = capsys.readouterr().err
    assert code == 0, err[-3000:]
    assert f"removed records/{orphan.rsplit('/', 1)[1]}" in err and "took over the stale lock" in err
    df = h.assert_exactly_once(out, h.folder_ids(data["local"]["folder"]))
    assert len(df) == 12 * 2 and set(audit.load(out, columns=["shard"]).shard) == set(range(6))
    named = sorted(f"job/records/{e['file']}" for e in io.manifest_entries(out).values())
    objects = [k for k in s3.keys("killed", "job/records/") if not k.endswith("/")]  # not the folder marker
    assert objects == named  # the orphan is gone, every named object is there
    runs = io.read_job(out)["runs"]
    # the killed run stays in the history, marked abandoned by the run that took its stale lock over
    assert [r["status"] for r in runs] == ["abandoned", "ok"] and runs[1]["resume"]
    assert [r["generation"] for r in runs] == [1, 2] and runs[0]["taken_over_by"] == 2


def test_prefetcher_keeps_a_bounded_window_of_objects_in_flight(s3, data):
    from concurrent.futures import ThreadPoolExecutor

    from audit.data.decode import DecodeError
    from audit.data.prefetch import Prefetcher, wants_prefetch

    ds = _dataset("folder", data["remote"])
    p = datasets.plan(ds)
    items = [it for s in p.shards for it in datasets.read_shard(ds, s, p.classes)]
    items.insert(2, datasets.Item(image_id="gone", path="s3://data/folder/cat/gone.png",
                                  file="s3://data/folder/cat/gone.png"))
    assert wants_prefetch(items) and not wants_prefetch(_items(_dataset("folder", data["local"]))[1])
    with ThreadPoolExecutor(4) as pool:
        pre = Prefetcher(pool, items, max_bytes=10**6, depth=3)
        assert pre.next == 3  # three objects requested before anything is decoded
        for k, it in enumerate(items):
            if it.image_id == "gone":
                with pytest.raises(DecodeError, match="not found: s3://data/folder/cat/gone.png"):
                    pre.fill(it)
            else:
                pre.fill(it)
                assert it.data == fs.read_bytes(it.file) and it.mask_data == fs.read_bytes(it.mask_file)
            assert pre.next == min(len(items), k + 1 + 3)  # never more than 3 ahead of the decoder
            assert len(pre.futures) <= 3
            pre.release(it)
            assert it.data is None and it.mask_data is None and it.has_mask != (it.image_id == "gone")


def test_explain_model_and_image_from_a_bucket(s3, data, tmp_path, capsys):
    """audit explain MODEL IMAGE with both in the bucket: the same figures as from the local copies."""
    from audit.cli import main

    img = "cat/img_002.png"
    outs = {}
    for where in ("local", "remote"):
        d = data[where]
        image = fs.join(d["folder"], img) if where == "remote" else os.path.join(d["folder"], img)
        outs[where] = tmp_path / where
        rc = main(["explain", d["model"], image, "--out", str(outs[where]), "--preprocess", "scale_0_1",
                   "--layers", "conv2", "--methods", "gradcam", "--filters", "0"])
        assert rc == 0, capsys.readouterr().err
    names = sorted(p.name for p in outs["remote"].glob("*.png"))
    assert "00_img_002_cams.png" in names and names == sorted(p.name for p in outs["local"].glob("*.png"))
    for n in names:
        assert (outs["remote"] / n).read_bytes() == (outs["local"] / n).read_bytes(), n
    assert main(["explain", data["remote"]["model"], "s3://data/folder/cat/none.png", "--out", str(tmp_path / "x")]) == 2
    assert "image: not found: s3://data/folder/cat/none.png" in capsys.readouterr().err


def test_actor_start_up_checks_its_credentials_and_output_bucket(s3, data):
    """An actor whose node cannot read the bucket stops the job in one line naming the node; a missing
    output bucket is refused before anything runs; URIs need no shared filesystem."""
    import re
    import socket

    from audit.data import io
    from audit.runner.worker import AuditWorker

    spec = JobSpec.from_partial({"model": {"path": data["remote"]["model"]},
                                 "dataset": {"path": data["remote"]["folder"]}, "output": "s3://results-nowhere/x"})
    AuditWorker(spec).check_paths()  # only URIs: nothing local to find
    s3.set_env(secret="wrong")
    with pytest.raises(AuditError) as e:
        AuditWorker(spec).check_paths()
    # the node id is named too when Ray is up in this process (another test module's Ray, under xdist)
    assert re.match(rf"on {re.escape(socket.gethostname())}( \(Ray node \w+\))?: access to bucket s3://data",
                    str(e.value)), str(e.value)
    s3.set_env()
    with pytest.raises(AuditError, match="bucket s3://results-nowhere does not exist"):
        io.check_output("s3://results-nowhere/x", resume=False)


def test_shipped_bucket_spec_is_valid():
    from audit.data import resources
    from audit.runner.spec import read_yaml, validate

    doc = read_yaml(resources.path("audit.jobs", "example_s3.yaml"))
    validate(doc)  # schema only: its buckets live elsewhere
    assert all(fs.is_uri(p) for p in (doc["model"]["path"], doc["dataset"]["path"], doc["output"]))


def test_conditional_put_lets_one_writer_create_an_object(s3, monkeypatch):
    """put_if_absent: If-None-Match through boto3 on S3 (the second writer is refused by the store),
    an existence check and a plain PUT without boto3."""
    s3.bucket("cond")
    uri = "s3://cond/a/entry.json"
    assert fs.conditional_puts(uri) and not fs.conditional_puts("gs://cond/x")
    assert fs.put_if_absent(uri, b"first") is True
    assert fs.put_if_absent(uri, b"second") is False
    assert fs.read_bytes(uri) == b"first"
    c = s3.client()  # the store itself refuses a second conditional PUT of the key
    with pytest.raises(c.exceptions.ClientError, match="PreconditionFailed"):
        c.put_object(Bucket="cond", Key="a/entry.json", Body=b"x", IfNoneMatch="*")
    monkeypatch.setattr(fs, "_boto3_client", lambda: None)  # boto3 not installed
    assert not fs.conditional_puts(uri)
    assert fs.put_if_absent(uri, b"third") is False and fs.read_bytes(uri) == b"first"
    assert fs.put_if_absent("s3://cond/a/other.json", b"x") is True
    s3.set_env(secret="wrong")
    monkeypatch.undo()
    with pytest.raises(AuditError, match="access to bucket s3://cond .*refused"):
        fs.put_if_absent("s3://cond/a/third.json", b"x")


def test_two_attempts_of_a_shard_commit_once(s3):
    """The first attempt's manifest entry wins; the second attempt returns it and deletes its own
    object.  An entry naming a missing object is replaced by the next attempt (a --resume redo)."""
    import pyarrow as pa

    from audit.data import io

    s3.bucket("twice")
    out = "s3://twice/job"
    t = pa.table({"image_id": ["a", "b"], "status": ["ok", "ok"]})
    first = io.write_shard(out, 3, t, job_id="j", schema_version="1", inputs={}, counts={})
    second = io.write_shard(out, 3, t, job_id="j", schema_version="1", inputs={}, counts={})
    assert second == first
    assert [k for k in s3.keys("twice", "job/records/") if not k.endswith("/")] == [f"job/records/{first['file']}"]
    assert io.committed_shards(out) == {3: first}
    fs.delete(fs.join(out, io.RECORDS, first["file"]))  # the entry's object lost: the shard is broken
    third = io.write_shard(out, 3, t, job_id="j", schema_version="1", inputs={}, counts={})
    assert third["file"] != first["file"] and io.committed_shards(out) == {3: third}


def test_lock_on_a_bucket_refuses_a_second_driver_and_takes_over_a_stale_one(s3):
    """The lock of a bucket output: created by a conditional PUT (a second driver is refused in one
    line), and a stale one (its pid gone on this host) deleted and created anew with a warning."""
    import json
    import socket
    import time

    from audit.data import io, lock

    s3.bucket("locked")
    out = "s3://locked/job"
    with lock.OutputLock(out, "j1") as first:
        with pytest.raises(AuditError, match=rf"output {out} is in use by driver pid {os.getpid()}"):
            lock.OutputLock(out, "j2").acquire()
        assert lock.read_lock(out).token == first.info.token
    assert not fs.exists(fs.join(out, io.LOCK))
    dead = {"host": socket.gethostname(), "pid": 2**22 + 7, "job_id": "old", "started": time.time(),
            "heartbeat": time.time(), "token": "stale"}  # a pid above Linux's pid_max: not running
    fs.write_bytes(fs.join(out, io.LOCK), json.dumps(dead).encode())
    said = []
    with lock.OutputLock(out, "j3", warn=said.append) as third:
        assert lock.read_lock(out).token == third.info.token
    assert len(said) == 1 and f"took over the stale lock of {out}" in said[0] and "is not running" in said[0]
