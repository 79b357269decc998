"""Imports sit at the top of modules; an import of ``audit.*`` inside a function needs a reason.

A module's head shows what it depends on.  An import of one of the package's
own modules may stay inside a function only when

* the imported module is heavy: importing it loads TensorFlow, Keras or Ray
  (its own imports at module level, followed through the package), so the
  checks made before TensorFlow stay fast; or
* the importing module is loaded when the CLI starts (``audit --help``
  imports every command module) and the imported one is not: at the head it
  would slow every command's start (pandas, pyarrow, the scan); or
* the pair is listed in ``DEFERRED`` below with its reason (an import cycle).

Checked on the source (AST), so nothing is imported here; one test checks the
static answer against a real import of the CLI.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("tensorflow", "keras", "ray")

#: (importing module, imported module) -> why the import stays in the function.
DEFERRED = {
    ("audit.scan.probes.base", "audit.scan.probes"): "a cycle: the probe registry imports its base module first",
    ("audit.demo", "audit.demofix"): "a cycle: demofix imports the demo's helpers",
    ("audit.scan.imagepass", "audit.scan.cost"): "a cycle: the cost lines read the pass's summary",
    ("audit.demo", "audit.review.report"): "optional: the demo goes on without a report when it cannot import",
}
CLI_ROOTS = ("audit", "audit.cli")  # with every command module (audit.cli.<name>): what `audit --help` imports


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def _modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted((ROOT / "audit").rglob("*.py"))}


def _targets(node: ast.stmt, module: str) -> list[str]:
    """The modules an import statement loads (``from audit.data import fs`` -> audit.data, audit.data.fs)."""
    mods = _modules()
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = node.module or ""
    if node.level:
        pkg = module.split(".") if _modules()[module].name == "__init__.py" else module.split(".")[:-1]
        base = ".".join(pkg[: len(pkg) - node.level + 1] + ([base] if base else []))
    return [base] + [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in mods]


def _parents(name: str) -> list[str]:
    bits = name.split(".")
    return [".".join(bits[:i]) for i in range(1, len(bits) + 1)]


def _walk_head(tree: ast.Module):
    """The statements run on import: module level, including if/try/with blocks and class bodies."""
    todo = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        yield node
        for field in ("body", "orelse", "finalbody", "handlers"):
            todo += [n for n in getattr(node, field, []) if isinstance(n, (ast.stmt, ast.ExceptHandler))]


@cache
def head_imports(module: str) -> tuple[str, ...]:
    """Every module the import of ``module`` loads by its own module-level imports (one step)."""
    tree = ast.parse(_modules()[module].read_text(encoding="utf-8"))
    out = []
    for node in _walk_head(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            for t in _targets(node, module):
                out += _parents(t)
    return tuple(dict.fromkeys(out))


@cache
def heavy(module: str) -> bool:
    """True when importing ``module`` (and its packages) loads TensorFlow, Keras or Ray."""
    mods = loaded([module]) | {n for n in _parents(module)}
    return any(n.split(".")[0] in HEAVY for m in mods for n in (m, *(head_imports(m) if m in _modules() else ())))


def loaded(roots) -> set[str]:
    """The package's modules that importing ``roots`` loads (module-level imports, followed)."""
    seen, todo = set(), list(roots)
    while todo:
        name = todo.pop()
        for m in _parents(name):
            if m in _modules() and m not in seen:
                seen.add(m)
                todo += [t for t in head_imports(m) if t in _modules()]
    return seen


@cache
def cli_start() -> frozenset:
    """The modules of the package loaded when the CLI starts."""
    return frozenset(loaded([*CLI_ROOTS, *(m for m in _modules() if m.startswith("audit.cli."))]))


def justified(module: str, target: str) -> bool:
    """An ``audit.*`` import of ``target`` inside a function of ``module`` has its reason."""
    start = cli_start()
    return heavy(target) or (module, target) in DEFERRED or (module in start and target not in start)


def function_imports(module: str) -> list[tuple[int, tuple[str, ...]]]:
    """(line, the audit modules it loads) of each ``audit.*`` import inside a function of ``module``."""
    tree = ast.parse(_modules()[module].read_text(encoding="utf-8"))
    out = []
    for fn in ast.walk(tree):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(fn):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = _targets(node, module)
                own = [n for n in names if n == "audit" or n.startswith("audit.")]
                if own:
                    out.append((node.lineno, tuple(own)))
    return out


def unexplained() -> list[str]:
    bad = []
    for module in _modules():
        for line, targets in function_imports(module):
            if not any(justified(module, t) for t in targets):
                bad.append(f"{_modules()[module].relative_to(ROOT)}:{line} imports {targets[-1]} inside a function")
    return sorted(set(bad))


def test_audit_imports_inside_functions_are_heavy_or_explained():
    bad = unexplained()
    assert bad == [], ("move these imports to the module head (or add the pair to DEFERRED with why):\n"
                       + "\n".join(bad))


def test_every_deferred_pair_is_still_there():
    present = {(m, t) for m in _modules() for _, ts in function_imports(m) for t in ts}
    assert set(DEFERRED) <= present, sorted(set(DEFERRED) - present)


def test_the_static_answer_matches_a_real_import():
    """The CLI's start loads no TensorFlow, Keras, Ray, pandas or pyarrow; the pre-TensorFlow checks no TF/Ray."""
    light = ["audit.cli", "audit.runner.spec", "audit.engine.modelfile", "audit.runner.precheck"]
    assert not any(heavy(m) for m in light) and heavy("audit.engine.explainer")
    assert "audit.engine.explainer" not in cli_start()
    code = ("import sys, importlib\n"
            "from audit.cli import build_parser\nbuild_parser()\n"
            f"print(sorted(h for h in {(*HEAVY, 'pandas', 'pyarrow')!r} if h in sys.modules))\n"
            f"for m in {light!r}: importlib.import_module(m)\n"
            f"print(sorted(h for h in {HEAVY!r} if h in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["[]", "[]"]


def test_the_checker_sees_a_light_import_in_a_function(tmp_path, monkeypatch):
    pkg = tmp_path / "audit"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "light.py").write_text("import json\n")
    (pkg / "sub" / "tf.py").write_text("import tensorflow as tf\n")
    (pkg / "sub" / "via.py").write_text("from audit.sub import tf\n")
    (pkg / "sub" / "user.py").write_text(
        "def f():\n    from audit.sub import light\n\n\ndef g():\n    from audit.sub.via import x\n"
        "    from . import tf\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    for f in (_modules, head_imports, heavy, cli_start):
        f.cache_clear()
    try:
        assert heavy("audit.sub.via") and not heavy("audit.sub.light")
        assert unexplained() == ["audit/sub/user.py:2 imports audit.sub.light inside a function"]
    finally:
        monkeypatch.undo()
        for f in (_modules, head_imports, heavy, cli_start):
            f.cache_clear()
