"""The worker's collaborators on their own: the row builder (no model) and the model holder."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from audit.data.datasets import Item
from audit.data.schema import records_schema
from audit.runner.rows import RowBuilder, correct


def _builder():
    return RowBuilder(["cat", "dog"], records_schema(["sky"]), (4, 4), {"sky": [0.0, 0.0, 1.0, 0.5]})


def test_rows_one_per_image_layer_and_method_with_statistics():
    rb = _builder()
    mask = np.zeros((4, 4), bool)
    mask[2:, 2:] = True
    batch = [(0, Item("cat/a.png", "/d/cat/a.png", label=0), (np.zeros((4, 4, 3), np.uint8), mask, (8, 8))),
             (1, Item("dog/b.png", "/d/dog/b.png", label=1), (np.zeros((4, 4, 3), np.uint8), None, (9, 7)))]
    maps = np.zeros((2, 4, 4), np.float32)
    maps[0, 3, 3] = 1.0  # all energy on one pixel inside the mask, in the bottom half
    maps[1, 0, :] = 1.0  # the top row: inside the sky region
    res = SimpleNamespace(image=np.array([0, 1]), pred=np.array([0, 0]), score=np.array([0.9, 0.6]),
                          target=np.array([0, 0]), maps={("conv", "gradcam"): maps, ("conv", "cam"): maps})
    parts, keys, counts = rb.rows(batch, res, 7, ["conv"], ["gradcam", "cam"])
    assert len(parts) == 2 and counts == {"flat": 0, "correct": 1, "labelled": 2}
    t = parts[0].to_pandas()
    assert t.image_id.tolist() == ["cat/a.png", "dog/b.png"] and t.pred_name.tolist() == ["cat", "cat"]
    assert t.correct.tolist() == [True, False] and t.shard.tolist() == [7, 7] and t.width.tolist() == [8, 9]
    assert t.energy_object[0] == 1.0 and np.isnan(t.energy_object[1]) and t.has_mask.tolist() == [True, False]
    assert t.energy_sky.tolist() == [0.0, 1.0] and parts[1].column("method").to_pylist() == ["cam", "cam"]
    assert keys[0].tolist() == [0, 1000] and keys[1].tolist() == [1, 1001]


def test_error_rows_keep_every_input_with_its_reason():
    rb = _builder()
    t = rb.error_rows([(0, Item("x.png", "/d/x.png", label=5), "cannot decode", None)], 3).to_pandas()
    assert t.status.tolist() == ["error"] and t.error.tolist() == ["cannot decode"]
    assert t.label_name.tolist() == ["5"] and t.layer.isna().all() and t.shard.tolist() == [3]


def test_correct_counts_multi_label_rows():
    batch = [(0, Item("a", "a", label=1), None), (1, Item("b", "b", label=None), None)]
    res = SimpleNamespace(image=np.array([0, 0, 1]), pred=np.array([0, 1, 0]))
    assert correct(batch, res) == ([True, None], 1, 1)


def test_shard_queue_retries_at_the_head_until_the_budget_is_spent():
    from audit.data.datasets import Shard
    from audit.runner.scheduler import ShardQueue

    q = ShardQueue(max_retries=1)
    q.load([Shard(0, "a", 0, 4), Shard(1, "a", 4, 10), Shard(2, "b", 0, 3)])
    assert (len(q), q.total, q.largest) == (3, 3, 6)
    first = q.popleft()
    assert q.retry(first) and q.popleft() is first  # back at the head
    assert q.retry(first, counted=False) and q.popleft() is first  # a drained node: not counted
    assert not q.retry(first) and len(q) == 2 and q.attempts[0] == 2  # the budget is spent
