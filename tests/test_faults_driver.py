"""The driver's own faults: ``audit run`` stopped by SIGINT or SIGKILL then ``--resume``, and two
drivers started at once on one output; afterwards every (image, layer, method) is in the output
exactly once.

The drivers that are signalled or that race run ``audit run`` in subprocesses (a killed driver
must be a process of its own).  The ``--resume`` after a signal runs through the CLI's ``main()``
in this process: the same small local job, run in the driver, that its subprocess ran (no Ray is
joined here: this module has no cluster, unlike tests/test_faults.py), and what it checks (the
lock left behind, its pid dead on this host, the shards committed) is read from the output, never
from the resuming process, so a fresh process would prove nothing more; it saves a TensorFlow
start per case.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import helpers_jobs as h
import pytest

from audit.data import io

pytestmark = pytest.mark.slow  # `audit run` drivers in subprocesses

N_PER_CLASS = 24  # 2 classes, shards of 4: 12 shards
METHODS = ("gradcam",)
RUN_ARGS = ("--no-progress", "--no-scan", "--set", "resources.actors=1")


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return h.folder_workspace(tmp_path_factory.mktemp("driver_faults"), N_PER_CLASS, METHODS,
                              {"actors": 1, "batch_size": 4, "max_retries": 2})


def _exactly_once(ws, out):
    return h.assert_exactly_once(out, ws["ids"], methods=METHODS)


def _driver(ws, out, *extra):
    env = h.env_without_ray(PYTHONPATH=str(Path(__file__).parents[1]))
    return subprocess.Popen([sys.executable, "-m", "audit", "run", ws["spec"], *RUN_ARGS,
                             "--set", f"output={out}", *extra],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_commits(out, n, proc, timeout=300):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if len(list((out / "_manifest").glob("part-*.json"))) >= n if (out / "_manifest").is_dir() else False:
            return
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.02)
    raise AssertionError("no commits")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_driver_killed_then_resume(ws, sig, capsys):
    import ray

    from audit.cli import main

    out = ws["dir"] / f"out_driver_{sig.name}"
    proc = _driver(ws, out)
    _wait_for_commits(out, 2, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    if sig == signal.SIGINT:
        assert proc.returncode == 130 and "continue with: audit run" in err
        assert json.loads((out / "job.json").read_text())["status"] == "interrupted"
        assert not (out / "_lock.json").exists()  # released on the way out
    else:
        assert proc.returncode == -signal.SIGKILL and (out / "_lock.json").exists()  # left behind
    done = len(io.committed_shards(out))
    assert 2 <= done < 12, "the fault came too late to interrupt anything"
    assert not ray.is_initialized()  # the resume runs in the driver, as in its own process
    capsys.readouterr()
    code = main(["run", ws["spec"], *RUN_ARGS, "--set", f"output={out}", "--resume"])
    outs, err = capsys.readouterr()
    assert code == 0, err[-3000:]
    if sig == signal.SIGKILL:  # a dead pid on this host: the lock is stale
        assert "took over the stale lock" in err and "is not running on" in err
    assert f"{len(ws['ids'])} of {len(ws['ids'])} audited" in outs
    _exactly_once(ws, out)
    runs = json.loads((out / "job.json").read_text())["runs"]
    # the killed run stays in the history: marked abandoned by the run that took its stale lock
    assert [r["status"] for r in runs] == ["interrupted" if sig == signal.SIGINT else "abandoned", "ok"]
    assert [r["generation"] for r in runs] == [1, 2]


def test_two_drivers_race_for_one_output(ws):
    out = ws["dir"] / "out_race"
    procs = [_driver(ws, out), _driver(ws, out)]
    results = [(p.wait(timeout=600), *p.communicate()) for p in procs]
    codes = sorted(r[0] for r in results)
    assert codes == [0, 2], [r[2][-2000:] for r in results]
    loser = next(r for r in results if r[0] == 2)[2].strip().splitlines()
    assert len(loser) == 1 and loser[0].startswith("audit: error: output ")
    assert "is in use by driver pid" in loser[0] or "is not empty" in loser[0]
    _exactly_once(ws, out)
    runs = json.loads((out / "job.json").read_text())["runs"]
    assert [r["status"] for r in runs] == ["ok"]
