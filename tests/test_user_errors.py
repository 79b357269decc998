"""Every user mistake is one line on stderr and exit status 2, for every command: a table of mistakes.

Read-only outputs: where chmod stops writes (not root) the folders are made
read-only for real; as root (chmod stops nothing) the file-system calls that
write under the folder are made to fail with EROFS, as a read-only mount
would.  Full outputs: a subprocess with a file-size limit (RLIMIT_FSIZE, the
signal ignored), whose writes then fail with EFBIG as on a full disk.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import io
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import helpers_jobs as h
import pytest
import yaml

from audit.cli import main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A model, a two-input model, a folder dataset, a Parquet dataset, a bad manifest and a job output."""
    import keras

    from audit.data import datasets
    from audit.runner.spec import load_spec
    from audit.runner.worker import AuditWorker

    tmp = tmp_path_factory.mktemp("mistakes")
    model = h.make_model(tmp / "model.keras")
    image, meta = keras.Input((16, 16, 3), name="image"), keras.Input((4,), name="meta")
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(2, 3, name="conv")(image))
    out = keras.layers.Dense(2, activation="softmax")(keras.layers.Concatenate()([x, meta]))
    keras.Model([image, meta], out).save(tmp / "two.keras")
    data, masks = h.make_folder(tmp / "data", 4)
    h.make_parquet(tmp / "pqdata", n=4, files=1)
    man = Path(h.make_manifest(tmp / "man", n=5))
    lines = man.read_text().splitlines()
    lines[2] = '"' + lines[2]  # line 3: a stray quote
    man.write_text("\n".join(lines) + "\n")
    # a job output as the actors write it (records, manifest), without Ray
    spec = load_spec({"model": {"path": model, "preprocess": "scale_0_1"},
                      "dataset": {"format": "folder", "path": data, "masks": masks, "shard_size": 4},
                      "explain": {"methods": ["gradcam"]}, "resources": {"batch_size": 4},
                      "output": str(tmp / "out")})
    (tmp / "out" / "records").mkdir(parents=True)
    (tmp / "out" / "_manifest").mkdir()
    w = AuditWorker(spec, out_dir=str(tmp / "out"), classes=datasets.plan(spec.dataset).classes)
    for s in datasets.plan(spec.dataset).shards:
        w.process_shard(s)
    assert main(["scan", str(tmp / "out"), "--no-intervene", "--quiet"]) == 0
    (tmp / "empty_out").mkdir()
    os.symlink("/dev/zero", tmp / "zero.png")
    (tmp / "random.csv").write_bytes(b"\x89\xff\x00\x10" + bytes(range(256)) * 4)
    return tmp


def job_spec(ws, name, **dataset):
    doc = {"model": {"path": str(ws / "model.keras"), "preprocess": "scale_0_1"},
           "dataset": {"format": "folder", "path": str(ws / "data"), "shard_size": 4, **dataset},
           "output": str(ws / f"out-{name}")}
    p = ws / f"{name}.yaml"
    p.write_text(yaml.safe_dump(doc))
    return str(p)


def one_line(capsys, rc, *words):
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("audit: error: "), err
    assert "Traceback" not in err
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


# ----------------------------------------------------------------------------
# the table: (command line, words the one line must hold)
# ----------------------------------------------------------------------------

MISTAKES = [
    # run
    ("run {ws}/nope.yaml", ["job spec not found"]),
    ("run {bad_manifest}", ["man/manifest.csv line 3: a quote is never closed"]),
    ("run {unknown_key}", ["unknown key 'dataset.shardsize'"]),
    ("run {binary_manifest}", ["random.csv is not a CSV text file"]),
    ("run {ok_spec} --no-scan --fail-on shortcut", ["--fail-on needs the scan's verdicts", "drop --no-scan"]),
    # scan
    ("scan {ws}/pqdata --no-intervene", ["is not a job output", "no 'image_id' column (a dataset folder?)"]),
    ("scan {ws}/data --no-intervene", ["is not a job output (no records/ folder)"]),
    ("scan {ws}/nope", ["does not exist"]),
    ("scan {ws}/out --no-intervene --layer nope", ["layer 'nope' is not in the records"]),
    # report
    ("report {ws}/pqdata", ["is not a job output"]),
    ("report {ws}/data", ["is not a job output (no records/ folder)"]),
    ("report {ws}/out --out {ws}/model.keras", ["cannot write", "report.html"]),
    # explain
    ("explain {ws}/two.keras {ws}/data/cat/img_000.png --out {ws}/ex",
     ["two.keras has 2 inputs (image [16, 16, 3], meta [4])", "one image input"]),
    ("explain {ws}/model.keras {ws}/data/cat/nope.png --out {ws}/ex", ["image not found"]),
    ("explain {ws}/model.keras {ws}/zero.png --out {ws}/ex", ["zero.png is not a regular file"]),
    # layers
    ("layers {ws}/two.keras", ["two.keras has 2 inputs (image [16, 16, 3], meta [4])"]),
    ("layers {ws}/nope.keras", ["model file not found"]),
    # submit (all found before contacting any cluster)
    ("submit {unknown_key} --address http://127.0.0.1:1", ["unknown key 'dataset.shardsize'"]),
    ("submit {ws}/nope.yaml --address http://127.0.0.1:1", ["job spec not found"]),
    ("submit {ok_spec} --address http://127.0.0.1:1 --runtime-env {ws}/nope.yaml", ["--runtime-env: not found"]),
]


@pytest.mark.parametrize("line, words", MISTAKES, ids=[m[0].split(" {")[0] + f"-{i}" for i, m in enumerate(MISTAKES)])
def test_each_mistake_is_one_line_and_exit_2(ws, capsys, line, words):
    names = {"ws": ws, "bad_manifest": job_spec(ws, "badman", format="manifest", path=str(ws / "man/manifest.csv")),
             "unknown_key": job_spec(ws, "typo", shardsize=4), "ok_spec": job_spec(ws, "ok"),
             "binary_manifest": job_spec(ws, "binman", format="manifest", path=str(ws / "random.csv"))}
    argv = line.format(**names).split()
    one_line(capsys, main(argv), *[w.format(**names) for w in words])


# ----------------------------------------------------------------------------
# read-only and full outputs
# ----------------------------------------------------------------------------


def _chmod_stops_writes(folder: Path) -> bool:
    probe = folder / ".probe"
    os.chmod(folder, 0o555)
    try:
        probe.write_text("x")
    except PermissionError:
        return True
    else:
        probe.unlink()
        return False
    finally:
        os.chmod(folder, 0o755)


@contextlib.contextmanager
def read_only(folder: Path, monkeypatch):
    """``folder`` and everything under it read-only (see the module docstring)."""
    folder = folder.resolve()
    dirs = [folder, *(p for p in folder.rglob("*") if p.is_dir())]
    if _chmod_stops_writes(folder):
        for d in dirs:
            os.chmod(d, 0o555)
        try:
            yield
        finally:
            for d in dirs:
                os.chmod(d, 0o755)
        return
    with monkeypatch.context() as mp:
        _refuse_writes_under(mp, str(folder))
        yield


def _refuse_writes_under(mp, root: str) -> None:
    def under(p) -> bool:
        return isinstance(p, (str, bytes, os.PathLike)) and os.path.abspath(os.fsdecode(p)).startswith(root)

    def refuse(p):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fsdecode(p))

    real_open, real_os_open, real_mkdir, real_access = builtins.open, os.open, os.mkdir, os.access
    real = {name: getattr(os, name) for name in ("replace", "rename", "unlink", "rmdir")}

    def fake_open(file, mode="r", *a, **k):
        if any(c in mode for c in "wax+") and under(file):
            refuse(file)
        return real_open(file, mode, *a, **k)

    def fake_os_open(path, flags, *a, **k):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and under(path):
            refuse(path)
        return real_os_open(path, flags, *a, **k)

    def fake_mkdir(path, *a, **k):
        if under(path) and not os.path.exists(path):
            refuse(path)
        return real_mkdir(path, *a, **k)

    def fake_access(path, mode, *a, **k):
        return False if mode & os.W_OK and under(path) else real_access(path, mode, *a, **k)

    mp.setattr(builtins, "open", fake_open)
    mp.setattr(io, "open", fake_open)
    mp.setattr(os, "open", fake_os_open)
    mp.setattr(os, "mkdir", fake_mkdir)
    mp.setattr(os, "access", fake_access)
    for name, fn in real.items():
        mp.setattr(os, name, lambda p, *a, _fn=fn, **k: refuse(p) if under(p) else _fn(p, *a, **k))


def test_read_only_output_scan_report_run(ws, capsys, monkeypatch):
    with read_only(ws / "out", monkeypatch):
        one_line(capsys, main(["scan", str(ws / "out"), "--no-intervene", "--quiet"]),
                 "cannot write", "summary/classes.parquet", "(read-only output?)")
        one_line(capsys, main(["report", str(ws / "out")]),
                 f"cannot write {ws / 'out' / 'report.html'}", "read-only", "elsewhere with --out DIR")
        # the way out: the report written elsewhere
        assert main(["report", str(ws / "out"), "--out", str(ws / "reports")]) == 0
        assert (ws / "reports" / "report.html").stat().st_size > 1000
        assert not (ws / "out" / "report.html").exists()
        # explain's figures refused there: one line naming the place
        line = one_line(capsys, main(["explain", str(ws / "model.keras"), str(ws / "data/cat/img_000.png"),
                                      "--out", str(ws / "out" / "figures"), "--filters", "0"]))
        assert str(ws / "out" / "figures") in line
    with read_only(ws / "empty_out", monkeypatch):
        spec = job_spec(ws, "ro")
        doc = yaml.safe_load(Path(spec).read_text())
        doc["output"] = str(ws / "empty_out")
        Path(spec).write_text(yaml.safe_dump(doc))
        one_line(capsys, main(["run", spec]), f"output {ws / 'empty_out'} is not writable")


def _run_limited(args, max_bytes=200):
    """``python -m audit ARGS`` whose writes fail beyond ``max_bytes`` (EFBIG), as on a full disk."""
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run([sys.executable, "-m", "audit", *args], preexec_fn=limit, capture_output=True,
                          text=True, env=env, timeout=300)


def test_full_output_scan_and_report_as_real_processes(ws):
    for args, words in ((["scan", str(ws / "out"), "--no-intervene", "--quiet"], "summary/classes.parquet"),
                        (["report", str(ws / "out")], "report.html")):
        r = _run_limited(args)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
        assert lines[0].startswith("audit: error: cannot write") and words in lines[0]
        assert "File too large (disk full or over quota?)" in lines[0]
    # nothing half-written is left behind
    assert not list((ws / "out").glob("*.tmp")) and not list((ws / "out" / "summary").glob(".*.tmp"))


def test_an_os_error_that_no_command_caught_is_still_one_line(monkeypatch, capsys):
    """The dispatcher's safety net: an OSError (a place the output goes, a file named) is one line."""
    import audit.cli.scan as scan_cli

    def full(args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/data/out/summary/x.parquet")

    monkeypatch.setattr(scan_cli, "run", full)
    line = one_line(capsys, main(["scan", "/data/out"]))
    assert line == "audit: error: No space left on device: /data/out/summary/x.parquet"
