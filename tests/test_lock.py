"""OUT/_lock.json: one driver per output; a stale lock is taken over with a warning."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import helpers_jobs as h
import pytest

from audit.data import lock as lk
from audit.errors import AuditError


def _write(out, **kw):
    now = time.time()
    d = {"host": socket.gethostname(), "pid": os.getpid(), "job_id": "other", "started": now - 5,
         "heartbeat": now, "token": "t0", **kw}
    (out / lk.LOCK).write_text(json.dumps(d))
    return d


def _dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_lock_is_taken_held_and_released(tmp_path):
    with lk.OutputLock(tmp_path, "j1") as held:
        d = json.loads((tmp_path / "_lock.json").read_text())
        assert (d["host"], d["pid"], d["job_id"]) == (socket.gethostname(), os.getpid(), "j1")
        assert d["started"] <= d["heartbeat"] <= time.time() and d["token"] == held.info.token
        with pytest.raises(AuditError) as e:  # a second driver, even in this process
            lk.OutputLock(tmp_path, "j2").acquire()
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith(f"output {tmp_path} is in use by driver pid {os.getpid()} on ")
        assert "(job j1, started " in msg and "last heartbeat 0 s ago" in msg
        with pytest.raises(AuditError, match="is in use by"):
            lk.check_free(tmp_path)
    assert not (tmp_path / "_lock.json").exists()
    lk.check_free(tmp_path)  # free again


@pytest.mark.parametrize("case", ["dead pid", "old heartbeat"])
def test_stale_lock_is_taken_over_with_a_warning(tmp_path, case):
    if case == "dead pid":
        _write(tmp_path, pid=_dead_pid())
        reason = "is not running on"
    else:
        _write(tmp_path, host="elsewhere", heartbeat=time.time() - lk.STALE_AFTER_S - 30)
        reason = "no heartbeat for"
    said = []
    with lk.OutputLock(tmp_path, "j", warn=said.append) as held:
        assert lk.read_lock(tmp_path).token == held.info.token
    assert len(said) == 1 and said[0].startswith(f"audit: warning: took over the stale lock of {tmp_path}")
    assert reason in said[0]


def test_live_lock_on_another_host_is_respected(tmp_path):
    _write(tmp_path, host="elsewhere", pid=1, heartbeat=time.time() - 5)
    with pytest.raises(AuditError, match="in use by driver pid 1 on elsewhere"):
        lk.OutputLock(tmp_path, "j").acquire()
    assert lk.read_lock(tmp_path).token == "t0"  # untouched


def test_heartbeat_advances_and_a_takeover_is_noticed(tmp_path, monkeypatch):
    monkeypatch.setattr(lk, "HEARTBEAT_S", 0.05)
    with lk.OutputLock(tmp_path, "j") as held:
        first = lk.read_lock(tmp_path).heartbeat
        for _ in range(100):
            time.sleep(0.02)
            if lk.read_lock(tmp_path).heartbeat > first:
                break
        assert lk.read_lock(tmp_path).heartbeat > first
        _write(tmp_path, host="elsewhere", token="intruder")  # someone took it (e.g. judged us stale)
        for _ in range(100):
            time.sleep(0.02)
            if held.lost:
                break
        assert held.lost and "elsewhere" in held.lost
    assert lk.read_lock(tmp_path).token == "intruder"  # release leaves a lock that is not ours


def test_run_job_refuses_a_busy_output_in_one_line(tmp_path):
    from audit.runner.job import run_job

    h.make_model(tmp_path / "model.keras")
    h.make_folder(tmp_path / "data", 2, masks=False)
    spec = h.write_spec(tmp_path / "job.yaml")
    (tmp_path / "out").mkdir()
    _write(tmp_path / "out", job_id="abc")  # this process's pid: alive
    for resume in (False, True):
        with pytest.raises(AuditError, match=r"output .*out is in use by driver pid \d+ on .* \(job abc"):
            run_job(spec, progress=False, resume=resume)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["_lock.json"]
