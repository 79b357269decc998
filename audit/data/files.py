"""Reading the user's files safely, and naming them in text.

Every read of an input file (an image, a mask) goes through
:func:`read_regular_file`: it never opens anything but a regular file (a FIFO
would block forever, ``/dev/zero`` would never end), and it never reads more
than a size limit (``dataset.max_image_bytes``).  Any problem is a
:class:`audit.data.decode.DecodeError` whose text becomes the row's ``error``
(or ``mask_error``).

File names on POSIX are bytes; Python hands names that are not valid UTF-8
over as strings with surrogate escapes, which Arrow cannot store.
:func:`escape_text` turns such a name into valid text (each undecodable byte
as ``\\xNN``); the exact bytes are kept by :func:`raw_bytes` for the
``path_bytes`` column.
"""

from __future__ import annotations

import os
import stat

from audit.data.decode import DecodeError

DEFAULT_MAX_IMAGE_BYTES = 256 * 1024 * 1024


def escape_text(s: str) -> str:
    """``s`` as valid UTF-8 text: undecodable bytes (surrogate escapes) become ``\\xNN``.

    Text that is already valid is returned unchanged, so the ids of ordinary
    names never change.
    """
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        pass
    try:
        return s.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate that is not an escaped byte
        return s.encode("utf-8", "backslashreplace").decode("utf-8")


def raw_bytes(s: str) -> bytes | None:
    """The exact bytes of a name that is not valid UTF-8; ``None`` when ``s`` is valid text."""
    try:
        s.encode("utf-8")
        return None
    except UnicodeEncodeError:
        return os.fsencode(s)


def unescape_path(s: str) -> str:
    """Inverse of :func:`escape_text` for a path (``\\xNN`` back to the raw byte), as a str for ``open``."""
    if "\\x" not in s:
        return s
    raw = s.encode("utf-8").decode("unicode_escape").encode("latin-1", "replace")
    # unicode_escape read the UTF-8 bytes as Latin-1: undo that for the valid parts
    return os.fsdecode(raw)


def _special_kind(mode: int) -> str | None:
    if stat.S_ISREG(mode):
        return None
    for test, name in ((stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "FIFO (named pipe)"),
                       (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
                       (stat.S_ISSOCK, "socket")):
        if test(mode):
            return name
    return "special file"


def read_regular_file(path: str, max_bytes: int = DEFAULT_MAX_IMAGE_BYTES, what: str = "file") -> bytes:
    """The bytes of the regular file ``path`` (symlinks followed), at most ``max_bytes``.

    Args:
        path: the file (a str; surrogate escapes are fine).
        max_bytes: the largest file read; a larger one is refused without reading it.
        what: ``"file"`` or ``"mask"``, for the messages.

    Returns:
        The file's bytes.

    Raises:
        DecodeError: the file is missing, unreadable, not a regular file (FIFO,
            device, socket, directory: checked with ``stat`` before opening and
            again on the open descriptor, which is opened non-blocking) or
            larger than ``max_bytes``.
    """
    shown = escape_text(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise DecodeError(f"{what} not found: {shown}") from None
    except OSError as e:
        raise DecodeError(f"cannot read {what} {shown}: {e.strerror or e}") from None
    _check_regular(st, max_bytes, what, shown)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise DecodeError(f"cannot read {what} {shown}: {e.strerror or e}") from None
    with os.fdopen(fd, "rb") as f:
        try:
            _check_regular(os.fstat(fd), max_bytes, what, shown)  # replaced since the stat?
            data = f.read(max_bytes + 1)
        except OSError as e:
            raise DecodeError(f"cannot read {what} {shown}: {e.strerror or e}") from None
    check_size(len(data), max_bytes, what)
    return data


def _check_regular(st, max_bytes: int, what: str, shown: str) -> None:
    kind = _special_kind(st.st_mode)
    if kind:
        raise DecodeError(f"{what} {shown} is a {kind}, not a regular file (not read)")
    check_size(st.st_size, max_bytes, what)


def check_size(n: int, max_bytes: int, what: str = "file") -> None:
    """Refuse ``n`` bytes above ``max_bytes`` (``dataset.max_image_bytes``) with a :class:`DecodeError`."""
    if n > max_bytes:
        raise DecodeError(f"{what} is larger than dataset.max_image_bytes={max_bytes:,} bytes"
                          + (f" ({n:,} bytes)" if n > max_bytes + 1 else ""))
