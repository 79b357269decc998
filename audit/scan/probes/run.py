"""Run every probe on one sample: screening, the rest, the follow-ups.

All edits of a stage are stacked and predicted in chunks, so a class's whole
bank costs one batched pass over ``sample x tests`` images.  An edit that
leaves an image as it was (a grey object turned grey, a flat area smoothed)
is not predicted: its prediction is the unedited one.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from audit.scan.config import DEFAULT, Config
from audit.scan.probes import PROBES  # defined before the package imports this module
from audit.scan.probes.base import CausalResult, Sample, flipped, predict_chunks

CHUNK = 256  # images per predict call (a speed setting, not a threshold)
BASE = "base"  # the cost key of the unedited images' predictions


class _Runner:
    """Edits and predicts the selected images of the trials of one sample, stage by stage, counting
    the forward passes by probe (``spent``)."""

    def __init__(self, predict_fn, s: Sample, chunk: int):
        self.predict_fn, self.s, self.chunk = predict_fn, s, chunk
        self.base = None if s.base_pred is None else np.asarray(s.base_pred)
        self.known = np.full(s.n, s.base_pred is not None)
        self.spent = Counter()

    def counted(self, what: str):
        """``predict_fn``, its images counted under ``what``."""
        def fn(images):
            self.spent[what] += len(images)
            return self.predict_fn(images)
        return fn

    def stage(self, trials: list, selections: list) -> None:
        """Predict the unmodified images that are needed and not known, and every trial's edits (in the
        same calls: a stage's images fill the batches together)."""
        need = np.logical_or.reduce(selections) & ~self.known if selections else np.zeros(0, bool)
        jobs = [(t, np.nonzero(sel)[0]) for t, sel in zip(trials, selections) if sel.any()]
        if not jobs:
            return
        edited, changed = [], []
        for t, rows in jobs:
            e = t.probe.edit(t, self.s, rows)
            c = (e != self.s.images[rows]).reshape(len(rows), -1).any(axis=1)
            edited.append(e[c])
            changed.append(c)
            self.spent[t.probe.name] += int(c.sum())
        self.spent[BASE] += int(need.sum())
        base, *preds = predict_chunks(self.predict_fn, [self.s.images[need], *edited], self.chunk)
        if need.any():
            if self.base is None:
                self.base = np.zeros((self.s.n, *np.shape(base)[1:]), np.asarray(base).dtype)
            self.base[need] = base
            self.known |= need
        cls = self.s.classes
        for (t, rows), c, p in zip(jobs, changed, preds):
            pred = self.base[rows].copy()  # an image its edit left unchanged keeps its prediction
            pred[c] = p
            f = flipped(self.base[rows], pred, None if cls is None else cls[rows])
            t.flips.update(zip(rows.tolist(), f.tolist()))
            if pred.ndim == 1:
                t.to.update((int(r), int(q)) for r, q, x in zip(rows, pred, f) if x)


def go_on(trials: list, cfg: Config) -> list[bool]:
    """Which trials go on to the rest of the sample after the screening: each probe's own rule
    (:meth:`audit.scan.probes.base.Probe.go_on`); the object test when a background test or a
    transform goes on (a transform counts only while removing the object changes little)."""
    go = [None if t.probe.follows_others else t.probe.go_on(t, trials, cfg) for t in trials]
    others = any(g for t, g in zip(trials, go) if t.probe.replaces_background or t.probe.is_transform)
    return [others if g is None else g for g in go]


def causal_tests(predict_fn, s: Sample, cfg: Config = DEFAULT, probes=None, chunk: int = CHUNK) -> CausalResult:
    """Run every probe of the registry on one sample.

    Every trial is screened first on the sample's first ``cfg.screen`` images
    (one that flips none of the first ``cfg.screen_early`` stops there);
    only a trial that may still matter goes on to the rest (a place that flips
    nothing on 8 images is no cue, and most places of most classes flip
    nothing): to ``cfg.min_tested`` images, and to the whole sample unless
    all of those flipped or none did (:func:`_settled`), then the placebos of the places that went on (on the screening
    images, then on the rest where those do not settle them), then the
    follow-ups (the transplants).  A healthy class then costs about
    ``screen x tests`` forward passes instead of ``sample x tests``.

    Args:
        predict_fn: uint8 images (N, H, W, C) -> predictions (N,) class ids, or (N, C) bool.
        s: the :class:`Sample`.
        cfg: the thresholds (``screen``, ``screen_early``, ``screen_min``, ``fill``, ``min_rate_n``...).
        probes: the probes to run (default: the registry, :data:`audit.scan.probes.PROBES`).
        chunk: images per ``predict_fn`` call.

    Returns:
        A :class:`CausalResult` (``forwards``: its forward passes by probe); a rate is NaN with fewer
        than ``cfg.min_rate_n`` testable images.
    """
    probes = list(PROBES.values()) if probes is None else list(probes)
    s.cfg = cfg
    trials = [t for p in probes for t in p.trials(s, cfg)]
    run = _Runner(predict_fn, s, chunk)
    _screen(run, trials, cfg)
    _placebos(run, trials, cfg)
    for p in probes:  # the follow-ups (do the flipping places carry the class?)
        trials += p.follow_up(run.counted(f"{p.name}/follow-up"), trials, s, cfg, chunk)
    out = CausalResult(n=s.n, masked=s.masks is not None, absence=s.masks is not None and not s.has_object.any())
    out.tests = [t.probe.result(t, s, cfg) for t in trials]
    out.forwards = dict(run.spent)
    return out


def _first(n: int, k: int) -> np.ndarray:
    """(n,) bool: the first ``k`` images (all of them when ``k`` is 0 or not less than ``n``)."""
    return np.arange(n) < (k if 0 < k < n else n)


def _screen(run: _Runner, trials: list, cfg: Config) -> None:
    """The screened trials on the first ``cfg.screen_early`` images, on the rest of the screening images
    where one of those flipped, then, where their rule says so, on every image not yet tested."""
    n = run.s.n
    first, early = _first(n, cfg.screen), _first(n, min(cfg.screen_early, cfg.screen) if cfg.screen else 0)
    none = np.zeros(n, bool)
    screened = [t.probe.screened for t in trials]
    run.stage(trials, [t.sel & early if k else none for t, k in zip(trials, screened)])
    go = [k and (len(t.flips) < cfg.screen_early or any(t.flips.values())) for t, k in zip(trials, screened)]
    run.stage(trials, [t.sel & first & ~early if g else none for t, g in zip(trials, go)])
    rest = [t.sel & ~_tested(t, n) if g and k else none for t, g, k in zip(trials, go_on(trials, cfg), screened)]
    upto = _first(n, cfg.min_tested if cfg.screen else 0)
    run.stage(trials, [r & upto for r in rest])
    run.stage(trials, [r & ~upto if r.any() and not _settled(t, cfg) else none for t, r in zip(trials, rest)])


def _settled(t, cfg: Config) -> bool:
    """A trial past the screening whose first ``cfg.min_tested`` images (the fewest a verdict takes) all
    flipped, to one class, or none did: the rest of the sample would only narrow an interval already
    clear of every rule's threshold.  Flips to several classes go on (the class they go to most names a
    default class).  Not an identity-keeping edit: its rule (``identity_flip_min`` 0.8 at the
    interval's lower end, ``identity_specific_min`` above the other classes') needs the whole sample."""
    f = list(t.flips.values())
    one = len(set(t.to.values())) <= 1
    return len(f) >= cfg.min_tested and not t.probe.keeps_identity and ((all(f) and one) or not any(f))


def _tested(t, n: int) -> np.ndarray:
    """(n,) bool: the images the trial has been run on."""
    out = np.zeros(n, bool)
    out[list(t.flips)] = True
    return out


def _placebos(run: _Runner, trials: list, cfg: Config) -> None:
    """The trials never screened (the placebos) where their rule holds now: on the screening images,
    then on the rest where their probe says those do not settle it (:meth:`Probe.settled`)."""
    n = run.s.n
    first, none = _first(n, cfg.screen), np.zeros(n, bool)
    due = [not t.probe.screened and t.probe.go_on(t, trials, cfg) for t in trials]
    run.stage(trials, [t.sel & first if d else none for t, d in zip(trials, due)])
    run.stage(trials, [t.sel & ~first if d and not t.probe.settled(t, cfg) else none for t, d in zip(trials, due)])


def extra_forwards(n: int, n_places: int, masked: bool, cfg: Config = DEFAULT, probes=None) -> int:
    """Forward passes :func:`causal_tests` costs for a sample of ``n``, planned: every probe's trials on
    the screening images (:meth:`~audit.scan.probes.base.Probe.planned`) and the base, and the base and
    about ``cfg.promising`` trials on the rest."""
    probes = list(PROBES.values()) if probes is None else list(probes)
    k = min(n, cfg.screen) if cfg.screen > 0 else n
    per = sum(p.planned(masked, n_places) for p in probes)
    return k * (1 + per) + (n - k) * (1 + min(cfg.promising, n_places))
