"""The CAM methods: one module per method, one line per method in the registry.

:data:`METHODS` maps a method's name to its instance, in the order the docs and
the CLI show them.  It drives the job schema's enum (a test checks they
agree), the help of ``audit explain --methods``, the scan's method preference
(:func:`scan_preference`) and the table in docs/methods.md
(:func:`markdown_table`).  Adding a method is one module here with a
subclass of :class:`~audit.engine.methods.base.Method` (or
:class:`~audit.engine.methods.base.OwnPassMethod` when it needs more than the
one forward + backward pass) and one line in ``_MODULES``.
"""

from __future__ import annotations

import importlib

from audit.engine.methods.base import Method, Needs, OwnPassMethod  # noqa: F401
from audit.errors import AuditError

# module -> class; one line per method
_MODULES = (
    ("gradcam", "GradCAM"),
    ("gradcampp", "GradCAMPlusPlus"),
    ("cam", "CAM"),
    ("gradcampp_exact", "GradCAMPlusPlusExact"),
    ("hirescam", "HiResCAM"),
    ("layercam", "LayerCAM"),
    ("xgradcam", "XGradCAM"),
    ("eigencam", "EigenCAM"),
    ("scorecam", "ScoreCAM"),
)


def _load() -> dict[str, Method]:
    out = {}
    for module, cls in _MODULES:
        method = getattr(importlib.import_module(f"{__name__}.{module}"), cls)()
        out[method.name] = method
    return out


METHODS: dict[str, Method] = _load()


def names() -> tuple[str, ...]:
    """Every method's name, in registry order."""
    return tuple(METHODS)


def scan_preference() -> tuple[str, ...]:
    """Method names in the order the scan prefers them (lowest ``scan_rank`` first)."""
    return tuple(sorted(METHODS, key=lambda n: METHODS[n].scan_rank))


def get(names_) -> tuple[Method, ...]:
    """The methods named in ``names_`` (a name or a list), duplicates dropped.

    Raises:
        AuditError: an unknown name or an empty list (the message lists the known ones).
    """
    if isinstance(names_, str):
        names_ = (names_,)
    names_ = list(dict.fromkeys(names_ or ()))
    bad = [n for n in names_ if n not in METHODS]
    if bad or not names_:
        raise AuditError(f"unknown method {bad[0] if bad else ''!r}; expected some of {', '.join(METHODS)}")
    return tuple(METHODS[n] for n in names_)


def markdown_table() -> str:
    """The methods table of docs/methods.md, generated from the registry."""
    rows = ["| method | reference | rule | needs | extra cost |", "|---|---|---|---|---|"]
    for m in METHODS.values():
        needs = ["activations"] + (["gradients"] if m.needs.gradients else []) + (
            ["head weights"] if m.needs.head_weights else []) + (
            ["extra forward passes"] if m.needs.extra_forward else [])
        rows.append(f"| `{m.name}` | {m.paper} | {m.rule} | {', '.join(needs)} | {m.needs.cost} |")
    return "\n".join(rows) + "\n"
