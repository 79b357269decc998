"""The scan's thresholds and fixed names (docs/scan.md explains each value)."""

from __future__ import annotations

from dataclasses import dataclass

from audit.engine.methods import scan_preference

VERDICTS = ("shortcut_suspected", "ok", "insufficient_data")
METHOD_PREFERENCE = scan_preference()  # from the method registry (each method's scan_rank)
BORDER_AREA = 1.0 - 0.8 * 0.8  # the outer 10% band on every side
# background transforms (docs/scan.md, "Causal tests")
TEXTURE_SIGMA = 1 / 16  # the texture transform's Gaussian blur, fraction of the side (4 px at 64)
SPARE_HOT = 0.5  # without masks, the object is taken to be where its own map holds >= this of its maximum,
SPARE_MAX = 0.15  # ... in at most this share of the map's cells (the strongest), grown by one cell


@dataclass(frozen=True)
class Config:
    """Thresholds of the scan (docs/scan.md explains each)."""

    min_images: int = 20  # fewer explained maps in a class: insufficient_data
    min_cluster: int = 8  # a cluster with fewer maps than this gets insufficient_data ...
    min_cluster_share: float = 0.01  # ... and one with less than this share of its class
    max_k: int = 6  # most clusters per class
    min_eigengap: float = 0.1  # smaller largest eigengap: one cluster
    merge_radius: float = 0.1  # clustering: maps closer than this (Hellinger) count as one prototype
    max_prototypes: int = 2000  # clustering: most prototypes per class (all maps join one)
    place_radius: float = 0.05  # a peak this close to the modal place is at it (fraction of the side)
    minority_share: float = 0.1  # a class whose maps form one cluster is split into the maps peaking
    minority_off_centre: float = 0.3  # ... at an off-centre modal place (this far from the centre) and the rest,
    #                                   when at least this share and fewer than robust.PLACE_SHARE_LOW peak there
    grid: int = 16  # mean maps are stored at grid x grid; clustering uses grid/2
    threshold: float = 0.5  # suspicion at or above: shortcut_suspected
    mask_min_n: int = 8  # masked maps needed to judge by masks
    mask_min_frac: float = 0.25  # ... and share of the group
    # causal tests (docs/scan.md, "Causal tests", gives the reason for each value)
    sample: int = 32  # images per class (and per tested cluster) for the causal tests
    min_sample: int = 16  # smallest per-class sample when the cost budget is short
    fill: str = "mean"  # fill of the place tests: mean | blur
    budget: float = 0.1  # extra forward passes per audited image at most ...
    budget_floor: int = 2048  # ... but always this many (small jobs)
    cluster_attention_min: float = 0.5  # clusters tested when their attention suspicion reaches this
    cue_flip_min: float = 0.5  # a cue place flips at least this share of the class ...
    cue_specific_min: float = 0.3  # ... and this much more than it flips the other classes
    max_cue_area: float = 0.4  # without masks, larger places also hide objects: not a cue
    hot_cue_max_area: float = 0.2  # without masks, the hot area of a group whose peaks sit at one place, at most
    #                                this large, may be a cue (a pasted mark stays put; objects move)
    min_tested: int = 16  # a flip rate on fewer images is reported, never a verdict
    screen: int = 8  # every test is screened on this many images of a sample ...
    screen_min: float = 0.2  # ... and goes on to the rest when it flips at least this share of them
    absence_density_max: float = 1.0  # absence class: places where objects usually sit are not cues
    image_flip_min: float = 0.7  # a whole-image transform (it edits the object too) must flip this share
    object_flip_max: float = 0.25  # removing the object flips at most this share ...
    background_flip_min: float = 0.35  # ... while replacing the background flips at least this
    transplant_min: float = 0.2  # a flipping place pasted into other classes' images turns at least this share
    background_transplant_min: float = 0.4  # without masks: a class's backgrounds pasted around other classes'
    #                                         hot areas turn at least this share of them into the class

    def replace(self, **changes) -> Config:
        """A copy with some fields changed."""
        from dataclasses import replace

        return replace(self, **changes)


DEFAULT = Config()
