"""The scan's thresholds: one typed :class:`Config` (docs/scan.md explains each value and why).

Every threshold of the scan is a field here with its documented default;
no module of :mod:`audit.scan` keeps a number of its own beside it.  Fixed
names (the verdicts, the method order) are not thresholds.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from audit.engine.methods import scan_preference

VERDICTS = ("shortcut_suspected", "ok", "insufficient_data")
METHOD_PREFERENCE = scan_preference()  # from the method registry (each method's scan_rank)
BORDER_AREA = 1.0 - 0.8 * 0.8  # the outer 10% band on every side (the records' energy_border): a definition


@dataclass(frozen=True)
class Config:
    """Thresholds of the scan (docs/scan.md explains each)."""

    # ---- groups and clustering
    min_images: int = 20  # fewer explained maps in a class: insufficient_data
    min_cluster: int = 8  # a cluster with fewer maps than this gets insufficient_data ...
    min_cluster_share: float = 0.01  # ... and one with less than this share of its class
    max_k: int = 6  # most clusters per class
    min_eigengap: float = 0.1  # smaller largest eigengap: one cluster
    merge_radius: float = 0.1  # clustering: maps closer than this (Hellinger) count as one prototype
    max_prototypes: int = 2000  # clustering: most prototypes per class (all maps join one)
    grid: int = 16  # mean maps are stored at grid x grid; clustering uses grid/2
    edge_floor: float = 1e-4  # clustering: affinities below this are no edge (the parts they would join are apart)
    near_zero: float = 1e-3  # clustering: a Laplacian eigenvalue below this is a part barely joined to the rest
    # ---- where the peaks sit (robust.py)
    place_radius: float = 0.05  # a peak this close to the modal place is at it (fraction of the side) ...
    place_radius_cells: float = 0.75  # ... but never less than this many map cells (coarse maps)
    place_share_low: float = 0.6  # fixed-place score: the share's lower bound ramps from this (0) ...
    place_share_high: float = 0.9  # ... to this (1)
    share_z: float = 1.2816  # one-sided 90% Wilson bound of the share of peaks at one place
    centre_near: float = 0.15  # ... times the modal place's distance from the centre ramping from this (0)
    centre_far: float = 0.3  # ... to this (1)
    minority_share: float = 0.1  # a class whose maps form one cluster is split into the maps peaking
    minority_off_centre: float = 0.3  # ... at an off-centre modal place (this far from the centre) and the rest,
    #                                   when at least this share and fewer than place_share_low peak there
    # ---- attention
    threshold: float = 0.5  # suspicion at or above: shortcut_suspected
    mask_min_n: int = 8  # masked maps needed to judge by masks
    mask_min_frac: float = 0.25  # ... and share of the group
    # ---- causal tests: samples and budget
    sample: int = 32  # images per class (and per tested cluster) for the causal tests
    min_sample: int = 16  # smallest per-class sample when the cost budget is short
    sequential_max: int = 128  # an undecided group (a rate's 95% interval straddles its threshold) is tested
    #                            on more images, its sample doubling up to this many, while the budget lasts
    #                            (a transplant: its recipients, past the pool's, up to this many)
    fill: str = "mean"  # fill of the place tests: mean | blur
    budget: float = 0.1  # extra forward passes per audited image at most ...
    budget_floor: int = 2048  # ... but always this many (small jobs)
    donors: int = 64  # images in the pool of backgrounds, recipients and object positions, across classes
    job_check: int = 16  # the pool's first images predicted and compared with the job's predictions: all
    #                      equal, the job's stand for every other unedited image (the pool's rest, the samples')
    cluster_attention_min: float = 0.5  # clusters tested when their attention suspicion reaches this
    min_rate_n: int = 5  # fewer testable images: a test's rate is unknown (NaN)
    min_tested: int = 16  # a flip rate on fewer images is reported, never a verdict
    screen: int = 8  # every test is screened on this many images of a sample ...
    screen_min: float = 0.2  # ... and goes on to the rest when it flips at least this share of them
    screen_early: int = 5  # a test that flips none of the first this many is not screened further (one
    #                        flipping half the class flips none of 5 in 3% of samples, under 2 of 8 in 3.5%)
    promising: int = 3  # places expected to pass the screening, for planning the cost
    max_promising: int = 4  # at most this many places (besides named regions) go on after the screening
    object_screen_max: float = 0.5  # the background tests go on only while removing the object flips at most this
    # ---- causal tests: the edits
    border_widths: tuple = (0.04, 0.1)  # border bands of the place bank, fraction of each side (a 20% band,
    #                                    61% of the image, named no verdict's cue on the zoo and 107 draws)
    edge_width: float = 0.2  # each edge band of the bank
    corner_side: float = 1 / 3  # each corner box of the bank
    texture_sigma: float = 1 / 16  # the texture transform's Gaussian blur, fraction of the side (4 px at 64)
    spare_hot: float = 0.5  # without masks, the object is taken to be where its own map holds >= this of its
    spare_max: float = 0.15  # ... maximum, in at most this share of the map's cells (the strongest), grown by one
    # ---- causal tests: the rules
    cue_flip_min: float = 0.5  # a cue place flips at least this share of the class ...
    cue_specific_min: float = 0.3  # ... and this much more than it flips the other classes
    placebo_margin: float = 0.1  # ... and more than its placebo's rate (its box at random places) plus this
    max_cue_area: float = 0.4  # without masks, larger places also hide objects: not a cue
    hot_cue_max_area: float = 0.2  # without masks, the hot area of a group whose peaks sit at one place, at most
    #                                this large, may be a cue (a pasted mark stays put; objects move)
    absence_density_max: float = 1.0  # absence class: places where objects usually sit are not cues
    image_flip_min: float = 0.7  # a whole-image transform (it edits the object too) must flip this share
    identity_flip_min: float = 0.8  # an identity-keeping edit (greyscale, hue) must flip this share of the class
    identity_specific_min: float = 0.5  # ... and this much more than the other class it flips most (a clean zoo class
    #                                     flipped 70% of 128 (62-78%) under a hue rotation, others 12%)
    identity_shift: float = 1 / 16  # the shift edit moves the image by this share of its side (4 px at 64; an
    #                                 eighth flipped 47% of a healthy zoo class: objects near the edge were cut)
    colour_transplant_min: float = 0.35  # a class's colours given to other classes' images turn this share ...
    colour_transplant_specific: float = 0.1  # ... and this much more than another class's colours do (at the
    #                                          lower end of the difference's interval: the placebo's margin)
    object_flip_max: float = 0.25  # removing the object flips at most this share ...
    background_flip_min: float = 0.35  # ... while replacing the background flips at least this
    mention_flip: float = 0.2  # a place that flips less than this is not worth a mention in the evidence
    # ---- transplants (probes/transplant.py)
    transplant_from: float = 0.4  # a place is transplanted when its occlusion flipped at least this share
    max_transplant: int = 2  # at most this many places per sample (the most flipping, the smallest first)
    recipients: int = 16  # images of other classes that receive each place
    min_recipients: int = 8  # fewer: the transplant is not run (rate unknown)
    transplant_min: float = 0.2  # a flipping place pasted into other classes' images turns at least this share
    background_object_max: float = 0.5  # without masks the background transplant runs only while removing
    #                                     the hot area flips at most this
    background_transplant_min: float = 0.4  # without masks: a class's backgrounds pasted around other classes'
    #                                         hot areas turn at least this share of them into the class

    def replace(self, **changes) -> Config:
        """A copy with some fields changed."""
        return replace(self, **changes)


DEFAULT = Config()
