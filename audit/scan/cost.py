"""What a shortcut costs: accuracy with and without the cue, worst group, right for the wrong reason.

From the per-image evidence (``summary/images.parquet``,
:mod:`audit.scan.imagepass`), per suspected class ``c`` with its cue:

* ``accuracy_with_cue`` / ``accuracy_without_cue``: the share of correct
  predictions among the images *labelled* ``c`` that carry the cue
  (``cue_present``) / that do not;
* ``worst_group_accuracy``: the lowest accuracy over the groups
  label x cue present (every label of the dataset, with and without the
  cue), with the group (``worst_group``, e.g. ``label=cat, cue=yes``);
* ``wrong_reason_share``: of the correct predictions of ``c``, the share whose
  prediction changes when the cue is removed ("right for the wrong reason").

Each rate carries its count and a 95% Wilson score interval (``_low``,
``_high``).  The functions are pure; :func:`update_classes` rewrites
``classes.parquet`` with the columns filled.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from audit.scan import imagetable
from audit.scan.imagepass import read_summary
from audit.scan.table import write_tables

Z95 = 1.959963984540054  # the two-sided 95% normal quantile


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float, float]:
    """(rate, low, high) of ``k`` successes in ``n`` trials with the Wilson score interval; NaNs for n = 0."""
    if n <= 0:
        return math.nan, math.nan, math.nan
    p = k / n
    d = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / d
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return p, max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class Rate:
    """A rate with its count and 95% Wilson interval."""

    k: int
    n: int

    @property
    def value(self) -> tuple[float, float, float]:
        return wilson(self.k, self.n)


@dataclass(frozen=True)
class Cost:
    """The cost columns of one class."""

    with_cue: Rate
    without_cue: Rate
    worst: Rate
    worst_group: str
    wrong_reason: Rate


RATE_COLUMNS = {"accuracy_with_cue": ("with_cue", "n_with_cue"),
                "accuracy_without_cue": ("without_cue", "n_without_cue"),
                "worst_group_accuracy": ("worst", "worst_group_n"),
                "wrong_reason_share": ("wrong_reason", "wrong_reason_n")}


TALLY_KEYS = ["label", "present", "correct", "to_class", "decides"]


def tally(label, pred, correct, present, decides, class_id: int):
    """Counts of images of one class's cue per (label, present, correct, to_class, decides): all that
    :func:`cost_of_tally` needs, so tallies of parts of a dataset add up (column ``n``).

    Args:
        label, pred: (N,) class ids (label -1 or NaN: unlabelled, tallied as -1).
        correct, present, decides: (N,) bool.
        class_id: the suspected class (``to_class``: predicted as it).
    """
    import pandas as pd

    label = np.asarray(label, np.float64)
    known = np.isfinite(label) & (label >= 0)
    df = pd.DataFrame({"label": np.where(known, label, -1).astype(np.int64),
                       "present": np.asarray(present, bool), "correct": np.asarray(correct, bool),
                       "to_class": np.asarray(pred, np.float64) == class_id, "decides": np.asarray(decides, bool)})
    return df.groupby(TALLY_KEYS).size().rename("n").reset_index()


def add_tallies(parts: list):
    """The sum of tallies (of parts of the same class's cue)."""
    import pandas as pd

    if not parts:
        return pd.DataFrame(columns=[*TALLY_KEYS, "n"])
    return pd.concat(parts, ignore_index=True).groupby(TALLY_KEYS)["n"].sum().reset_index()


def class_cost(label, pred, correct, present, decides, class_id: int, names=None) -> Cost:
    """The :class:`Cost` of class ``class_id`` from per-image arrays (one entry per image, its cue).

    Args:
        label, pred: (N,) int class ids (label -1 or NaN: unlabelled, left out of the accuracies).
        correct, present, decides: (N,) bool.
        class_id: the suspected class.
        names: {class id: name} for ``worst_group``.
    """
    return cost_of_tally(tally(label, pred, correct, present, decides, class_id), class_id, names)


def cost_of_tally(t, class_id: int, names=None) -> Cost:
    """The :class:`Cost` of class ``class_id``'s cue from its :func:`tally`."""
    def count(sel) -> int:
        return int(t.loc[sel, "n"].sum())

    own = t["label"] == int(class_id)
    with_cue = Rate(count(own & t["correct"] & t["present"]), count(own & t["present"]))
    without = Rate(count(own & t["correct"] & ~t["present"]), count(own & ~t["present"]))
    worst, group = Rate(0, 0), ""
    for lab in sorted(int(v) for v in t.loc[t["label"] >= 0, "label"].unique()):
        for has in (True, False):
            g = (t["label"] == lab) & (t["present"] == has)
            r = Rate(count(g & t["correct"]), count(g))
            if r.n and (not worst.n or r.k / r.n < worst.k / worst.n):
                worst = r
                group = f"label={(names or {}).get(lab, lab)}, cue={'yes' if has else 'no'}"
    right = t["correct"] & t["to_class"]
    return Cost(with_cue, without, worst, group, Rate(count(right & t["decides"]), count(right)))


def cost_fields(c: Cost | None) -> dict:
    """The cost columns of one classes.parquet row (nulls without a cost)."""
    out = {}
    for col, (attr, ncol) in RATE_COLUMNS.items():
        r = getattr(c, attr) if c is not None else None
        v, lo, hi = r.value if r is not None and r.n else (None, None, None)
        out.update({col: v, f"{col}_low": lo, f"{col}_high": hi, ncol: r.n if r is not None else None})
    out["worst_group"] = c.worst_group if c is not None and c.worst.n else None
    return out


COST_COLUMNS = ["cue_class", "cue", "label", "pred", "correct", "cue_present", "cue_decides"]


def tallies_of(frames) -> dict:
    """{(class id, cue): :func:`tally`} of rows of ``images.parquet`` with evidence, given in parts
    (DataFrames with :data:`COST_COLUMNS`), each part's tallies added as it comes."""
    out: dict = {}
    for df in frames:
        for (cid, cue), d in df.groupby(["cue_class", "cue"]):
            t = tally(d["label"].to_numpy(dtype=np.float64, na_value=np.nan),
                      d["pred"].to_numpy(dtype=np.float64, na_value=np.nan),
                      d["correct"].fillna(False).to_numpy(bool), d["cue_present"].fillna(False).to_numpy(bool),
                      d["cue_decides"].fillna(False).to_numpy(bool), int(cid))
            key = (int(cid), str(cue))
            out[key] = add_tallies([out[key], t]) if key in out else t
    return out


def costs_of(images_df, names=None) -> dict:
    """{(class id, cue): :class:`Cost`} from a table of ``images.parquet`` rows in memory."""
    if images_df is None or not len(images_df):
        return {}
    return _costs(tallies_of([images_df[images_df["status"] != "error"]]), names)


def stored_costs(out, names=None) -> dict:
    """{(class id, cue): :class:`Cost`} from ``OUT/summary/images.parquet``, read a batch at a time
    (:data:`COST_COLUMNS` of the rows with evidence only); {} without the table."""
    return _costs(tallies_of(imagetable.batches(out, COST_COLUMNS, imagetable.ok_rows())), names)


def _costs(tallies: dict, names) -> dict:
    return {k: cost_of_tally(t, k[0], names) for k, t in tallies.items()}


def with_costs(classes_df, costs: dict):
    """``classes_df`` with the cost columns filled from ``costs`` ({(class id, cue): :class:`Cost`})."""
    rows = [cost_fields(costs.get((int(r.class_id), str(r.cue)))) for r in classes_df.itertuples()]
    df = classes_df.copy()
    for col in cost_fields(None):
        df[col] = [r[col] for r in rows]
    return df


def class_names(classes_df) -> dict:
    """{class id: name} of ``classes.parquet``."""
    if not len(classes_df):
        return {}
    return dict(zip(classes_df["class_id"].astype(int), classes_df["class_name"].astype(str)))


def update_classes(out) -> None:
    """Rewrite ``OUT/summary/classes.parquet`` with the cost columns from ``images.parquet``."""
    classes = read_summary(out, "classes")
    if classes is None:
        return
    regions = [c[7:] for c in classes.columns if c.startswith("energy_") and c not in ("energy_object", "energy_border")]
    costs = stored_costs(out, class_names(classes))
    write_tables(out, {"classes": with_costs(classes, costs)}, regions)


def _pct(v) -> str:
    return "-" if v is None or not math.isfinite(v) else f"{100 * v:.0f}%"


def _count(v) -> int:
    return 0 if v is None or v != v else int(v)


def cost_sentence(row: dict) -> str | None:
    """The cost of one class row (a dict of classes.parquet) in words, or None without one."""
    n_with, n_without = _count(row.get("n_with_cue")), _count(row.get("n_without_cue"))
    if n_with + n_without == 0:
        return None

    def rate(col: str) -> str:
        return f"{_pct(_f(row.get(col)))} (95% {_pct(_f(row.get(col + '_low')))}-{_pct(_f(row.get(col + '_high')))})"

    return (f"accuracy {rate('accuracy_with_cue')} on its {n_with} images with the cue, "
            f"{rate('accuracy_without_cue')} on its {n_without} without; worst group {row.get('worst_group') or '-'}: "
            f"{rate('worst_group_accuracy')} of {_count(row.get('worst_group_n'))}; right for the wrong reason: "
            f"{rate('wrong_reason_share')} of {_count(row.get('wrong_reason_n'))} correct predictions")


def _f(v):
    return None if v is None else float(v)


def cost_lines(classes_df) -> list[str]:
    """One line per class with a cost: accuracy with and without the cue, worst group, wrong reason."""
    lines = []
    if "accuracy_with_cue" not in classes_df:
        return lines
    for r in classes_df.itertuples():
        n_with, n_without = _count(r.n_with_cue), _count(r.n_without_cue)
        if n_with + n_without == 0:
            continue
        lines.append(
            f"  cost of {r.class_name}'s cue {r.cue}: accuracy {_pct(r.accuracy_with_cue)} with the cue "
            f"(n={n_with}, {_pct(r.accuracy_with_cue_low)}-{_pct(r.accuracy_with_cue_high)}), "
            f"{_pct(r.accuracy_without_cue)} without (n={n_without}, "
            f"{_pct(r.accuracy_without_cue_low)}-{_pct(r.accuracy_without_cue_high)}); worst group "
            f"{r.worst_group} {_pct(r.worst_group_accuracy)} (n={_count(r.worst_group_n)}); right for the wrong "
            f"reason {_pct(r.wrong_reason_share)} of {_count(r.wrong_reason_n)} correct")
    return lines
