"""The bank of places the place test fills one at a time."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from audit.engine.stats import border_mask, box_mask
from audit.scan.config import DEFAULT, Config
from audit.scan.probes.base import Where

HOT_AREA = "hot area"  # the place name of a group's hot area (a contract value of the ``place`` column)


@dataclass(frozen=True)
class Spot:
    """A place to occlude: its name (``border:4%``, ``edge:top``, ``corner:top_left``,
    ``cell:left``, ``region:<name>``, ``hot area``), box (x0, y0, x1, y1 fractions; None for a band), pixels and kind."""

    name: str
    box: tuple | None
    mask: np.ndarray = field(repr=False, compare=False)
    where: Where = Where.REGION

    @property
    def area(self) -> float:
        return float(self.mask.mean())


def place_bank(size, regions: dict | None = None, hot_box=None, cfg: Config = DEFAULT,
               cells: bool = False) -> list[Spot]:
    """The fixed places tested for every class, at the model input ``size`` (H, W).

    Border bands (``cfg.border_widths``), each edge (``cfg.edge_width``),
    each corner (``cfg.corner_side``), with ``cells`` the middle cell of each
    side of the grid the corners belong to (a mark inside the image, off
    every edge band, is in one of them; not the centre cell: without masks
    that is where objects usually sit, and occluding it hides them), each
    named region, and the class's hot area (``hot_box``) when given.
    """
    places = [Spot(f"border:{round(100 * w)}%", None, border_mask(size, w), Where.BORDER) for w in cfg.border_widths]
    e, c = cfg.edge_width, cfg.corner_side
    boxes = {"edge:top": (0, 0, 1, e), "edge:bottom": (0, 1 - e, 1, 1), "edge:left": (0, 0, e, 1),
             "edge:right": (1 - e, 0, 1, 1),
             "corner:top_left": (0, 0, c, c), "corner:top_right": (1 - c, 0, 1, c),
             "corner:bottom_left": (0, 1 - c, c, 1), "corner:bottom_right": (1 - c, 1 - c, 1, 1)}
    if cells:
        boxes.update({"cell:top": (c, 0, 1 - c, c), "cell:left": (0, c, c, 1 - c), "cell:right": (1 - c, c, 1, 1 - c),
                      "cell:bottom": (c, 1 - c, 1 - c, 1)})
    kinds = {name: Where.EDGE if name.startswith("edge:") else Where.CELL if name.startswith("cell:")
             else Where.CORNER for name in boxes}
    for r, b in (regions or {}).items():
        boxes[f"region:{r}"] = tuple(float(v) for v in b)
        kinds[f"region:{r}"] = Where.REGION
    if hot_box is not None:
        boxes[HOT_AREA] = tuple(float(v) for v in hot_box)
        kinds[HOT_AREA] = Where.HOT
    for name, b in boxes.items():
        m = box_mask(b, size)
        if m.any():
            places.append(Spot(name, tuple(float(v) for v in b), m, kinds[name]))
    return places


def spot_named(name: str, size, box=None, regions: dict | None = None, cfg: Config = DEFAULT) -> Spot | None:
    """The bank's place called ``name`` at ``size`` (the hot area from ``box``), or a box given; None if unknown."""
    for s in place_bank(size, regions, box if name == HOT_AREA else None, cfg, cells=True):
        if s.name == name:
            return s
    if box is not None:
        return Spot(name, tuple(float(v) for v in box), box_mask(box, size), Where.REGION)
    return None
