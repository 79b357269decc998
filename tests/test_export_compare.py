"""`audit export` (group labels, masks, counterfactual set) and `audit compare` (table, page, exit codes)."""

from __future__ import annotations

import shutil

import cv2
import helpers_fix as hf
import numpy as np
import pandas as pd
import pytest

from audit.cli import main
from audit.data.jobspec import DatasetSpec


@pytest.fixture(scope="module")
def evidence(tmp_path_factory):
    from audit.scan import scan
    from audit.scan.imagepass import run_pass

    out, truth = hf.shortcut_job(tmp_path_factory.mktemp("exp") / "job")
    scan(out, quiet=True)
    run_pass(out, quiet=True)
    return out, truth


def test_export_three_outputs_read_back(evidence, tmp_path):
    from audit.data import datasets

    out, truth = evidence
    to = tmp_path / "exp"
    assert main(["export", out, "--to", str(to)]) == 0
    meta = pd.read_csv(to / "metadata.csv")
    assert list(meta.columns) == ["img_filename", "y", "split", "place", "cue", "confidence"]
    assert sorted(meta.img_filename) == sorted(truth)
    want = meta.img_filename.map(lambda i: truth[i])
    assert (meta.y == want.map(lambda t: t[0])).all() and (meta.place == want.map(lambda t: int(t[1]))).all()
    assert set(meta.split) <= {0, 1, 2} and meta.confidence.between(0, 1).all()
    marked = [i for i, (_, m) in truth.items() if m]
    for i in marked:  # a mask at the image's resolution, the corner set, the object's middle not
        m = cv2.imread(str(to / "masks" / i), cv2.IMREAD_UNCHANGED)
        assert m.shape == (hf.SIDE, hf.SIDE) and m[-3, -3] == 255 and m[16, 16] == 0
    assert len(list((to / "masks").rglob("*.png"))) == len(marked)
    man = pd.read_csv(to / "counterfactual" / "manifest.csv")
    removed, pasted = man[man.provenance == "cue removed"], man[man.provenance.str.startswith("cue pasted")]
    assert sorted(removed.source_id) == sorted(marked) and len(pasted) == 24  # 24 unmarked cats receive it
    corner = slice(hf.SIDE - hf.MARK, hf.SIDE - 2)
    for path in removed.path:
        assert cv2.imread(str(to / "counterfactual" / path))[corner, corner].max() < 200
    for path in pasted.path:
        assert (cv2.imread(str(to / "counterfactual" / path))[corner, corner] == 255).all()
    ds = DatasetSpec.from_partial({"format": "manifest", "path": str(to / "counterfactual" / "manifest.csv"),
                                   "classes": ["cat", "dog"], "shard_size": 64})
    assert datasets.plan(ds).total == len(man)  # a dataset `audit run` reads


def test_export_never_overwrites_without_force(evidence, tmp_path, capsys):
    out, _ = evidence
    to = tmp_path / "exp"
    assert main(["export", out, "--to", str(to), "--what", "groups"]) == 0
    (to / "metadata.csv").write_text("mine\n")
    assert main(["export", out, "--to", str(to), "--what", "groups"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--force" in err[0] and (to / "metadata.csv").read_text() == "mine\n"
    assert main(["export", out, "--to", str(to), "--what", "groups", "--force"]) == 0
    assert (to / "metadata.csv").read_text().startswith("img_filename")
    assert main(["export", out, "--to", str(tmp_path / "x"), "--what", "labels"]) == 2


def _healthy_copy(out, tmp_path):
    """The same audit with every verdict ok and no cost (as after a successful fix)."""
    dst = tmp_path / "ok"
    shutil.copytree(out, dst)
    p = dst / "summary" / "classes.parquet"
    df = pd.read_parquet(p)
    df["verdict"], df["cue"], df["flip_rate_cue"] = "ok", "", 0.0
    df["worst_group_accuracy"] = np.nan
    df.to_parquet(p)
    (dst / "summary" / "images.parquet").unlink()
    return str(dst)


def test_compare_exit_codes_and_outputs(evidence, tmp_path, capsys):
    out, _ = evidence
    ok = _healthy_copy(out, tmp_path)
    assert main(["compare", ok, out, "--fail-on", "new"]) == 3
    assert main(["compare", ok, out, "--fail-on", "any"]) == 3
    assert main(["compare", out, ok, "--fail-on", "new"]) == 0
    assert main(["compare", out, ok, "--fail-on", "any"]) == 0
    assert main(["compare", out, out, "--fail-on", "new"]) == 0
    assert main(["compare", out, out, "--fail-on", "any"]) == 3
    assert main(["compare", out, str(tmp_path / "nothing")]) == 2
    capsys.readouterr()
    d = tmp_path / "cmp"
    assert main(["compare", ok, out, "--out", str(d)]) == 0
    printed = capsys.readouterr().out
    assert "dog: new shortcut" in printed
    table = pd.read_parquet(d / "compare.parquet").set_index("class_name")
    assert table.loc["dog", "change"] == "new shortcut" and table.loc["dog", "flip_rate_cue_b"] == 1.0
    assert bool(table.loc["dog", "flip_rate_cue_changed"])  # 0/32 vs 32/32: beyond the intervals
    html = (d / "compare.html").read_text()
    assert "new shortcut" in html and "<style>" in html and "http" not in html.split("<body>")[0]


def test_compare_counts_images_whose_cue_dependence_changed(evidence, tmp_path):
    from audit.scan.compare import compare

    out, _ = evidence
    dst = tmp_path / "b"
    shutil.copytree(out, dst)
    p = dst / "summary" / "images.parquet"
    df = pd.read_parquet(p)
    flip = df.index[df.cue_decides][:5]
    df.loc[flip, "cue_decides"] = False
    df.to_parquet(p)
    c = compare(out, str(dst))
    assert len(c.images) == 5
    assert c.classes.set_index("class_name").loc["dog", "images_cue_lost"] == 5


@pytest.mark.slow
def test_export_and_compare_into_a_bucket(evidence, tmp_path):
    import helpers_s3

    from audit.data import fs

    out, truth = evidence
    server = helpers_s3.S3Server()
    try:
        server.set_env()
        server.bucket("exp")
        assert main(["export", out, "--to", "s3://exp/run"]) == 0
        names = {rel for rel, _ in fs.list_files("s3://exp/run")}
        assert "metadata.csv" in names and "counterfactual/manifest.csv" in names
        assert sum(n.startswith("masks/") for n in names) == sum(m for _, m in truth.values())
        meta = pd.read_csv(fs.open_input("s3://exp/run/metadata.csv"))
        assert sorted(meta.img_filename) == sorted(truth)
        assert main(["export", out, "--to", "s3://exp/run", "--what", "masks"]) == 2  # never overwritten ...
        assert main(["export", out, "--to", "s3://exp/run", "--what", "masks", "--force"]) == 0  # ... unless asked
        assert main(["compare", out, out, "--out", "s3://exp/cmp"]) == 0
        assert {"compare.html", "compare.parquet"} <= {rel for rel, _ in fs.list_files("s3://exp/cmp")}
    finally:
        server.stop()
