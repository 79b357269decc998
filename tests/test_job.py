"""Jobs on a local Ray: 2 actors on a few hundred images, an actor killed mid-job,
interrupt + resume, bad inputs, bad specs, the CLI, queries.  One Ray per module."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import time
import types
from pathlib import Path

import helpers_jobs as h
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from audit.data import datasets, io
from audit.errors import AuditError
from audit.runner.job import run_job
from audit.runner.spec import load_spec

N_PER_CLASS = 100


@pytest.fixture(scope="module")
def ray_local():
    ray = h.ray_init_local(num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("job")
    h.make_model(tmp / "model.keras")
    root, mroot = h.make_folder(tmp / "data", N_PER_CLASS)
    bad = h.bad_files(tmp / "data" / "cat")
    odd = h.odd_files(tmp / "data" / "dog")
    spec = h.write_spec(
        tmp / "job.yaml",
        dataset={"format": "folder", "path": "data", "masks": "data_masks", "shard_size": 16},
        explain={"methods": ["gradcam", "gradcam++"], "layers": "auto", "regions": {"top": [0, 0, 1, 0.5]}},
        resources={"actors": 2, "cpus_per_actor": 1, "batch_size": 16, "decode_threads": 2},
    )
    n_images = 2 * N_PER_CLASS + len(bad) + len(odd)
    return {"dir": tmp, "spec": spec, "bad": bad, "odd": odd, "n": n_images}


def _check_output(out, n_images, bad):
    """Every input appears; good images have one row per layer x method; no duplicates."""
    import audit

    df = audit.load(out)
    assert df["image_id"].nunique() == n_images
    err = df[df.status == "error"]
    assert sorted(err.image_id) == sorted(f"cat/{k}" for k in bad)
    for k, words in bad.items():
        row = err[err.image_id == f"cat/{k}"].iloc[0]
        assert words in row.error and pd.isna(row.layer) and row.cam is None
    good = df[df.status != "error"]
    assert len(good) == 2 * (n_images - len(bad))
    assert not good.duplicated(["image_id", "layer", "method"]).any()
    assert set(good.method) == {"gradcam", "gradcam++"} and set(good.layer) == {"conv2"}
    assert (good.cam.map(len) == good.cam_h * good.cam_w).all()
    return df


@pytest.mark.slow
def test_two_actors_kill_one_mid_job(ray_local, ws):
    out = ws["dir"] / "out_kill"
    pids, killed, done_by = {}, [], []

    def on_event(kind, payload):
        if kind == "actor_ready":
            pids[payload["pid"]] = payload
        elif kind == "shard_done":
            done_by.append(payload["pid"])
            if not killed:  # its next shard is already queued on it: that one must be retried
                killed.append(payload["pid"])
                os.kill(payload["pid"], signal.SIGKILL)

    s = run_job(ws["spec"], overrides=[f"output={out}"], progress=False, on_event=on_event)
    assert s["status"] == "ok" and s["images"] == ws["n"] == s["images_done"]
    assert s["actor_deaths"] == 1 and s["retries"] >= 1 and s["actors"] == 3
    assert s["errors"] == len(ws["bad"])
    plan = datasets.plan(load_spec(ws["spec"]).dataset)
    assert s["shards"] == len(plan.shards) == len(io.committed_shards(out))
    assert len(set(done_by)) >= 2  # two actors did work (the killed one and another)
    df = _check_output(out, ws["n"], ws["bad"])
    assert s["rows"] == len(df)

    # grayscale, RGBA and 16-bit images are audited normally
    odd = df[df.image_id.isin([f"dog/{k}" for k in ws["odd"]])]
    assert len(odd) == 6 and (odd.status != "error").all() and (odd.width == 16).all()

    # job.json: resolved spec, model sha256, versions, timings
    job = json.loads((out / "job.json").read_text())
    assert job["status"] == "ok" and job["job_id"] == s["job_id"]
    assert job["model"]["sha256"] == hashlib.sha256((ws["dir"] / "model.keras").read_bytes()).hexdigest()
    assert job["spec"]["dataset"]["path"] == str(ws["dir"] / "data")
    assert job["versions"]["ray"] and job["versions"]["pyarrow"]
    assert job["timings"]["run_s"] > 0 and job["layers"] == ["conv2"] and job["classes"] == ["cat", "dog"]
    # where each actor that became ready computed (the replacement may not have been needed in
    # time): each 1 CPU = 1 TensorFlow thread, no GPU here
    facts = job["runs"][-1]["actors"]
    assert sorted(f["pid"] for f in facts) == sorted(pids) and len(facts) >= 2
    assert all(f["gpus"] == 0 and f["threads"] == 1 and f["memory_growth"] == [] for f in facts)
    assert s["devices"] == f"{len(facts)} actors on CPU (no GPU visible, 1 TensorFlow thread each)"

    # file metadata and manifest entries
    part = out / "records" / "part-00000.parquet"
    meta = pq.read_schema(part).metadata
    assert meta[b"shortcut_audit.job_id"].decode() == s["job_id"]
    assert meta[b"shortcut_audit.schema_version"] == b"1"
    entry = json.loads((out / "_manifest" / "part-00000.json").read_text())
    assert entry["rows"] == pq.read_metadata(part).num_rows and entry["inputs"]["start"] == 0
    assert not list((out / "records").glob(".*"))  # no temp files left

    # values equal an in-process run of the same shard (the plain worker class, no Ray)
    from audit.runner.worker import AuditWorker

    spec = load_spec(ws["spec"], [f"output={out}"])
    w = AuditWorker(spec, classes=plan.classes)
    shard = plan.shards[3]
    ref = w.process_shard(shard, commit=False)["table"].to_pandas()
    got = pq.read_table(out / "records" / f"part-{shard.id:05d}.parquet").to_pandas()
    assert list(got.image_id) == list(ref.image_id) and list(got.method) == list(ref.method)
    assert got.pred.tolist() == ref.pred.tolist() and got.label.tolist() == ref.label.tolist()
    np.testing.assert_allclose(np.stack(got.cam.dropna()), np.stack(ref.cam.dropna()), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got.energy_object, ref.energy_object, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got.energy_top, ref.energy_top, rtol=1e-4, atol=1e-6)
    assert got.has_mask.all() and got.energy_object.notna().all()


@pytest.mark.slow
def test_interrupt_then_resume(ray_local, ws, capsys):
    out = ws["dir"] / "out_resume"
    seen = []

    def stop_after_three(kind, payload):
        if kind == "shard_done":
            seen.append(payload["shard"])
            if len(seen) == 3:
                raise KeyboardInterrupt

    # one actor (its next shards queued on it when the driver stops): an interrupt is the driver's
    # doing; two actors at work are test_two_actors_kill_one_mid_job's
    with pytest.raises(KeyboardInterrupt):
        run_job(ws["spec"], overrides=[f"output={out}", "resources.actors=1"], progress=False,
                on_event=stop_after_three)
    assert json.loads((out / "job.json").read_text())["status"] == "interrupted"
    first = io.committed_shards(out)
    assert set(seen) <= set(first) and len(first) >= 3
    stamps = {k: (out / "records" / e["file"]).stat().st_mtime_ns for k, e in first.items()}

    # a second run without --resume is refused, in one line
    with pytest.raises(AuditError, match="not empty; use --resume"):
        run_job(ws["spec"], overrides=[f"output={out}"], progress=False)
    # resuming with a different sharding is refused
    with pytest.raises(AuditError, match="cannot resume: dataset.shard_size"):
        run_job(ws["spec"], overrides=[f"output={out}", "dataset.shard_size=7"], resume=True, progress=False)

    redone, polled = [], []

    def watch(kind, payload):
        if kind == "shard_done":
            redone.append(payload["shard"])
        elif kind == "progress":
            polled.append(payload["committed"] + payload["inside_shards"])

    capsys.readouterr()
    # one actor: what is skipped, redone and shown is the driver's doing (one TensorFlow start fewer)
    s = run_job(ws["spec"], overrides=[f"output={out}", "resources.actors=1"], resume=True, progress=True,
                on_event=watch)
    assert s["status"] == "ok" and s["shards_skipped"] == len(first)
    # the bar started at the images already committed and ended at all of them
    bar = capsys.readouterr().err.replace("\r", "\n")
    done_before = sum(int(e["inputs"]["stop"]) - int(e["inputs"]["start"]) for e in first.values())
    assert f"{done_before}/{ws['n']}" in bar and f"{ws['n']}/{ws['n']}" in bar
    assert polled and all(done_before <= v <= ws["n"] for v in polled)  # the driver polled the actors
    assert not set(redone) & set(first)  # committed shards were skipped...
    for k, e in first.items():  # ...and not rewritten
        assert (out / "records" / e["file"]).stat().st_mtime_ns == stamps[k]
    sizes = {sh.id: sh.size for sh in datasets.plan(load_spec(ws["spec"]).dataset).shards}
    assert s["images_done"] == ws["n"]
    assert s["images_this_run"] == ws["n"] - sum(sizes[k] for k in first) > 0
    _check_output(out, ws["n"], ws["bad"])
    job = json.loads((out / "job.json").read_text())
    assert [r["status"] for r in job["runs"]] == ["interrupted", "ok"]


def test_unknown_layer_stops_the_job_with_one_line(ray_local, ws):
    out = ws["dir"] / "out_badlayer"
    with pytest.raises(AuditError) as e:
        run_job(ws["spec"], overrides=[f"output={out}", "explain.layers=[nope]", "resources.actors=1"],
                progress=False)
    msg = str(e.value)
    assert "nope" in msg and "conv2" in msg and "\n" not in msg


def test_missing_model_is_refused_before_ray(ws, tmp_path):
    with pytest.raises(AuditError, match="model file not found"):
        run_job(ws["spec"], overrides=[f"output={tmp_path / 'o'}", "model.path=gone.keras"], progress=False)
    assert not (tmp_path / "o").exists()


def test_failed_planning_leaves_no_output_behind(tmp_path):
    """A dataset error must not leave an OUT that a rerun refuses as 'not empty'."""
    h.make_model(tmp_path / "model.keras")
    (tmp_path / "data" / "cat").mkdir(parents=True)  # a class folder with no images
    spec = h.write_spec(tmp_path / "job.yaml", dataset={"classes": None})
    for _ in range(2):  # the same mistake twice: the same message, not "not empty"
        with pytest.raises(AuditError, match="no images"):
            run_job(spec, progress=False)
    assert not (tmp_path / "out").exists()
    # an OUT holding only the empty folders of an interrupted start counts as empty
    (tmp_path / "out" / "records").mkdir(parents=True)
    (tmp_path / "out" / "_manifest").mkdir()
    assert io.check_output(tmp_path / "out", resume=False) == tmp_path / "out"
    (tmp_path / "out" / "notes.txt").write_text("x")
    with pytest.raises(AuditError, match="not empty"):
        io.check_output(tmp_path / "out", resume=False)


def test_uncreatable_output_is_one_line(tmp_path):
    (tmp_path / "ro").write_text("a file where a folder is needed")
    with pytest.raises(AuditError, match="cannot create output directory"):
        io.prepare_output(tmp_path / "ro" / "sub" / "out", resume=False)


def test_cli_run_summary_scan_and_queries(ray_local, ws, capsys, monkeypatch):
    from audit.cli import main

    calls = []
    fake = types.ModuleType("audit.scan.pipeline")

    def fake_scan(out_dir, **kw):
        calls.append(str(out_dir))
        raise RuntimeError("boom")

    fake.scan = fake.scan_as_saved = fake_scan
    monkeypatch.setitem(sys.modules, "audit.scan.pipeline", fake)
    out = ws["dir"] / "out_cli"
    code = main(["run", ws["spec"], "--no-progress", "--set", f"output={out}", "--set", "dataset.limit=20",
                 "--set", "resources.actors=1"])
    cap = capsys.readouterr()
    assert "job t (" in cap.out and "20 of 20 audited" in cap.out and "errors    1 unreadable" in cap.out  # cat/huge.png sorts first
    assert "devices   1 actor on CPU (no GPU visible" in cap.out
    assert calls == [str(out)]  # the scan ran on the output...
    assert code == 1 and "audit: scan failed (RuntimeError: boom)" in cap.err  # ...and its failure is one line
    assert len([ln for ln in cap.err.splitlines() if "scan failed" in ln]) == 1

    import pyarrow.compute as pc

    import audit

    df = audit.load(out, columns=["image_id", "method", "status"], filters=[("method", "=", "gradcam")])
    assert list(df.columns) == ["image_id", "method", "status"] and set(df.method) == {"gradcam"}
    assert len(df) == 19  # 20 images, the unreadable one (no method) is filtered out
    df2 = audit.load(out, filters=pc.field("status") == "error")
    assert df2.image_id.tolist() == ["cat/huge.png"]
    with pytest.raises(AuditError, match="no column 'nope'"):
        audit.load(out, columns=["nope"])

    row = audit.load(out, filters=[("image_id", "=", "cat/img_003.png"), ("method", "=", "gradcam")]).iloc[0]
    hm = audit.heatmap(row)
    raw = np.asarray(row.cam, np.float32).reshape(16, 16)
    np.testing.assert_allclose(hm, np.maximum(raw, 0) / raw.max(), rtol=1e-6)
    assert audit.heatmap(row, size=(32, 48)).shape == (32, 48)
    ov = audit.overlay(row)
    from audit.review import viz

    img = h.image(3, 0)[0]
    np.testing.assert_array_equal(ov, viz.overlay_image(img, hm))
    err_row = df2.iloc[0]
    with pytest.raises(AuditError, match="has no map"):
        audit.heatmap(err_row)


@pytest.mark.slow
def test_progress_poll_is_answered_while_shards_are_held(ray_local, ws, tmp_path):
    """Both shard slots of an actor stuck (inputs whose reads the test holds): it
    still answers ``progress`` with the images done so far, from its own concurrency group."""
    import ray

    from audit.data import datasets
    from audit.runner import job

    man = Path(h.make_manifest(tmp_path, n=10))
    holds = [tmp_path / "images" / f"{name}.hold" for name in ("im002.png", "im006.png")]  # one in each shard
    for hold in holds:
        hold.touch()  # reading the image blocks while its .hold file exists (FIFOs are refused unread)

    def hold_reads(self):
        from audit.data import files

        real = files.read_regular_file

        def held(path, *a, **k):
            while os.path.exists(path + ".hold"):
                time.sleep(0.02)
            return real(path, *a, **k)

        files.read_regular_file = held
        datasets.read_regular_file = held  # imported at the top of datasets.py
    spec = load_spec({"model": {"path": str(ws["dir"] / "model.keras"), "preprocess": "scale_0_1"},
                      "dataset": {"format": "manifest", "path": str(man), "shard_size": 5},
                      "explain": {"methods": ["gradcam"]},
                      "resources": {"batch_size": 2, "decode_threads": 2},
                      "output": str(tmp_path / "out")})
    plan = datasets.plan(spec.dataset)
    io.prepare_output(spec.output, resume=False)  # as the driver does before starting actors
    actor = job.remote_worker().options(max_concurrency=job.QUEUE_DEPTH, num_cpus=0).remote(
        spec, classes=plan.classes)
    try:
        ray.get(actor.setup.remote())
        ray.get(actor.__ray_call__.remote(hold_reads))
        # the actor's process hands the GIL over every 1 ms (Python's default is 5 ms)
        assert ray.get(actor.__ray_call__.remote(lambda self: sys.getswitchinterval())) == job.SWITCH_INTERVAL_S

        def poll_until(want):
            seen = None
            for _ in range(120):
                seen = ray.get(actor.progress.remote(), timeout=10)
                if seen == want:
                    break
                time.sleep(0.25)
            return seen

        refs = [actor.process_shard.remote(plan.shards[0], commit=False)]
        assert poll_until({0: 2}) == {0: 2}  # images 0-1 explained, image 2 blocks
        refs.append(actor.process_shard.remote(plan.shards[1], commit=False))
        assert poll_until({0: 2, 1: 0}) == {0: 2, 1: 0}  # both slots busy: shard 1 waits its turn
        assert not ray.wait(refs, timeout=0.5)[0]  # both shards still held
        for hold in holds:
            hold.unlink()
        results = ray.get(refs, timeout=60)
        assert [r["images"] for r in results] == [5, 5] and all(r["errors"] == 0 for r in results)
        assert ray.get(actor.progress.remote()) == {}
    finally:
        ray.kill(actor)


def test_progress_bar_counts_up_to_the_committed_images(capsys):
    from audit.runner.progress import Progress

    bar = Progress(total=100, initial=20, errors=1, enabled=True, name="t")
    bar.show(15)  # 20 committed before this run + 15 inside shards
    assert bar.bar.n == 35
    bar.show(5)  # a shard retried elsewhere: the count does not go back
    assert bar.bar.n == 35
    bar.update(30, errors=2)  # that shard (30 images) commits
    assert bar.bar.n == 50 and bar.committed == 50
    bar.show(80)  # never past the total
    assert bar.bar.n == 100
    bar.close()
    assert "100/100" in capsys.readouterr().err


def test_devices_line_says_where_the_actors_computed():
    from audit.runner.job import describe_devices

    gpu = {"gpus": 1, "memory_growth": [True], "mixed_precision": False, "threads": 4}
    assert describe_devices([]) is None
    assert describe_devices([gpu, gpu]) == "2 actors on GPU (1 GPU each, memory growth on)"
    assert describe_devices([{**gpu, "mixed_precision": True}]) == (
        "1 actor on GPU (1 GPU each, memory growth on, mixed precision)")
    # memory growth that did not take is shown loudly; an actor without a GPU is counted
    assert describe_devices([{**gpu, "memory_growth": [False]}, {"gpus": 0, "threads": 2}]) == (
        "2 actors on GPU (1 with a GPU, memory growth OFF)")
    assert describe_devices([{"gpus": 0, "threads": 2}, {"gpus": 0, "threads": 4}]) == (
        "2 actors on CPU (no GPU visible, 2/4 TensorFlow threads each)")
