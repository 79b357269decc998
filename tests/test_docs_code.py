"""The code in README.md and docs/ runs as a user would paste it.

Every ```python, ```bash and ```sql block is run in a workspace laid out as the
docs name things (models/my_model.keras, jobs/my_job.yaml, results/tank-sky as a
tiny job's output, OUT, cat.jpg, ...).  A block that cannot run here carries
``<!-- not run by the tests: REASON -->`` on the line above it; shell lines that
need a cluster, a bucket or downloaded weights are skipped with the reason in
SKIP_LINES.  Both show up as skips with their reason.
"""

from __future__ import annotations

import re
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from helpers_jobs import image, make_folder, write_png

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUN_LANGS = ("python", "bash", "sh", "shell", "sql")
MARK = re.compile(r"<!--\s*not run by the tests:\s*(.+?)\s*-->")
SKIP_LINES = {  # a shell line holding this is not run: why
    "--address": "needs a Ray cluster",
    "audit submit": "needs a Ray cluster",
    "--application": "needs a keras.applications model's weights",
    "s3://": "needs a bucket",
    "audit export": "needs a job with a suspected class (tests/test_export_compare.py exports one)",
    "audit compare": "needs two outputs of one job (tests/test_export_compare.py compares two)",
}


@dataclass(frozen=True)
class Block:
    page: str
    line: int
    lang: str
    code: str
    skip: str | None  # the reason given in the page, or None

    def __str__(self):
        return f"{self.page}:{self.line}"


def blocks() -> list[Block]:
    out = []
    for page in PAGES:
        text = page.read_text()
        for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.M | re.S):
            line = text.count("\n", 0, m.start()) + 1
            before = text[:m.start()].rstrip("\n").rsplit("\n", 1)[-1]
            mark = MARK.search(before)
            out.append(Block(str(page.relative_to(ROOT)), line, m.group(1), m.group(2),
                             mark.group(1) if mark else None))
    return out


RUNNABLE = [b for b in blocks() if b.lang in RUN_LANGS]


def test_every_command_block_is_labelled():
    """A block of `audit ...` commands without a language would escape these tests."""
    unlabelled = [str(b) for b in blocks() if not b.lang and b.code.lstrip().startswith(("audit ", "python "))]
    assert not unlabelled, f"label these blocks ```bash: {unlabelled}"
    assert len(RUNNABLE) >= 10


# -- the workspace ------------------------------------------------------------------------


def make_model(path):
    """A tiny CNN whose last convolution has the name the README's example uses."""
    import keras

    keras.utils.set_random_seed(0)
    inp = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="conv1")(inp)
    x = keras.layers.Conv2D(6, 3, padding="same", activation="relu", name="conv5_block3_out")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    out = keras.layers.Dense(2, activation="softmax", name="head")(x)
    path.parent.mkdir(parents=True, exist_ok=True)
    keras.Model(inp, out).save(path)


def spec(model, data, output, masks):
    return {"name": "docs", "model": {"path": model, "preprocess": "scale_0_1"},
            "dataset": {"format": "folder", "path": data, "masks": masks, "shard_size": 8},
            "explain": {"methods": ["gradcam", "gradcam++"], "layers": "auto",
                        "regions": {"sky": [0.0, 0.0, 1.0, 0.4]}},
            "resources": {"actors": 1, "batch_size": 8, "decode_threads": 2}, "output": output}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """The files the docs name, and results/tank-sky (and OUT) from a tiny job run by `audit run`."""
    from audit.cli import main

    ws = tmp_path_factory.mktemp("docs")
    make_model(ws / "models" / "my_model.keras")
    shutil.copy(ws / "models" / "my_model.keras", ws / "models" / "tank_sky.keras")
    make_folder(ws / "data", 10)
    (ws / "jobs").mkdir()
    (ws / "jobs" / "my_job.yaml").write_text(yaml.safe_dump(
        spec("../models/my_model.keras", "../data", "../results/my-job", "../data_masks")))
    (ws / "job.yaml").write_text(yaml.safe_dump(spec("models/my_model.keras", "data", "results/job", "data_masks")))
    for name, i in (("cat.jpg", 1), ("dog.jpg", 2), ("photo1.png", 3), ("photo2.png", 4)):
        write_png(ws / name, image(i, i % 2)[0]) if name.endswith(".png") else _jpeg(ws / name, image(i, 0)[0])
    (ws / "home").mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ws)
        assert main(["run", "job.yaml", "--set", "output=results/tank-sky", "--no-progress"]) == 0
    shutil.copytree(ws / "results" / "tank-sky", ws / "OUT")
    return ws


def _jpeg(path, rgb):
    import cv2

    cv2.imwrite(str(path), rgb[:, :, ::-1])


# -- running the blocks -------------------------------------------------------------------


def shell_lines(code: str) -> list[str]:
    """The commands of a shell block: continuations joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", code)
    return [line for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def run_shell(code: str, skipped: list):
    from audit.cli import main

    for line in shell_lines(code):
        why = next((w for k, w in SKIP_LINES.items() if k in line), None)
        if why:
            skipped.append(f"{line.split('#')[0].strip()} ({why})")
            continue
        argv = [Path(a).expanduser().as_posix() if a.startswith("~") else a
                for a in shlex.split(line, comments=True)]
        assert argv[0] == "audit", f"not an audit command: {line}"
        assert main(argv[1:]) == 0, line


@pytest.mark.slow
@pytest.mark.parametrize("block", RUNNABLE, ids=str)
def test_block_runs(block, workspace, monkeypatch, capsys):
    if block.skip:
        pytest.skip(block.skip)
    monkeypatch.chdir(workspace)
    monkeypatch.setenv("HOME", str(workspace / "home"))
    if block.lang == "python":
        exec(compile(block.code, str(block), "exec"), {"__name__": "__docs__"})
    elif block.lang == "sql":
        import duckdb

        assert duckdb.sql(block.code).fetchall()
    else:
        skipped = []
        run_shell(block.code, skipped)
        if skipped:
            print(f"{block}: not run: " + "; ".join(skipped))


@pytest.mark.slow
def test_heatmap_and_overlay_on_any_loaded_row(workspace):
    """Rows without the map's or the image's columns: read from the output, the same as a full row."""
    import numpy as np

    import audit

    full = audit.load(workspace / "results" / "tank-sky", filters=[("status", "=", "ok")])
    some = audit.load(workspace / "results" / "tank-sky", columns=["image_id", "energy_object"],
                      filters=[("status", "=", "ok")])
    picked = some[some.energy_object >= some.energy_object.median()]
    for pos in (0, len(picked) - 1):
        row = picked.iloc[pos]
        ref = full.loc[row.name]
        assert ref.image_id == row.image_id
        np.testing.assert_array_equal(audit.heatmap(row, size=16), audit.heatmap(ref, size=16))
        np.testing.assert_array_equal(audit.overlay(row), audit.overlay(ref))
    with pytest.raises(audit.AuditError, match="'cam', 'cam_h', 'cam_w'"):
        audit.heatmap(dict(some.iloc[0]))
    with pytest.raises(audit.AuditError, match="load them too"):
        audit.heatmap(some.reset_index(drop=True).iloc[::-1].reset_index(drop=True).iloc[0].rename(10 ** 6))
