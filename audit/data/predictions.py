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

from audit.data.query import records_dataset

MIN_IMAGES = 8  # fewer audited images than this say nothing about the model


def prediction_counts(out) -> tuple[collections.Counter, int, int, set]:
    """(images per predicted class, images with a non-finite score, images, the labels seen).

    Over the committed records, one row per image: the rows of one (layer, method) view.
    """
    import pyarrow.compute as pc

    ds = records_dataset(out)
    names = ds.schema.names
    if not {"pred", "layer", "method"} <= set(names):
        return collections.Counter(), 0, 0, set()
    first = ds.head(1, columns=["layer", "method"])
    if first.num_rows == 0:
        return collections.Counter(), 0, 0, set()
    view = (pc.field("layer") == first.column("layer")[0].as_py()) & \
        (pc.field("method") == first.column("method")[0].as_py()) & pc.field("pred").is_valid()
    counts, bad, n, labels = collections.Counter(), 0, 0, set()
    cols = ["pred"] + [c for c in ("score", "label") if c in names]
    for batch in ds.to_batches(columns=cols, filter=view):
        preds = batch.column("pred").to_pylist()
        counts.update(preds)
        n += len(preds)
        if "score" in cols:
            bad += sum(1 for s in batch.column("score").to_pylist() if s is None or not math.isfinite(s))
        if "label" in cols and len(labels) < 2:
            labels.update(v for v in batch.column("label").to_pylist() if v is not None)
    return counts, bad, n, labels


def one_class_warning(out, classes=None) -> str | None:
    """One sentence when every audited image got the same predicted class (or a non-finite score), else None.

    Images whose labels are all one class may rightly all be predicted as it:
    that is not called out.
    """
    counts, bad, n, labels = prediction_counts(out)
    if n < MIN_IMAGES:
        return None
    if bad:
        return (f"the model's scores are NaN or infinite for {bad:,} of {n:,} images (NaN weights?): its "
                "predictions and heatmaps mean nothing")
    if len(counts) == 1 and (classes is None or len(classes) > 1) and len(labels) != 1:
        (cls, _), = counts.items()
        name = f" ({classes[cls]})" if classes and 0 <= cls < len(classes) else ""
        return (f"the model predicts class {cls}{name} for every one of the {n:,} images (a collapsed head, "
                "or NaN weights?): accuracy and verdicts describe that constant, not what it learned")
    return None
