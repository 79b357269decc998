"""stderr stays the user's: every command, on success and on a user mistake, prints only
its own lines (``audit: ...``) there, never TensorFlow's, absl's, CUDA's or Ray's."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers_jobs import folder_workspace, image, make_model, write_png

ROOT = Path(__file__).resolve().parents[1]


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "AUDIT_VERBOSE")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return {**env, **extra}


def audit(*args, cwd, timeout=600, **env):
    """Run ``python -m audit ARGS`` in a fresh process (a first TensorFlow import, as a user gets)."""
    return ended(started(*args, cwd=cwd, **env), timeout)


def started(*args, cwd, **env) -> subprocess.Popen:
    """``python -m audit ARGS`` started in a fresh process; :func:`ended` waits for it."""
    return subprocess.Popen([sys.executable, "-m", "audit", *map(str, args)], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env(**env))


def ended(proc: subprocess.Popen, timeout=600) -> subprocess.CompletedProcess:
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:  # timed out, or interrupted: not left running
            proc.kill()
            proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def own_lines_only(stderr: str) -> list[str]:
    """The stderr lines, each checked to be the tool's own (``audit: ...``); returns them."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    for line in lines:
        assert line.startswith("audit: "), f"a line on stderr that is not the tool's own: {line!r}"
    return lines


def assert_one_error(res, *words):
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    lines = own_lines_only(res.stderr)
    assert len(lines) == 1 and lines[0].startswith("audit: error: "), lines
    for w in words:
        assert w in lines[0], lines[0]


def test_tensorflow_import_is_quiet_unless_verbose(tmp_path):
    """The hook silences the C++ lines at TF's import; ``--verbose`` (``AUDIT_VERBOSE=1``) shows them, here
    through the CLI's own flag on a command that loads a model (so this test can fail)."""
    make_model(tmp_path / "model.keras")
    code = "from audit import quiet; quiet.install(); import keras, tensorflow as tf; print(tf.constant(2).numpy())"
    quiet = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=_env(), cwd=tmp_path)
    loud = audit("layers", "model.keras", "--verbose", cwd=tmp_path)
    quiet = ended(quiet)
    assert quiet.returncode == 0, quiet.stderr[-2000:]
    assert quiet.stdout.strip() == "2"
    assert quiet.stderr.strip() == ""
    assert loud.returncode == 0, loud.stderr[-2000:]
    assert "absl::InitializeLog" in loud.stderr or "cuda" in loud.stderr.lower(), loud.stderr
    assert any(not line.startswith("audit: ") for line in loud.stderr.splitlines() if line.strip()), loud.stderr


# `python -m audit ARGS` that also says, last on stdout, whether TensorFlow or Keras got imported
WATCHED = ("import sys\nfrom audit.cli import main\ntry:\n    rc = main(sys.argv[1:])\nfinally:\n"
           "    print('imported:', [m for m in ('tensorflow', 'keras') if m in sys.modules])\nraise SystemExit(rc)\n")


def assert_one_error_without_tf(*args, cwd, words=()):
    res = subprocess.run([sys.executable, "-c", WATCHED, *map(str, args)], cwd=cwd, capture_output=True,
                         text=True, timeout=600, env=_env())
    assert_one_error(res, *words)
    assert res.stdout.splitlines()[-1] == "imported: []", (args, res.stdout[-500:])


def test_mistakes_before_tensorflow_are_one_line(tmp_path):
    """Usage and file mistakes that need no model: one line, exit 2, and TensorFlow never imported."""
    assert_one_error_without_tf("run", tmp_path / "missing.yaml", cwd=tmp_path, words=["missing.yaml"])
    assert_one_error_without_tf("scan", tmp_path / "nothing", cwd=tmp_path, words=["nothing"])
    assert_one_error_without_tf("scan", tmp_path, "--causal-budget", "-1", cwd=tmp_path, words=["--causal-budget"])
    assert_one_error_without_tf("report", tmp_path / "nothing", cwd=tmp_path, words=["nothing"])
    assert_one_error_without_tf("compare", tmp_path / "nothing", tmp_path, cwd=tmp_path, words=["nothing"])
    assert_one_error_without_tf("export", tmp_path / "nothing", "--to", tmp_path / "x", cwd=tmp_path,
                                words=["nothing"])
    assert_one_error_without_tf("submit", tmp_path / "missing.yaml", "--address", "http://127.0.0.1:1", cwd=tmp_path)
    assert_one_error_without_tf("explain", tmp_path / "m.keras", "--out", tmp_path / "o", cwd=tmp_path,
                                words=["IMAGE"])
    (tmp_path / "file").write_text("x")
    assert_one_error_without_tf("demo", "--out", tmp_path / "file", cwd=tmp_path, words=["file"])
    assert_one_error_without_tf("nonsense", cwd=tmp_path, words=["nonsense"])


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """A tiny job, run through `audit run` (with its scan) as a user would."""
    tmp = tmp_path_factory.mktemp("quiet")
    ws = folder_workspace(tmp, 12, ["gradcam", "gradcam++"], {"actors": 1, "batch_size": 8}, shard_size=8)
    write_png(tmp / "one.png", image(0, 0)[0])
    res = audit("run", ws["spec"], "--no-progress", cwd=tmp)
    return {"dir": tmp, "run": res}


@pytest.mark.slow
def test_run_and_scan_success_is_quiet(job):
    res = job["run"]
    assert res.returncode == 0, res.stderr[-3000:]
    assert "scan of" in res.stdout
    assert own_lines_only(res.stderr) == []


@pytest.mark.slow
def test_run_on_ray_is_quiet(job):
    """The same job on a private Ray (actors import TensorFlow too): still only the tool's lines."""
    res = audit("run", "job.yaml", "--no-progress", "--no-scan", "--set", "output=out-ray", cwd=job["dir"],
                AUDIT_IN_PROCESS="0")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "in the driver" not in res.stdout and "actor on CPU" in res.stdout
    assert own_lines_only(res.stderr) == []


@pytest.mark.slow
def test_scan_report_layers_explain_quiet(job):
    tmp = job["dir"]
    # layers and explain (they read the model and an image) while scan then report run on the output
    aside = [(args, started(*args, cwd=tmp)) for args in (
        ("layers", "model.keras"),
        ("explain", "model.keras", "one.png", "--out", "fig", "--filters", "0", "--preprocess", "scale_0_1"))]
    done = [(args, audit(*args, cwd=tmp)) for args in (("scan", "out"), ("report", "out"))]
    for args, res in done + [(args, ended(p)) for args, p in aside]:
        assert res.returncode == 0, (args, res.stderr[-3000:])
        assert own_lines_only(res.stderr) == [], args


@pytest.mark.slow
def test_mistakes_after_tensorflow_are_one_line(job):
    tmp = job["dir"]
    assert_one_error(audit("scan", "out", "--layer", "nope", cwd=tmp), "nope")
    assert_one_error(audit("layers", "one.png", cwd=tmp), "one.png")
    assert_one_error(audit("explain", "model.keras", "one.png", "--out", "fig2", "--layers", "nope", cwd=tmp),
                     "nope")
    assert_one_error(audit("run", "job.yaml", "--set", "model.preprocess=scale_0_2", "--set", "output=o2",
                           cwd=tmp), "preprocess")
