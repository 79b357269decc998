"""``audit compare A B``: two audits side by side (before and after a fix, two checkpoints, two datasets).

Classes are matched by name.  Per class: the verdict of each audit and what
changed (``change``: ``new shortcut``, ``shortcut gone``, ``still suspected``,
``cue moved``, ``ok``, ``not comparable``), the cue, the cue's flip rate, the
attention suspicion and the cost columns of each, and whether a rate moved
by more than its 95% Wilson intervals (the two intervals do not overlap).
With per-image evidence on both sides, the images whose cue dependence
changed (same image id and cue) are counted per class.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import numpy as np

from audit.data.schema import arrow_schema
from audit.scan import imagetable
from audit.scan.cost import wilson
from audit.scan.imagepass import read_summary

SUSPECTED = "shortcut_suspected"
PAIRED = ("verdict", "cue", "suspicion", "attention_suspicion", "accuracy", "flip_rate_cue", "n")
RATES = ("accuracy_with_cue", "accuracy_without_cue", "worst_group_accuracy", "wrong_reason_share")


@dataclass
class Comparison:
    """The per-class table (``compare.parquet``) and the images whose cue dependence changed."""

    a: str
    b: str
    classes: object  # DataFrame
    images: object  # DataFrame: image_id, cue, cue_decides_a, cue_decides_b

    @property
    def new(self) -> list[str]:
        return self.classes.loc[self.classes["change"] == "new shortcut", "class_name"].tolist()

    @property
    def suspected_b(self) -> list[str]:
        return self.classes.loc[self.classes["verdict_b"] == SUSPECTED, "class_name"].tolist()


def change_of(va, vb, cue_a, cue_b) -> str:
    """What happened to one class's verdict from A to B."""
    if va is None or vb is None:
        return "not comparable"
    sa, sb = va == SUSPECTED, vb == SUSPECTED
    if sb and not sa:
        return "new shortcut"
    if sa and not sb:
        return "shortcut gone"
    if sa and sb:
        return "still suspected" if (cue_a or "") == (cue_b or "") else "cue moved"
    return "ok" if va == vb == "ok" else ("unchanged" if va == vb else f"{va} -> {vb}")


def separated(a: tuple, b: tuple) -> bool | None:
    """True when two (low, high) intervals do not overlap; None when either is unknown."""
    if any(v is None or not math.isfinite(float(v)) for v in (*a, *b)):
        return None
    return bool(a[1] < b[0] or b[1] < a[0])


def _flip_interval(row) -> tuple:
    f, n = row.get("flip_rate_cue"), row.get("n_intervened")
    if f is None or n is None or f != f or not n:
        return (math.nan, math.nan)
    return wilson(round(float(f) * int(n)), int(n))[1:]


def _get(row, col):
    if row is None:
        return None
    v = row.get(col)
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else v


def class_rows(ca, cb) -> list[dict]:
    """One dict per class name of either audit."""
    ra = {str(r["class_name"]): r for r in ca.to_dict("records")}
    rb = {str(r["class_name"]): r for r in cb.to_dict("records")}
    rows = []
    for name in sorted(set(ra) | set(rb)):
        a, b = ra.get(name), rb.get(name)
        row = {"class_name": name, "change": change_of(_get(a, "verdict"), _get(b, "verdict"), _get(a, "cue"),
                                                        _get(b, "cue"))}
        for col in PAIRED:
            row[f"{col}_a"], row[f"{col}_b"] = _get(a, col), _get(b, col)
        ia, ib = (_flip_interval(x) if x is not None else (math.nan, math.nan) for x in (a, b))
        row.update({"flip_rate_cue_low_a": ia[0], "flip_rate_cue_high_a": ia[1], "flip_rate_cue_low_b": ib[0],
                    "flip_rate_cue_high_b": ib[1], "flip_rate_cue_changed": separated(ia, ib)})
        for col in RATES:
            for side, r in (("a", a), ("b", b)):
                for suffix in ("", "_low", "_high"):
                    row[f"{col}{suffix}_{side}"] = _get(r, f"{col}{suffix}")
            row[f"{col}_changed"] = separated((row[f"{col}_low_a"], row[f"{col}_high_a"]),
                                              (row[f"{col}_low_b"], row[f"{col}_high_b"]))
        rows.append(row)
    return rows


CHANGE_COLUMNS = ["image_id", "cue", "cue_class", "cue_decides"]
JOIN_ROWS = 1_000_000  # rows of each side's evidence joined in memory at once, at most (else partitioned)


def image_changes(ia, ib):
    """Images (same id and cue) whose ``cue_decides`` differs between two tables of evidence in memory."""
    import pandas as pd

    if ia is None or ib is None or not len(ia) or not len(ib):
        return pd.DataFrame(columns=["image_id", "cue", "cue_class", "cue_decides_a", "cue_decides_b"])
    m = ia[CHANGE_COLUMNS].merge(ib[CHANGE_COLUMNS], on=["image_id", "cue", "cue_class"], suffixes=("_a", "_b"))
    m = m[m["cue_decides_a"].notna() & m["cue_decides_b"].notna()]
    return m[m["cue_decides_a"].astype(bool) != m["cue_decides_b"].astype(bool)].reset_index(drop=True)


def stored_image_changes(a, b, max_rows: int = JOIN_ROWS):
    """:func:`image_changes` of two job outputs' ``images.parquet``, in bounded memory.

    Only :data:`CHANGE_COLUMNS` of the rows with a ``cue_decides`` are read,
    a batch at a time.  When a side has more than ``max_rows`` rows, both are
    first split by a hash of the image id into parts of about ``max_rows``
    rows (spilled to temporary Parquet files, a batch at a time) and the
    parts are joined one pair at a time: an image's rows fall in the same
    part on both sides.
    """
    import tempfile

    import pandas as pd

    parts = max(1, -(-max(imagetable.rows(a), imagetable.rows(b)) // max(1, int(max_rows))))
    if parts == 1:
        return image_changes(_evidence(a), _evidence(b))
    with tempfile.TemporaryDirectory(prefix="audit-compare-") as tmp:
        fa, fb = _spill(a, tmp, "a", parts), _spill(b, tmp, "b", parts)
        found = [image_changes(_read(x), _read(y)) for x, y in zip(fa, fb)]
    found = [f for f in found if len(f)]
    return pd.concat(found, ignore_index=True) if found else image_changes(None, None)


def _decided_rows():
    import pyarrow.compute as pc

    return pc.field("cue_decides").is_valid()


def _evidence(out):
    import pandas as pd

    got = list(imagetable.batches(out, CHANGE_COLUMNS, _decided_rows()))
    return pd.concat(got, ignore_index=True) if got else None


def _part_of(ids, parts: int) -> np.ndarray:
    """(N,) the part (0 .. parts - 1) of each image id: CRC32 of the id (the same on both sides)."""
    return np.fromiter((zlib.crc32(str(i).encode()) % parts for i in ids), np.int64, len(ids))


def _spill(out, tmp: str, side: str, parts: int) -> list:
    """The evidence of ``out`` split into ``parts`` Parquet files by :func:`_part_of`; their paths."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    paths = [f"{tmp}/{side}-{k:04d}.parquet" for k in range(parts)]
    writers: dict = {}
    try:
        for df in imagetable.batches(out, CHANGE_COLUMNS, _decided_rows()):
            part = _part_of(df["image_id"].to_numpy(), parts)
            for k in np.unique(part):
                t = pa.Table.from_pandas(df[part == k], preserve_index=False)
                if k not in writers:
                    writers[k] = pq.ParquetWriter(paths[k], t.schema)
                writers[k].write_table(t.cast(writers[k].schema))
    finally:
        for w in writers.values():
            w.close()
    return [p if k in writers else None for k, p in enumerate(paths)]


def _read(path):
    import pyarrow.parquet as pq

    return None if path is None else pq.read_table(path).to_pandas()


def compare(a, b) -> Comparison:
    """Compare two scanned job outputs.

    Raises:
        AuditError: either has no ``summary/classes.parquet``.
    """
    import pandas as pd

    for out in (a, b):
        imagetable.require(out, "classes")
    ca, cb = read_summary(a, "classes"), read_summary(b, "classes")
    imgs = stored_image_changes(a, b)
    df = pd.DataFrame(class_rows(ca, cb))
    names = dict(zip(cb["class_id"], cb["class_name"])) | {k: v for k, v in zip(ca["class_id"], ca["class_name"])}
    counts = imgs.assign(class_name=imgs["cue_class"].map(names)) if len(imgs) else imgs.assign(class_name=None)
    gained = counts[counts["cue_decides_b"].astype(bool)].groupby("class_name").size() if len(counts) else {}
    lost = counts[~counts["cue_decides_b"].astype(bool)].groupby("class_name").size() if len(counts) else {}
    df["images_cue_gained"] = [int(gained.get(n, 0)) if len(gained) else 0 for n in df["class_name"]]
    df["images_cue_lost"] = [int(lost.get(n, 0)) if len(lost) else 0 for n in df["class_name"]]
    order = {"new shortcut": 0, "still suspected": 1, "cue moved": 2, "shortcut gone": 3}
    df = df.sort_values("change", key=lambda s: s.map(order).fillna(9), kind="stable").reset_index(drop=True)
    df = df.reindex(columns=[f.name for f in arrow_schema("compare")])
    return Comparison(str(a), str(b), df, imgs)


def exit_status(c: Comparison, fail_on: str | None) -> int:
    """3 when ``fail_on`` is ``new`` and a class gained a shortcut, or ``any`` and B has a suspect; else 0."""
    if fail_on == "new" and c.new:
        return 3
    if fail_on == "any" and c.suspected_b:
        return 3
    return 0


def _known(v) -> bool:
    return v is not None and v == v


def _pct(v) -> str:
    return "-" if v is None or v != v else f"{100 * float(v):.0f}%"


def format_comparison(c: Comparison) -> str:
    """The printed comparison: one line per class, changes first."""
    lines = [f"compare {c.a} (A) -> {c.b} (B)"]
    for r in c.classes.itertuples():
        bits = [f"{r.class_name}: {r.change} ({r.verdict_a} -> {r.verdict_b})"]
        if r.cue_a or r.cue_b:
            bits.append(f"cue {r.cue_a or '-'} -> {r.cue_b or '-'}, flip {_pct(r.flip_rate_cue_a)} -> "
                        f"{_pct(r.flip_rate_cue_b)}" + (" (beyond the intervals)" if r.flip_rate_cue_changed else ""))
        if _known(r.worst_group_accuracy_a) or _known(r.worst_group_accuracy_b):
            bits.append(f"worst-group accuracy {_pct(r.worst_group_accuracy_a)} -> {_pct(r.worst_group_accuracy_b)}"
                        + (" (beyond the intervals)" if r.worst_group_accuracy_changed else ""))
        if r.images_cue_gained or r.images_cue_lost:
            bits.append(f"cue decides {r.images_cue_gained} more / {r.images_cue_lost} fewer images")
        lines.append("  " + "; ".join(bits))
    lines.append(f"{len(c.new)} new shortcut(s); {len(c.suspected_b)} class(es) suspected in B")
    return "\n".join(lines)
