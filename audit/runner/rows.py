"""The row builder of a worker: explained batches and unreadable inputs as records-table rows.

One row per (image, layer, method) with the statistics of :mod:`audit.engine.stats`,
cast to the records schema; an input that could not be explained is one
``status=error`` row.  Pure Arrow/NumPy: no model, no threads.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from audit.data.files import escape_text
from audit.engine.stats import map_stats, to_arrow_columns


@dataclass
class RowBuilder:
    """Builds the rows of one job's records (its classes, schema, input size and regions)."""

    classes: list
    schema: pa.Schema
    size: tuple  # (H, W) of the model input: maps and masks are compared at it
    regions: dict

    def name(self, i):
        """The class name of index ``i`` (its number when the job has fewer classes), None for None."""
        if i is None:
            return None
        return self.classes[i] if 0 <= i < len(self.classes) else str(i)

    def error_rows(self, bad, shard_id):
        """Rows of inputs that could not be explained: (index, item, reason, (w, h) or None) each."""
        n = len(bad)
        cols = {name: pa.nulls(n, self.schema.field(name).type) for name in self.schema.names}
        cols["image_id"] = pa.array([b[1].image_id for b in bad], pa.string())
        cols["path"] = pa.array([b[1].path for b in bad], pa.string())
        cols["path_bytes"] = pa.array([b[1].path_bytes for b in bad], pa.binary())
        cols["mask_error"] = pa.array([b[1].mask_error for b in bad], pa.string())
        cols["shard"] = pa.array([shard_id] * n, pa.int32())
        cols["label"] = pa.array([b[1].label for b in bad], pa.int32())
        cols["label_name"] = pa.array([self.name(b[1].label) for b in bad], pa.string())
        cols["status"] = pa.array(["error"] * n, pa.string())
        cols["error"] = pa.array([escape_text(b[2]) for b in bad], pa.string())
        cols["has_mask"] = pa.array([b[1].has_mask for b in bad], pa.bool_())
        sizes = [b[3] for b in bad]
        cols["width"] = pa.array([s[0] if s else None for s in sizes], pa.int32())
        cols["height"] = pa.array([s[1] if s else None for s in sizes], pa.int32())
        return pa.table(cols, schema=self.schema)

    def rows(self, batch, res, shard_id, layers, methods):
        """Statistics and Arrow rows of an explained batch: ([tables], [sort keys], counts)."""
        parts, keys = [], []
        counts = {"flat": 0, "correct": 0, "labelled": 0}
        right, counts["labelled"], counts["correct"] = correct(batch, res)
        # one row per explained row: several per image for a multi-label head
        batch = [batch[i] for i in res.image]
        has_mask, masks = self.masks(batch)
        common = self.common_columns(batch, res, right, has_mask, shard_id)
        n_blocks = 0
        for layer in layers:
            for method in methods:
                table, n_flat = self.block(common, layer, method, res.maps[(layer, method)], masks, has_mask)
                counts["flat"] += n_flat
                parts.append(table)
                keys.append(np.array([b[0] * 1000 + n_blocks for b in batch], np.int64))
                n_blocks += 1
        return parts, keys, counts

    def masks(self, batch):
        """(has_mask per row, (n, H, W) bool masks or None when no row has one)."""
        has_mask = np.array([b[2][1] is not None for b in batch])
        if not has_mask.any():
            return has_mask, None
        masks = np.zeros((len(batch), *self.size), bool)
        for k, b in enumerate(batch):
            if b[2][1] is not None:
                masks[k] = b[2][1]
        return has_mask, masks

    def common_columns(self, batch, res, correct, has_mask, shard_id) -> dict:
        """The columns every layer x method block of these rows shares."""
        labels = [b[1].label for b in batch]
        n = len(batch)
        pred = res.pred.astype(np.int32)
        return {
            "image_id": pa.array([b[1].image_id for b in batch], pa.string()),
            "path": pa.array([b[1].path for b in batch], pa.string()),
            "path_bytes": pa.array([b[1].path_bytes for b in batch], pa.binary()),
            "mask_error": pa.array([b[1].mask_error for b in batch], pa.string()),
            "shard": pa.array(np.full(n, shard_id, np.int32)),
            "label": pa.array([None if v is None else int(v) for v in labels], pa.int32()),
            "label_name": pa.array([self.name(v) for v in labels], pa.string()),
            "pred": pa.array([None if p < 0 else int(p) for p in pred], pa.int32()),  # -1: no label above 0.5
            "pred_name": pa.array([None if p < 0 else self.name(int(p)) for p in pred], pa.string()),
            "score": pa.array(res.score.astype(np.float32)),
            "correct": pa.array([correct[i] for i in res.image], pa.bool_()),
            "target": pa.array(res.target.astype(np.int32)),
            "width": pa.array([b[2][2][0] for b in batch], pa.int32()),
            "height": pa.array([b[2][2][1] for b in batch], pa.int32()),
            "has_mask": pa.array(has_mask),
            "error": pa.nulls(n, pa.string()),
        }

    def block(self, common, layer, method, maps, masks, has_mask):
        """(the rows of one layer x method, cast to the schema; how many of its maps are flat)."""
        n, h, w = maps.shape
        st = map_stats(maps, self.size, masks=masks, has_mask=has_mask, regions=self.regions)
        # the engine zeroes the maps it flags as degenerate, so map_stats already
        # reports them flat with null statistics
        status = st["status"].astype(str)
        offsets = pa.array(np.arange(n + 1, dtype=np.int32) * (h * w))
        cols = {
            **common,
            "layer": pa.array([layer] * n, pa.string()),
            "method": pa.array([method] * n, pa.string()),
            "cam": pa.ListArray.from_arrays(offsets, pa.array(maps.reshape(-1).astype(np.float32))),
            "cam_h": pa.array(np.full(n, h, np.int32)),
            "cam_w": pa.array(np.full(n, w, np.int32)),
            "status": pa.array(status.tolist(), pa.string()),
            **to_arrow_columns(st),
        }
        table = pa.table({name: cols[name] for name in self.schema.names}, schema=self.schema)
        return table, int((status == "flat").sum())


def correct(batch, res):
    """(per image: label predicted or None when unlabelled, labelled count, correct count).

    Single-label heads: the label is the predicted class.  Multi-label heads:
    the label is among the labels above 0.5.
    """
    predicted = [set() for _ in batch]
    for i, p in zip(res.image, res.pred):
        if p >= 0:
            predicted[i].add(int(p))
    correct = [None if b[1].label is None else int(b[1].label) in s for b, s in zip(batch, predicted)]
    return correct, sum(c is not None for c in correct), sum(bool(c) for c in correct)
