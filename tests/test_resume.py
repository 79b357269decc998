"""--resume checks what each committed shard holds; --resume=replan; broken part files.

Identities are pure functions of the dataset (tested without Ray).  The jobs
are small, so they run in the driver (:mod:`audit.runner.inprocess`): resume
checks and commits are the driver's in both paths, and tests/test_inprocess.py
shows the driver's records equal to the actors'; no Ray or actor start here.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import helpers_jobs as h
import helpers_s3
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from audit.data import datasets, formats, fs, io
from audit.data.identity import ShardIdentity, compare, identity_change, shard_identity
from audit.data.jobspec import DatasetSpec
from audit.errors import AuditError
from audit.runner.job import run_job


@pytest.fixture(scope="module")
def s3():
    server = helpers_s3.S3Server()
    yield server
    server.stop()


@pytest.fixture(scope="module", autouse=True)
def in_the_driver():
    """Every job of this module runs in the driver (asserted by :func:`finished`)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("AUDIT_IN_PROCESS", "1")
    yield
    mp.undo()


def _ds(fmt, path, size=4, **kw):
    return DatasetSpec.from_partial({"format": fmt, "path": str(path), "shard_size": size, **kw})


def _ids(ds):
    formats.clear_caches()  # as resume does: the folder listing may be cached
    p = datasets.plan(ds)
    return p, [shard_identity(ds, s, p.classes) for s in p.shards]


def test_folder_identity_follows_the_images(tmp_path):
    h.make_folder(tmp_path / "d", 6, masks=False)
    ds = _ds("folder", tmp_path / "d")
    plan, before = _ids(ds)
    assert [i.count for i in before] == [4, 2, 4, 2]
    assert before[0].first == "cat/img_000.png" and before[0].last == "cat/img_003.png"
    assert _ids(ds)[1] == before  # deterministic
    # one image added inside the first class: shard 0's list changes, shard 1 holds one more
    h.write_png(tmp_path / "d" / "cat" / "img_001b.png", h.image(99, 0)[0])
    plan2, after = _ids(ds)
    assert after[0].last == "cat/img_002.png" and after[0].digest != before[0].digest
    assert identity_change(before[0], after[0]) == "its last image was 'cat/img_003.png', now 'cat/img_002.png'"
    assert identity_change(before[1], after[1]) == "it held 2 inputs, now 3"
    assert after[2:] == before[2:]  # the other class is untouched
    # renamed inside, same first/last and count: only the digest tells
    (tmp_path / "d" / "cat" / "img_001b.png").unlink()
    (tmp_path / "d" / "cat" / "img_001.png").rename(tmp_path / "d" / "cat" / "img_001a.png")
    third = _ids(ds)[1]
    assert (third[0].count, third[0].first, third[0].last) == (4, before[0].first, before[0].last)
    assert "input list changed" in identity_change(before[0], third[0])


def test_an_image_or_mask_replaced_in_place_changes_only_its_shards_content(tmp_path):
    _, masks = h.make_folder(tmp_path / "d", 6)
    ds = _ds("folder", tmp_path / "d", masks=str(masks))
    _, before = _ids(ds)
    assert all(i.content for i in before)
    # the same name, another picture (another size): names, labels and count are unchanged
    h.write_png(tmp_path / "d" / "cat" / "img_001.png", h.image(99, 0, size=40)[0])
    _, after = _ids(ds)
    assert [(i.count, i.first, i.last, i.digest) for i in after] == [(i.count, i.first, i.last, i.digest)
                                                                     for i in before]
    assert after[0].content != before[0].content and after[1:] == before[1:]
    assert identity_change(before[0], after[0]) == (
        "a file it reads ('cat/img_000.png'..'cat/img_003.png') was replaced in place: same name, "
        "another size or modification time")
    h.write_png(Path(masks) / "dog" / "img_005.png", np.full((16, 16), 255, np.uint8))  # a mask redrawn
    _, third = _ids(ds)
    assert third[:3] == after[:3] and third[3].content != after[3].content
    # an entry committed before contents were recorded is checked on the rest
    old = ShardIdentity(**{**before[0].to_dict(), "content": None})
    assert ShardIdentity.from_dict(old.to_dict()) == old and identity_change(old, after[0]) is None


def test_manifest_and_parquet_files_rewritten_in_place_change_the_content(tmp_path):
    man = Path(h.make_manifest(tmp_path / "m", n=8))
    ds = _ds("manifest", man)
    _, before = _ids(ds)
    h.write_png(tmp_path / "m" / "images" / "im006.png", h.image(5, 0, size=24)[0])
    _, after = _ids(ds)
    assert after[0] == before[0] and after[1].digest == before[1].digest
    assert after[1].content != before[1].content

    pq_dir = h.make_parquet(tmp_path / "p", n=8, files=2)
    ds = _ds("parquet", pq_dir, size=2)
    _, before = _ids(ds)
    first = sorted(Path(pq_dir).glob("*.parquet"))[0]
    table = pq.read_table(first)
    other = pa.array([b"another picture"] * table.num_rows, pa.binary())
    pq.write_table(table.set_column(table.column_names.index("image"), "image", other), first)
    _, after = _ids(ds)
    assert [i.digest for i in after] == [i.digest for i in before]  # same keys and labels
    assert [a.content != b.content for a, b in zip(after, before)] == [True, True, False, False]


def test_object_identity_uses_one_listing_per_folder(s3, tmp_path):
    from audit.data import identity

    h.make_folder(tmp_path / "d", 4, masks=False)
    s3.bucket("ident")
    root = s3.upload(tmp_path / "d", "s3://ident/d")
    ds = _ds("folder", root)
    identity.clear_cache()
    _, before = _ids(ds)
    assert [i.count for i in before] == [4, 4] and all(i.content for i in before)
    assert identity.file_stat(f"{root}/cat/img_000.png")[0] == (tmp_path / "d/cat/img_000.png").stat().st_size
    assert identity.file_stat(f"{root}/cat/nope.png") == ("missing",)
    h.write_png(tmp_path / "e.png", h.image(7, 0, size=40)[0])
    fs.write_bytes(f"{root}/dog/img_002.png", (tmp_path / "e.png").read_bytes())
    assert _ids(ds)[1] == before  # the listing is cached in this process ...
    identity.clear_cache()  # ... until a resume clears it
    _, after = _ids(ds)
    assert after[0] == before[0] and after[1].content != before[1].content


def test_manifest_parquet_tfrecord_identities(tmp_path):
    man = Path(h.make_manifest(tmp_path / "m", n=8))
    ds = _ds("manifest", man)
    _, before = _ids(ds)
    assert before[0].first == "images/im000.png" and before[1].last == "images/im007.png"
    text = man.read_text().splitlines()
    text[2] = text[2].replace(",dog", ",cat")  # row 1 relabelled
    man.write_text("\n".join(text) + "\n")
    _, after = _ids(ds)
    assert after[0].digest != before[0].digest and after[1] == before[1]

    pq_dir = h.make_parquet(tmp_path / "p", n=8, files=2)
    ds = _ds("parquet", pq_dir, size=2)
    _, ids = _ids(ds)
    assert [(i.first, i.last) for i in ids[:2]] == [("rec-0000", "rec-0001"), ("rec-0002", "rec-0003")]

    rec = h.make_tfrecord(tmp_path / "t.tfrecord", n=6)
    ds = _ds("tfrecord", rec, size=4)
    _, ids = _ids(ds)
    assert [i.count for i in ids] == [4, 2] and ids[0].first == "t.tfrecord#0"
    blob = bytearray(Path(rec).read_bytes())
    blob[-1] ^= 0xFF  # the last record's data CRC: only the second shard changes
    Path(rec).write_bytes(bytes(blob))
    _, ids2 = _ids(ds)
    assert ids2[0] == ids[0] and ids2[1].digest != ids[1].digest


def test_compare_names_what_changed():
    shard = datasets.Shard(3, "cat", 8, 12)
    ident = ShardIdentity(4, "cat/a.png", "cat/d.png", "x")
    entry = {"shard": 3, "job_id": "j", "inputs": shard.to_dict(), "identity": ident.to_dict()}
    assert compare(entry, shard, lambda: ident, "j") is None
    assert compare(entry, shard, lambda: ident, "k") == "it was written by job j, not k"
    assert compare(entry, None, lambda: ident, "j") == "the new plan has no such shard (the dataset shrank)"
    moved = datasets.Shard(3, "cat", 8, 13)
    assert compare(entry, moved, lambda: ident, "j") == "it covered inputs 8-12 of cat, now 8-13"
    assert compare(entry, datasets.Shard(3, "dog", 8, 12), lambda: ident, "j") == "its source was 'cat', now 'dog'"
    old = {**entry, "identity": None}  # committed before identities were recorded: descriptor only
    assert compare(old, shard, lambda: 1 / 0, "j") is None


def _workspace(tmp):
    """A model, 12 images per class (shards of 4: 6 shards) and a spec in ``tmp``; returns the spec."""
    return h.folder_workspace(tmp, 12, ("gradcam",), {"actors": 1, "batch_size": 4})["spec"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """The workspace with its job run to the end, once per module, and a copy of it as it was then."""
    root = tmp_path_factory.mktemp("resume")
    work = root / "job"
    work.mkdir()
    spec = _workspace(work)
    summary = run_job(spec, progress=False)
    assert "in the driver" in summary["devices"]
    return {"work": work, "copy": h.copy_tree(work, root / "as_finished"), "spec": spec, "summary": summary}


@pytest.fixture()
def job(finished):
    """The finished job as it was after its run (same paths: job.json holds the resolved spec), and its summary."""
    from audit.data import identity

    work = finished["work"]
    shutil.rmtree(work)
    h.copy_tree(finished["copy"], work)
    formats.clear_caches()  # listings of this folder cached by an earlier test
    identity.clear_cache()
    return work, finished["spec"], finished["summary"]


@pytest.fixture()
def fresh_job(tmp_path):
    return tmp_path, _workspace(tmp_path)


@pytest.mark.slow
def test_resume_after_an_image_was_added_is_refused_then_replanned(job, capsys):
    tmp, spec, s = job
    assert s["status"] == "ok" and s["images_done"] == 24
    entry = json.loads((tmp / "out" / "_manifest" / "part-00001.json").read_text())
    assert entry["identity"]["count"] == 4 and entry["identity"]["first"] == "cat/img_004.png"
    assert entry["job_id"] == s["job_id"] and entry["bytes"] == (tmp / "out/records/part-00001.parquet").stat().st_size
    # one image added to the first class (the case: '80 of 73 audited', duplicates)
    h.write_png(tmp / "data" / "cat" / "img_005b.png", h.image(77, 0)[0])
    with pytest.raises(AuditError) as e:
        run_job(spec, resume=True, progress=False)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("cannot resume: shard 1 (records/part-00001.parquet)")
    assert "its last image was 'cat/img_007.png', now 'cat/img_006.png'" in msg and "--resume=replan" in msg
    capsys.readouterr()
    s = run_job(spec, resume="replan", progress=False)
    err = capsys.readouterr().err
    assert "--resume=replan: shard 1 changed" in err and "keeping 1 committed shards" in err
    assert s["status"] == "ok" and s["images"] == s["images_done"] == 25 and s["shards_skipped"] == 1
    h.assert_exactly_once(tmp / "out", h.folder_ids(tmp / "data"), methods=("gradcam",))
    runs = json.loads((tmp / "out" / "job.json").read_text())["runs"]
    assert [r["status"] for r in runs] == ["ok", "ok"]


@pytest.mark.slow
def test_resume_after_an_image_was_replaced_in_place_is_refused_then_replanned(job, capsys):
    import audit

    tmp, spec, s = job
    assert s["status"] == "ok" and s["images_done"] == 24
    # another picture under the same name (40x40, the others are 16x16), in shard 1
    h.write_png(tmp / "data" / "cat" / "img_005.png", h.image(77, 0, size=40)[0])
    with pytest.raises(AuditError) as e:
        run_job(spec, resume=True, progress=False)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("cannot resume: shard 1 (records/part-00001.parquet) no longer "
                                              "matches the dataset: a file it reads ('cat/img_004.png'.."
                                              "'cat/img_007.png') was replaced in place")
    capsys.readouterr()
    s = run_job(spec, resume="replan", progress=False)
    assert "--resume=replan: shard 1 changed" in capsys.readouterr().err
    assert s["status"] == "ok" and s["images"] == s["images_done"] == 24 and s["shards_skipped"] == 1
    h.assert_exactly_once(tmp / "out", h.folder_ids(tmp / "data"), methods=("gradcam",))
    df = audit.load(tmp / "out", columns=["image_id", "width"])
    assert set(df[df.image_id == "cat/img_005.png"].width) == {40}  # the new picture was audited
    assert set(df[df.image_id != "cat/img_005.png"].width) == {16}
    assert run_job(spec, resume=True, progress=False)["shards_skipped"] == 6  # and a resume now agrees


@pytest.mark.slow
def test_replan_after_the_dataset_shrank_removes_the_extra_shards(fresh_job):
    tmp, spec = fresh_job
    run_job(spec, progress=False, overrides=["dataset.classes=[cat, dog]"])
    shutil.rmtree(tmp / "data" / "dog")  # the plan loses shards 3-5
    with pytest.raises(AuditError, match="shard 3 .* the new plan has no such shard"):
        run_job(spec, resume=True, progress=False, overrides=["dataset.classes=[cat, dog]"])
    s = run_job(spec, resume="replan", progress=False, overrides=["dataset.classes=[cat, dog]"])
    assert s["images"] == s["images_done"] == 12 and s["shards"] == 3
    assert sorted(p.name for p in (tmp / "out" / "records").iterdir()) == [f"part-0000{i}.parquet" for i in range(3)]
    h.assert_exactly_once(tmp / "out", h.folder_ids(tmp / "data"), methods=("gradcam",))


@pytest.mark.slow
def test_truncated_part_file_is_named_by_load_and_redone_on_resume(job, capsys):
    import audit

    tmp, spec, _ = job
    part = tmp / "out" / "records" / "part-00002.parquet"
    size = part.stat().st_size
    with open(part, "r+b") as f:
        f.truncate(size // 2)
    assert 2 not in io.committed_shards(tmp / "out")
    with pytest.raises(AuditError) as e:
        audit.load(tmp / "out")
    assert str(e.value) == (f"{tmp / 'out'}: shard 2's records/part-00002.parquet is {size // 2:,} bytes but its "
                            f"manifest entry says {size:,} (truncated or replaced); it is not committed: rerun "
                            "the job with --resume to redo it")
    from audit.cli import main

    capsys.readouterr()
    assert main(["scan", str(tmp / "out")]) == 2  # the scan names it too, in one line
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "shard 2's records/part-00002.parquet is" in err[0]
    s = run_job(spec, resume=True, progress=False)
    assert "audit: shard 2 is redone: records/part-00002.parquet is" in capsys.readouterr().err
    assert s["status"] == "ok" and s["shards_skipped"] == 5 and s["images_this_run"] == 4
    h.assert_exactly_once(tmp / "out", h.folder_ids(tmp / "data"), methods=("gradcam",))


def test_cli_resume_forms():
    from audit.cli import build_parser

    p = build_parser()
    assert p.parse_args(["run", "j.yaml", "--resume"]).resume is True
    assert p.parse_args(["run", "j.yaml", "--resume=replan"]).resume == "replan"
    assert p.parse_args(["run", "j.yaml"]).resume is False
    ns = p.parse_args(["run", "--resume", "j.yaml"])
    assert ns.resume is True and ns.spec_after_resume == "j.yaml"
    with pytest.raises(SystemExit):
        p.parse_args(["run", "j.yaml", "--resume", "other"])
