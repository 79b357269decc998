"""The zoo: planted-shortcut datasets and small models to check the scan against.

* :mod:`audit.zoo.draw`: backgrounds, objects (the true class signal) and cues;
* :mod:`audit.zoo.cases`: :class:`~audit.zoo.cases.Case` definitions (which class
  carries which cue, where the scan should find it) and the deterministic renderer;
* :mod:`audit.zoo.train`: writing a case as a ``folder`` dataset with masks, a
  small network per case (Conv-BN-ReLU by default; residual, MobileNet-like,
  Flatten-headed and global-max-pooled ones for some cases), the held-out check that the cue was
  learned, and the cache.

``bench/detection.py`` audits every case with and without masks and scores
the scan's verdicts (docs/scan.md, "Detection benchmark").
"""
