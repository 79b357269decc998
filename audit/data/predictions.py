"""What the model predicted over a whole output: one class for every input is called out.

A model with NaN weights predicts class 0 (the argmax of NaNs) with a NaN
score for every image, and a collapsed head predicts one class whatever the
input; either makes every heatmap meaningless while the accuracy still reads
like a number ("50%" on balanced data).  :func:`one_class_warning` reads only
the ``pred`` and ``score`` columns, batch by batch (memory does not grow with
the output), and says so in one sentence.
"""

from __future__ import annotations

import collections
import math

MIN_IMAGES = 8  # fewer audited images than this say nothing about the model


def prediction_counts(out) -> tuple[collections.Counter, int, int]:
    """(images per predicted class, images with a non-finite score, images) over the committed records.

    One row per image is counted: the rows of one (layer, method) view.
    """
    import pyarrow.compute as pc

    from audit.data.query import records_dataset

    ds = records_dataset(out)
    names = ds.schema.names
    if not {"pred", "layer", "method"} <= set(names):
        return collections.Counter(), 0, 0
    first = ds.head(1, columns=["layer", "method"])
    if first.num_rows == 0:
        return collections.Counter(), 0, 0
    view = (pc.field("layer") == first.column("layer")[0].as_py()) & \
        (pc.field("method") == first.column("method")[0].as_py()) & pc.field("pred").is_valid()
    counts, bad, n = collections.Counter(), 0, 0
    cols = ["pred"] + (["score"] if "score" in names else [])
    for batch in ds.to_batches(columns=cols, filter=view):
        preds = batch.column(0).to_pylist()
        counts.update(preds)
        n += len(preds)
        if "score" in cols:
            bad += sum(1 for s in batch.column(1).to_pylist() if s is None or not math.isfinite(s))
    return counts, bad, n


def one_class_warning(out, classes=None) -> str | None:
    """One sentence when every audited image got the same predicted class (or a non-finite score), else None."""
    counts, bad, n = prediction_counts(out)
    if n < MIN_IMAGES:
        return None
    if bad:
        return (f"the model's scores are NaN or infinite for {bad:,} of {n:,} images (NaN weights?): its "
                "predictions and heatmaps mean nothing")
    if len(counts) == 1 and (classes is None or len(classes) > 1):
        (cls, _), = counts.items()
        name = f" ({classes[cls]})" if classes and 0 <= cls < len(classes) else ""
        return (f"the model predicts class {cls}{name} for every one of the {n:,} images (a collapsed head, "
                "or NaN weights?): accuracy and verdicts describe that constant, not what it learned")
    return None
