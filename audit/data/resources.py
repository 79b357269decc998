"""Files shipped inside the package: schemas, job specs, templates."""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from pathlib import Path

# packages whose files live in a top-level folder of the source tree (see pyproject.toml's package-dir)
_SOURCE_DIRS = {"audit.schemas": "schemas", "audit.jobs": "jobs"}


def path(package: str, name: str) -> Path:
    """Path of a data file in ``audit.schemas``, ``audit.jobs`` or ``audit.templates``.

    Run from a source checkout (``PYTHONPATH=checkout``), the checkout's own
    ``schemas/`` and ``jobs/`` are used, not those of whichever checkout is
    installed in editable mode.
    """
    src = _source_dir(package)
    if src is not None and (src / name).is_file():
        return src / name
    return Path(str(resources.files(package).joinpath(name)))


def _source_dir(package: str) -> Path | None:
    folder = _SOURCE_DIRS.get(package)
    if folder is None:
        return None
    root = Path(__file__).resolve().parents[2]  # the checkout holding audit/
    if (root / "pyproject.toml").is_file() and (root / folder).is_dir():
        return root / folder
    return None


@cache
def schema(name: str) -> dict:
    """A JSON schema from ``schemas/`` (e.g. ``schema("job")`` reads job.schema.json)."""
    return json.loads(path("audit.schemas", f"{name}.schema.json").read_text())
