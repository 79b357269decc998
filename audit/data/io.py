"""The output directory: exactly-once shard commits, the manifest, job.json.

A shard is committed in two steps, both atomic renames on the same filesystem:

1. its rows, cast to the declared Arrow schema, are written to
   ``records/.part-NNNNN.<random>.tmp`` and renamed to ``records/part-NNNNN.parquet``;
2. then ``_manifest/part-NNNNN.json`` (shard id, inputs, row count) is written
   the same way.

A shard counts as done only when its manifest entry exists.  A retried or
resumed shard overwrites its Parquet file by rename (readers never see half a
file; temp names start with ``.`` so ``pyarrow.dataset`` ignores them) and is
deterministic, so writing it twice gives the same rows.  A commit also removes
the temp files of its shard left by an earlier attempt killed mid-write.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from pathlib import Path

from audit.errors import AuditError

RECORDS = "records"
MANIFEST = "_manifest"
JOB_JSON = "job.json"


def part_name(shard: int) -> str:
    return f"part-{int(shard):05d}"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path, data: bytes) -> None:
    path = Path(path)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode())


def _has_content(out: Path) -> bool:
    """True when OUT holds anything but empty records/ and _manifest/ folders."""
    for entry in out.iterdir():
        if entry.name in (RECORDS, MANIFEST) and entry.is_dir() and not any(entry.iterdir()):
            continue
        return True
    return False


def check_output(out, resume: bool) -> Path:
    """Refuse an OUT that is a file, or non-empty without ``resume`` (creates nothing)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise AuditError(f"output {out} exists and is not a directory")
    if out.exists() and _has_content(out):
        if not resume:
            raise AuditError(
                f"output directory {out} is not empty; use --resume to continue the job there "
                "(or choose another output, e.g. --set output=...)"
            )
        if not (out / JOB_JSON).is_file():
            raise AuditError(f"cannot resume: {out} has no {JOB_JSON}; it is not the output of an audit job")
    return out


def prepare_output(out, resume: bool) -> Path:
    """Check OUT (:func:`check_output`), then create it with records/ and _manifest/."""
    out = check_output(out, resume)
    try:
        (out / RECORDS).mkdir(parents=True, exist_ok=True)
        (out / MANIFEST).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise AuditError(f"cannot create output directory {out}: {e.strerror or e}") from None
    return out


def read_job(out) -> dict | None:
    p = Path(out) / JOB_JSON
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError:
        return None


def committed_shards(out) -> dict[int, dict]:
    """{shard id: manifest entry} of the committed shards (valid entry and Parquet file present)."""
    out = Path(out)
    done = {}
    mdir = out / MANIFEST
    if not mdir.is_dir():
        return done
    for p in mdir.glob("part-*.json"):
        try:
            entry = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if (out / RECORDS / entry.get("file", "")).is_file():
            done[int(entry["shard"])] = entry
    return done


def _dictionary_columns(schema) -> list[str]:
    """Dictionary-encode the string columns only (ids, names, layer, method, status).

    Dictionary encoding of the float columns (the cam lists above all) costs
    more CPU than the whole rest of the write and makes the file larger: the
    values hardly repeat, so Arrow builds a dictionary and then falls back.
    """
    import pyarrow as pa

    return [f.name for f in schema if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)]


def write_shard(out, shard: int, table, *, job_id: str, schema_version: str, inputs: dict,
                counts: dict) -> dict:
    """Commit one shard: Parquet (temp file, rename), then its manifest entry. Returns the entry."""
    import pyarrow.parquet as pq

    out = Path(out)
    name = part_name(shard)
    final = out / RECORDS / f"{name}.parquet"
    tmp = out / RECORDS / f".{name}.{uuid.uuid4().hex[:8]}.tmp"
    meta = dict(table.schema.metadata or {})
    meta.update({
        b"shortcut_audit.schema_version": str(schema_version).encode(),
        b"shortcut_audit.job_id": str(job_id).encode(),
        b"shortcut_audit.shard": str(shard).encode(),
    })
    table = table.replace_schema_metadata(meta)
    try:
        pq.write_table(table, tmp, compression="zstd", row_group_size=max(1, table.num_rows),
                       use_dictionary=_dictionary_columns(table.schema))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(final.parent)
    entry = {"shard": int(shard), "file": final.name, "rows": table.num_rows, "inputs": inputs,
             "job_id": job_id, "bytes": final.stat().st_size, **counts}
    atomic_write_json(out / MANIFEST / f"{name}.json", entry)
    _remove_stale_temps(out, name)
    return entry


def _remove_stale_temps(out: Path, name: str) -> None:
    """Temp files of this shard left by an earlier attempt whose process was killed mid-write."""
    for d, pattern in ((RECORDS, f".{name}.*.tmp"), (MANIFEST, f".{name}.json.*.tmp")):
        for p in (out / d).glob(pattern):
            with contextlib.suppress(OSError):
                p.unlink()
