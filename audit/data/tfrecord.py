"""TFRecord framing with its checksums, robust to corrupt files.

A TFRecord file is a sequence of records::

    uint64 length | uint32 masked_crc32c(length) | data[length] | uint32 masked_crc32c(data)

:func:`frames` walks a file from a record boundary and yields one
:class:`Frame` per entry the audit counts: a good record, a record whose data
checksum fails (found by :func:`read_record`), a truncated last record, or a
corrupt stretch of bytes.  A header whose length checksum fails means the
framing is lost at that point; the walk then looks for the next offset that
holds a valid header (length checksum right, record inside the file) and
resumes there, so the records after a damaged stretch are kept and the
stretch itself is one entry (one error row).  The walk is deterministic from
any frame boundary, so the planner and the workers count the same entries.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

_MASK_DELTA = 0xA282EAD8
_RESYNC_CHUNK = 1 << 20  # candidate offsets checked at once while resynchronising


@dataclass(frozen=True)
class Frame:
    """One entry of a TFRecord file: a record, or bytes that are not one."""

    offset: int  # where the entry starts
    length: int | None  # data bytes of a record; None for a corrupt stretch
    problem: str | None  # why this entry is not a good record (None: check the data checksum on reading)
    next: int  # offset of the next entry


def crc32c(data: bytes) -> int:
    import google_crc32c

    return google_crc32c.value(bytes(data))


def masked_crc(data: bytes) -> int:
    """TFRecord's masked CRC32C of ``data``."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def frames(f, size: int, start: int = 0):
    """Yield the :class:`Frame` s of an open binary file of ``size`` bytes from offset ``start``."""
    pos = start
    while pos < size:
        f.seek(pos)
        head = f.read(12)
        if len(head) < 12:
            yield Frame(pos, None, f"truncated TFRecord record ({len(head)}-byte header)", size)
            return
        n, crc = struct.unpack("<QI", head)
        if masked_crc(head[:8]) != crc:
            nxt = _resync(f, size, pos + 1)
            yield Frame(pos, None, f"corrupt TFRecord data: bytes {pos:,} to {nxt:,} are not a record "
                                   "(length checksum mismatch)", nxt)
            pos = nxt
            continue
        if pos + 16 + n > size:
            yield Frame(pos, n, "truncated TFRecord record", size)
            return
        yield Frame(pos, n, None, pos + 16 + n)
        pos += 16 + n


def read_record(f, frame: Frame, max_bytes: int) -> tuple[bytes | None, str | None]:
    """(data, None) of a good record, or (None, why not); reads nothing for a refused one."""
    if frame.problem:
        return None, frame.problem
    if frame.length > max_bytes:
        return None, f"TFRecord record is {frame.length:,} bytes, more than dataset.max_image_bytes={max_bytes:,}"
    f.seek(frame.offset + 12)
    data = f.read(frame.length)
    tail = f.read(4)
    if len(data) < frame.length or len(tail) < 4:
        return None, "truncated TFRecord record"
    if struct.unpack("<I", tail)[0] != masked_crc(data):
        return None, "corrupt TFRecord record (data checksum mismatch)"
    return data, None


# ----------------------------------------------------------------------------
# finding the next valid header after a corrupt stretch
# ----------------------------------------------------------------------------


def _resync(f, size: int, pos: int) -> int:
    """The first offset >= ``pos`` with a valid header whose record fits in the file, else ``size``."""
    while pos + 16 <= size:
        f.seek(pos)
        buf = f.read(_RESYNC_CHUNK + 11)
        if len(buf) < 12:
            break
        for k in _valid_headers(buf, max_length=size):
            (n,) = struct.unpack_from("<Q", buf, int(k))
            if pos + int(k) + 16 + n <= size:
                return pos + int(k)
        pos += len(buf) - 11
    return size


_TABLE = None


def _crc_table() -> np.ndarray:
    global _TABLE
    if _TABLE is None:
        t = np.arange(256, dtype=np.uint32)
        for _ in range(8):
            t = np.where(t & 1, (t >> 1) ^ np.uint32(0x82F63B78), t >> 1).astype(np.uint32)
        _TABLE = t
    return _TABLE


def _valid_headers(buf: bytes, max_length: int | None = None) -> np.ndarray:
    """Offsets k (with 12 bytes left) where ``buf[k:k+12]`` holds a length and its masked CRC32C.

    The CRC of all 8-byte windows at once (table-driven, vectorised over k).
    With ``max_length`` (the file size), only windows whose length fits in
    that many bytes are checked: in random bytes that leaves about one
    offset in 2^24, so a corrupt stretch is searched at disk speed.
    """
    b = np.frombuffer(buf, np.uint8)
    m = len(b) - 11
    if m <= 0:
        return np.zeros(0, np.int64)
    # twelve zero bytes are no header (the masked CRC of a zero length is not 0): a zeroed
    # stretch, the commonest damage, is skipped without computing its CRCs
    x = b != 0
    any2 = x[:-1] | x[1:]
    any4 = any2[:-2] | any2[2:]
    any8 = any4[:-4] | any4[4:]
    keep = any8[:m] | any4[8:8 + m]  # some byte of buf[k:k+12] is not zero
    if max_length is not None:
        for j in range(max(1, (int(max_length).bit_length() + 7) // 8), 8):
            keep &= b[j:j + m] == 0  # the high bytes of a length below max_length are zero
    idx = np.flatnonzero(keep)
    table = _crc_table()
    crc = np.full(len(idx), 0xFFFFFFFF, np.uint32)
    for j in range(8):
        crc = table[(crc ^ b[idx + j]) & 0xFF] ^ (crc >> np.uint32(8))
    crc ^= np.uint32(0xFFFFFFFF)
    masked = ((crc >> np.uint32(15)) | (crc << np.uint32(17))) + np.uint32(_MASK_DELTA)
    stored = (b[idx + 8].astype(np.uint32) | (b[idx + 9].astype(np.uint32) << 8)
              | (b[idx + 10].astype(np.uint32) << 16) | (b[idx + 11].astype(np.uint32) << 24))
    return idx[masked == stored]
