"""Paths and URIs: local files and object storage (S3, GCS, Azure) through ``pyarrow.fs``.

Every place that takes a path (``dataset.path``, ``dataset.masks``, manifest
entries, ``model.path``, ``output``, ``audit.load``) also takes a URI:
``s3://bucket/key``, ``gs://bucket/key`` (``gcs://``), ``abfs://container/key``
(``abfss://``, ``az://``).  A local path never goes through this module's
object-storage code: the callers keep their local branches (special files,
size limits, non-UTF-8 names, temp + rename).

Why ``pyarrow.fs``: pyarrow is already a dependency (the records are
Parquet), its S3, GCS and Azure filesystems are built into the wheel (no
s3fs/gcsfs/adlfs extras to install on every node), the Parquet reader reads
straight from them, and its S3 client retries throttling and transient
errors itself (:data:`S3_RETRIES` attempts with backoff).

One filesystem object per process and bucket (:func:`resolve`, cached), never
one per image.  Endpoints and credentials come from the standard places and
are never written anywhere by this module:

* S3: ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``,
  ``~/.aws/credentials`` and ``~/.aws/config`` (``AWS_PROFILE``), instance
  roles; the region from ``AWS_REGION`` or ``AWS_DEFAULT_REGION``; an
  S3-compatible endpoint from ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``
  (read here and passed to pyarrow as ``endpoint_override``: pyarrow's S3
  client does not read these variables itself).
* GCS: ``GOOGLE_APPLICATION_CREDENTIALS`` or the metadata server; an
  emulator from ``STORAGE_EMULATOR_HOST`` (as Google's own clients read it;
  anonymous requests).
* Azure: ``AZURE_STORAGE_ACCOUNT_NAME`` and ``AZURE_STORAGE_ACCOUNT_KEY`` (or
  the default Azure credential chain).
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import threading
import time
from dataclasses import dataclass

from audit.errors import AuditError

SCHEMES = {"s3": "s3", "gs": "gs", "gcs": "gs", "abfs": "abfs", "abfss": "abfs", "az": "abfs"}
S3_RETRIES = 8  # attempts per S3 request (throttling, 5xx, dropped connections), with backoff
CONFLICT_RETRIES = 5  # conditional PUTs answered 409 (another conditional write of the key in flight)

#: The variable to set, named in a credential error, per scheme.
CREDENTIAL_HINT = {
    "s3": "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE; AWS_ENDPOINT_URL for an "
          "S3-compatible server)",
    "gs": "GOOGLE_APPLICATION_CREDENTIALS",
    "abfs": "AZURE_STORAGE_ACCOUNT_NAME and AZURE_STORAGE_ACCOUNT_KEY",
}

_lock = threading.Lock()
_cache: dict = {}  # (scheme, bucket, environment) -> pyarrow FileSystem


def is_uri(path) -> bool:
    """True for an object-storage URI (``s3://``, ``gs://``, ``abfs://`` ...); False for a local path."""
    if not isinstance(path, str):
        return False
    scheme, sep, _ = path.partition("://")
    return bool(sep) and scheme.lower() in SCHEMES


@dataclass(frozen=True)
class Location:
    """A URI split into its parts: ``s3://bucket/a/b`` -> scheme ``s3``, bucket, key ``a/b``."""

    scheme: str
    bucket: str
    key: str

    @property
    def path(self) -> str:
        """The path pyarrow's filesystem takes: ``bucket/key``."""
        return f"{self.bucket}/{self.key}" if self.key else self.bucket

    @property
    def uri(self) -> str:
        return f"{self.scheme}://{self.path}"


def split(uri: str) -> Location:
    """Split ``uri`` (see :class:`Location`); the scheme is normalised (``gcs`` -> ``gs``)."""
    scheme, _, rest = uri.partition("://")
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise AuditError(f"{uri}: no bucket in the URI (expected {scheme}://BUCKET/PATH)")
    return Location(SCHEMES[scheme.lower()], bucket, _normkey(key))


def _normkey(key: str) -> str:
    key = posixpath.normpath(key) if key else ""
    return "" if key in (".", "/") else key.lstrip("/")


def join(base: str, *parts: str) -> str:
    """``os.path.join`` for a local ``base``; for a URI, its key joined and normalised (``..`` resolved)."""
    if not is_uri(base):
        return os.path.join(base, *parts)
    loc = split(base)
    key = posixpath.join(loc.key, *parts)
    return Location(loc.scheme, loc.bucket, _normkey(key)).uri


def dirname(path: str) -> str:
    if not is_uri(path):
        return os.path.dirname(path)
    loc = split(path)
    return Location(loc.scheme, loc.bucket, posixpath.dirname(loc.key)).uri


def relpath(path: str, start: str) -> str:
    """``path`` relative to ``start`` as a POSIX path (local or URI)."""
    if not is_uri(path):
        return os.path.relpath(path, start).replace(os.sep, "/")
    return posixpath.relpath(split(path).key or ".", split(start).key or ".")


# ----------------------------------------------------------------------------
# filesystems
# ----------------------------------------------------------------------------


def _s3_endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def _env_key(scheme: str) -> tuple:
    """The environment a filesystem was built from: a changed variable gives a new one."""
    names = {"s3": ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                    "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_REGION", "AWS_DEFAULT_REGION"),
             "gs": ("GOOGLE_APPLICATION_CREDENTIALS", "STORAGE_EMULATOR_HOST"),
             "abfs": ("AZURE_STORAGE_ACCOUNT_NAME", "AZURE_STORAGE_ACCOUNT_KEY")}[scheme]
    return tuple(os.environ.get(n) for n in names)


def _make_s3():
    from pyarrow import fs as pafs

    kwargs = {"retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=S3_RETRIES),
              "connect_timeout": 10.0, "request_timeout": 60.0}
    endpoint = _s3_endpoint()
    if endpoint:
        scheme, sep, host = endpoint.partition("://")
        kwargs["endpoint_override"] = host.rstrip("/") if sep else endpoint
        kwargs["scheme"] = scheme if sep else "https"
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    elif endpoint:
        kwargs["region"] = "us-east-1"  # an S3-compatible server: no region lookup against AWS
    return pafs.S3FileSystem(**kwargs)


def _make_gcs():
    """GCS; with ``STORAGE_EMULATOR_HOST`` (the variable Google's clients read), that emulator, anonymously."""
    from pyarrow import fs as pafs

    emulator = os.environ.get("STORAGE_EMULATOR_HOST")
    if not emulator:
        return pafs.GcsFileSystem()
    scheme, sep, host = emulator.partition("://")
    return pafs.GcsFileSystem(anonymous=True, scheme=scheme if sep else "http",
                              endpoint_override=host.rstrip("/") if sep else emulator)


def _make(loc: Location):
    from pyarrow import fs as pafs

    if loc.scheme == "s3":
        return _make_s3()
    if loc.scheme == "gs":
        return _make_gcs()
    account = os.environ.get("AZURE_STORAGE_ACCOUNT_NAME")
    if not account:
        raise AuditError(f"{loc.uri}: set AZURE_STORAGE_ACCOUNT_NAME (and AZURE_STORAGE_ACCOUNT_KEY, or use "
                         "an Azure identity) to read container {loc.bucket!r}")
    key = os.environ.get("AZURE_STORAGE_ACCOUNT_KEY")
    return pafs.AzureFileSystem(account_name=account, account_key=key) if key else \
        pafs.AzureFileSystem(account_name=account)


def resolve(uri: str):
    """(pyarrow filesystem, path inside it) for a URI or a local path.

    The filesystem of a bucket is made once per process (and per set of
    credential variables) and reused for every object.

    Raises:
        AuditError: an unusable URI or missing Azure account name.
    """
    from pyarrow import fs as pafs

    if not is_uri(uri):
        return pafs.LocalFileSystem(), os.path.abspath(uri)
    loc = split(uri)
    key = (loc.scheme, loc.bucket, _env_key(loc.scheme))
    with _lock:
        fsys = _cache.get(key)
        if fsys is None:
            fsys = _cache[key] = _make(loc)
    return fsys, loc.path


def clear_cache() -> None:
    """Forget the filesystems and clients made so far (tests change credentials between cases)."""
    with _lock:
        _cache.clear()
        _boto_cache.clear()
        _no_conditional.clear()


# ----------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------

_DENIED = ("ACCESS_DENIED", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "Forbidden",
           "403", "No credentials", "credentials", "INVALID_ACCESS_KEY_ID", "SIGNATURE_DOES_NOT_MATCH",
           "Unauthorized", "401")
_NO_BUCKET = ("NoSuchBucket", "NO_SUCH_BUCKET", "bucket does not exist", "Bucket does not exist",
              "ContainerNotFound")


def storage_error(e: BaseException, uri: str, doing: str = "read") -> AuditError | None:
    """One line for a refused credential or a missing bucket, or None for another error.

    Args:
        e: the exception pyarrow raised (an ``OSError`` holding the store's error code).
        uri: the URI being accessed.
        doing: ``read`` or ``write``, for the message.
    """
    if not is_uri(uri):
        return None
    text = " ".join(str(e).split())
    loc = split(uri)
    where = f"{loc.scheme}://{loc.bucket}"
    if any(s in text for s in _NO_BUCKET):
        return AuditError(f"bucket {where} does not exist (or is not visible with these credentials): "
                          f"cannot {doing} {uri}")
    if any(s in text for s in _DENIED):
        endpoint = f" at {_s3_endpoint()}" if loc.scheme == "s3" and _s3_endpoint() else ""
        return AuditError(f"access to bucket {where}{endpoint} refused (cannot {doing} {uri}): set "
                          f"{CREDENTIAL_HINT[loc.scheme]} to a credential that may {doing} it")
    return None


def raise_storage(e: BaseException, uri: str, doing: str = "read"):
    """Raise :func:`storage_error`'s one line when it has one, else an AuditError with pyarrow's first line."""
    err = storage_error(e, uri, doing)
    if err is not None:
        raise err from None
    first = (" ".join(str(e).split()) or type(e).__name__)[:300]
    raise AuditError(f"cannot {doing} {uri}: {first}") from None


# ----------------------------------------------------------------------------
# operations (URI or local path)
# ----------------------------------------------------------------------------


def info(path: str):
    """pyarrow ``FileInfo`` of ``path`` (``type`` is NotFound when it does not exist)."""
    fsys, p = resolve(path)
    try:
        return fsys.get_file_info(p)
    except OSError as e:
        raise_storage(e, path)


def exists(path: str) -> bool:
    if not is_uri(path):
        return os.path.exists(path)
    from pyarrow import fs as pafs

    loc = split(path)
    if not loc.key:
        return info(path).type != pafs.FileType.NotFound or _bucket_exists(path)
    return info(path).type != pafs.FileType.NotFound


def _bucket_exists(path: str) -> bool:
    from pyarrow import fs as pafs

    fsys, p = resolve(path)
    try:
        fsys.get_file_info(pafs.FileSelector(p, recursive=False))
        return True
    except FileNotFoundError:
        return False
    except OSError as e:
        raise_storage(e, path)


def is_file(path: str) -> bool:
    if not is_uri(path):
        return os.path.isfile(path)
    from pyarrow import fs as pafs

    return info(path).type == pafs.FileType.File


def is_dir(path: str) -> bool:
    """A local directory, or a URI prefix holding at least one object."""
    if not is_uri(path):
        return os.path.isdir(path)
    from pyarrow import fs as pafs

    return info(path).type == pafs.FileType.Directory


def size(path: str) -> int:
    if not is_uri(path):
        return os.path.getsize(path)
    st = info(path)
    if st.size is None:
        raise FileNotFoundError(path)
    return int(st.size)


def list_files(path: str, recursive: bool = True) -> list[tuple[str, int]]:
    """(relative POSIX path, size) of every object under the prefix ``path``, sorted.

    Raises:
        AuditError: the bucket is missing or access is refused.
    """
    from pyarrow import fs as pafs

    fsys, p = resolve(path)
    try:
        infos = fsys.get_file_info(pafs.FileSelector(p, recursive=recursive, allow_not_found=True))
    except OSError as e:
        raise_storage(e, path)
    base = p.rstrip("/") + "/"
    out = [(i.path[len(base):], int(i.size or 0)) for i in infos
           if i.type == pafs.FileType.File and i.path.startswith(base)]
    return sorted(out)


def list_dirs(path: str) -> list[str]:
    """Names of the immediate sub-prefixes (folders) of ``path``, sorted."""
    from pyarrow import fs as pafs

    fsys, p = resolve(path)
    try:
        infos = fsys.get_file_info(pafs.FileSelector(p, recursive=False, allow_not_found=True))
    except OSError as e:
        raise_storage(e, path)
    dirs = sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)
    if dirs or not is_uri(path):
        return dirs
    # none: also what a store ignoring GCS's includeTrailingDelimiter answers (gcp-storage-emulator);
    # the full listing then says, at the price of one listing of this prefix's objects
    return sorted({rel.split("/", 1)[0] for rel, _ in list_files(path) if "/" in rel})


def open_input(path: str):
    """A seekable binary file for reading (a local file, or a pyarrow random-access file on a URI)."""
    if not is_uri(path):
        return open(path, "rb")
    fsys, p = resolve(path)
    try:
        return fsys.open_input_file(p)
    except FileNotFoundError:
        raise
    except OSError as e:
        raise_storage(e, path)


def read_bytes(path: str, max_bytes: int | None = None) -> bytes:
    """The whole object; with ``max_bytes``, refused (``ValueError``) without reading when larger."""
    with open_input(path) as f:
        if max_bytes is not None:
            n = f.size() if hasattr(f, "size") else os.fstat(f.fileno()).st_size
            if n > max_bytes:
                raise ValueError(n)
        return f.read()


def write_bytes(path: str, data: bytes) -> None:
    """Write one object (a single PUT for small data); local paths are written in place."""
    if not is_uri(path):
        with open(path, "wb") as f:
            f.write(data)
        return
    fsys, p = resolve(path)
    try:
        with fsys.open_output_stream(p) as f:
            f.write(data)
    except OSError as e:
        raise_storage(e, path, "write")


_boto_cache: dict = {}  # S3 environment -> boto3 client, or None when boto3 is not installed
_no_conditional: set = set()  # S3 buckets (and environments) that refused If-None-Match


def _boto3_client():
    """One boto3 S3 client per process and environment, or None without boto3 (see :func:`put_if_absent`)."""
    key = _env_key("s3")
    with _lock:
        if key not in _boto_cache:
            try:
                import boto3
                from botocore.config import Config
            except ImportError:
                _boto_cache[key] = None
            else:  # boto3 reads AWS_ENDPOINT_URL(_S3), the credentials and the region itself
                region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or \
                    ("us-east-1" if _s3_endpoint() else None)
                # a session of its own: boto3's default one keeps the credentials it first found
                _boto_cache[key] = boto3.session.Session().client("s3", region_name=region, config=Config(
                    retries={"max_attempts": S3_RETRIES, "mode": "standard"}, connect_timeout=10, read_timeout=60))
        return _boto_cache[key]


def conditional_puts(path: str) -> bool:
    """True when :func:`put_if_absent` on ``path`` is an atomic conditional PUT (If-None-Match: *)."""
    if not is_uri(path) or split(path).scheme != "s3":
        return False
    return _boto3_client() is not None and (split(path).bucket, _env_key("s3")) not in _no_conditional


def put_if_absent(path: str, data: bytes) -> bool:
    """Write the object ``path`` unless one exists: True when this call wrote it, False when one was there.

    On S3 with boto3 installed it is one PUT with ``If-None-Match: *``, which
    the store refuses (412) when the object exists: of two writers racing,
    exactly one wins.  pyarrow's filesystems cannot send that header; GCS,
    Azure, S3 without boto3 and a store that rejects the header (remembered
    per bucket) get an existence check and a plain PUT, which two writers
    racing between the two can both pass.  :func:`conditional_puts` says
    which applies.

    Raises:
        AuditError: a refused credential, a missing bucket or another storage error.
    """
    if conditional_puts(path):
        written = _put_if_none_match(path, data)
        if written is not None:
            return written
    if exists(path):
        return False
    write_bytes(path, data)
    return True


def _put_if_none_match(path: str, data: bytes) -> bool | None:
    """The conditional PUT; None when the store does not support it (then never tried again for the bucket)."""
    from botocore.exceptions import BotoCoreError, ClientError, ParamValidationError

    loc = split(path)
    for attempt in range(CONFLICT_RETRIES):
        try:
            _boto3_client().put_object(Bucket=loc.bucket, Key=loc.key, Body=data, IfNoneMatch="*")
            return True
        except ParamValidationError:  # a botocore older than S3's conditional writes (1.35)
            break
        except ClientError as e:
            code = str(e.response.get("Error", {}).get("Code", ""))
            if code in ("PreconditionFailed", "412"):
                return False
            if code in ("ConditionalRequestConflict", "409"):  # a racing conditional write in flight
                time.sleep(0.1 * (attempt + 1))
                continue
            if code in ("NotImplemented", "501", "InvalidArgument", "InvalidRequest"):
                break
            raise_storage(e, path, "write")
        except BotoCoreError as e:
            raise_storage(e, path, "write")
    else:
        return False  # still in conflict: another writer holds the key
    with _lock:
        _no_conditional.add((loc.bucket, _env_key("s3")))
    return None


def read_versioned(path: str) -> tuple[bytes, float, str | None]:
    """(content, seconds since it was last written, its ETag or None) of one small object.

    The ETag comes with S3's conditional writes (:func:`put_if_match`); elsewhere it is None.

    Raises:
        FileNotFoundError: no such object.
        AuditError: a refused credential or another storage error.
    """
    if conditional_puts(path):
        from botocore.exceptions import BotoCoreError, ClientError

        loc = split(path)
        try:
            r = _boto3_client().get_object(Bucket=loc.bucket, Key=loc.key)
            data = r["Body"].read()
        except ClientError as e:
            if str(e.response.get("Error", {}).get("Code", "")) in ("NoSuchKey", "404"):
                raise FileNotFoundError(path) from None
            raise_storage(e, path)
        except BotoCoreError as e:
            raise_storage(e, path)
        return data, time.time() - r["LastModified"].timestamp(), r.get("ETag")
    st = info(path)
    from pyarrow import fs as pafs

    if st.type == pafs.FileType.NotFound:
        raise FileNotFoundError(path)
    data = read_bytes(path)
    age = time.time() - st.mtime.timestamp() if st.mtime is not None else 0.0
    return data, age, None


def put_if_match(path: str, data: bytes, etag: str) -> bool | None:
    """Replace ``path`` only while it is still the version ``etag`` (S3 ``If-Match``).

    Returns True when written, False when the object changed or is gone (412
    or 404), None when the store does not support the header (then write plainly).
    """
    from botocore.exceptions import BotoCoreError, ClientError, ParamValidationError

    loc = split(path)
    try:
        _boto3_client().put_object(Bucket=loc.bucket, Key=loc.key, Body=data, IfMatch=etag)
        return True
    except ParamValidationError:
        return None
    except ClientError as e:
        code = str(e.response.get("Error", {}).get("Code", ""))
        if code in ("PreconditionFailed", "412", "NoSuchKey", "404", "ConditionalRequestConflict", "409"):
            return False
        if code in ("NotImplemented", "501", "InvalidArgument", "InvalidRequest"):
            return None
        raise_storage(e, path, "write")
    except BotoCoreError as e:
        raise_storage(e, path, "write")


def delete(path: str) -> None:
    """Delete one object or file; a missing one is fine."""
    if not is_uri(path):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return
    fsys, p = resolve(path)
    try:
        fsys.delete_file(p)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise_storage(e, path, "write")


def local_copy(uri: str, suffix: str = "") -> str:
    """Download ``uri`` once per process into a temp file (keeping its suffix); returns the local path.

    For files a library can only open from a local path (a Keras model).
    """
    import hashlib
    import tempfile

    if not is_uri(uri):
        return uri
    st = info(uri)  # the object's size and time are in the name: a replaced model is fetched again
    if st.size is None:
        raise AuditError(f"not found: {uri}")
    stamp = f"{uri}|{st.size}|{st.mtime_ns}"
    name = hashlib.sha256(stamp.encode()).hexdigest()[:16] + (suffix or posixpath.splitext(uri)[1])
    target = os.path.join(tempfile.gettempdir(), f"shortcut-audit-{os.getuid()}", name)
    if os.path.isfile(target):
        return target
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = f"{target}.{os.getpid()}.tmp"
    fsys, p = resolve(uri)
    try:
        with fsys.open_input_stream(p) as src, open(tmp, "wb") as dst:
            while chunk := src.read(8 << 20):
                dst.write(chunk)
    except FileNotFoundError:
        raise AuditError(f"not found: {uri}") from None
    except OSError as e:
        raise_storage(e, uri)
    os.replace(tmp, target)
    return target


def not_found(uri: str, what: str = "") -> AuditError:
    """The one line for a URI that does not exist: names a missing bucket as such."""
    label = f"{what}: " if what else ""
    if is_uri(uri):
        loc = split(uri)
        bucket = Location(loc.scheme, loc.bucket, "").uri
        if not exists(bucket):
            return AuditError(f"{label}bucket {loc.scheme}://{loc.bucket} does not exist (or is not visible "
                              f"with these credentials; {CREDENTIAL_HINT[loc.scheme]} say whose): {uri}")
    return AuditError(f"{label}not found: {uri}")


def sha256(path: str) -> str:
    """SHA-256 of a file or object, streamed."""
    import hashlib

    h = hashlib.sha256()
    fsys, p = resolve(path)
    try:
        with fsys.open_input_stream(p) as f:
            while chunk := f.read(8 << 20):
                h.update(chunk)
    except FileNotFoundError:
        raise not_found(path) from None
    except OSError as e:
        raise_storage(e, path)
    return h.hexdigest()
