"""``compare.html``: two audits side by side, in the report's style (self-contained, no images)."""

from __future__ import annotations

import math
import re

from audit.data import fs, io, resources
from audit.data.schema import arrow_schema
from audit.errors import cannot_write


def _style() -> str:
    """The report's own style sheet (its template's ``<style>`` block), so both pages look alike."""
    text = resources.path("audit.templates", "report.html.j2").read_text(encoding="utf-8")
    m = re.search(r"<style>(.*?)</style>", text, re.S)
    return m.group(1) if m else ""


def _num(v):
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def render(c) -> str:
    """The page of a :class:`audit.scan.compare.Comparison`."""
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(resources.path("audit.templates", ""))),
                             autoescape=jinja2.select_autoescape(["html", "j2"]), undefined=jinja2.ChainableUndefined)
    env.filters["pct"] = lambda v: "–" if _num(v) is None else f"{_num(v) * 100:.0f}%"
    env.filters["num"] = lambda v: "–" if _num(v) is None else f"{_num(v):.2f}"
    rows = c.classes.astype(object).where(c.classes.notna(), None).to_dict("records")
    gone = [r["class_name"] for r in rows if r["change"] == "shortcut gone"]
    return env.get_template("compare.html.j2").render(
        a=c.a, b=c.b, rows=rows, new=c.new, suspected_b=c.suspected_b, gone=gone, images_changed=len(c.images),
        style=_style())


def write(c, out_dir) -> list[str]:
    """Write ``DIR/compare.html`` and ``DIR/compare.parquet`` (and ``compare_images.parquet``); their paths.

    Raises:
        AuditError: the folder cannot be written.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    remote = fs.is_uri(str(out_dir))
    paths = [fs.join(str(out_dir), n) if remote else f"{out_dir}/{n}"
             for n in ("compare.html", "compare.parquet", "compare_images.parquet")]
    blobs = [render(c).encode()]
    for table in (pa.Table.from_pandas(c.classes, schema=arrow_schema("compare"), preserve_index=False),
                  pa.Table.from_pandas(c.images.astype({"cue_decides_a": bool, "cue_decides_b": bool}),
                                       preserve_index=False)):
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        blobs.append(sink.getvalue().to_pybytes())
    try:
        if not remote:
            import os

            os.makedirs(out_dir, exist_ok=True)
        for p, b in zip(paths, blobs):
            io.atomic_write_bytes(p, b)
    except OSError as e:
        raise cannot_write(out_dir, e, "write the comparison elsewhere with --out DIR") from None
    return paths
