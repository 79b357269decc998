"""Files shipped inside the package: schemas, job specs, templates."""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from pathlib import Path


def path(package: str, name: str) -> Path:
    """Path of a data file in ``audit.schemas``, ``audit.jobs`` or ``audit.templates``."""
    return Path(str(resources.files(package).joinpath(name)))


@cache
def schema(name: str) -> dict:
    """A JSON schema from ``schemas/`` (e.g. ``schema("job")`` reads job.schema.json)."""
    return json.loads(path("audit.schemas", f"{name}.schema.json").read_text())
