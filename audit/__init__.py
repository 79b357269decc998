"""shortcut-audit: did the image classifier learn the object or a shortcut?

Public API (README.md, "In Python")::

    import audit
    model = audit.load_model("models/m.keras")
    ex = audit.Explainer(model, layers="auto", methods=("gradcam", "gradcam++"))
    res = ex(x)
    df = audit.load("results/tank-sky")
    audit.heatmap(row); audit.overlay(row)

Importing ``audit`` is cheap: TensorFlow, Ray and pandas load on first use.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["Explainer", "AuditError", "load", "load_model", "heatmap", "overlay", "__version__"]

from audit.errors import AuditError


def __getattr__(name):
    if name == "Explainer":
        from audit.engine.explainer import Explainer

        return Explainer
    if name == "load_model":
        from audit.engine.models import load_model

        return load_model
    if name in ("load", "heatmap", "overlay"):
        from audit.data import query

        return getattr(query, name)
    raise AttributeError(f"module 'audit' has no attribute {name!r}")
