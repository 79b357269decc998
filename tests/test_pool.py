"""The causal tests' pool: its images come in a mixed order, so a transplant's first recipients are a sample of
every other class, not the first class of a folder's sorted ids."""

from types import SimpleNamespace

import numpy as np
import pandas as pd

from audit.scan import causal
from audit.scan.config import DEFAULT
from audit.scan.read import hashed


class FolderIntervener:
    """Images named ``<class>/<n>.png``; the model says the class of the folder."""

    def __init__(self):
        self.forwards = 0

    def load(self, ids):
        cls = [ord(i[0]) - ord("a") for i in ids]
        return np.stack([np.full((4, 4, 3), 60 * c, np.uint8) for c in cls]), None

    def predict(self, images):
        self.forwards += len(images)
        return images[:, 0, 0, 0] // 60


def test_a_transplant_s_first_recipients_come_from_every_other_class():
    ids = [f"{c}/{n:03d}.png" for c in "abc" for n in range(100)]
    view = SimpleNamespace(df=pd.DataFrame({"image_id": ids, "status": "ok", "target": [ord(i[0]) - 97 for i in ids]}))
    pool = causal._pool(FolderIntervener(), view, False, DEFAULT)
    assert list(pool.ids) == hashed(pool.ids) and len(pool.ids) == DEFAULT.donors
    first = pool.recipients.for_class(0, DEFAULT).base  # the 16 recipients of class a
    assert len(first) == DEFAULT.recipients and set(first.tolist()) == {1, 2}  # sorted ids would give b's only
    assert abs(float(np.mean(first == 1)) - 0.5) <= 0.3
    assert hashed(reversed(ids)) == hashed(ids) and hashed(ids) != sorted(ids)  # deterministic, not by name
