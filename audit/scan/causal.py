"""Plan and run the causal tests of a scan: every class, and the clusters whose attention is suspect.

:func:`plan_tests` chooses a deterministic sample per class (``Config.sample``
images) and per suspect cluster within a cost budget of extra forward passes
(``Config.budget`` per audited image, at least ``Config.budget_floor``);
:func:`run_tests` loads each sample once and runs the probes of
:mod:`audit.scan.probes` on it.  The result,
:class:`CausalTests`, also gives each place's flip rate on the *other*
classes (:meth:`CausalTests.others`), which tells a class-specific cue from
an occlusion that disturbs every class alike, and where objects usually sit
(:attr:`CausalTests.density`), for classes defined by absence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np

from audit.scan.config import Config
from audit.scan.probes import PROBES, CausalResult, Sample, causal_tests, extra_forwards
from audit.scan.probes.edits import Levels, remove_objects, spare_masks
from audit.scan.probes.places import place_bank
from audit.scan.probes.run import CHUNK
from audit.scan.probes.transplant import Recipients
from audit.scan.read import hashed, sample_ids
from audit.scan.robust import fixed_place_score
from audit.scan.verdict import OthersRates, assess, identity_placebo, placebo_rates, straddling


@dataclass(frozen=True)
class TestPlan:
    """One sample to test: a class (``cluster`` None) or one of its clusters."""

    class_id: int
    cluster: int | None
    ids: tuple  # image ids, sorted
    hot_box: tuple | None = None
    pool: tuple = ()  # every testable image id of the group (more are drawn from it in this order)


@dataclass
class CausalTests:
    """Every causal test of a scan, by (class id, cluster or None)."""

    results: dict = field(default_factory=dict)  # {(class_id, cluster): CausalResult}
    density: dict = field(default_factory=dict)  # {place: object density ratio}
    planned: int = 0  # samples planned
    skipped: int = 0  # samples left out by the budget
    forwards: int = 0  # extra forward passes the tests cost
    budget: int = 0  # extra forward passes allowed
    extended: int = 0  # samples grown by sequential testing
    flagged_before: dict = field(default_factory=dict)  # {class_id: classes flagged before its last round}
    grow: object = field(default=None, repr=False)  # the sequential tester (:class:`_Grow`), for later rounds

    def get(self, class_id: int, cluster: int | None = None) -> CausalResult | None:
        return self.results.get((class_id, cluster))

    def grow_again(self, class_ids, flagged: frozenset) -> None:
        """Sequential testing once more for the groups of ``class_ids``, judged now with the ``flagged``
        classes no identity placebo (a round of verdicts flagged them): a test that the old placebo
        decided may straddle its threshold against the new one, and more images decide it."""
        if self.grow is not None:
            self.grow.again(class_ids, flagged)

    def others(self, class_id: int, flagged: frozenset | None = None) -> OthersRates:
        """The other classes' flip rates of each place on their own samples (:func:`placebo_rates`); the
        ``flagged`` classes (decided by a cue of their own; default: those flagged before the class's last
        round of verdicts) are no placebo of an identity-keeping edit."""
        flagged = self.flagged_before.get(class_id, frozenset()) if flagged is None else flagged
        rows = [(c, res) for (c, cl), res in self.results.items() if c != class_id and cl is None]
        return placebo_rates([res for _, res in rows], [res for c, res in rows if c not in flagged])


def _ok_ids(rows) -> list:
    return rows.loc[rows["status"] == "ok", "image_id"].tolist()


def priority(features, verdict, cfg: Config) -> float:
    """How suspect a group is before any causal test (0..1): its attention suspicion (with masks: little
    attention on its object), or its peaks sitting at one place away from the centre (a pasted mark)."""
    s = verdict.attention_suspicion if verdict is not None and math.isfinite(verdict.attention_suspicion) else 0.0
    return max(s, fixed_place_score(features.peak_place, cfg))


@dataclass(frozen=True, eq=False)
class _Wanted:
    result: object  # the ClassResult
    cluster: int | None
    ids: list
    hot: object
    priority: float


def _wanted(results, cfg: Config) -> list:
    """Every class with a verdict and every cluster worth testing, suspects first (most suspect first),
    then the rest (classes before clusters)."""
    classes = [r for r in results if r.features.n >= cfg.min_images]
    out = [_Wanted(r, None, _ok_ids(r.rows), r.features.hot_box, priority(r.features, r.own, cfg)) for r in classes]
    for r in classes:
        for c in r.clusters if len(r.clusters) > 1 else ():
            if c.verdict is None or c.verdict.verdict == "insufficient_data":
                continue
            p = priority(c.features, c.verdict, cfg)
            if p >= cfg.cluster_attention_min:
                out.append(_Wanted(r, c.cluster, list(c.members), c.features.hot_box, p))
    return sorted(out, key=lambda w: (w.priority < cfg.cluster_attention_min, w.cluster is not None, -w.priority))


def plan_tests(results, n_images: int, n_places: int, masked: bool, cfg: Config) -> tuple[list, int]:
    """Samples for every class and suspect cluster within the budget, the suspects first.

    The budget is ``cfg.budget`` extra forward passes per audited image (at least ``cfg.budget_floor``),
    plus a full sample for every suspect group (a cluster whose peaks sit at one place away from the
    centre, a class with little attention on its object: :func:`priority` at least
    ``cfg.cluster_attention_min``): suspects are never cut off by the number of classes.  When the rest
    does not fit at ``cfg.sample`` images, their sample drops to ``cfg.min_sample``; what still does not
    fit is left out (its evidence says so and names ``--causal-budget``).

    Args:
        results: the :class:`audit.scan.table.ClassResult` s (attention verdicts only).
        n_images: images audited (the budget scales with it).
        n_places: places in the bank (the cost of a test scales with it).
        masked: object and background tests too.
        cfg: ``sample``, ``min_sample``, ``budget``, ``budget_floor``, ``cluster_attention_min``.

    Returns:
        (plans, number of samples left out by the budget).
    """
    wanted = _wanted(results, cfg)
    suspects = [w for w in wanted if w.priority >= cfg.cluster_attention_min]
    budget = budget_of(n_images, len(suspects), n_places, masked, cfg)
    need = sum(extra_forwards(min(cfg.sample, len(w.ids)), n_places, masked, cfg) for w in wanted)
    rest = cfg.sample if need <= budget else cfg.min_sample
    plans, skipped, spent = [], 0, 0
    for w in wanted:
        chosen = tuple(sorted(sample_ids(w.ids, cfg.sample if w in suspects else rest)))
        cost = extra_forwards(len(chosen), n_places, masked, cfg)
        if spent + cost > budget:
            skipped += 1
            continue
        spent += cost
        plans.append(TestPlan(w.result.class_id, w.cluster, chosen, None if w.hot is None else tuple(w.hot),
                              tuple(w.ids)))
    return plans, skipped


def budget_of(n_images: int, n_suspects: int, n_places: int, masked: bool, cfg: Config) -> int:
    """The extra forward passes the causal tests may spend (see :func:`plan_tests`)."""
    return max(cfg.budget_floor, int(cfg.budget * n_images)) + \
        extra_forwards(cfg.sample, n_places, masked, cfg) * n_suspects


@dataclass
class Pool:
    """A deterministic pool of images across classes (``Config.donors``), loaded once per scan."""

    backgrounds: np.ndarray | None = None  # the images with their objects inpainted away (masks only)
    target: np.ndarray | None = None  # each image's class
    density: np.ndarray | None = None  # object density per pixel (masks only)
    levels: Levels | None = None  # the dataset's typical image
    recipients: Recipients | None = None  # the images as they are, with the model's predictions
    job_preds: dict | None = None  # {image id: the job's prediction}, where the pool's own agree with them
    ids: tuple = ()  # the pool's image ids, in the order of its arrays


def _pool(intervener, view, use_masks: bool, cfg: Config, results=()) -> Pool:
    """Load the pool: backgrounds and object density (with masks), levels, and the transplant's
    recipients (the images with their predictions; their objects, grown, or without masks their own
    heatmaps' hot areas, are never pasted over)."""
    df = view.df
    ok = df[df["status"] == "ok"].drop_duplicates("image_id")
    # mixed, not sorted: a transplant's first recipients must not all be one class's (a folder's ids sort by class)
    ids = hashed(sample_ids(ok["image_id"].tolist(), cfg.donors))
    if not ids:
        return Pool()
    target = dict(zip(ok["image_id"], ok["target"]))
    pool = Pool(target=np.array([target[i] for i in ids]), ids=tuple(ids))
    recorded = job_predictions(view)
    pool.recipients, images, masks, agreed = _load_recipients(intervener, ids, use_masks, cfg, results, recorded)
    pool.job_preds = recorded if agreed else None
    pool.levels = Levels.of(images)
    if pool.recipients.keep is None:
        return pool
    has = masks.reshape(len(masks), -1).any(axis=1)
    pool.density = masks[has].mean(axis=0) if has.any() else None
    pool.backgrounds = remove_objects(images, masks)
    return pool


def _load_recipients(intervener, ids: list, use_masks: bool, cfg: Config, results=(), recorded=None,
                     check: int | None = None) -> tuple:
    """(the :class:`Recipients` of ``ids``: the images, the model's predictions, with masks their objects
    grown (``keep``), else their own heatmaps' hot areas (``hot``); the images; the masks; whether the
    job's ``recorded`` predictions stood for them (:func:`base_predictions`, checked on ``check`` of them,
    default ``cfg.job_check``))."""
    images, masks = intervener.load(ids)
    base, agreed = base_predictions(intervener.predict, images, ids, recorded,
                                    cfg.job_check if check is None else check)
    if use_masks and masks is not None and masks.any():
        return Recipients(images, base, keep=_spare(images.shape[1:3], cfg, masks)), images, masks, agreed
    hot = _spare(images.shape[1:3], cfg, grids=maps_of(results, ids))
    return Recipients(images, base, hot=hot), images, masks, agreed


def base_predictions(predict, images: np.ndarray, ids: list, recorded: dict | None, check: int) -> tuple:
    """(the predictions of ``images``, whether the job's ``recorded`` ones stood for them).

    The first ``check`` images are predicted; where their predictions are single-label and all equal
    the job's (same model, same decoding), the rest take the job's.  Otherwise (a job run in mixed
    precision or on another device may break a near tie the other way; a multi-label head; an image
    the job did not record) every image is predicted.
    """
    if recorded is None or any(i not in recorded for i in ids):
        return np.asarray(predict(images)), False
    k = min(check, len(ids))
    head = np.asarray(predict(images[:k])) if k else np.zeros(0, int)
    if head.ndim != 1 or any(recorded[i] != p for i, p in zip(ids[:k], head)):
        rest = np.asarray(predict(images[k:])) if k < len(ids) else head[:0]
        return np.concatenate([head, rest]), False
    return np.concatenate([head, np.array([int(recorded[i]) for i in ids[k:]], int)]).astype(int), True


def _more_recipients(intervener, view, pool: Pool, use_masks: bool, cfg: Config, results=()) -> Recipients | None:
    """The images after the pool's in its deterministic order (``cfg.sequential_max`` more), as recipients
    for a transplant that sequential testing grows past the pool (their predictions the job's, once the
    pool's agreed); None when there are none."""
    ok = view.df[view.df["status"] == "ok"].drop_duplicates("image_id")["image_id"].tolist()
    ids = hashed(sample_ids(ok, cfg.donors + cfg.sequential_max) - set(pool.ids))
    if not ids:
        return None
    return _load_recipients(intervener, ids, use_masks, cfg, results, pool.job_preds, check=0)[0]


def _spare(size, cfg: Config, masks=None, grids=None):
    return spare_masks(size, masks, grids, cfg.spare_hot, cfg.spare_max)


def _backgrounds_for(pool: Pool, class_id: int) -> tuple:
    """(the pool's backgrounds of the other classes, round robin by class, their classes), or (None, None)."""
    if pool.backgrounds is None:
        return None, None
    keep = np.nonzero(pool.target != class_id)[0]
    keep = keep[interleave(pool.target[keep])] if len(keep) else keep
    return pool.backgrounds[keep], pool.target[keep]


def interleave(labels: np.ndarray) -> np.ndarray:
    """An order of ``labels`` that takes one of each class in turn (round robin), so that images
    given backgrounds in turn get every donor class about equally often."""
    by = [np.nonzero(labels == c)[0].tolist() for c in np.unique(labels)]
    order = []
    while any(by):
        for q in by:
            if q:
                order.append(q.pop(0))
    return np.array(order, int)


def _density_ratios(density, places) -> dict:
    """{place: mean object density inside the place / mean density over the image}."""
    if density is None or density.mean() <= 0:
        return {}
    mean = float(density.mean())
    return {p.name: float(density[p.mask].mean() / mean) for p in places if p.mask.any()}


def maps_of(results, ids) -> np.ndarray | None:
    """(n, g, g) the heatmap of each image id on the grid, from any class (a flat map where it has
    none), or None when no class has maps."""
    found, shape = {}, None
    for r in results:
        if r.grids is None or not len(r.grids):
            continue
        shape = r.grids.shape[1:]
        for k in np.nonzero(np.isin(np.asarray(r.map_ids), list(ids)))[0]:  # only the pool's few ids
            found.setdefault(r.map_ids[k], r.grids[k])
    if shape is None:
        return None
    out = np.zeros((len(ids), *shape), np.float32)
    for j, i in enumerate(ids):
        if i in found:
            out[j] = found[i]
    return out


def own_grids(results, plan: TestPlan) -> np.ndarray | None:
    """(n, g, g) each sampled image's own heatmap on the grid (a flat map where it has none), or None."""
    return maps_of([r for r in results if r.class_id == plan.class_id][:1], plan.ids)


def _sample(intervener, results, plan: TestPlan, pool: Pool, size, regions, masked: bool, cfg: Config):
    """The :class:`audit.scan.probes.Sample` of one plan (its images loaded), or None."""
    loaded = intervener.call(intervener.load, plan.ids)
    if loaded is None:
        return None
    images, masks = loaded
    if masked and masks is None:
        masks = np.zeros(images.shape[:3], bool)
    bg, bg_cls = _backgrounds_for(pool, plan.class_id)
    spare = _spare(size, cfg, masks) if masked else _spare(size, cfg, grids=own_grids(results, plan))
    return Sample(images, place_bank(size, regions, plan.hot_box, cfg, cells=not masked), masks if masked else None,
                  classes=np.full(len(images), plan.class_id), backgrounds=bg, background_classes=bg_cls,
                  spare=spare, levels=pool.levels,
                  recipients=pool.recipients.for_class(plan.class_id, cfg) if pool.recipients else None,
                  target=plan.class_id, cfg=cfg, base_pred=_known(pool, plan.ids))


def job_predictions(view) -> dict | None:
    """{image id: the prediction the job recorded}, or None without a ``pred`` column.  They stand for the
    scan's own only once its predictions of the pool's first images agree (:func:`base_predictions`)."""
    if "pred" not in view.df:
        return None
    ok = view.df[view.df["status"] == "ok"].drop_duplicates("image_id")
    return dict(zip(ok["image_id"], ok["pred"]))


def _known(pool: Pool, ids) -> np.ndarray | None:
    """The job's predictions of ``ids`` (where they stood for the pool's: :func:`base_predictions`), or None."""
    if not pool.job_preds or any(i not in pool.job_preds for i in ids):
        return None
    return np.array([int(pool.job_preds[i]) for i in ids])


def run_tests(intervener, results, view, cfg: Config, use_masks: bool) -> CausalTests:
    """Plan and run the causal tests of every class (and suspect cluster) of a scan."""
    out = CausalTests()
    size = intervener.call(lambda: intervener.size)
    if size is None:
        return out
    # decided by the data (records with an object mask or box), never by which spec keys a format has
    masked = bool(use_masks and view.masked)
    n_places = len(place_bank(size, view.regions, cfg=cfg, cells=not masked)) + 1
    n_images = int(view.df["image_id"].nunique()) if len(view.df) else 0
    plans, out.skipped = plan_tests(results, n_images, n_places, masked, cfg)
    out.planned = len(plans) + out.skipped
    start = intervener.forwards
    pool = intervener.call(_pool, intervener, view, use_masks, cfg, results) or Pool()
    out.density = _density_ratios(pool.density, place_bank(size, view.regions, cfg=cfg))
    out.budget = budget_of(n_images, sum(w.priority >= cfg.cluster_attention_min for w in _wanted(results, cfg)),
                           n_places, masked, cfg)
    for plan in plans:
        sample = _sample(intervener, results, plan, pool, size, view.regions, masked, cfg)
        res = None if sample is None else intervener.call(causal_tests, intervener.predict, sample, cfg)
        if res is None:
            break
        out.results[(plan.class_id, plan.cluster)] = res
    out.forwards = intervener.forwards - start
    # sequential testing spends from a budget of its own, as large: the planned tests may use all of theirs
    grow = _Grow(intervener, results, pool, size, view.regions, masked, cfg, out, intervener.forwards,
                 {(p.class_id, p.cluster): p for p in plans},
                 lambda: intervener.call(_more_recipients, intervener, view, pool, use_masks, cfg, results))
    for plan in [p for p in plans if (p.class_id, p.cluster) in out.results]:
        grow.until_decided(plan)
    out.forwards = intervener.forwards - start
    out.grow = grow
    return out


@dataclass
class _Grow:
    """Sequential testing: a group whose verdict is undecided (a rate whose 95% interval straddles its
    threshold) is tested on more of its images, doubling its sample up to ``cfg.sequential_max`` while
    its budget lasts (as large as the planned tests', counted from ``start``: the growth's own
    spending).  An identity-keeping edit is judged against the other class it flips most, at
    the end of that class's interval: where that class ran the edit on fewer images (the screening's 8
    leave 0 of 8 at 0-32%), its sample grows first, to this class's size; more images of this class
    alone could never decide it."""

    intervener: object
    results: list
    pool: Pool
    size: tuple
    regions: dict
    masked: bool
    cfg: Config
    out: CausalTests
    start: int
    plans: dict = field(default_factory=dict)  # {(class_id, cluster): TestPlan}, grown samples included
    more: object = None  # () -> Recipients | None: images past the pool, loaded on first need
    _extra: object = None  # what ``more`` gave (False: nothing)
    _loaded: dict = field(default_factory=dict)  # {plan: Sample}: a transplant grown again reloads nothing
    seen: dict = field(default_factory=dict)  # {(class_id, cluster, probe, place): ids a grown test ran on}
    _first: dict = field(default_factory=dict)  # {(class_id, cluster): the planned sample's ids}

    def __post_init__(self):
        self._first = {k: frozenset(p.ids) for k, p in self.plans.items()}

    def _seen(self, key: tuple, t) -> frozenset:
        """The images of group ``key`` the test ``t`` ran on: the planned sample's, and those it grew by
        (another test's growth leaves it where it was)."""
        return self.seen.get((*key, t.probe, t.place), self._first.get(key, frozenset()))

    def until_decided(self, plan: TestPlan) -> None:
        key = (plan.class_id, plan.cluster)
        while True:
            res = self.out.results[key]
            v = self._verdict(plan, res)
            if v is None or v.undecided is None:
                return  # decided
            if self._grow_placebo(plan.class_id, v.undecided) or self._grow_transplant(plan, v.undecided):
                continue
            t, seen, more, keep, why = self._next(key, plan, res, v.undecided)
            if why:
                self._stopped(key, t, why)
                return
            extra = self._run(replace(plan, ids=tuple(sorted(more))), keep)
            if extra is None:
                return
            self.out.results[key] = merge(res, extra)
            self.out.extended += 1
            for probe, place in keep:
                self.seen[(*key, probe, place)] = seen | frozenset(more)
            plan = replace(plan, ids=tuple(sorted(set(plan.ids) | set(more))))
            self.plans[key] = plan

    def _next(self, key: tuple, plan: TestPlan, res: CausalResult, undecided) -> tuple:
        """The test to grow: ``undecided``, or where every image of the group (or ``sequential_max``) has
        tested it, another test that still straddles its rule; with the images it has seen, its next
        images, the tests to run and why it cannot grow ("" when it can)."""
        first = self._step(key, plan, undecided)
        if first[-1] not in ("all", "max"):
            return first
        for t in self._straddling(plan, res):
            if (t.probe, t.place) == (undecided.probe, undecided.place):
                continue
            step = self._step(key, plan, t)
            if step[-1] not in ("all", "max"):
                return step if not step[-1] else first
        return first

    def _step(self, key: tuple, plan: TestPlan, t) -> tuple:
        """``(t, images it has seen, its next images, the tests to run, why it cannot grow or "")``."""
        seen = self._seen(key, t)
        # the test's next images: those another test grew by are new to this one
        more = [i for i in sample_ids(list(plan.pool), 2 * len(seen)) if i not in seen]
        keep = _kept(t)
        return t, seen, more, keep, self._why_not(t, seen, plan, len(more) * (1 + len(keep)))

    def _straddling(self, plan: TestPlan, res: CausalResult) -> list:
        """The group's other tests still straddling their rules (:func:`audit.scan.verdict.straddling`)."""
        g = self._group(plan)
        if g is None:
            return []
        f, cfg = g
        return straddling(res, self.out.others(plan.class_id), cfg, self.out.density,
                          f.peak_place.share_low >= cfg.place_share_low)

    def _why_not(self, t, seen: frozenset, plan: TestPlan, cost: int) -> str:
        """Why the undecided test ``t`` cannot run on more images of its group, or "" (the reasons:
        :data:`audit.scan.verdict.STOPPED`)."""
        if not t.spec.grows:
            return "recipients"  # a transplant: its recipients did not grow either
        if len(seen) >= len(plan.pool):
            return "all"
        if len(seen) >= self.cfg.sequential_max:
            return "max"
        return "budget" if self.intervener.forwards - self.start + cost > self.out.budget else ""

    def _stopped(self, key: tuple, t, why: str) -> None:
        res = self.out.results[key]
        self.out.results[key] = replace(res, stopped={**res.stopped, (t.probe, t.place): why})

    def again(self, class_ids, flagged: frozenset) -> None:
        """:meth:`until_decided` for every tested group of ``class_ids``, the ``flagged`` classes no
        identity placebo; what it costs is added to ``out.forwards`` (the growth budget is the same)."""
        before = self.intervener.forwards
        for key, plan in list(self.plans.items()):
            if key[0] in class_ids and key in self.out.results:
                self.out.flagged_before[key[0]] = flagged
                self.until_decided(plan)
        self.out.forwards += self.intervener.forwards - before

    def _grow_placebo(self, class_id: int, t) -> bool:
        """Test the identity-keeping edit ``t`` on more images of the other class it flips most, among those
        not flagged before (a transplant: on more of that class's recipients), where that class ran it on
        fewer images than ``t``; False when there is nothing to grow or no budget."""
        if not t.spec.keeps_identity or not (t.spec.grows or t.spec.more_recipients):
            return False
        flagged = self.out.flagged_before.get(class_id, frozenset())  # no placebo (:meth:`CausalTests.others`)
        others = [(k, o) for k, r in self.out.results.items() if k[0] != class_id and k[1] is None
                  and k[0] not in flagged for o in r.tests if o.place == t.place and o.probe == t.probe and o.n]
        if not others:
            return False
        top = identity_placebo([o for _, o in others])
        key = next(k for k, o in others if o is top)
        other = self.plans.get(key)
        if other is None or top.n >= t.n:
            return False
        if not t.spec.grows:
            return self._grow_transplant(other, top, t.n - top.n)
        taken = self._seen(key, top)
        more = [i for i in other.pool if i not in taken][:t.n - top.n]
        edits = sum(o.probe == t.probe for o in self.out.results[key].tests)  # the probe runs all of its edits
        if not more or self.intervener.forwards - self.start + len(more) * (1 + edits) > self.out.budget:
            return False
        extra = self._run(replace(other, ids=tuple(sorted(more))), {(t.probe, t.place)})
        if extra is None:
            return False
        self.out.results[key] = merge(self.out.results[key], extra)
        self.out.extended += 1
        self.seen[(*key, t.probe, t.place)] = taken | frozenset(more)
        self.plans[key] = replace(other, ids=tuple(sorted(set(other.ids) | set(more))))
        return True

    def _grow_transplant(self, plan: TestPlan, t, want: int | None = None) -> bool:
        """The transplant ``t`` (a probe with ``more_recipients``: the colour or the background
        transplant) given to the next ``want`` (default: as many as it had, so its recipients double)
        images of other classes (the pool's, ``cfg.donors`` across classes, then the images past it, up
        to ``cfg.sequential_max``), its counts added.  It runs even when the budget is spent:
        ``sequential_max`` bounds its cost (two forward passes a recipient)."""
        if not t.spec.more_recipients or self.pool.recipients is None:
            return False
        want = t.n if want is None else max(want, self.cfg.min_recipients)
        rec = self._recipients(plan.class_id, t.n + want)
        if rec is None or len(rec.images) < t.n + self.cfg.min_recipients:
            return False
        # no budget check: sequential_max bounds it (at most 2 x 128 forward passes a test, a few seconds)
        rest = rec.rows(t.n, t.n + want)
        if plan not in self._loaded:
            self._loaded[plan] = _sample(self.intervener, self.results, plan, self.pool, self.size, self.regions,
                                         self.masked, self.cfg)
        s = self._loaded[plan]
        tr = None if s is None else self.intervener.call(t.spec.transplant_into, self.intervener.predict, s, rest,
                                                         CHUNK)
        if tr is None:
            return False
        key = (plan.class_id, plan.cluster)
        res = self.out.results[key]
        same = [x for x in res.tests if (x.probe, x.place) == (t.probe, t.place)]
        if not same:
            return False
        n, k = same[0].n + tr.n, same[0].k + int(round(tr.rate * tr.n))
        grown = replace(same[0], n=n, k=k, flip_rate=k / n, transplant=k / n, transplant_n=n)
        self.out.results[key] = replace(res, tests=[grown if x is same[0] else x for x in res.tests])
        self.out.extended += 1
        return True

    def _recipients(self, class_id: int, n: int) -> Recipients | None:
        """Up to ``n`` (at most ``cfg.sequential_max``) images of other classes: the pool's, then the
        images past it (loaded once, when the pool has too few)."""
        cfg = self.cfg.replace(recipients=min(n, self.cfg.sequential_max))
        rec = self.pool.recipients.for_class(class_id, cfg)
        if (rec is not None and len(rec.images) >= cfg.recipients) or self.more is None:
            return rec
        if self._extra is None:
            self._extra = self.more() or False
        return self.pool.recipients.join(self._extra).for_class(class_id, cfg) if self._extra else rec

    def _group(self, plan: TestPlan) -> tuple | None:
        """The group's features and thresholds (a cluster may have its own), or None."""
        r = next((r for r in self.results if r.class_id == plan.class_id), None)
        if r is None:
            return None
        if plan.cluster is None:
            return r.features, self.cfg
        c = next((c for c in r.clusters if c.cluster == plan.cluster), None)
        return None if c is None else (c.features, c.cfg or self.cfg)

    def _verdict(self, plan: TestPlan, res: CausalResult):
        g = self._group(plan)
        return None if g is None else assess(g[0], g[1], res, self.out.others(plan.class_id), self.out.density)

    def _run(self, plan: TestPlan, keep: set) -> CausalResult | None:
        """The kept tests (no screening, no transplants) on the new images of ``plan``."""
        s = _sample(self.intervener, self.results, plan, self.pool, self.size, self.regions, self.masked, self.cfg)
        if s is None:
            return None
        s.places = [p for p in s.places if ("place", p.name) in keep]
        s.recipients = None
        probes = [p for p in PROBES.values() if any(k[0] == p.name for k in keep)]
        return self.intervener.call(causal_tests, self.intervener.predict, s, self.cfg.replace(screen=0), probes)


def _kept(t) -> set:
    """The tests a grown sample runs: the undecided one (with its placebo, for a place) alone, since
    the others' rates, each with its own count, were decided on the images they had."""
    keep = {(t.probe, t.place)}
    return keep | {("placebo", t.place)} if t.spec.is_place else keep


def merge(res: CausalResult, extra: CausalResult) -> CausalResult:
    """``res`` with the counts of the same tests (probe, place, fill) on more images added."""
    more = {(t.probe, t.place, t.fill): t for t in extra.tests if t.n}
    tests = []
    for t in res.tests:
        e = more.get((t.probe, t.place, t.fill))
        if e is not None and t.n:
            n, k = t.n + e.n, t.k + e.k
            t = replace(t, n=n, k=k, flip_rate=k / n)
        tests.append(t)
    return replace(res, n=res.n + extra.n, tests=tests)
