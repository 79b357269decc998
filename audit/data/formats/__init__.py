"""Dataset formats: one module per format behind one interface (:class:`DatasetFormat`).

Adding a format is one module with a :class:`DatasetFormat` subclass and one
line in :data:`_CLASSES`; the job schema's ``dataset.format`` enum is checked
against :data:`FORMATS` by the tests, and docs/jobs.md describes each.

>>> from audit.data import formats
>>> formats.get("folder").plan(spec.dataset)
"""

from __future__ import annotations

from audit.data.formats.base import DatasetFormat, Item, Plan, Shard, ShardIdentity  # noqa: F401
from audit.data.formats.folder import Folder
from audit.data.formats.manifest import Manifest
from audit.data.formats.parquet import Parquet
from audit.data.formats.tfrecord import TFRecord
from audit.data.formats.webdataset import WebDataset
from audit.errors import AuditError

_CLASSES = (Folder, Manifest, Parquet, TFRecord, WebDataset)

#: format name -> the format (one instance each; formats hold no per-job state)
FORMATS: dict[str, DatasetFormat] = {cls.name: cls() for cls in _CLASSES}


def get(name: str) -> DatasetFormat:
    """The format called ``name`` (``dataset.format``).

    Raises:
        AuditError: no such format (the message lists the known ones).
    """
    try:
        return FORMATS[name]
    except KeyError:
        raise AuditError(f"unknown dataset format {name!r}; expected one of {', '.join(FORMATS)}") from None


def of_record_file(file: str) -> DatasetFormat | None:
    """The format whose records are stored as ``file#index`` paths for a file named like ``file``."""
    low = file.lower()
    for f in FORMATS.values():
        if f.record_extensions and low.endswith(f.record_extensions):
            return f
    return None


def clear_caches() -> None:
    """Forget every format's cached listings (before ``--resume`` compares identities)."""
    for f in FORMATS.values():
        f.clear_caches()
