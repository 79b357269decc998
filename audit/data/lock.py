"""``OUT/_lock.json``: one driver owns an output at a time.

The driver takes the lock before it writes anything into OUT and holds it
until the job has ended: ``{"host", "pid", "job_id", "started",
"heartbeat", "token"}``.  A thread rewrites ``heartbeat`` (wall-clock
seconds) every :data:`HEARTBEAT_S`.  A second driver is refused in one line
naming the holder.  A lock is **stale**, and taken over with a one-line
warning, when its pid is not running on this host (same host name), or when
its heartbeat is older than :data:`STALE_AFTER_S` (a driver on another host,
or one whose machine died; clocks of the hosts must agree to within that).

The lock is created with ``O_CREAT | O_EXCL`` (atomic on local filesystems
and NFSv3+).  A takeover first renames the stale file aside and checks that
what it moved is the lock it judged stale, so two drivers taking over the
same stale lock do not both win.

On object storage (OUT a URI) there is neither ``O_EXCL`` nor rename.  On
S3 with boto3 installed the lock is created with a conditional PUT
(``If-None-Match: *``, :func:`audit.data.fs.put_if_absent`): the store lets
one driver in.  Elsewhere (GCS, Azure, S3 without boto3) it is written when
absent and read back; the driver that reads its own token holds it; two
drivers starting within the same second can both pass that check, so there
the lock keeps honest users apart rather than guaranteeing exclusion.  A
stale lock is deleted (after checking it is still the one judged stale) and
created anew.  The shard commits stay exactly-once regardless (see
:mod:`audit.data.io`).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from audit.data import fs
from audit.data.io import LOCK
from audit.errors import AuditError

HEARTBEAT_S = 10.0  # how often the holder rewrites its heartbeat
STALE_AFTER_S = 120.0  # a lock whose heartbeat is older than this is stale (whatever the host)


@dataclass
class LockInfo:
    """The content of ``OUT/_lock.json``."""

    host: str
    pid: int
    job_id: str
    started: float
    heartbeat: float
    token: str

    def describe(self, now: float | None = None) -> str:
        ago = max(0.0, (now or time.time()) - self.heartbeat)
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return (f"driver pid {self.pid} on {self.host} (job {self.job_id}, started {since}, "
                f"last heartbeat {ago:.0f} s ago)")


def read_lock(out) -> LockInfo | None:
    """The lock of ``out``, or None when there is none (or it is unreadable: being rewritten)."""
    return _read_path(fs.join(str(out), LOCK) if fs.is_uri(str(out)) else Path(out) / LOCK)


def stale_reason(info: LockInfo, now: float | None = None) -> str | None:
    """Why a lock is stale (see the module docstring), or None when its holder may be alive."""
    now = time.time() if now is None else now
    if info.host == socket.gethostname() and not _pid_alive(info.pid):
        return f"pid {info.pid} is not running on {info.host}"
    if now - info.heartbeat > STALE_AFTER_S:
        return f"no heartbeat for {now - info.heartbeat:.0f} s (stale after {STALE_AFTER_S:.0f} s)"
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def check_free(out) -> None:
    """Refuse in one line when a live driver holds ``out`` (creates nothing).

    Raises:
        AuditError: the lock is held and not stale.
    """
    info = read_lock(out)
    if info is not None and stale_reason(info) is None:
        raise AuditError(f"output {out} is in use by {info.describe()}; wait for it to end, or stop it "
                         f"(a lock without a heartbeat for {STALE_AFTER_S:.0f} s is taken over)")


class OutputLock:
    """The lock of one output, held by this driver (a context manager).

    >>> with OutputLock(out, job_id, warn=print):
    ...     ...   # write into out
    """

    def __init__(self, out, job_id: str, warn=None):
        self.remote = fs.is_uri(str(out))
        self.out = str(out) if self.remote else Path(out)
        self.path = fs.join(self.out, LOCK) if self.remote else self.out / LOCK
        self.job_id = job_id
        self.warn = warn or (lambda m: None)
        now = time.time()
        self.info = LockInfo(socket.gethostname(), os.getpid(), job_id, now, now, uuid.uuid4().hex)
        self.lost: str | None = None  # set by the heartbeat thread when another driver took the lock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()

    def acquire(self) -> None:
        """Take the lock (OUT must exist); take over a stale one with a warning.

        Raises:
            AuditError: a live driver holds it.
        """
        for _ in range(5):
            if self._create():
                break
            held = read_lock(self.out)
            if held is None:  # vanished or half-written: look again
                time.sleep(0.05)
                continue
            why = stale_reason(held)
            if why is None:
                raise AuditError(f"output {self.out} is in use by {held.describe()}; wait for it to end, or stop "
                                 f"it (a lock without a heartbeat for {STALE_AFTER_S:.0f} s is taken over)")
            if self._take_over(held):
                self.warn(f"audit: warning: took over the stale lock of {self.out} from {held.describe()}: {why}")
        else:
            raise AuditError(f"output {self.out}: could not take {LOCK} (another driver keeps changing it)")
        self._thread = threading.Thread(target=self._beat, name="audit-lock-heartbeat", daemon=True)
        self._thread.start()

    def _put_and_check(self) -> bool:
        """Object storage: write the lock, read it back; ours when the token read is ours."""
        if not fs.put_if_absent(self.path, (json.dumps(asdict(self.info), indent=2) + "\n").encode()):
            return False
        if fs.conditional_puts(self.path):
            return True  # the store created it for us alone
        time.sleep(0.2)  # a driver racing us overwrites within this window: then one of us sees the other
        held = _read_path(self.path)
        return held is not None and held.token == self.info.token

    def _create(self) -> bool:
        if self.remote:
            return read_lock(self.out) is None and self._put_and_check()
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        except OSError as e:
            raise AuditError(f"cannot write {self.path}: {e.strerror or e}") from None
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(asdict(self.info), indent=2) + "\n")
            f.flush()
            os.fsync(f.fileno())
        return True

    def _take_over(self, held: LockInfo) -> bool:
        """Move the stale lock aside; put it back if what moved is not the one judged stale."""
        if self.remote:  # no rename: delete the stale lock (still the one judged stale); _create puts ours
            now = read_lock(self.out)
            if now is None or now.token != held.token:
                return False
            fs.delete(self.path)
            return True
        aside = self.out / f".{LOCK}.{uuid.uuid4().hex[:8]}.stale"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False
        moved = _read_path(aside)
        if moved is not None and moved.token != held.token:
            with contextlib.suppress(OSError):
                os.link(aside, self.path)  # someone's fresh lock: restore it (fails if a newer one exists)
            with contextlib.suppress(OSError):
                aside.unlink()
            return False
        with contextlib.suppress(OSError):
            aside.unlink()
        return True

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            held = read_lock(self.out)
            if held is not None and held.token != self.info.token:
                self.lost = f"{held.describe()} took over {self.path}"
                return
            self.info.heartbeat = time.time()
            if self.remote:
                with contextlib.suppress(OSError, AuditError):  # a flaky store: the next beat tries again
                    fs.write_bytes(self.path, (json.dumps(asdict(self.info), indent=2) + "\n").encode())
                continue
            tmp = self.out / f".{LOCK}.{self.info.token[:8]}.tmp"
            try:
                tmp.write_text(json.dumps(asdict(self.info), indent=2) + "\n")
                os.replace(tmp, self.path)
            except OSError:  # a full or flaky disk: the next beat tries again
                continue

    def release(self) -> None:
        """Stop the heartbeat and remove the lock if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=HEARTBEAT_S)
        held = read_lock(self.out)
        if held is not None and held.token == self.info.token:
            with contextlib.suppress(OSError, AuditError):
                fs.delete(self.path) if self.remote else self.path.unlink()


def _read_path(path) -> LockInfo | None:
    try:
        d = json.loads(fs.read_bytes(path) if isinstance(path, str) else path.read_text())
        return LockInfo(str(d["host"]), int(d["pid"]), str(d["job_id"]), float(d["started"]),
                        float(d["heartbeat"]), str(d.get("token", "")))
    except (OSError, ValueError, KeyError, TypeError):
        return None
