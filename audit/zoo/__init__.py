"""The zoo: planted-shortcut datasets and small models to check the scan against.

* :mod:`audit.zoo.draw`: backgrounds, objects (the true class signal) and cues;
* :mod:`audit.zoo.cases`: :class:`~audit.zoo.cases.Case` definitions (which class
  carries which cue, where the scan should find it) and the deterministic renderer;
* :mod:`audit.zoo.train`: writing a case as a ``folder`` dataset with masks, a
  small network per case (Conv-BN-ReLU by default; residual, MobileNet-like,
  Flatten-headed and global-max-pooled ones for some cases), the held-out check that the cue was
  learned, and the cache.

Drawn cases, which nobody wrote (``bench/draws.py``, docs/scan.md "Drawn cases"):

* :mod:`audit.zoo.space`: :func:`~audit.zoo.space.draw_case`, a random case as a pure function of its seed;
* :mod:`audit.zoo.paint`: its images (cue on or off, or another class's cue: the paired counterfactual);
* :mod:`audit.zoo.learned`: building it, and which of its cues the model learned;
* :mod:`audit.zoo.tally`: precision and recall of flagged classes with Wilson intervals.

``bench/detection.py`` audits every case with and without masks and scores
the scan's verdicts (docs/scan.md, "Detection benchmark").
"""
