"""The layers hold: engine < data < runner < scan < review < cli (README, "Layout").

A module of one stage imports only from its own stage, earlier stages and the
shared base modules (``audit.errors``, ``audit.quiet``); imports inside
functions count too.  Checked on the source (AST), so nothing is imported.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

STAGES = ("engine", "data", "runner", "scan", "review", "cli")
BASE = {"errors", "quiet"}  # imported by every stage, import no stage
ROOT = Path(__file__).resolve().parent.parent / "audit"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(tree: ast.AST, module: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``tree``, ``from audit import x`` as ``audit.x``."""
    out = []
    package = module.split(".")
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the importing package
                base = ".".join(package[: len(package) - node.level] + ([base] if base else []))
            if base == "audit":
                out += [(node.lineno, f"audit.{a.name}") for a in node.names]
            else:
                out.append((node.lineno, base))
    return out


def _part(name: str) -> str | None:
    """The top-level part of ``audit`` that a module name belongs to (stage, base or other)."""
    bits = name.split(".")
    return bits[1] if len(bits) > 1 and bits[0] == "audit" else None


def violations(source: str, module: str) -> list[str]:
    """Imports in ``source`` (of ``module``) that break the layers, as ``module:line -> target``."""
    own = _part(module)
    if own not in STAGES and own not in BASE:
        return []  # the package root, the demo and the zoo sit above the cli
    rank = STAGES.index(own) if own in STAGES else -1
    bad = []
    for line, target in _imported(ast.parse(source), module):
        part = _part(target)
        if part is None or part in BASE and own not in BASE:
            continue
        if own == STAGES[-1]:
            continue  # the cli may use everything, the demo and the version included
        allowed = part in STAGES and STAGES.index(part) <= rank
        if not allowed:
            bad.append(f"{module}:{line} -> {target}")
    return bad


def test_no_module_imports_a_later_layer():
    files = sorted(ROOT.rglob("*.py"))
    assert len(files) > 50
    bad = []
    for f in files:
        bad += violations(f.read_text(encoding="utf-8"), _module_name(f))
    assert bad == [], "imports against the layers:\n" + "\n".join(bad)


@pytest.mark.parametrize("module,source,n_bad", [
    ("audit.engine.stats", "from audit.data.schema import stat_columns\n", 1),
    ("audit.data.query", "def f():\n    from audit.review import viz\n", 1),
    ("audit.data.query", "from audit import demo\n", 1),
    ("audit.data.query", "from ..review import viz\n", 1),
    ("audit.engine.x", "import audit.runner.worker\n", 1),
    ("audit.errors", "from audit.engine import graph\n", 1),
    ("audit.scan.x", "from audit.engine import graph\nfrom audit.data import io\nfrom audit.errors import AuditError\n", 0),
    ("audit.cli.x", "from audit import __version__\nfrom audit.review import report\n", 0),
    ("audit.cli.x", "from . import run\nfrom audit import demo\n", 0),
    ("audit.demo", "from audit.cli import main\n", 0),
])
def test_the_checker_flags_what_it_should(module, source, n_bad):
    assert len(violations(source, module)) == n_bad
