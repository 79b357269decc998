"""Score a scan of a zoo case: were exactly the planted classes flagged, and is the cue named right?

A run is *right* when the set of flagged classes (verdict
``shortcut_suspected``) equals the set of planted classes and, for every
planted class, the scan's ``cue`` / ``cue_box`` points at the planted place:

* ``corner:<name>`` (a watermark or stamp): the cue names that corner
  (``bottom_right``, ``bottom-right``), or its ``cue_box`` overlaps the cue's
  box and covers at most :data:`MAX_CORNER_BOX` of the image (a box over the
  whole picture does not point anywhere);
* ``border`` (a thin frame): the cue names the border, the frame or an edge;
* ``background`` (a texture): the cue names the background or a texture;
* ``colour`` (a tint over the whole image): the cue names a colour, a tint or
  the background (the tint covers it);
* ``edge:<side>`` (a patch or noise square in the middle of that edge): the cue
  names that edge (``edge:left``), or its ``cue_box`` overlaps the cue's box and
  covers at most :data:`MAX_CORNER_BOX` of the image; ``border`` (all four
  edges) or a corner (the patch is in none) is wrong;
* ``spot:<name>`` (a patch inside the image, on no edge or corner): only a
  ``cue_box`` of at most :data:`MAX_CORNER_BOX` that overlaps it;
* ``sky`` (the top of the background blended towards blue): the cue names the
  background, a texture, the sky, a gradient, a colour or ``edge:top`` (the
  band's strongest part).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from audit.zoo.cases import Case

MAX_CORNER_BOX = 0.3
BORDER_WORDS = ("border", "frame", "edge")
BACKGROUND_WORDS = ("background", "texture")
COLOUR_WORDS = ("colour", "color", "tint", "background")
SKY_WORDS = ("background", "texture", "sky", "gradient", "colour", "color", "edge:top")


@dataclass
class Flag:
    """What the scan said about one class."""

    name: str
    verdict: str
    cue: str
    cue_box: list | None
    evidence: str


@dataclass
class Score:
    """The scoring of one scanned run."""

    planted: dict[str, str]  # class -> expected place
    flagged: list[str]
    cue_ok: dict[str, bool] = field(default_factory=dict)  # planted and flagged class -> cue right
    classes: dict[str, Flag] = field(default_factory=dict)

    @property
    def right(self) -> bool:
        return set(self.flagged) == set(self.planted) and all(self.cue_ok.get(c, False) for c in self.planted)

    def wrong_classes(self) -> list[str]:
        """Classes whose verdict or cue was wrong (missed, false flag or misplaced cue)."""
        out = [c for c in self.planted if c not in self.flagged or not self.cue_ok.get(c, False)]
        return out + [c for c in self.flagged if c not in self.planted]


def _overlap(a, b) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return max(0.0, w) * max(0.0, h)


def _box_points_at(cue_box, planted_box) -> bool:
    """A ``cue_box`` of at most :data:`MAX_CORNER_BOX` of the image that overlaps the planted box."""
    if cue_box is None or planted_box is None or len(cue_box) != 4:
        return False
    box = [float(v) for v in cue_box]
    area = (box[2] - box[0]) * (box[3] - box[1])
    return area <= MAX_CORNER_BOX and _overlap(box, planted_box) > 0


def place_matches(place: str, cue: str, cue_box, planted_box=None) -> bool:
    """Whether the scan's ``cue`` (and ``cue_box``) points at the planted ``place``."""
    name = (cue or "").lower().replace("-", "_").replace(" ", "_")
    if place.startswith(("corner:", "edge:", "spot:")):
        kind, where = place.split(":", 1)
        named = {"corner": where, "edge": place}.get(kind)  # "bottom_right", "edge:left"; a spot has no name
        return (named is not None and named in name) or _box_points_at(cue_box, planted_box)
    if place == "sky":
        return any(w in name for w in SKY_WORDS)
    if place == "border":
        return any(w in name for w in BORDER_WORDS)
    if place == "background":
        return any(w in name for w in BACKGROUND_WORDS)
    if place == "colour":
        return any(w in name for w in COLOUR_WORDS)
    raise ValueError(f"unknown place {place!r}")


def _cue_box(v):
    if v is None:
        return None
    try:
        return [float(x) for x in v]
    except TypeError:
        return None


def score(case: Case, classes_df) -> Score:
    """Score the scan's ``classes.parquet`` (a DataFrame) of ``case``."""
    flags = {}
    for r in classes_df.itertuples():
        flags[str(r.class_name)] = Flag(str(r.class_name), str(r.verdict), str(r.cue or ""),
                                        _cue_box(r.cue_box), str(r.evidence or ""))
    flagged = sorted(n for n, f in flags.items() if f.verdict == "shortcut_suspected")
    s = Score(case.planted, flagged, classes=flags)
    for k, cue in case.cues:
        name = case.classes[k]
        f = flags.get(name)
        if f is not None and f.verdict == "shortcut_suspected":
            s.cue_ok[name] = place_matches(cue.place, f.cue, f.cue_box, cue.box())
    return s
