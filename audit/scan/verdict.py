"""The verdict of one group (a class or a cluster): suspicion, cue and a one-sentence evidence.

:func:`assess` combines the attention scores of a :class:`GroupFeatures`
(:func:`place_score`, :func:`audit.scan.robust.fixed_place_score`, :func:`diffuse_score`,
:func:`off_object_score`) with the intervention's :func:`confirmation`.
Pure functions; docs/scan.md explains every rule and threshold.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from audit.scan.config import BORDER_AREA, DEFAULT, Config
from audit.scan.features import GroupFeatures, Place
from audit.scan.intervene import FlipResult
from audit.scan.robust import fixed_place_score
from audit.scan.values import clip01, finite, pct


@dataclass
class Verdict:
    """The scan's judgement of one group."""

    verdict: str = "insufficient_data"  # shortcut_suspected | ok | insufficient_data
    suspicion: float = math.nan
    attention_suspicion: float = math.nan
    cue: str = ""
    cue_kind: str = ""  # region | border | fixed | hotspot | object | ""
    cue_box: list | None = None
    masked: bool = False
    flips: FlipResult | None = None
    confirmation: float | None = None
    evidence: str = ""

    @property
    def suspected(self) -> bool:
        return self.verdict == "shortcut_suspected"


def place_score(share: float, area: float) -> float:
    """How much a place dominates the attention: 0 at (or below) its area share, 1 when it holds nearly all.

    ``d = (share - area) / (1 - area)`` is the share of the energy *above
    uniform* (0 = as much as its area, 1 = all of it); the score ramps from
    d = 0.25 to d = 0.6.
    """
    if not (finite(share) and finite(area)) or area >= 1.0:
        return 0.0
    d = (share - area) / (1.0 - area)
    return clip01((d - 0.25) / 0.35)


def diffuse_score(entropy: float, concentration: float) -> float:
    """Attention spread over the whole image; capped at 0.35: never a verdict by itself."""
    if not (finite(entropy) and finite(concentration)) or concentration > 0.25:
        return 0.0
    return 0.35 * clip01((entropy - 0.9) / 0.07)


def off_object_score(energy_object: float, pointing: float) -> float:
    """Attention off the object: the peak misses it (weight 0.6) and little energy is on it (0.4)."""
    s_point = clip01((0.6 - pointing) / 0.4) if finite(pointing) else 0.0
    s_energy = clip01((0.4 - energy_object) / 0.3) if finite(energy_object) else 0.0
    return 0.6 * s_point + 0.4 * s_energy


def confirmation(flips: FlipResult | None) -> float | None:
    """0..1 from the intervention: 1 = the shortcut is confirmed, 0 = refuted, None = not run.

    Confirmed by a cue flip rate well above noise (ramp 0.1 -> 0.4) or by an
    object whose removal barely matters (flip rate ramp 0.3 -> 0.05).
    """
    if flips is None:
        return None
    parts = []
    if finite(flips.flip_rate_cue):
        parts.append(clip01((flips.flip_rate_cue - 0.1) / 0.3))
    if finite(flips.flip_rate_object):
        parts.append(clip01((0.3 - flips.flip_rate_object) / 0.25))
    return max(parts) if parts else None


@dataclass(frozen=True)
class _Candidate:
    score: float
    place: Place


def best_place(f: GroupFeatures) -> _Candidate:
    """The strongest candidate cue place (named regions, the border, a fixed place)."""
    cands = [_Candidate(place_score(p.share, p.area), p) for p in f.places]
    fixed = fixed_place_score(f.peak_place)
    cands.append(_Candidate(fixed, Place("fixed", "fixed place", box=f.hot_box)))
    # ties: a named region first (the user's hypothesis), then a fixed place, then the border
    rank = {"region": 0, "fixed": 1, "border": 2}
    cands.sort(key=lambda c: (-c.score, rank[c.place.kind]))
    return cands[0]


def _insufficient(f: GroupFeatures, cfg: Config, flips) -> Verdict:
    why = f"{f.n} usable heatmap{'' if f.n == 1 else 's'}" + (f" ({f.n_flat} flat)" if f.n_flat else "")
    return Verdict(flips=flips, evidence=f"Only {why}; {cfg.min_images} are needed for a verdict.")


def assess(f: GroupFeatures, cfg: Config = DEFAULT, flips: FlipResult | None = None) -> Verdict:
    """Suspicion (0..1), verdict, cue and a one-sentence evidence for one group.

    Args:
        f: from :func:`audit.scan.features.group_features`.
        cfg: the thresholds.
        flips: from :func:`audit.scan.intervene.flip_rates`, or None when not run.

    Returns:
        A :class:`Verdict`.
    """
    if f.n < cfg.min_images:
        return _insufficient(f, cfg, flips)
    m = f.means
    best = best_place(f)
    s_diffuse = diffuse_score(m["entropy"], m["concentration"])
    masked = f.n_masked >= cfg.mask_min_n and f.n_masked >= cfg.mask_min_frac * f.n
    res = Verdict(masked=masked, flips=flips)
    s_attn = off_object_score(m["energy_object"], m["pointing_hit"]) if masked else max(best.score, s_diffuse)
    if best.score >= 0.3:
        p = best.place
        res.cue = f"region:{p.name}" if p.kind == "region" else p.name
        res.cue_kind, res.cue_box = p.kind, p.box
    elif (masked and s_attn >= cfg.threshold) or (not masked and s_diffuse > 0):
        res.cue, res.cue_kind, res.cue_box = "background", "hotspot", f.hot_box
    elif masked:
        res.cue, res.cue_kind = "object", "object"
    res.attention_suspicion = s_attn
    res.confirmation = confirmation(flips)
    c = res.confirmation
    res.suspicion = s_attn if c is None else s_attn * (0.3 + 0.7 * c)
    res.verdict = "shortcut_suspected" if res.suspicion >= cfg.threshold else "ok"
    res.evidence = evidence(f, res, best.place)
    return res


def _where(f: GroupFeatures, res: Verdict, best: Place) -> str:
    kind = res.cue_kind
    if kind == "region":
        return f"{pct(best.share)} of the attention lies in region '{best.name}' ({pct(best.area)} of the image)"
    if kind == "border":
        return f"{pct(best.share)} of the attention lies in the outer 10% border ({pct(BORDER_AREA)} of the image)"
    if kind == "fixed":
        pp = f.peak_place
        return (f"{pct(pp.share)} of the peaks stay within {pp.radius:.2f} of one place (x={pp.x:.2f}, "
                f"y={pp.y:.2f}) away from the image centre")
    if kind == "hotspot":
        hx, hy = f.hot_xy
        at = f", strongest around x={hx:.2f}, y={hy:.2f}" if finite(hx) else ""
        return f"the attention is spread over the background (entropy {f.means['entropy']:.2f}{at})"
    return ""


def _flip_text(flips: FlipResult | None) -> str:
    if flips is None:
        return ""
    fl = []
    if finite(flips.flip_rate_cue):
        fl.append(f"occluding the cue changes {pct(flips.flip_rate_cue)} of {flips.n_cue} predictions")
    if finite(flips.flip_rate_object):
        fl.append(f"occluding the object {pct(flips.flip_rate_object)} of {flips.n_object}")
    return ", ".join(fl)


def evidence(f: GroupFeatures, res: Verdict, best: Place) -> str:
    """One human sentence: what the attention does and where, and what the intervention showed."""
    m = f.means
    parts = []
    where = _where(f, res, best)
    if res.masked:
        parts.append(f"{pct(m['energy_object'])} of the attention is on the object and the peak hits it in "
                     f"{pct(m['pointing_hit'])} of {f.n_masked} masked images")
        if where and res.cue_kind != "object":
            parts.append(where)
        if finite(f.object_spread) and finite(f.peak_object_dist) and f.object_spread > 0.08 \
                and f.peak_object_dist > 0.25 and res.attention_suspicion >= 0.5:
            parts.append(f"the peaks stay {f.peak_object_dist:.2f} of the image away from the "
                         "objects as they move")
    elif where:
        parts.append(where)
    else:
        pp = f.peak_place
        parts.append(f"the attention moves with the image ({pct(pp.share)} of the peaks within "
                     f"{pp.radius:.2f} of any one place) and no region or the border dominates")
    flip = _flip_text(res.flips)
    if flip:
        parts.append(flip)
    text = "; ".join(parts)
    if res.verdict == "ok" and res.attention_suspicion >= 0.5 and res.confirmation is not None:
        text += " - the intervention does not confirm a shortcut"
    elif res.verdict == "ok" and 0 < res.attention_suspicion < 0.5 and res.cue_kind == "hotspot" \
            and not res.masked:
        text += " - diffuse attention alone is not a shortcut"
    return text[0].upper() + text[1:] + "."
