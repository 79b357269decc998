"""``OUT/_lock.json``: one driver owns an output at a time, and a driver that lost it commits nothing.

The driver takes the lock before it writes anything into OUT and holds it
until the job has ended: ``{"host", "pid", "job_id", "started",
"heartbeat", "token", "generation"}``.  A thread rewrites ``heartbeat``
(wall-clock seconds) every :data:`HEARTBEAT_S`.  A second driver is refused
in one line naming the holder.

**Fencing.**  ``generation`` only grows: a driver takes one more than every
generation the output has seen (the lock it replaces, ``job.json`` and its
run history).  Every commit, of a shard (:func:`audit.data.io.write_shard`,
just before the rename and again before the manifest entry), of
``job.json`` and of the lock itself, first checks that ``_lock.json`` still
holds this driver's token (:func:`guard`, :meth:`OutputLock.check`), and a
manifest entry of a later generation is never replaced.  A driver that was
paused (SIGSTOP, Ctrl-Z, a frozen VM) while another took its output over
finds, within one heartbeat, its lock missing, unreadable or another's: it
stops with one line (``stopped: ...; this run (generation 1) commits
nothing more``), its actors refuse to commit, and it never recreates the
lock.  What is left is the instant between the check and the rename (local
disk) or the PUT (a bucket without conditional writes), and a check that
cannot read the store at that moment (a frozen server: the commit is let
through, since it goes to the same store, and the heartbeat looks again).

**Stale locks**, taken over with a one-line warning: its pid is not running
on this host (same host name); its heartbeat is older than
:data:`STALE_AFTER_S` (a driver on another host, or one whose machine died;
clocks must agree to within that); or, where the content cannot be trusted,
the file itself was last written more than :data:`STALE_AFTER_S` ago: an
empty or truncated lock (a full disk), or a heartbeat more than
:data:`FUTURE_SLACK_S` in the future (a clock set wrong).

The lock is written whole to a temp file and hard-linked into place (atomic
like ``O_CREAT | O_EXCL`` on local filesystems and NFSv3+, and never
empty; ``O_EXCL`` where hard links are refused).  A takeover first renames
the stale file aside and checks that what it moved is the lock it judged
stale, so two drivers taking over the same stale lock do not both win.  A
full disk is one line naming the lock and the free space.

On object storage (OUT a URI) there is neither ``O_EXCL`` nor rename.  On
S3 with boto3 installed the lock is created with a conditional PUT
(``If-None-Match: *``, :func:`audit.data.fs.put_if_absent`) and renewed with
``If-Match`` on the version read (:func:`audit.data.fs.put_if_match`): the
store lets one driver in, and a heartbeat never overwrites a takeover.
Elsewhere (GCS, Azure, S3 without boto3) it is written when absent and read
back; the driver that reads its own token holds it; two drivers starting
within the same second can both pass that check, so there the lock keeps
honest users apart rather than guaranteeing exclusion.  A stale lock is
deleted (after checking it is still the one judged stale) and created anew.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from audit.data import fs
from audit.data.io import LOCK, read_job
from audit.errors import AuditError, cannot_write

HEARTBEAT_S = 10.0  # how often the holder rewrites its heartbeat
STALE_AFTER_S = 120.0  # a lock whose heartbeat is older than this is stale (whatever the host)
FUTURE_SLACK_S = 30.0  # a heartbeat further ahead than this is not believed: the file's age decides


class LockLost(AuditError):
    """This driver no longer holds its output: another driver took it over (or the lock is gone)."""


@dataclass
class LockInfo:
    """The content of ``OUT/_lock.json``."""

    host: str
    pid: int
    job_id: str
    started: float
    heartbeat: float
    token: str
    generation: int = 0  # the fencing token: one more than any earlier holder of this output

    def describe(self, now: float | None = None) -> str:
        ago = (now or time.time()) - self.heartbeat
        beat = f"{ago:.0f} s ago" if ago >= -FUTURE_SLACK_S else f"{-ago:.0f} s in the future"
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return (f"driver pid {self.pid} on {self.host} (job {self.job_id}, started {since}, "
                f"last heartbeat {beat}, generation {self.generation})")


@dataclass
class LockFile:
    """What ``OUT/_lock.json`` is now: its content (None when unreadable) and its age."""

    exists: bool
    info: LockInfo | None = None
    age: float | None = None  # seconds since the file was last written
    etag: str | None = None  # object storage with conditional writes: the version read
    error: str | None = None  # the store could not be read just now (tolerant reads only)


def read_lock(out) -> LockInfo | None:
    """The lock of ``out``, or None when there is none (or it is unreadable)."""
    return inspect(out).info


def inspect(out, tolerant: bool = False) -> LockFile:
    """The lock file of ``out`` as it is now (:class:`LockFile`).

    Args:
        out: the output.
        tolerant: a store that cannot be read just now gives ``error`` instead of raising
            (the heartbeat and the commit checks then try again rather than give up the output).

    Raises:
        AuditError: the store cannot be read (a refused credential, a missing bucket), unless ``tolerant``.
    """
    return _inspect_path(_lock_path(out), tolerant)


def _lock_path(out):
    return fs.join(str(out), LOCK) if fs.is_uri(str(out)) else Path(out) / LOCK


def _inspect_path(path, tolerant: bool = False) -> LockFile:
    try:
        if isinstance(path, str):
            data, age, etag = fs.read_versioned(path)
        else:
            etag = None
            with open(path, "rb") as f:
                data, age = f.read(), time.time() - os.fstat(f.fileno()).st_mtime
    except FileNotFoundError:
        return LockFile(False)
    except (OSError, AuditError) as e:
        if tolerant:
            return LockFile(True, error=" ".join(str(e).split())[:200] or type(e).__name__)
        if isinstance(e, AuditError):
            raise
        return LockFile(True, None, 0.0)  # a local file that cannot be read: judged as unreadable content
    return LockFile(True, _parse(data), age, etag)


def stale_reason(info: LockInfo | None, now: float | None = None, age: float | None = None) -> str | None:
    """Why a lock is stale (see the module docstring), or None when its holder may be alive.

    Args:
        info: the lock's content; None when the file is unreadable (empty, truncated: a full disk).
        now: the time (default: now).
        age: seconds since the lock file was last written, when known.
    """
    now = time.time() if now is None else now
    if info is None:
        if age is not None and age > STALE_AFTER_S:
            return f"it is unreadable (empty or truncated) and was last written {age:.0f} s ago"
        return None
    if info.host == socket.gethostname() and not _pid_alive(info.pid):
        return f"pid {info.pid} is not running on {info.host}"
    if info.heartbeat - now > FUTURE_SLACK_S:  # a clock far ahead: the file's own age decides
        if age is not None and age > STALE_AFTER_S:
            return (f"its heartbeat is {info.heartbeat - now:.0f} s in the future and the file was last "
                    f"written {age:.0f} s ago")
        return None
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


def _busy_line(out, state: LockFile) -> str:
    who = state.info.describe() if state.info else (
        f"a driver whose {LOCK} is unreadable (empty or truncated, last written {state.age or 0:.0f} s ago)")
    return (f"output {out} is in use by {who}; wait for it to end, or stop it "
            f"(a lock without a heartbeat for {STALE_AFTER_S:.0f} s is taken over)")


def check_free(out) -> None:
    """Refuse in one line when a live driver holds ``out`` (creates nothing).

    Raises:
        AuditError: the lock is held and not stale.
    """
    state = inspect(out)
    if state.exists and stale_reason(state.info, age=state.age) is None:
        raise AuditError(_busy_line(out, state))


def holder_problem(out, token: str) -> str | None:
    """Why the driver holding ``token`` no longer owns ``out``, or None while it does.

    Actors call it (through :func:`guard`) just before each commit step.
    """
    return _not_ours(inspect(out, tolerant=True), token, _lock_path(out))


def guard(out, token: str, generation: int, what: str):
    """A callable that raises :class:`LockLost` once ``token`` no longer holds ``out`` (commit fencing)."""

    def check() -> None:
        why = holder_problem(out, token)
        if why is not None:
            raise LockLost(f"stopped: {what} not committed: {why}; this run (generation {generation}) "
                           "commits nothing more")

    return check


def next_generation(out, *seen: LockInfo | None) -> int:
    """One more than every generation this output has seen: earlier locks and the runs in job.json."""
    gens = [i.generation for i in seen if i is not None]
    job = read_job(out) or {}
    gens.append(int(job.get("generation") or 0))
    gens += [int(r.get("generation") or 0) for r in job.get("runs") or [] if isinstance(r, dict)]
    return max(gens, default=0) + 1


class OutputLock:
    """The lock of one output, held by this driver (a context manager).

    >>> with OutputLock(out, job_id, warn=print):
    ...     ...   # write into out
    """

    def __init__(self, out, job_id: str, warn=None):
        self.remote = fs.is_uri(str(out))
        self.out = str(out) if self.remote else Path(out)
        self.path = _lock_path(self.out)
        self.job_id = job_id
        self.warn = warn or (lambda m: None)
        now = time.time()
        self.info = LockInfo(socket.gethostname(), os.getpid(), job_id, now, now, uuid.uuid4().hex)
        self.lost: str | None = None  # set by the heartbeat thread when the lock is no longer ours
        self._etag: str | None = None  # the version of our lock object (conditional writes)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()

    @property
    def generation(self) -> int:
        return self.info.generation

    def guard(self, what: str):
        """A check that raises :class:`LockLost` once this lock is not ours (before each commit)."""
        return guard(self.out, self.info.token, self.info.generation, what)

    def acquire(self) -> None:
        """Take the lock (OUT must exist); take over a stale one with a warning.

        Raises:
            AuditError: a live driver holds it, or the lock cannot be written (a full disk).
        """
        seen: LockInfo | None = None
        for _ in range(5):
            self.info.generation = next_generation(self.out, seen)
            if self._create():
                break
            state = inspect(self.out)
            if not state.exists:  # vanished: look again
                continue
            seen = state.info or seen
            why = stale_reason(state.info, age=state.age)
            if why is None:
                if state.info is None:  # a lock being written right now: give it a moment
                    time.sleep(0.05)
                    if inspect(self.out).info is None and stale_reason(None, age=state.age) is None:
                        raise AuditError(_busy_line(self.out, state))
                    continue
                raise AuditError(_busy_line(self.out, state))
            if self._take_over(state):
                who = state.info.describe() if state.info else f"an unreadable {LOCK}"
                self.warn(f"audit: warning: took over the stale lock of {self.out} from {who}: {why}")
        else:
            raise AuditError(f"output {self.out}: could not take {LOCK} (another driver keeps changing it)")
        self._thread = threading.Thread(target=self._beat, name="audit-lock-heartbeat", daemon=True)
        self._thread.start()

    def _body(self) -> bytes:
        return (json.dumps(asdict(self.info), indent=2) + "\n").encode()

    def _put_and_check(self) -> bool:
        """Object storage: write the lock, read it back; ours when the token read is ours."""
        if not fs.put_if_absent(self.path, self._body()):
            return False
        if fs.conditional_puts(self.path):
            self._etag = inspect(self.out).etag
            return True  # the store created it for us alone
        time.sleep(0.2)  # a driver racing us overwrites within this window: then one of us sees the other
        held = inspect(self.out).info
        return held is not None and held.token == self.info.token

    def _create(self) -> bool:
        if self.remote:
            return not inspect(self.out).exists and self._put_and_check()
        # the whole lock is written to a temp file, then linked in: never an empty _lock.json
        tmp = self.out / f".{LOCK}.{self.info.token[:8]}.new"
        try:
            write_file(tmp, self._body())
            os.link(tmp, self.path)  # fails if a lock exists: atomic, like O_EXCL
        except FileExistsError:
            return False
        except OSError as e:
            if e.errno in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
                return self._create_excl()  # a filesystem without hard links
            raise cannot_write(self.path, e, need=len(self._body())) from None
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()
        return True

    def _create_excl(self) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        except OSError as e:
            raise cannot_write(self.path, e) from None
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(self._body())
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:  # a full disk: leave no empty lock behind
            with contextlib.suppress(OSError):
                self.path.unlink()
            raise cannot_write(self.path, e, need=len(self._body())) from None
        return True

    def _take_over(self, judged: LockFile) -> bool:
        """Move the stale lock aside; put it back if what moved is not the one judged stale."""
        token = judged.info.token if judged.info else None
        if self.remote:  # no rename: delete the stale lock (still the one judged stale); _create puts ours
            now = inspect(self.out)
            if not now.exists or (now.info.token if now.info else None) != token:
                return False
            fs.delete(self.path)
            return True
        aside = self.out / f".{LOCK}.{uuid.uuid4().hex[:8]}.stale"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False
        moved = _inspect_path(aside).info
        if (moved.token if moved else None) != token:
            with contextlib.suppress(OSError):
                os.link(aside, self.path)  # someone's fresh lock: restore it (fails if a newer one exists)
            with contextlib.suppress(OSError):
                aside.unlink()
            return False
        with contextlib.suppress(OSError):
            aside.unlink()
        return True

    def _beat(self) -> None:
        """Every HEARTBEAT_S: stop at once when the lock is gone, unreadable or another's; else renew it."""
        while not self._stop.wait(HEARTBEAT_S):
            state = inspect(self.out, tolerant=True)
            if state.error is not None:  # a store that does not answer now: the next beat looks again
                continue
            why = _not_ours(state, self.info.token, self.path)
            if why is not None:
                self.lost = why
                return
            self.info.heartbeat = time.time()
            try:
                self._renew(state)
            except LockLost as e:
                self.lost = str(e)
                return
            except (OSError, AuditError):  # a full or flaky disk or store: the next beat tries again
                continue

    def _renew(self, state: LockFile) -> None:
        if self.remote:  # state: what this beat read (its etag is the version we hold)
            if state.etag is not None and fs.conditional_puts(self.path):
                written = fs.put_if_match(self.path, self._body(), state.etag)
                if written is False:
                    raise LockLost(f"{self.path} changed under this driver (another driver took it over)")
                if written:
                    return
            fs.write_bytes(self.path, self._body())
            return
        tmp = self.out / f".{LOCK}.{self.info.token[:8]}.tmp"
        tmp.write_bytes(self._body())
        os.replace(tmp, self.path)

    def check(self) -> None:
        """Raise :class:`LockLost` (one line) when this driver no longer holds the output."""
        why = self.lost or _not_ours(inspect(self.out, tolerant=True), self.info.token, self.path)
        if why is not None:
            self.lost = why
            raise LockLost(f"stopped: {why}; this run (generation {self.info.generation}) commits nothing more")

    def release(self) -> None:
        """Stop the heartbeat and remove the lock if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=HEARTBEAT_S)
        held = read_lock(self.out)
        if held is not None and held.token == self.info.token:
            with contextlib.suppress(OSError, AuditError):
                fs.delete(self.path) if self.remote else self.path.unlink()


def _not_ours(state: LockFile, token: str, path) -> str | None:
    """Why the lock is not (any longer) ``token``'s, or None; None too when the store did not answer."""
    if state.error is not None:  # cannot tell: the write that follows goes to the same store
        return None
    if not state.exists:
        return f"{path} is gone (another driver took the output over and finished?)"
    if state.info is None:
        return f"{path} is unreadable (another driver is taking the output over?)"
    if state.info.token != token:
        return f"{state.info.describe()} took over {path}"
    return None


def write_file(path: Path, data: bytes) -> None:
    """Write and fsync a whole local file (a full disk raises; the partial file is removed)."""
    try:
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError:
        with contextlib.suppress(OSError):
            path.unlink()
        raise


def _parse(data: bytes) -> LockInfo | None:
    try:
        d = json.loads(data)
        return LockInfo(str(d["host"]), int(d["pid"]), str(d["job_id"]), float(d["started"]),
                        float(d["heartbeat"]), str(d.get("token", "")), int(d.get("generation") or 0))
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
