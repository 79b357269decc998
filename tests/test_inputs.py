"""Every input gets a row: odd names, special files, size limits, padded images, corrupt TFRecords, bad masks."""

from __future__ import annotations

import os
import socket
import struct
import threading
import types
from pathlib import Path

import cv2
import helpers_jobs as h
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from audit.data import datasets, decode, files, io, tfrecord
from audit.data.jobspec import DatasetSpec
from audit.errors import AuditError
from audit.runner.spec import fill_defaults, load_spec
from audit.runner.worker import AuditWorker, runs_mixed


def ds(fmt, path, **kw):
    d = {"format": fmt, "path": str(path), "classes": None, "masks": None, "shard_size": 4,
         "limit": None, "max_pixels": 100_000_000}
    d.update(kw)
    return DatasetSpec.from_partial(d)


def items_of(d):
    p = datasets.plan(d)
    return p, [it for s in p.shards for it in datasets.read_shard(d, s, p.classes)]


def load(it, **kw):
    return datasets.load_item(it, (h.SIZE, h.SIZE), 10**8, **kw)


def within(seconds, fn, *args, **kw):
    """fn(*args) in a thread; fail (instead of hanging the suite) if it blocks."""
    out = {}

    def target():
        try:
            out["value"] = fn(*args, **kw)
        except BaseException as e:  # noqa: BLE001 - handed back to the test
            out["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"{fn.__name__} blocked for {seconds} s"
    if "error" in out:
        raise out["error"]
    return out["value"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return h.make_model(tmp_path_factory.mktemp("imodel") / "model.keras")


def run_worker(tmp_path, model, dataset):
    spec = load_spec({"model": {"path": model, "preprocess": "scale_0_1"}, "dataset": dataset,
                      "explain": {"methods": ["gradcam"]}, "resources": {"batch_size": 4, "decode_threads": 2},
                      "output": str(tmp_path / "out")})
    p = datasets.plan(spec.dataset)
    w = AuditWorker(spec, classes=p.classes)
    table = pa.concat_tables([w.process_shard(s, commit=False)["table"] for s in p.shards])
    # the table must survive a Parquet round trip (non-UTF-8 text would fail here)
    tmp_path.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, tmp_path / "rows.parquet")
    return pq.read_table(tmp_path / "rows.parquet").to_pandas()


# ----------------------------------------------------------------------------
# names that are not UTF-8
# ----------------------------------------------------------------------------


def test_non_utf8_file_names_are_escaped_and_kept_exactly(tmp_path, model):
    root, _ = h.make_folder(tmp_path / "data", 2, masks=False)
    raw = os.fsencode(root) + b"/cat/caf\xe9-\xff.png"  # Latin-1 bytes: not UTF-8
    img = h.image(77, 0)[0]
    with open(raw, "wb") as f:
        f.write(h.encode_png(img))
    p, its = items_of(ds("folder", root))
    odd = [it for it in its if it.path_bytes is not None]
    assert len(its) == 5 and len(odd) == 1
    assert odd[0].image_id == "cat/caf\\xe9-\\xff.png" and odd[0].path_bytes == raw
    assert odd[0].path == os.fsdecode(raw).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    assert all(it.path_bytes is None for it in its if it is not odd[0])
    assert np.array_equal(load(odd[0])[0], img)
    # the whole shard is audited and written (before: UnicodeEncodeError, the shard lost)
    df = run_worker(tmp_path, model, {"format": "folder", "path": root, "shard_size": 8})
    row = df[df.image_id == "cat/caf\\xe9-\\xff.png"].iloc[0]
    assert len(df) == 5 and (df.status == "ok").all()
    assert row.path_bytes == raw and df.path_bytes.isna().sum() == 4
    from audit.data import query

    assert np.array_equal(query.original_image(row), img)  # overlays find the file by its exact bytes
    # read back by its id (the scan's intervention step)
    images, _, _ = datasets.load_images(ds("folder", root), ["cat/caf\\xe9-\\xff.png"], (16, 16))
    assert np.array_equal(images[0], img)


def test_non_utf8_paths_and_labels_in_a_manifest(tmp_path):
    img = h.image(78, 1)[0]
    (tmp_path / "im").mkdir()
    with open(os.fsencode(tmp_path) + b"/im/\xfcber.png", "wb") as f:
        f.write(h.encode_png(img))
    with open(os.fsencode(tmp_path) + b"/im/\xfcber2.png", "wb") as f:  # each image listed once
        f.write(h.encode_png(img))
    (tmp_path / "m.csv").write_bytes(b"path,label\nim/\xfcber.png,dog\nim/\xfcber2.png,k\xe4se\n")
    p, its = items_of(ds("manifest", tmp_path / "m.csv"))
    assert p.classes == ["dog", "k\\xe4se"]
    assert its[0].image_id == "im/\\xfcber.png" and its[0].path_bytes == os.fsencode(tmp_path) + b"/im/\xfcber.png"
    assert np.array_equal(load(its[0])[0], img) and its[1].label == 1


def test_escape_text_keeps_valid_names_and_round_trips():
    assert files.escape_text("chat/été.png") == "chat/été.png" and files.raw_bytes("été") is None
    odd = os.fsdecode(b"a\xffb")
    assert files.escape_text(odd) == "a\\xffb" and files.raw_bytes(odd) == b"a\xffb"
    assert files.unescape_path("d/\\xffé.png") == os.fsdecode(b"d/" + b"\xff" + "é.png".encode())
    assert files.escape_text("\ud800x") == "\\ud800x"  # a lone surrogate that is no escaped byte


# ----------------------------------------------------------------------------
# special files and sizes
# ----------------------------------------------------------------------------


def test_fifos_devices_sockets_and_dangling_links_are_error_rows_without_blocking(tmp_path):
    root, _ = h.make_folder(tmp_path / "data", 1, masks=False)
    cat = Path(root) / "cat"
    os.mkfifo(cat / "pipe.png")
    os.symlink("/dev/zero", cat / "zero.jpg")
    os.symlink(cat / "nowhere.png", cat / "dangling.png")
    sock = None
    if len(str(cat / "s.png")) < 100:  # AF_UNIX paths are short
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(cat / "s.png"))
    try:
        p, its = items_of(ds("folder", root))
        errors = {}
        for it in its:
            try:
                within(10, load, it)
            except decode.DecodeError as e:
                errors[it.image_id.split("/")[1]] = str(e)
    finally:
        if sock:
            sock.close()
    assert "FIFO (named pipe), not a regular file" in errors.pop("pipe.png")
    assert "character device, not a regular file" in errors.pop("zero.jpg")
    assert "file not found" in errors.pop("dangling.png")
    if sock:
        assert "socket, not a regular file" in errors.pop("s.png")
    assert errors == {} and p.total == len(its) == 2 + 3 + (sock is not None)


def test_a_file_swapped_for_a_fifo_after_the_stat_is_not_read(tmp_path, monkeypatch):
    os.mkfifo(tmp_path / "p.png")
    real_stat = os.stat
    monkeypatch.setattr(os, "stat", lambda p, *a, **k: real_stat(__file__))  # the check sees a regular file
    with pytest.raises(decode.DecodeError, match="FIFO"):
        within(10, files.read_regular_file, str(tmp_path / "p.png"))


def test_files_over_max_image_bytes_are_refused_unread(tmp_path):
    data = h.encode_png(h.image(1, 0)[0])
    (tmp_path / "a.png").write_bytes(data)
    assert files.read_regular_file(str(tmp_path / "a.png"), len(data)) == data
    with pytest.raises(decode.DecodeError, match=f"larger than dataset.max_image_bytes={len(data) - 1:,}"):
        files.read_regular_file(str(tmp_path / "a.png"), len(data) - 1)
    # encoded bytes held in a Parquet cell or a TFRecord record are bounded the same way
    it = datasets.Item(image_id="x", path="x", data=data)
    with pytest.raises(decode.DecodeError, match="max_image_bytes"):
        load(it, max_bytes=100)
    tfr = h.make_tfrecord(tmp_path / "t.tfrecord", n=2, masks=False)
    _, its = items_of(ds("tfrecord", tfr, max_image_bytes=100))
    assert all("more than dataset.max_image_bytes=100" in it.error for it in its)
    # the spec has the key, with its default
    spec = fill_defaults({"model": {"path": "m.keras"}, "dataset": {"format": "folder", "path": "d"}, "output": "o"})
    assert spec["dataset"]["max_image_bytes"] == 256 * 2**20 and spec["dataset"]["resize_masks"] is False


# ----------------------------------------------------------------------------
# bytes after the end of a valid image
# ----------------------------------------------------------------------------


def test_trailing_bytes_after_jpeg_and_png_are_decoded(tmp_path):
    img = h.image(5, 1)[0]
    ok, jpg = cv2.imencode(".jpg", img[..., ::-1])
    jpg = jpg.tobytes()
    png = h.encode_png(img)
    rng = np.random.default_rng(0)
    want_jpg = decode.decode_image(jpg)
    for pad in (b"\x00" * 200, rng.bytes(200), rng.bytes(4096), b"\xff\xd8" + rng.bytes(300)):
        assert np.array_equal(decode.decode_image(jpg + pad), want_jpg)
        assert np.array_equal(decode.decode_image(png + pad), img)
    # still refused: truncated files, also when an end marker hides in an EXIF thumbnail before the scan
    thumb = b"Exif\x00\x00" + b"\xff\xd8" + b"\x11" * 40 + b"\xff\xd9"
    exif = jpg[:2] + b"\xff\xe1" + struct.pack(">H", len(thumb) + 2) + thumb + jpg[2:]
    assert np.array_equal(decode.decode_image(exif), want_jpg)
    with pytest.raises(decode.DecodeError, match="truncated JPEG"):
        decode.decode_image(exif[: len(exif) * 2 // 3])
    with pytest.raises(decode.DecodeError, match="truncated PNG"):
        decode.decode_image(png[:-12] + b"\x00" * 40)  # IEND cut off, padding after it


# ----------------------------------------------------------------------------
# corrupt TFRecords
# ----------------------------------------------------------------------------


def _records(path):
    """[(offset, length)] of a good TFRecord file."""
    out, data, pos = [], Path(path).read_bytes(), 0
    while pos < len(data):
        n = struct.unpack("<Q", data[pos:pos + 8])[0]
        out.append((pos, n))
        pos += 16 + n
    return out


def _items(d):
    p, its = items_of(d)
    assert p.total == len(its)
    return its


def _tf_items(path, shard_size=3):
    d = ds("tfrecord", path, shard_size=shard_size)
    p, its = items_of(d)
    assert p.total == len(its)
    return its


def test_random_bytes_tfrecord_is_one_error_row(tmp_path):
    bad = tmp_path / "junk.tfrecord"
    bad.write_bytes(np.random.default_rng(1).bytes(5000))
    [it] = _tf_items(bad)
    assert it.error == "corrupt TFRecord data: bytes 0 to 5,000 are not a record (length checksum mismatch)"
    short = tmp_path / "short.tfrecord"
    short.write_bytes(b"\x01\x02\x03")
    [it] = _tf_items(short)
    assert it.error.startswith("truncated TFRecord record")


def test_a_corrupt_record_keeps_the_rest_of_the_file(tmp_path):
    path = h.make_tfrecord(tmp_path / "d.tfrecord", n=7, masks=False)
    data = bytearray(Path(path).read_bytes())
    recs = _records(path)
    good = [it.image_id for it in _tf_items(path)]
    # 1. a flipped byte in record 2's data: that record is an error row, the others decode
    flip = bytearray(data)
    flip[recs[2][0] + 12 + 30] ^= 0xFF
    (tmp_path / "flip.tfrecord").write_bytes(flip)
    its = _tf_items(tmp_path / "flip.tfrecord")
    assert [it.error for it in its] == [None, None, "corrupt TFRecord record (data checksum mismatch)"] + [None] * 4
    assert np.array_equal(load(its[3])[0], h.image(4003, 1)[0])
    # 2. record 4's length field overwritten: the framing is found again at record 5
    hdr = bytearray(data)
    hdr[recs[4][0]:recs[4][0] + 8] = struct.pack("<Q", 10**15)
    (tmp_path / "hdr.tfrecord").write_bytes(hdr)
    its = _tf_items(tmp_path / "hdr.tfrecord")
    assert len(its) == 7 and [it.error is None for it in its] == [True] * 4 + [False] + [True] * 2
    assert its[4].error.startswith(f"corrupt TFRecord data: bytes {recs[4][0]:,} to {recs[5][0]:,}")
    assert np.array_equal(load(its[6])[0], h.image(4006, 0)[0])
    # 3. 3000 random bytes between records 2 and 3: one error row for them, every record kept
    junk = data[:recs[3][0]] + np.random.default_rng(2).bytes(3000) + data[recs[3][0]:]
    (tmp_path / "junk.tfrecord").write_bytes(junk)
    its = _tf_items(tmp_path / "junk.tfrecord")
    assert len(its) == 8 and [it.error is None for it in its] == [True] * 3 + [False] + [True] * 4
    for k, it in enumerate(its[:3] + its[4:]):
        assert it.image_id == good[k].replace("d.tfrecord", "junk.tfrecord").replace(f"#{k}", f"#{k + (k >= 3)}")
        assert np.array_equal(load(it)[0], h.image(4000 + k, k % 2)[0])
    # the shards (of 3 entries) tile the entries whatever the shard size
    assert [it.image_id for it in _tf_items(tmp_path / "junk.tfrecord", 1)] == [it.image_id for it in its]


def test_a_damaged_parquet_row_group_costs_only_its_rows(tmp_path):
    root = h.make_parquet(tmp_path / "pq", n=12, files=1)  # row groups of 4
    f = Path(root) / "part-0.parquet"
    off = pq.ParquetFile(f).metadata.row_group(1).column(0).data_page_offset
    data = bytearray(f.read_bytes())
    data[off:off + 16] = b"\xff" * 16  # rows 4-7: a page header that does not parse
    f.write_bytes(data)
    its = _items(ds("parquet", root, shard_size=3))  # shards 0-2, 3-5, 6-8, 9-11 straddle the groups
    assert [it.error is None for it in its] == [True] * 4 + [False] * 4 + [True] * 4
    assert its[5].image_id == "part-0.parquet#5" and its[5].error.startswith("unreadable Parquet row group 1")
    assert [it.image_id for it in its[8:]] == [f"rec-{i:04d}" for i in range(8, 12)]
    assert np.array_equal(load(its[3])[0], h.image(3003, 1)[0])


def test_damaged_files_commit_through_the_worker(tmp_path, model):
    """The worker's whole path on damaged inputs, commit included: every entry one row, no exception."""
    junk = tmp_path / "junk.tfrecord"
    junk.write_bytes(np.random.default_rng(4).bytes(3000))
    spec = load_spec({"model": {"path": model, "preprocess": "scale_0_1"},
                      "dataset": {"format": "tfrecord", "path": str(junk), "shard_size": 4},
                      "explain": {"methods": ["gradcam"]}, "resources": {"batch_size": 4},
                      "output": str(tmp_path / "out")})
    io.prepare_output(spec.output, resume=False)
    p = datasets.plan(spec.dataset)
    w = AuditWorker(spec, out_dir=spec.output, classes=["a", "b"])
    for s in p.shards:
        w.process_shard(s)
    df = pq.read_table(tmp_path / "out" / "records").to_pandas()
    assert df.status.tolist() == ["error"] and df.error[0].startswith("corrupt TFRecord data: bytes 0 to 3,000")


def test_tfrecord_header_search_matches_the_checksum():
    header = struct.pack("<Q", 1234)
    header += struct.pack("<I", tfrecord.masked_crc(header))
    buf = np.random.default_rng(3).bytes(777) + header + b"\x00" * 40
    assert tfrecord._valid_headers(buf).tolist() == [777]
    assert tfrecord._valid_headers(buf, max_length=5000).tolist() == [777]
    assert tfrecord._valid_headers(buf, max_length=200).tolist() == []  # a length of 1234 needs a 2nd byte



# ----------------------------------------------------------------------------
# masks
# ----------------------------------------------------------------------------


def _mask_cases(tmp_path):
    """A folder dataset whose cat/img_001 mask is corrupt, img_002's is 32x32, img_003's a FIFO."""
    root, mroot = h.make_folder(tmp_path / "data", 4)
    (Path(mroot) / "cat" / "img_001.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    h.write_png(Path(mroot) / "cat" / "img_002.png", cv2.resize(h.image(2, 0)[1], (32, 32),
                                                               interpolation=cv2.INTER_NEAREST))
    os.remove(Path(mroot) / "cat" / "img_003.png")
    os.mkfifo(Path(mroot) / "cat" / "img_003.png")
    return root, mroot


def test_a_bad_mask_leaves_the_image_audited_without_it(tmp_path):
    root, mroot = _mask_cases(tmp_path)
    _, its = items_of(ds("folder", root, masks=mroot))
    got = {it.image_id: within(10, load, it) for it in its}
    assert got["cat/img_000.png"][1] is not None and its[0].mask_error is None
    reasons = {it.image_id: it.mask_error for it in its if it.mask_error}
    assert reasons == {"cat/img_001.png": "mask: truncated PNG (no IHDR header)",
                       "cat/img_002.png": "mask is 32x32 but the image is 16x16; set dataset.resize_masks: true "
                                          "to stretch masks to their image",
                       "cat/img_003.png": f"mask {mroot}/cat/img_003.png is a FIFO (named pipe), not a regular file "
                                          "(not read)"}
    for k in (1, 2, 3):
        img, mask, _ = got[f"cat/img_00{k}.png"]
        assert mask is None and np.array_equal(img, h.image(k, 0)[0])
    # allowed: the 32x32 mask is stretched (nearest) to the image
    _, its = items_of(ds("folder", root, masks=mroot))
    img, mask, _ = load(its[2], resize_masks=True)
    assert its[2].mask_error is None and np.array_equal(mask, h.image(2, 0)[1] > 0)


def test_mask_error_column_through_the_worker(tmp_path, model):
    root, mroot = _mask_cases(tmp_path)
    (tmp_path / "m.csv").write_text(f"path,label,x0,y0,x1,y1\n{root}/dog/img_000.png,1,1,2,x,4\n")
    df = run_worker(tmp_path, model, {"format": "folder", "path": root, "masks": mroot, "shard_size": 8})
    assert len(df) == 8 and (df.status == "ok").all()
    bad = df[df.mask_error.notna()]
    assert sorted(bad.image_id) == ["cat/img_001.png", "cat/img_002.png", "cat/img_003.png"]
    assert (~bad.has_mask).all() and bad.energy_object.isna().all()
    fine = df[df.mask_error.isna()]
    assert fine.has_mask.all() and fine.energy_object.notna().all()
    # a manifest box that is not numbers: the image is audited, the box is the mask_error
    df = run_worker(tmp_path / "b", model, {"format": "manifest", "path": str(tmp_path / "m.csv"),
                                            "classes": ["cat", "dog"]})
    assert df.status.tolist() == ["ok"] and df.mask_error.tolist() == ["bad box ['1', '2', 'x', '4']"]


# ----------------------------------------------------------------------------
# our bugs are not the user's data
# ----------------------------------------------------------------------------


def test_a_bug_in_our_code_fails_the_shard_instead_of_becoming_error_rows(tmp_path, model, monkeypatch):
    root, _ = h.make_folder(tmp_path / "data", 2, masks=False)

    def broken(*a, **k):
        raise TypeError("unsupported operand type(s) for +: 'int' and 'str'")

    monkeypatch.setattr(decode, "decode_image_sized", broken)
    with pytest.raises(TypeError, match="unsupported operand"):
        run_worker(tmp_path, model, {"format": "folder", "path": root, "shard_size": 8})


def test_mixed_precision_reports_what_the_model_runs():
    import keras

    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        inp = keras.Input((8, 8, 3))
        mixed = keras.Model(inp, keras.layers.Conv2D(2, 3)(inp))
    finally:
        keras.mixed_precision.set_global_policy("float32")
    inp = keras.Input((8, 8, 3))
    plain = keras.Model(inp, keras.layers.Conv2D(2, 3)(inp))
    assert runs_mixed(mixed) and not runs_mixed(plain)


# ----------------------------------------------------------------------------
# malformed manifests
# ----------------------------------------------------------------------------


def test_a_stray_quote_in_a_manifest_is_one_line_naming_file_and_line(tmp_path):
    path = Path(h.make_manifest(tmp_path, n=6))
    lines = path.read_text().splitlines()
    lines[3] = lines[3].replace("images/", '"images/', 1)  # line 4: a quote never closed
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(AuditError) as e:
        datasets.plan(ds("manifest", path))
    assert str(e.value).startswith(f"dataset: manifest {path} line 4: a quote is never closed")
    lines[3] = lines[3].replace('"images/', 'images/', 1)
    lines[5] = '"images/im004.png"x,cat'  # text after a closing quote
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(AuditError, match=r"line 6: not valid CSV: ',' expected after '\"'"):
        datasets.plan(ds("manifest", path))


def _planted_bug(*a, **k):
    return 1 + "x"  # our bug


@pytest.mark.slow
@pytest.mark.parametrize("in_process", ["1", "0"], ids=["in-driver", "on-ray"])
def test_a_bug_in_our_code_fails_the_job_with_its_traceback_not_error_rows(tmp_path, in_process, monkeypatch,
                                                                           capsys):
    """End to end: a TypeError inside the per-image loading fails the shards (exit 1, incomplete)
    with the traceback printed once; no image becomes an error row.

    On Ray (`audit run` in a subprocess, its own Ray) the bug is planted in every process by a
    sitecustomize, the actors included.  In the driver there is no other process: the bug is
    planted here and `audit run` runs through the CLI's ``main()`` in this process (the same
    in-driver job, its traceback printed by the same code), which saves a TensorFlow start."""
    import subprocess
    import sys

    import yaml

    h.make_model(tmp_path / "model.keras")
    h.make_folder(tmp_path / "data", 2, masks=False)
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump({
        "model": {"path": "model.keras", "preprocess": "scale_0_1"},
        "dataset": {"format": "folder", "path": "data", "shard_size": 2},
        "explain": {"methods": ["gradcam"]},
        "resources": {"actors": 1, "batch_size": 2, "max_retries": 0}, "output": "out"}))
    if in_process == "1":
        from audit.cli import main

        monkeypatch.setattr(decode, "decode_image_sized", _planted_bug)
        monkeypatch.setenv("AUDIT_IN_PROCESS", "1")
        monkeypatch.chdir(tmp_path)
        code = main(["run", str(spec), "--no-progress", "--no-scan"])
        r = types.SimpleNamespace(returncode=code, **dict(zip(("stdout", "stderr"), capsys.readouterr())))
        at_fault = f'{Path(__file__).name}", line {_planted_bug.__code__.co_firstlineno + 1}, in _planted_bug'
    else:
        stub = tmp_path / "stub"
        stub.mkdir()
        (stub / "sitecustomize.py").write_text(
            "from audit.data import decode\n"
            "def broken(*a, **k):\n"
            "    return 1 + 'x'  # our bug\n"
            "decode.decode_image_sized = broken\n")
        repo = Path(__file__).resolve().parents[1]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(stub), str(repo)]), "RAY_ADDRESS": "",
               "AUDIT_IN_PROCESS": "0"}  # a job this small runs in the driver unless told otherwise
        r = subprocess.run([sys.executable, "-m", "audit", "run", str(spec), "--no-progress", "--no-scan"],
                           capture_output=True, text=True, env=env, timeout=400, cwd=tmp_path)
        at_fault = 'sitecustomize.py", line 3, in broken'
    assert r.returncode == 1, r.stderr[-3000:]
    assert "incomplete" in r.stdout and "FAILED    shards 0, 1" in r.stdout
    # the traceback (the remote one on Ray), once, down to the line at fault
    assert r.stderr.count("a bug of shortcut-audit, not a fault in the data") == 1
    assert 'audit/data/datasets.py", line' in r.stderr and at_fault in r.stderr
    assert "TypeError: unsupported operand type(s) for +: 'int' and 'str'" in r.stderr
    assert not list((tmp_path / "out" / "records").glob("part-*.parquet"))  # no error rows written
