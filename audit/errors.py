"""User-facing errors.

An :class:`AuditError` is a mistake the user can fix (a bad path, an unknown
layer, a malformed spec).  The CLI prints its message on one line and exits
with status 2 instead of showing a traceback.
"""

import errno

# a write refused because of where it goes, not because of what is written
_READ_ONLY = (errno.EROFS, errno.EACCES, errno.EPERM)
_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class AuditError(Exception):
    """A user mistake, reported as one clear line (no traceback)."""


def os_error_line(e: OSError) -> str:
    """An ``OSError`` (ours or pyarrow's) as one line: what went wrong and the file."""
    why = e.strerror or " ".join(str(e).split())[:300] or type(e).__name__
    return f"{why}: {e.filename}" if e.filename else why


def cannot_write(path, e: OSError, hint: str = "", need: int | None = None) -> AuditError:
    """The :class:`AuditError` for a failed write to ``path``; ``hint`` is added for a read-only or full place.

    Args:
        path: what was being written.
        e: the error.
        hint: what to do instead, e.g. ``"write it elsewhere with --out DIR"``.
        need: bytes the write needed; a full disk's line then says how much is free and needed.
    """
    why = e.strerror or " ".join(str(e).split())[:300] or type(e).__name__
    kind = ""
    if e.errno in _READ_ONLY:
        kind = " (read-only output?)"
    elif e.errno == errno.ENOSPC or (e.errno is None and is_disk_full(e)):
        kind = f" ({free_space(path, need)})"
    elif e.errno in _FULL:
        kind = " (disk full or over quota?)"
    return AuditError(f"cannot write {path}: {why}{kind}" + (f"; {hint}" if hint and kind else ""))


def is_disk_full(e: BaseException) -> bool:
    """True for a full disk or quota, also as pyarrow reports it (an OSError without errno)."""
    if isinstance(e, OSError) and e.errno in _FULL:
        return True
    text = str(e)
    return "No space left on device" in text or "Disk quota exceeded" in text


def free_space(path, need: int | None = None) -> str:
    """``disk full: 12.0 kB free on /mnt/out, about 3.4 MB needed`` (what is known of it)."""
    import os
    import shutil

    where = os.path.dirname(os.path.abspath(str(path)))
    while where and not os.path.isdir(where):
        where = os.path.dirname(where)
    try:
        free = f"{_size(shutil.disk_usage(where).free)} free on {where}"
    except OSError:
        free = "disk full or over quota"
    return f"disk full: {free}" + (f", about {_size(need)} needed" if need else "") + "; free some space"


def _size(n: float) -> str:
    if n < 1000:
        return f"{int(n)} bytes"
    units = ("kB", "MB", "GB")
    k = 0
    n /= 1000
    while n >= 1000 and k < len(units) - 1:
        n, k = n / 1000, k + 1
    return f"{n:.1f} {units[k]}"
