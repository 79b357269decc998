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


# ----------------------------------------------------------------------------
# locks that heal
# ----------------------------------------------------------------------------


def _age(path, seconds):
    t = time.time() - seconds
    os.utime(path, (t, t))


@pytest.mark.parametrize("content", [b"", b'{"host": "x", "pid"', b"\x00\x00\x00"])
def test_an_unreadable_lock_is_stale_once_old_and_taken_over_with_a_warning(tmp_path, content):
    (tmp_path / lk.LOCK).write_bytes(content)  # what a full disk leaves
    with pytest.raises(AuditError, match=r"is in use by a driver whose _lock.json is unreadable \(empty or "
                                         r"truncated, last written 0 s ago\)"):
        lk.OutputLock(tmp_path, "j").acquire()
    _age(tmp_path / lk.LOCK, lk.STALE_AFTER_S + 10)
    said = []
    with lk.OutputLock(tmp_path, "j", warn=said.append) as held:
        assert lk.read_lock(tmp_path).token == held.info.token
    assert len(said) == 1 and "from an unreadable _lock.json: it is unreadable (empty or truncated) and was " \
                              "last written 13" in said[0]


def test_a_heartbeat_in_the_future_is_judged_by_the_file_age(tmp_path):
    _write(tmp_path, host="elsewhere", heartbeat=time.time() + 3600)
    with pytest.raises(AuditError, match=r"last heartbeat 3600 s in the future"):
        lk.OutputLock(tmp_path, "j").acquire()
    _age(tmp_path / lk.LOCK, lk.STALE_AFTER_S + 1)
    said = []
    with lk.OutputLock(tmp_path, "j", warn=said.append):
        pass
    assert len(said) == 1 and "its heartbeat is 3600 s in the future and the file was last written" in said[0]


def test_a_full_disk_is_one_line_naming_the_lock_and_free_space(tmp_path, monkeypatch):
    import errno

    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(lk, "write_file", full)
    with pytest.raises(AuditError) as e:
        lk.OutputLock(tmp_path, "j").acquire()
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"cannot write {tmp_path / lk.LOCK}: No space left on device")
    assert "disk full: " in msg and " free on " in msg and "bytes needed" in msg
    assert list(tmp_path.iterdir()) == []  # no empty lock left behind to block the next run


# ----------------------------------------------------------------------------
# fencing: generations, loss within one heartbeat, guarded commits
# ----------------------------------------------------------------------------


def test_generations_only_grow_across_takeovers_and_job_json(tmp_path):
    with lk.OutputLock(tmp_path, "j") as a:
        assert a.generation == 1
    (tmp_path / "job.json").write_text(json.dumps({"generation": 4, "runs": [{"generation": 6}]}))
    with lk.OutputLock(tmp_path, "j") as b:
        assert b.generation == 7
    _write(tmp_path, pid=_dead_pid(), generation=9)
    with lk.OutputLock(tmp_path, "j") as c:
        assert c.generation == 10 and lk.read_lock(tmp_path).generation == 10


@pytest.mark.parametrize("how", ["removed", "taken", "emptied"])
def test_a_lost_lock_is_noticed_within_one_heartbeat_and_never_recreated(tmp_path, monkeypatch, how):
    monkeypatch.setattr(lk, "HEARTBEAT_S", 0.05)
    held = lk.OutputLock(tmp_path, "j")
    held.acquire()
    try:
        if how == "removed":  # a driver took it over, finished and released it
            (tmp_path / lk.LOCK).unlink()
        elif how == "taken":
            _write(tmp_path, host="elsewhere", token="intruder", generation=5)
        else:
            (tmp_path / lk.LOCK).write_bytes(b"")
        for _ in range(100):
            if held.lost:
                break
            time.sleep(0.02)
        assert held.lost
        time.sleep(0.2)  # several more heartbeats: none of them writes the lock back
        assert lk.read_lock(tmp_path) is None if how != "taken" else lk.read_lock(tmp_path).token == "intruder"
        with pytest.raises(lk.LockLost, match=r"^stopped: .*; this run \(generation 1\) commits nothing more$"):
            held.check()
    finally:
        held.release()
    assert (tmp_path / lk.LOCK).exists() == (how != "removed")


def test_a_guarded_commit_is_refused_once_the_lock_is_another_s(tmp_path):
    import pyarrow as pa

    from audit.data import io

    (tmp_path / io.RECORDS).mkdir()
    (tmp_path / io.MANIFEST).mkdir()
    table = pa.table({"x": [1, 2]})
    kw = dict(job_id="j", schema_version="1", inputs={}, counts={})
    with lk.OutputLock(tmp_path, "j") as a:
        entry = io.write_shard(tmp_path, 0, table, guard=a.guard("shard 0"), generation=a.generation, **kw)
        assert entry["generation"] == 1
        _write(tmp_path, host="elsewhere", token="intruder", generation=2)
        with pytest.raises(lk.LockLost, match=r"^stopped: shard 1 not committed: driver pid \d+ on elsewhere .* "
                                              r"took over .*_lock.json; this run \(generation 1\)"):
            io.write_shard(tmp_path, 1, table, guard=a.guard("shard 1"), generation=a.generation, **kw)
        assert sorted(p.name for p in (tmp_path / io.RECORDS).iterdir()) == ["part-00000.parquet"]
        assert sorted(p.name for p in (tmp_path / io.MANIFEST).iterdir()) == ["part-00000.json"]
    # an entry of a later generation is never replaced by an earlier one, lock or no lock
    later = {**json.loads((tmp_path / io.MANIFEST / "part-00000.json").read_text()), "generation": 3}
    (tmp_path / io.MANIFEST / "part-00000.json").write_text(json.dumps(later))
    with pytest.raises(AuditError, match="generation 3 committed it after this run"):
        io.write_shard(tmp_path, 0, table, generation=2, **kw)


def test_a_store_that_does_not_answer_is_not_a_lost_lock(tmp_path, monkeypatch):
    """A flaky read (a frozen server) neither stops the driver nor refuses its commits; a real loss does."""
    monkeypatch.setattr(lk, "HEARTBEAT_S", 0.05)
    real = lk._inspect_path

    def flaky(path, tolerant=False):
        if tolerant:
            return lk.LockFile(True, error="cannot read: timed out")
        return real(path, tolerant)

    with lk.OutputLock(tmp_path, "j") as held:
        monkeypatch.setattr(lk, "_inspect_path", flaky)
        time.sleep(0.3)  # several heartbeats that could not read the lock
        assert held.lost is None
        held.guard("shard 0")()  # let through: the commit goes to the same store
        monkeypatch.setattr(lk, "_inspect_path", real)
        (tmp_path / lk.LOCK).unlink()
        with pytest.raises(lk.LockLost, match="is gone"):
            held.guard("shard 1")()
