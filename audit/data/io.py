"""The output directory: exactly-once shard commits, the manifest, job.json.

A shard is committed in two steps, both atomic renames on the same filesystem:

1. its rows, cast to the declared Arrow schema, are written to
   ``records/.part-NNNNN.<random>.tmp`` and renamed to ``records/part-NNNNN.parquet``;
2. then ``_manifest/part-NNNNN.json`` (shard id, inputs, identity, row count,
   bytes, job id) is written the same way.

A shard counts as done only when its manifest entry exists and its Parquet
file has the entry's size and row count (:func:`committed_shards`).  A retried or
resumed shard overwrites its Parquet file by rename (readers never see half a
file; temp names start with ``.`` so ``pyarrow.dataset`` ignores them) and is
deterministic, so writing it twice gives the same rows.  A commit also removes
the temp files of its shard left by an earlier attempt killed mid-write.

OUT may be an object-storage URI (``s3://``, ``gs://``, ``abfs://``;
:mod:`audit.data.fs`), where there is no atomic rename.  There a shard is
committed by two single PUTs, each of which appears whole or not at all:

1. its rows go to ``records/part-NNNNN-<attempt>.parquet``, a name unique to
   the attempt, so two attempts (a retried shard whose first actor is still
   alive, a resumed job) never write the same object;
2. then ``_manifest/part-NNNNN.json`` names the object it commits, with its
   size and row count.

Readers (:func:`committed_shards`, ``audit.load``, the scan, the report,
``--resume``) follow the manifest entries only, so an attempt killed
mid-upload leaves at most an orphan object that nothing reads;
:func:`remove_orphans` deletes those at the end of a job.

The entry is created with :func:`audit.data.fs.put_if_absent`: on S3 with
boto3 installed, one PUT with ``If-None-Match: *``, so of two attempts of a
shard that both finish (a retried shard whose first actor was alive after
all) the store lets exactly one entry in; the other attempt finds it,
deletes its own object and returns the entry there.  pyarrow cannot send
that header, so GCS, Azure, S3 without boto3 and stores that reject the
header get an existence check, then a plain PUT: two attempts racing between
the two can both write, and the last entry wins.  Either way both objects
hold the same rows (shards are deterministic), the entry names one of them,
and every shard is read exactly once, from one complete object.  An entry
that names a missing or truncated object is replaced by the next attempt
(a ``--resume`` redo).
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from pathlib import Path

from audit.data import fs
from audit.errors import AuditError, cannot_write, is_disk_full

RECORDS = "records"
MANIFEST = "_manifest"
JOB_JSON = "job.json"
LOCK = "_lock.json"  # see audit.data.lock


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
    """Write a whole file: temp + rename locally, one PUT (which is atomic) on object storage."""
    if fs.is_uri(str(path)):
        fs.write_bytes(str(path), data)
        return
    path = Path(path)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # a full disk: leave no half-written temp file behind
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_json(path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode())


def write_job(out, record: dict) -> None:
    """Write ``OUT/job.json``; a full disk or a read-only output is one line naming it (AuditError)."""
    data = (json.dumps(record, indent=2, sort_keys=False, default=str) + "\n").encode()
    path = job_path(out)
    try:
        atomic_write_bytes(path, data)
    except OSError as e:
        raise cannot_write(path, e, need=len(data)) from None


def _has_content(out: Path) -> bool:
    """True when OUT holds anything but empty records/ and _manifest/ folders (and the lock)."""
    for entry in out.iterdir():
        if entry.name in (RECORDS, MANIFEST) and entry.is_dir() and not any(entry.iterdir()):
            continue
        if entry.name == LOCK or entry.name.startswith(f".{LOCK}."):  # the driver's lock (audit.data.lock)
            continue
        return True
    return False


def check_output(out, resume: bool) -> Path:
    """Refuse an OUT that is a file, or non-empty without ``resume`` (creates nothing)."""
    if fs.is_uri(str(out)):
        return _check_output_uri(str(out), resume)
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
    _check_writable(out)
    return out


def _check_output_uri(out: str, resume: bool) -> str:
    """:func:`check_output` for a URI: the bucket exists and is readable; empty, or a job to resume."""
    loc = fs.split(out)
    if not fs.exists(fs.Location(loc.scheme, loc.bucket, "").uri):
        raise fs.not_found(out, "output")
    names = [rel for rel, _ in fs.list_files(out) if rel != LOCK]
    if names and not resume:
        raise AuditError(f"output {out} is not empty; use --resume to continue the job there "
                         "(or choose another output, e.g. --set output=...)")
    if names and JOB_JSON not in names:
        raise AuditError(f"cannot resume: {out} has no {JOB_JSON}; it is not the output of an audit job")
    return out


def _check_writable(out: Path) -> None:
    """Refuse an OUT (or its nearest existing parent) that cannot be written, before any work starts."""
    where = out
    while not where.exists() and where != where.parent:
        where = where.parent
    for sub in (where, where / RECORDS, where / MANIFEST):
        if sub.is_dir() and not os.access(sub, os.W_OK):  # also false on a read-only mount, even for root
            raise AuditError(f"output {out} is not writable ({sub} is read-only); choose another output, "
                             "e.g. --set output=...")


def prepare_output(out, resume: bool) -> Path:
    """Check OUT (:func:`check_output`), then create it with records/ and _manifest/."""
    out = check_output(out, resume)
    if fs.is_uri(str(out)):
        return out  # prefixes need no creating
    try:
        (out / RECORDS).mkdir(parents=True, exist_ok=True)
        (out / MANIFEST).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise AuditError(f"cannot create output directory {out}: {e.strerror or e}") from None
    return out


def job_path(out):
    """``OUT/job.json`` (a Path, or a URI string)."""
    return fs.join(str(out), JOB_JSON) if fs.is_uri(str(out)) else Path(out) / JOB_JSON


def read_job(out) -> dict | None:
    if fs.is_uri(str(out)):
        try:
            return json.loads(fs.read_bytes(fs.join(str(out), JOB_JSON)))
        except (FileNotFoundError, json.JSONDecodeError):
            return None
    p = Path(out) / JOB_JSON
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError:
        return None


def part_problem(out, entry: dict, rows: bool = True) -> str | None:
    """Why a manifest entry's Parquet file does not hold what the entry says, or None.

    Checks that the file exists, that its size is the entry's ``bytes`` and
    (with ``rows``) that its footer says ``rows`` rows.  A truncated or
    replaced part file fails here and its shard is not committed.
    """
    if fs.is_uri(str(out)):
        path = fs.join(str(out), RECORDS, str(entry.get("file", "")))
        try:
            size = fs.size(path)
        except FileNotFoundError:
            return "is missing"
    else:
        path = Path(out) / RECORDS / str(entry.get("file", ""))
        try:
            size = path.stat().st_size
        except OSError:
            return "is missing"
    if "bytes" in entry and size != int(entry["bytes"]):
        return f"is {size:,} bytes but its manifest entry says {int(entry['bytes']):,} (truncated or replaced)"
    if rows:
        import pyarrow.parquet as pq

        try:
            n = pq.read_metadata(fs.open_input(path) if fs.is_uri(str(path)) else path).num_rows
        except Exception as e:  # noqa: BLE001 - ArrowInvalid, OSError: any unreadable footer
            return f"is not readable Parquet ({' '.join(str(e).split())[:120]})"
        if n != int(entry.get("rows", n)):
            return f"has {n:,} rows but its manifest entry says {int(entry['rows']):,}"
    return None


def manifest_entries(out) -> dict[int, dict]:
    """{shard id: manifest entry} of every readable entry in ``OUT/_manifest`` (files not checked)."""
    if fs.is_uri(str(out)):
        return _manifest_entries_uri(str(out))
    mdir = Path(out) / MANIFEST
    found = {}
    if not mdir.is_dir():
        return found
    for p in mdir.glob("part-*.json"):
        try:
            entry = json.loads(p.read_text())
            found[int(entry["shard"])] = entry
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return found


def _manifest_entries_uri(out: str) -> dict[int, dict]:
    found = {}
    mdir = fs.join(out, MANIFEST)
    for rel, _ in fs.list_files(mdir, recursive=False):
        if not (rel.startswith("part-") and rel.endswith(".json")):
            continue
        try:
            entry = json.loads(fs.read_bytes(fs.join(mdir, rel)))
            found[int(entry["shard"])] = entry
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            continue
    return found


def has_manifest(out) -> bool:
    """True when OUT has a ``_manifest/`` (a job output whose shards are committed by entries)."""
    if fs.is_uri(str(out)):
        return bool(fs.list_files(fs.join(str(out), MANIFEST), recursive=False))
    return (Path(out) / MANIFEST).is_dir()


def committed_shards(out, rows: bool = True, broken: dict | None = None) -> dict[int, dict]:
    """{shard id: manifest entry} of the committed shards.

    A shard is committed when its manifest entry exists and its Parquet file
    matches it (:func:`part_problem`; ``rows=False`` checks the size only).
    Entries whose file does not match go to ``broken`` ({shard id: reason})
    when a dict is given: they are redone on resume.
    """
    done = {}
    for sid, entry in manifest_entries(out).items():
        problem = part_problem(out, entry, rows=rows)
        if problem is None:
            done[sid] = entry
        elif broken is not None:
            broken[sid] = f"{RECORDS}/{entry.get('file')} {problem}"
    return done


def uncommit(out, shard_ids) -> None:
    """Take shards out of the output: manifest entry first, then the Parquet file."""
    if fs.is_uri(str(out)):
        entries = manifest_entries(out)
        for sid in shard_ids:
            fs.delete(fs.join(str(out), MANIFEST, f"{part_name(sid)}.json"))
            if sid in entries and entries[sid].get("file"):
                fs.delete(fs.join(str(out), RECORDS, str(entries[sid]["file"])))
        return
    out = Path(out)
    for sid in shard_ids:
        name = part_name(sid)
        for p in (out / MANIFEST / f"{name}.json", out / RECORDS / f"{name}.parquet"):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
    _fsync_dir(out / MANIFEST)


def _dictionary_columns(schema) -> list[str]:
    """Dictionary-encode the string columns only (ids, names, layer, method, status).

    Dictionary encoding of the float columns (the cam lists above all) costs
    more CPU than the whole rest of the write and makes the file larger: the
    values hardly repeat, so Arrow builds a dictionary and then falls back.
    """
    import pyarrow as pa

    return [f.name for f in schema if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)]


def write_shard(out, shard: int, table, *, job_id: str, schema_version: str, inputs: dict,
                counts: dict, identity: dict | None = None, guard=None, generation: int = 0) -> dict:
    """Commit one shard: Parquet (temp file, rename), then its manifest entry. Returns the entry.

    ``inputs`` is the shard's descriptor, ``identity`` what it holds
    (:class:`audit.data.identity.ShardIdentity` as a dict): ``--resume``
    compares both with its new plan.  ``guard`` (fencing) is called just
    before the rename and again before the manifest entry: it raises when this
    driver's lock (of ``generation``) is no longer held, so a driver that was
    paused while another took the output over commits nothing.  An entry
    already committed by a later generation is never replaced.

    Raises:
        AuditError: the lock was lost (``guard``), a later generation committed
            the shard, or the disk is full (one line with the free space).
    """
    table = _with_metadata(table, job_id, schema_version, shard)
    check = _fence(out, shard, guard, generation)
    if fs.is_uri(str(out)):
        return _write_shard_uri(str(out), shard, table, job_id=job_id, inputs=inputs, counts=counts,
                                identity=identity, check=check, generation=generation)
    out = Path(out)
    name = part_name(shard)
    final = out / RECORDS / f"{name}.parquet"
    tmp = out / RECORDS / f".{name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        _write_parquet(table, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        check()
        os.replace(tmp, final)
    except OSError as e:
        if is_disk_full(e):
            raise cannot_write(final, e, need=table.nbytes) from None
        raise
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(final.parent)
    entry = {"shard": int(shard), "file": final.name, "rows": table.num_rows, "inputs": inputs,
             "identity": identity, "job_id": job_id, "bytes": final.stat().st_size,
             "generation": int(generation), **counts}
    check()
    atomic_write_json(out / MANIFEST / f"{name}.json", entry)
    _remove_stale_temps(out, name)
    return entry


def _fence(out, shard: int, guard, generation: int):
    """The check run before each commit step: the lock still ours, no later generation's entry there."""
    where = fs.join(str(out), MANIFEST, f"{part_name(shard)}.json") if fs.is_uri(str(out)) else \
        Path(out) / MANIFEST / f"{part_name(shard)}.json"

    def check() -> None:
        if guard is not None:
            guard()
        held = _read_entry(str(where)) if generation else None
        if held is not None and int(held.get("generation") or 0) > generation:
            raise AuditError(f"stopped: shard {shard} not committed: generation {held['generation']} committed "
                             f"it after this run (generation {generation}) started; this run commits nothing more")

    return check


def _with_metadata(table, job_id, schema_version, shard):
    meta = dict(table.schema.metadata or {})
    meta.update({
        b"shortcut_audit.schema_version": str(schema_version).encode(),
        b"shortcut_audit.job_id": str(job_id).encode(),
        b"shortcut_audit.shard": str(shard).encode(),
    })
    return table.replace_schema_metadata(meta)


def _write_parquet(table, where):
    import pyarrow.parquet as pq

    pq.write_table(table, where, compression="zstd", row_group_size=max(1, table.num_rows),
                   use_dictionary=_dictionary_columns(table.schema))


def _write_shard_uri(out: str, shard: int, table, *, job_id, inputs, counts, identity, check,
                     generation: int) -> dict:
    """Commit one shard on object storage: an object named for this attempt, then the entry naming it."""
    import pyarrow as pa

    name = part_name(shard)
    file = f"{name}-{uuid.uuid4().hex[:12]}.parquet"  # unique to the attempt: never overwritten
    sink = pa.BufferOutputStream()
    _write_parquet(table, sink)
    data = sink.getvalue()
    check()
    fs.write_bytes(fs.join(out, RECORDS, file), data.to_pybytes())
    entry = {"shard": int(shard), "file": file, "rows": table.num_rows, "inputs": inputs,
             "identity": identity, "job_id": job_id, "bytes": data.size, "generation": int(generation), **counts}
    where = fs.join(out, MANIFEST, f"{name}.json")
    body = (json.dumps(entry, indent=2, default=str) + "\n").encode()
    try:
        check()
    except AuditError:
        fs.delete(fs.join(out, RECORDS, file))
        raise
    if fs.put_if_absent(where, body):
        return entry
    held = _read_entry(where)
    if held is not None and part_problem(out, held) is None:  # another attempt committed the shard first
        fs.delete(fs.join(out, RECORDS, file))
        return held
    fs.write_bytes(where, body)  # the entry there names a missing or truncated object: this attempt replaces it
    return entry


def _read_entry(path: str) -> dict | None:
    try:
        return json.loads(fs.read_bytes(path))
    except (OSError, ValueError):
        return None


def remove_orphans(out) -> list[str]:
    """Delete the record objects no manifest entry names (attempts killed mid-upload, replaced attempts).

    Object storage only (a local OUT has no such objects: temp files are
    removed at commit).  Call it when no actor of the job can still commit.
    Returns the names removed.
    """
    if not fs.is_uri(str(out)):
        return []
    named = {str(e.get("file")) for e in manifest_entries(out).values()}
    gone = []
    for rel, _ in fs.list_files(fs.join(str(out), RECORDS), recursive=False):
        if rel not in named:
            fs.delete(fs.join(str(out), RECORDS, rel))
            gone.append(rel)
    return gone


def _remove_stale_temps(out: Path, name: str) -> None:
    """Temp files of this shard left by an earlier attempt whose process was killed mid-write."""
    for d, pattern in ((RECORDS, f".{name}.*.tmp"), (MANIFEST, f".{name}.json.*.tmp")):
        for p in (out / d).glob(pattern):
            with contextlib.suppress(OSError):
                p.unlink()


def completeness(out) -> str | None:
    """One sentence when OUT holds only part of its job (``6 of 16 shards committed ...``), else None.

    From ``job.json`` (the plan's shard count and the last run's status) and
    the manifest entries; an output without ``job.json`` (records written by
    hand) is taken as it is.
    """
    job = read_job(out) or {}
    total = (job.get("shards") or {}).get("total") or (job.get("dataset") or {}).get("shards")
    if not total:
        return None
    total = int(total)
    done = sum(1 for sid in committed_shards(out, rows=False) if sid < total)
    status = job.get("status")
    if done >= total and status not in ("running", "interrupted", "failed"):
        return None
    why = {"running": "its driver is still running, or was stopped",
           "interrupted": "the job was interrupted", "failed": "the job failed"}.get(status, f"job status {status}")
    return (f"incomplete output: {done} of {total} shards committed ({why}); the results cover only those "
            "shards: continue the job with `audit run SPEC --resume`")
