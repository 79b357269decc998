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


def cannot_write(path, e: OSError, hint: str = "") -> AuditError:
    """The :class:`AuditError` for a failed write to ``path``; ``hint`` is added for a read-only or full place.

    Args:
        path: what was being written.
        e: the error.
        hint: what to do instead, e.g. ``"write it elsewhere with --out DIR"``.
    """
    why = e.strerror or " ".join(str(e).split())[:300] or type(e).__name__
    kind = ""
    if e.errno in _READ_ONLY:
        kind = " (read-only output?)"
    elif e.errno in _FULL:
        kind = " (disk full or over quota?)"
    return AuditError(f"cannot write {path}: {why}{kind}" + (f"; {hint}" if hint and kind else ""))
