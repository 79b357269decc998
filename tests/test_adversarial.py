"""The adversarial table of issue 22 as tests: each attempt and what must come of it.

A hostile or unlucky user's attempts, each asserting its one-line error, its
exactly-once output or its warning.  The quick ones need no Ray; the hostile
driver tests (marked slow) run driver A as ``audit run`` in a subprocess:

* **a paused driver** (issue 22.1): driver A is stopped with SIGSTOP after a
  random number of commits and a random pause; its lock is aged as if 130 s
  had passed; driver B (``audit run`` through ``main()`` in the test's process)
  takes the output over (``--resume``, or an image added and ``--resume=replan``)
  and finishes; A is continued.  A must stop in one
  line and commit nothing; every current input is in the output exactly once;
  ``job.json`` holds both runs.  For a local disk and for S3 (moto); with A's
  shards on Ray actors (which go on computing, and try to commit, while A is
  stopped) and with A's job run in the driver itself (a small local job).
* the rest, one test each, in the order of the issue: spec bombs and bounds,
  input identity, label types, duplicated rows, locks that heal, a full disk,
  incomplete outputs, masks by full name, the pixel limit, one-class models,
  URIs, the Lambda flag.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import helpers_jobs as h
import helpers_s3
import pytest

from audit.data import datasets, decode, fs, identity, io
from audit.data import lock as lk
from audit.data.jobspec import DatasetSpec
from audit.errors import AuditError

METHODS = ("gradcam",)
N_PER_CLASS = 32  # 2 classes, shards of 4: 16 shards


@pytest.fixture(scope="module")
def s3():
    server = helpers_s3.S3Server()
    server.bucket("fence")
    yield server
    server.stop()


def _driver(spec, out, *extra, slow: float | None = None, ray: bool = False):
    """``audit run`` in a subprocess; ``slow``: each commit waits that long first (so that a pause at a
    random moment lands mid-run); ``ray``: on actors of its private Ray (which go on computing while
    the driver is stopped), else in the driver itself (a small local job)."""
    import helpers_faults

    args = ["run", spec, "--no-progress", "--no-scan", "--set", f"output={out}", "--set", "resources.actors=1",
            *extra]
    return helpers_faults.driver(args, {"slow_commits": slow} if slow else None,
                                 {"AUDIT_IN_PROCESS": "0" if ray else "1"})


def _driver_here(spec, out, *extra) -> int:
    """Driver B, ``audit run`` through the CLI's ``main()`` in this process: the job its subprocess
    would run (a small local job, in the driver; no Ray here while it runs), the same lock file
    read and taken over.  The takeover is decided from what A left in the lock (its pid, alive and
    stopped, its aged heartbeat), never from B's process, so a fresh process proves nothing more;
    A stays a subprocess, being the one stopped and continued.  Returns the exit status."""
    from audit.cli import main

    return main(["run", spec, "--no-progress", "--no-scan", "--set", f"output={out}", "--set",
                 "resources.actors=1", *extra])


def _entries(out) -> int:
    return len(io.manifest_entries(out)) if (fs.is_uri(out) or Path(out).is_dir()) else 0


def _wait_for_commits(out, n, proc, timeout=300):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if _entries(out) >= n:
            return
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    raise AssertionError("no commits")


def _age_lock(out, seconds):
    """What 130 s of SIGSTOP look like to another driver: the heartbeat (only) grows old."""
    path = fs.join(out, lk.LOCK) if fs.is_uri(out) else str(Path(out) / lk.LOCK)
    d = json.loads(fs.read_bytes(path))
    d["heartbeat"] -= seconds
    if fs.is_uri(out):
        fs.write_bytes(path, json.dumps(d).encode())
    else:
        Path(path).write_text(json.dumps(d))


@pytest.mark.slow
@pytest.mark.parametrize("store,mode,ray", [("local", "replan", True), ("local", "resume", False),
                                            ("s3", "replan", True), ("s3", "resume", False)])
def test_a_paused_driver_never_overwrites_the_one_that_took_over(tmp_path, request, capsys, store, mode, ray):
    rng = random.Random(f"{store}-{mode}")
    ws = h.folder_workspace(tmp_path, N_PER_CLASS, METHODS, {"actors": 1, "batch_size": 4, "max_retries": 1})
    out = str(tmp_path / "out")
    if store == "s3":
        request.getfixturevalue("s3")
        out = f"s3://fence/{store}-{mode}"
    a = _driver(ws["spec"], out, slow=0.4, ray=ray)
    try:
        _wait_for_commits(out, rng.randint(1, 3), a)
        time.sleep(rng.uniform(0, 1.0))  # a random point: mid-shard, mid-commit, between shards
        os.kill(a.pid, signal.SIGSTOP)
        paused_at = _entries(out)
        assert paused_at < 2 * N_PER_CLASS // 4 and a.poll() is None, "A ended before it was paused"
        ids = list(ws["ids"])
        if mode == "replan":  # an image added while A sleeps: only B's plan has it
            h.write_png(tmp_path / "data" / "cat" / "img_000b.png", h.image(77, 0)[0])
            ids = h.folder_ids(tmp_path / "data")
        _age_lock(out, 130)
        b_code = _driver_here(ws["spec"], out, f"--resume={mode}" if mode == "replan" else "--resume")
        b_out, b_err = capsys.readouterr()
        assert b_code == 0, b_err[-3000:]
        assert "took over the stale lock" in b_err
    finally:
        os.kill(a.pid, signal.SIGCONT)
    a_out, a_err = a.communicate(timeout=300)
    lines = a_err.strip().splitlines()
    assert a.returncode == 2 and lines[-1].startswith("audit: error: stopped: "), \
        (paused_at, a_out[-2000:], a_err[-3000:], b_out[-2000:])
    assert "commits nothing more" in lines[-1]
    h.assert_exactly_once(out, ids, methods=METHODS)
    job = json.loads(fs.read_bytes(io.job_path(out)) if fs.is_uri(out) else Path(io.job_path(out)).read_text())
    runs = [(r["generation"], r["status"]) for r in job["runs"]]
    assert runs == [(1, "abandoned"), (2, "ok")], runs
    assert job["generation"] == 2 and job["status"] == "ok"
    assert lk.read_lock(out) is None  # B released it; A did not write it back
    assert {e.get("generation") for e in io.manifest_entries(out).values()} <= {1, 2}


# ----------------------------------------------------------------------------
# the quick attempts (no Ray)
# ----------------------------------------------------------------------------


def _one_line(exc_info) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg and len(msg) < 600, msg[:300]
    return msg


def _spec_file(tmp_path, extra: str = "") -> Path:
    (tmp_path / "m.keras").write_bytes(b"not a model")
    (tmp_path / "data" / "a").mkdir(parents=True, exist_ok=True)
    p = tmp_path / "job.yaml"
    p.write_text("name: t\nmodel: {path: m.keras}\ndataset: {format: folder, path: data}\noutput: out\n" + extra)
    return p


def test_a_570_byte_alias_bomb_in_explain_layers_is_one_line_at_once(tmp_path):
    from audit.runner.spec import load_spec

    levels = ['a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    levels += [f"a{k}: &a{k} [" + ", ".join([f"*a{k - 1}"] * 9) + "]" for k in range(1, 9)]
    p = _spec_file(tmp_path, "x-bomb:\n" + "".join(f"  {ln}\n" for ln in levels) + "explain: {layers: *a8}\n")
    assert p.stat().st_size < 1200
    t0 = time.perf_counter()
    with pytest.raises(AuditError) as e:
        load_spec(str(p))
    assert "alias" in _one_line(e) and time.perf_counter() - t0 < 30  # 9^9 strings were never built


@pytest.mark.parametrize("value", ["1000000000", "1e23"])
def test_a_huge_batch_size_is_one_line_naming_the_bound(tmp_path, value):
    from audit.runner.spec import load_spec

    with pytest.raises(AuditError) as e:
        load_spec(str(_spec_file(tmp_path)), [f"resources.batch_size={value}"])
    assert "batch_size" in _one_line(e)


def test_an_edited_manifest_box_changes_the_shard_identity(tmp_path):
    h.write_png(tmp_path / "a.png", h.image(1, 0)[0])
    m = tmp_path / "m.csv"
    m.write_text("path,label,x0,y0,x1,y1\na.png,0,0,0,2,2\n")
    d = DatasetSpec.from_partial({"format": "manifest", "path": str(m), "classes": ["x", "y"], "shard_size": 4})

    def ident():
        p = datasets.plan(d)
        return identity.shard_identity(d, p.shards[0], p.classes)

    was = ident()
    m.write_text("path,label,x0,y0,x1,y1\na.png,0,10,10,20,20\n")  # same shard, another box
    assert "input list changed" in identity.identity_change(was, ident())


def test_categorical_and_float_labels_are_labels_not_error_rows(tmp_path):
    import pandas as pd

    png = h.encode_png(h.image(1, 0)[0])
    pd.DataFrame({"image": [png] * 3, "label": pd.Categorical(["cat", "dog", "cat"])}).to_parquet(
        tmp_path / "c.parquet")
    (tmp_path / "f").mkdir()
    pd.DataFrame({"image": [png] * 3, "label": [0.0, 1.0, float("nan")]}).to_parquet(tmp_path / "f" / "f.parquet")
    c = DatasetSpec.from_partial({"format": "parquet", "path": str(tmp_path / "c.parquet"), "shard_size": 4})
    f = DatasetSpec.from_partial({"format": "parquet", "path": str(tmp_path / "f"), "shard_size": 4,
                                  "classes": ["cat", "dog"]})
    assert [(i.label, i.error) for i in datasets.iter_items(c)] == [(0, None), (1, None), (0, None)]
    assert [(i.label, i.error) for i in datasets.iter_items(f)] == [(0, None), (1, None), (None, None)]


def test_a_duplicated_manifest_row_with_a_bad_label_is_refused_in_one_line(tmp_path):
    for n in ("a.png", "b.png"):
        h.write_png(tmp_path / n, h.image(1, 0)[0])
    (tmp_path / "m.csv").write_text("path,label\na.png,bad\nb.png,1\na.png,0\n")
    with pytest.raises(AuditError) as e:
        datasets.plan(DatasetSpec.from_partial({"format": "manifest", "path": str(tmp_path / "m.csv"), "shard_size": 4,
                                                "classes": ["x", "y"]}))
    assert "line 4: image 'a.png' is listed again (first on line 2)" in _one_line(e)


@pytest.mark.parametrize("content", [b"", b'{"host": "h", "pid": 1, "job_'])
def test_an_empty_or_truncated_lock_heals_once_old(tmp_path, content):
    (tmp_path / lk.LOCK).write_bytes(content)
    with pytest.raises(AuditError) as e:
        lk.OutputLock(tmp_path, "j").acquire()
    assert "unreadable" in _one_line(e)
    t = time.time() - lk.STALE_AFTER_S - 5
    os.utime(tmp_path / lk.LOCK, (t, t))
    said = []
    with lk.OutputLock(tmp_path, "j", warn=said.append):
        pass
    assert len(said) == 1 and "took over the stale lock" in said[0] and "unreadable" in said[0]


def test_a_heartbeat_in_the_future_is_not_believed_forever(tmp_path):
    d = {"host": "elsewhere", "pid": 1, "job_id": "x", "started": 0, "heartbeat": time.time() + 10**6, "token": "t"}
    (tmp_path / lk.LOCK).write_text(json.dumps(d))
    t = time.time() - lk.STALE_AFTER_S - 5
    os.utime(tmp_path / lk.LOCK, (t, t))
    said = []
    with lk.OutputLock(tmp_path, "j", warn=said.append):
        pass
    assert "in the future" in said[0]


def test_a_full_disk_during_a_shard_write_is_one_line_with_the_free_space(tmp_path, monkeypatch):
    import errno

    import pyarrow as pa

    (tmp_path / io.RECORDS).mkdir()
    (tmp_path / io.MANIFEST).mkdir()

    def full(table, where):
        Path(where).write_bytes(b"PAR1")  # a partial file, as a full disk leaves it
        raise OSError(errno.ENOSPC, "No space left on device")  # pyarrow raises it this way

    monkeypatch.setattr(io, "_write_parquet", full)
    with pytest.raises(AuditError) as e:
        io.write_shard(tmp_path, 3, pa.table({"x": [1]}), job_id="j", schema_version="1", inputs={}, counts={})
    msg = _one_line(e)
    assert msg.startswith(f"cannot write {tmp_path / 'records' / 'part-00003.parquet'}: No space left on device")
    assert "disk full: " in msg and " free on " in msg and "needed" in msg
    assert list((tmp_path / io.RECORDS).iterdir()) == []  # no temp file left behind


def test_a_full_disk_writing_job_json_is_one_line(tmp_path, monkeypatch):
    import errno

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(AuditError) as e:
        io.write_job(tmp_path, {"a": 1})
    assert _one_line(e).startswith(f"cannot write {tmp_path / 'job.json'}: No space left on device (disk full: ")
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_writing_the_scan_summary_is_one_line(tmp_path, monkeypatch):
    import errno

    from audit.data.schema import arrow_schema
    from audit.scan import table

    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(io, "atomic_write_bytes", full)
    with pytest.raises(AuditError) as e:
        table.write_tables(tmp_path, {"interventions": arrow_schema("interventions", {}).empty_table().to_pandas()},
                           {})
    msg = _one_line(e)
    assert msg.startswith(f"cannot write {tmp_path / 'summary' / 'interventions.parquet'}: No space left on device "
                          "(disk full: ") and "needed; free some space); the scan writes OUT/summary/" in msg


def _fake_output(out: Path, shards: int, total: int, status: str, pred=lambda i: i % 2, score=0.9,
                 label=lambda i: i % 2):
    import pyarrow as pa

    (out / io.RECORDS).mkdir(parents=True)
    (out / io.MANIFEST).mkdir()
    for s in range(shards):
        ids = [f"img{s}_{k}" for k in range(4)]
        t = pa.table({"image_id": ids, "status": ["ok"] * 4, "layer": ["conv"] * 4, "method": ["gradcam"] * 4,
                      "pred": [pred(4 * s + k) for k in range(4)], "score": [score] * 4,
                      "label": [label(4 * s + k) for k in range(4)]})
        io.write_shard(out, s, t, job_id="j", schema_version="1", inputs={"start": 0, "stop": 4}, counts={})
    io.atomic_write_json(out / io.JOB_JSON, {"job_id": "j", "status": status, "shards": {"total": total},
                                             "classes": ["cat", "dog"]})


def test_an_incomplete_output_says_so_in_the_scan_and_the_summary(tmp_path):
    from audit.cli.run import format_summary
    from audit.scan.table import format_table

    _fake_output(tmp_path / "out", 6, 16, "incomplete")
    line = io.completeness(tmp_path / "out")
    assert line.startswith("incomplete output: 6 of 16 shards committed (job status incomplete)")
    import pandas as pd

    classes = pd.DataFrame({"verdict": ["ok"], "class_id": [0], "class_name": ["cat"], "n": [24], "accuracy": [1.0],
                            "suspicion": [0.1], "cue": [None], "flip_rate_cue": [None], "flip_rate_object": [None],
                            "flip_rate_background": [None], "evidence": ["fine"]})
    text = format_table(classes, pd.DataFrame(columns=["class_id"]), out="o", incomplete=line)
    assert text.splitlines()[0] == f"WARNING: {line}"
    assert "0 of 1 classes suspected of a shortcut (incomplete output: 6 of 16 shards committed);" in text
    summary = {"name": "t", "job_id": "j", "status": "incomplete", "images_done": 24, "images": 64,
               "images_this_run": 24, "shards_skipped": 0, "errors": 0, "flat_maps": 0, "shards": 16,
               "shards_done": 6, "retries": 0, "shards_failed": [7], "actors": 1, "actor_deaths": 0,
               "output": "o", "rows": 24}
    assert "  INCOMPLETE 6 of 16 shards committed: continue with --resume" in format_summary(summary)
    _fake_output(tmp_path / "done", 2, 2, "ok")
    assert io.completeness(tmp_path / "done") is None


@pytest.mark.parametrize("case", ["nan weights", "collapsed head", "healthy", "one-class data"])
def test_a_model_that_predicts_one_class_for_everything_is_called_out(tmp_path, case):
    from audit.data.predictions import one_class_warning

    pred, score, label = {"nan weights": (lambda i: 0, float("nan"), lambda i: i % 2),
                          "collapsed head": (lambda i: 1, 0.99, lambda i: i % 2),
                          "healthy": (lambda i: i % 2, 0.9, lambda i: i % 2),
                          "one-class data": (lambda i: 1, 0.9, lambda i: 1)}[case]
    _fake_output(tmp_path, 3, 3, "ok", pred=pred, score=score, label=label)
    said = one_class_warning(tmp_path, ["cat", "dog"])
    if case in ("healthy", "one-class data"):  # all tanks, all predicted tank: nothing wrong
        assert said is None
    elif case == "nan weights":
        assert said.startswith("the model's scores are NaN or infinite for 12 of 12 images")
    else:
        assert said.startswith("the model predicts class 1 (dog) for every one of the 12 images")


def test_same_stem_images_do_not_share_a_mask(tmp_path):
    import numpy as np

    for name in ("img.bmp", "img.webp"):
        h.write_png(tmp_path / "d" / "cat" / name, h.image(1, 0)[0])
    h.write_png(tmp_path / "m" / "cat" / "img.png", np.full((16, 16), 255, np.uint8))
    d = DatasetSpec.from_partial({"format": "folder", "path": str(tmp_path / "d"), "masks": str(tmp_path / "m"),
                                  "shard_size": 4})
    assert [(i.image_id, i.mask_file) for i in datasets.iter_items(d)] == [("cat/img.bmp", None),
                                                                           ("cat/img.webp", None)]


def test_explain_refuses_a_12000_by_12000_pbm_before_decoding(tmp_path):
    from audit.review.explain import read_image

    p = tmp_path / "big.pbm"
    p.write_bytes(b"P4\n# huge\n12000 12000\n" + bytes(12000 * 12000 // 8))
    t0 = time.perf_counter()
    with pytest.raises(AuditError) as e:
        read_image(p)
    assert "PBM header claims 12000x12000 = 144,000,000 pixels, more than max_pixels" in _one_line(e)
    assert time.perf_counter() - t0 < 5


def test_opencv_s_own_pixel_guard_is_one_clear_line():
    """Inside jobs OpenCV's OPENCV_IO_MAX_IMAGE_PIXELS refused with a raw "Assertion failed"."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import numpy as np, cv2\n"
            "from audit.data import decode\n"
            "ok, buf = cv2.imencode('.png', np.zeros((40, 40, 3), np.uint8))\n"
            "try:\n    decode.decode_image(buf.tobytes(), max_pixels=10**8)\n"
            "except decode.DecodeError as e:\n    print(e)\n")
    env = {**os.environ, "OPENCV_IO_MAX_IMAGE_PIXELS": "100"}
    r = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parents[1])], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.stdout.strip().startswith("the image has more than max_pixels=100,000,000 pixels (refused by OpenCV"), \
        r.stdout + r.stderr[-500:]
    assert "Assertion" not in r.stdout


@pytest.mark.parametrize("fmt,data,size", [
    ("pgm", b"P5 640 480 255\n", (640, 480)),
    ("pam", b"P7\nWIDTH 300\nHEIGHT 200\nDEPTH 3\nMAXVAL 255\nENDHDR\n", (300, 200)),
    ("ras", b"\x59\xa6\x6a\x95" + (70).to_bytes(4, "big") + (50).to_bytes(4, "big"), (70, 50)),
    ("hdr", b"#?RADIANCE\nFORMAT=32-bit_rle_rgbe\n\n-Y 30 +X 40\n", (40, 30)),
])
def test_every_decoder_s_header_is_sized_before_decoding(fmt, data, size):
    assert decode.header_size(data) == (fmt, *size)


def test_an_absolute_s3_manifest_entry_keeps_its_uri_as_image_id():
    from audit.data.formats import manifest

    item = manifest._manifest_item({"path": "s3://out/img/a.png", "label": "0"}, "/data", None, "mask")
    assert item.image_id == "s3://out/img/a.png"


def test_the_scan_names_a_bucket_output_with_both_slashes():
    import pandas as pd

    from audit.scan.table import format_table

    text = format_table(pd.DataFrame(columns=["verdict", "class_id"]), pd.DataFrame(columns=["class_id"]),
                        out="s3://out/job")
    assert "tables in s3://out/job/summary/classes.parquet" in text


def test_the_lambda_refusal_names_a_flag_that_audit_run_accepts(tmp_path):
    import zipfile

    from audit.cli import build_parser
    from audit.runner.precheck import check_model_file
    from audit.runner.spec import load_spec

    cfg = {"class_name": "Functional", "config": {"layers": [
        {"class_name": "InputLayer", "config": {"name": "in"}},
        {"class_name": "Lambda", "config": {"name": "code"}}]}}
    with zipfile.ZipFile(tmp_path / "m.keras", "w") as z:
        z.writestr("config.json", json.dumps(cfg))
    (tmp_path / "data" / "a").mkdir(parents=True)
    spec = tmp_path / "job.yaml"
    spec.write_text("name: t\nmodel: {path: m.keras}\ndataset: {format: folder, path: data}\noutput: out\n")
    with pytest.raises(AuditError) as e:
        check_model_file(load_spec(str(spec)))
    msg = _one_line(e)
    assert "--set model.trust_code=true" in msg and "(or --trust-code)" not in msg
    args = build_parser().parse_args(["run", str(spec), "--set", "model.trust_code=true"])
    check_model_file(load_spec(str(spec), args.overrides))  # the flag named exists and is enough


def test_a_model_with_nan_weights_is_called_out_from_its_real_records(tmp_path):
    """The issue's case end to end without Ray: NaN weights, the worker's own rows, the warning."""
    import keras
    import numpy as np

    from audit.data.predictions import one_class_warning
    from audit.runner.spec import load_spec
    from audit.runner.worker import AuditWorker

    path = h.make_model(tmp_path / "nan.keras")
    m = keras.models.load_model(path)
    m.get_layer("head").set_weights([np.full_like(w, np.nan) for w in m.get_layer("head").get_weights()])
    m.save(path)
    h.make_folder(tmp_path / "data", 5, masks=False)
    spec = load_spec({"model": {"path": path, "preprocess": "scale_0_1"},
                      "dataset": {"format": "folder", "path": str(tmp_path / "data"), "shard_size": 8},
                      "explain": {"methods": ["gradcam"]}, "resources": {"batch_size": 4},
                      "output": str(tmp_path / "out")})
    p = datasets.plan(spec.dataset)
    (tmp_path / "out" / io.RECORDS).mkdir(parents=True)
    (tmp_path / "out" / io.MANIFEST).mkdir()
    w = AuditWorker(spec, out_dir=str(tmp_path / "out"), job_id="j", classes=p.classes)
    for s in p.shards:
        w.process_shard(s)
    said = one_class_warning(tmp_path / "out", p.classes)
    assert said is not None and said.startswith("the model's scores are NaN or infinite for 10 of 10 images"), said
