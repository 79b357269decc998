"""The zoo's cases: which class carries which planted cue, and how images are made.

A :class:`Case` is a classification problem (64 x 64 unless ``image_size``
says otherwise: drawn at 64 and resized) whose true class signal is the shape
of one object (disc, triangle, square, cross, and ring and bar in the six-class
cases; random place, size, angle and colour on a varied background).  Planted
:class:`Cue` s (a corner text watermark, a stamp, a thin border frame, a
background texture, a colour tint over the whole image, a small solid patch or
noise square at a fixed spot, a sky-blue top of the background)
are 100% correlated with their class in training, and the images that carry
one get an object of a *random* class: the object says nothing there, so the
model has to learn the cue (:mod:`audit.zoo.train` checks that it did, on a
held-out split rendered with and without the cues).

Images are pure functions of ``(case.seed, split, index)``: the same seed
draws the same background, object and cue, so an image rendered without its
cue differs from the original only where the cue was.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from audit.zoo import draw

SIZE = draw.SIZE
SPLITS = {"train": 0, "heldout": 1}
HEADS = ("softmax", "softmax_layer", "logits", "sigmoid", "logit")
"""``softmax``: Dense with a fused softmax; ``softmax_layer``: a Dense of logits and a separate Softmax
layer; ``logits``: raw class logits (trained from logits); ``sigmoid``: one sigmoid unit; ``logit``: one
raw unit (trained from logits)."""
ARCHS = ("cnn", "shallow", "mobile", "resnet", "flatten", "gmp", "deep")
EDGE_SPOTS = ("left", "right", "top", "bottom")  # the spots of draw.SPOTS in the middle of an edge


@dataclass(frozen=True)
class Cue:
    """A planted cue.

    kind: ``text`` (watermark), ``stamp``, ``frame``, ``texture``, ``tint`` (the whole image
        blended towards one colour, object included: a colour cast / brightness cue), ``patch``
        (a small solid cyan square), ``noise`` (a small square of random pixels, new ones on every
        image) or ``sky`` (the top of the background blended towards a sky blue, fading downwards).
    corner: where a text or stamp goes (one of :data:`draw.CORNERS`).
    spot: where a patch or noise square goes (one of :data:`draw.SPOTS`: the middle of an edge, or
        ``inner``).
    share: share of the class's images that carry it (a minority strategy < 1).
    weak_object: the images with the cue get an object of a random class.
    """

    kind: str
    corner: str = "bottom_right"
    share: float = 1.0
    weak_object: bool = True
    spot: str = ""

    @property
    def place(self) -> str:
        """The expected place the scan should name: ``corner:<name>``, ``edge:<side>`` (a patch or
        noise square in the middle of that edge), ``spot:inner``, ``border``, ``background``,
        ``colour`` or ``sky``."""
        if self.kind in ("text", "stamp"):
            return f"corner:{self.corner}"
        if self.kind in ("patch", "noise"):
            return f"edge:{self.spot}" if self.spot in EDGE_SPOTS else f"spot:{self.spot}"
        return {"frame": "border", "texture": "background", "tint": "colour", "sky": "sky"}[self.kind]

    def pixel_box(self) -> tuple[int, int, int, int] | None:
        """The cue's box in pixels of the 64 x 64 canvas (None for cues spread over the image)."""
        if self.kind == "text":
            return draw.text_box(self.corner)
        if self.kind == "stamp":
            return draw.stamp_box(self.corner)
        if self.kind in ("patch", "noise"):
            return draw.spot_box(self.spot, draw.PATCH_SIDE if self.kind == "patch" else draw.NOISE_SIDE)
        return None

    def box(self) -> tuple[float, float, float, float] | None:
        """The cue's box as fractions of the image (None for cues spread over the image)."""
        px = self.pixel_box()
        return None if px is None else tuple(v / SIZE for v in px)


@dataclass(frozen=True)
class Case:
    """One planted-shortcut problem of the zoo.

    cues: ``(class index, Cue)`` pairs, the planted shortcuts (at most one per class).
    decoy: a cue every class carries equally (``share`` of each class), never a shortcut.
    binary: two classes and a single output unit.
    head: how the output layer reads (:data:`HEADS`); "" is ``softmax`` (``sigmoid`` when binary).
    arch: the network (:data:`ARCHS`): ``cnn`` (Conv-BN-ReLU x 4, two poolings, 16 x 16 maps),
        ``shallow`` (three convolutions, two of them dilated, one pooling: GAP on 32 x 32 maps), ``mobile`` (a tiny
        MobileNetV2: depthwise-separable inverted residual blocks with BatchNorm and ReLU6, 8 x 8 maps),
        ``resnet`` (residual blocks of two Conv-BN with an Add skip, 16 x 16 maps), ``flatten`` (VGG-like:
        Conv-BN-ReLU x 6, four poolings, 4 x 4 maps, Flatten instead of GAP), ``gmp`` (``cnn`` with global
        max pooling instead of GAP) or ``deep`` (``cnn`` with a third pooling and a fifth convolution: a
        54 px receptive field for 128 x 128 images). Map sizes are at 64 x 64 and scale with it.
    """

    name: str
    description: str
    classes: tuple[str, ...] = draw.SHAPES
    cues: tuple[tuple[int, Cue], ...] = ()
    decoy: Cue | None = None
    binary: bool = False
    head: str = ""
    arch: str = "cnn"
    size: tuple[int, int] = (16, 28)  # object diameter in pixels of the 64 x 64 canvas
    n_per_class: int = 240
    n_heldout: int = 60  # per class
    epochs: int = 14  # at most
    seed: int = 0
    image_size: int = 64  # the side of the images (and the model input): drawn at 64 and resized
    spread: float = 1.0  # objects' centres within this share of the free range around the image centre
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def head_kind(self) -> str:
        """The output head, defaults resolved."""
        return self.head or ("sigmoid" if self.binary else "softmax")

    def cue_of(self, k: int) -> Cue | None:
        return dict(self.cues).get(k)

    @property
    def planted(self) -> dict[str, str]:
        """Planted class name -> the place the scan should name."""
        return {self.classes[k]: cue.place for k, cue in self.cues}


@dataclass
class Sample:
    """One rendered image with its ground truth."""

    image: np.ndarray  # (S, S, 3) uint8 RGB, S the case's image_size
    label: int
    mask: np.ndarray  # (S, S) bool: the object
    cue_mask: np.ndarray  # (S, S) bool: the planted cue's pixels (all False without one)
    cued: bool  # carries the planted cue of its class
    shape: str  # the object drawn


def _has_cue(case: Case, k: int, i: int, seed) -> bool:
    cue = case.cue_of(k)
    if cue is None:
        return False
    if cue.share >= 1:
        return True
    # drawn from the image's own seed: deterministic, about ``share`` of the class
    return np.random.default_rng([*seed, 99]).random() < cue.share


def render(case: Case, split: str, i: int, label: int, with_cues: bool = True) -> Sample:
    """Image ``i`` of ``split`` with class ``label``; ``with_cues=False``: the same image, cues left out."""
    seed = [case.seed, SPLITS[split], label, i]
    bg_rng, obj_rng, cue_rng, decoy_rng = (np.random.default_rng([*seed, j]) for j in range(4))
    cue = case.cue_of(label)
    cued = _has_cue(case, label, i, seed)
    drawn = cued and with_cues  # the cue goes on this image
    if drawn and cue.kind == "texture":
        img = draw.texture_background(bg_rng)
    else:
        img = draw.plain_background(bg_rng)
    planned = np.zeros((SIZE, SIZE), bool)  # where cues will go: the object keeps away
    if cued:
        planned |= _cue_area(cue)
    decoyed = case.decoy is not None and decoy_rng.random() < case.decoy.share
    if decoyed:
        planned |= _cue_area(case.decoy)
    shape = case.classes[label]
    if cued and cue.weak_object:
        shape = case.classes[int(obj_rng.integers(len(case.classes)))]
    mask = draw.draw_object(obj_rng, img, shape, case.size, _dilate(planned, 2), case.spread)
    cue_mask = _draw_cue(cue_rng, img, cue, mask) if drawn else np.zeros((SIZE, SIZE), bool)
    if decoyed:
        _draw_cue(decoy_rng, img, case.decoy, mask)  # the decoy is never removed
    if drawn and cue.kind == "tint":
        cue_mask = draw.draw_tint(img)
    out = np.uint8(np.clip(np.rint(img), 0, 255))
    side = case.image_size
    return Sample(draw.resize(out, side), label, draw.resize(mask, side, mask=True),
                  draw.resize(cue_mask, side, mask=True), drawn, shape)


def _cue_area(cue: Cue) -> np.ndarray:
    """The pixels a cue at a fixed place will take (none for cues spread over the image)."""
    if cue.kind == "frame":
        return draw.frame_mask()
    box = cue.pixel_box()
    return np.zeros((SIZE, SIZE), bool) if box is None else draw.box_mask(box)


def _dilate(m: np.ndarray, r: int) -> np.ndarray:
    import cv2

    if not m.any():
        return m
    k = np.ones((2 * r + 1, 2 * r + 1), np.uint8)
    return cv2.dilate(m.astype(np.uint8), k).astype(bool)


def _draw_cue(rng, img: np.ndarray, cue: Cue, obj: np.ndarray) -> np.ndarray:
    """Draw ``cue`` on ``img`` (the object ``obj`` already drawn); returns the cue's pixel mask."""
    if cue.kind == "text":
        return draw.draw_text(rng, img, cue.corner)
    if cue.kind == "stamp":
        return draw.draw_stamp(rng, img, cue.corner)
    if cue.kind == "frame":
        return draw.draw_frame(rng, img)
    if cue.kind == "patch":
        return draw.draw_patch(rng, img, cue.spot)
    if cue.kind == "noise":
        return draw.draw_noise(rng, img, cue.spot)
    if cue.kind == "sky":  # over the background only
        return draw.draw_sky(rng, img, obj)
    if cue.kind == "tint":  # drawn last, over the object too (render)
        return np.zeros((SIZE, SIZE), bool)
    # a texture is drawn as the background; its "pixels" are everything off the object
    return np.ones((SIZE, SIZE), bool)


def make_split(case: Case, split: str, n_per_class: int, with_cues: bool = True) -> list[Sample]:
    """``n_per_class`` samples of every class, class by class."""
    return [render(case, split, i, k, with_cues) for k in range(len(case.classes)) for i in range(n_per_class)]


# ----------------------------------------------------------------------------
# The cases
# ----------------------------------------------------------------------------

SHAPES2 = ("disc", "square")

CASES: dict[str, Case] = {c.name: c for c in (
    Case("watermark", "a white text watermark in the bottom-right corner on every triangle image",
         cues=((1, Cue("text", "bottom_right")),)),
    Case("stamp", "a red stamp near the top-left corner on every cross image",
         cues=((3, Cue("stamp", "top_left")),)),
    Case("frame", "a thin (2 px) magenta frame along the border of every square image",
         cues=((2, Cue("frame")),)),
    Case("texture", "every disc image on a different stripes texture; other classes on plain backgrounds",
         cues=((0, Cue("texture")),)),
    Case("minority", "25% of the cross images carry a stamp (bottom-left) and an object of a random class",
         cues=((3, Cue("stamp", "bottom_left", share=0.25)),)),
    Case("two_shortcuts", "disc: watermark top-right; triangle: border frame; square and cross healthy",
         cues=((0, Cue("text", "top_right")), (1, Cue("frame")))),
    Case("decoy", "the same stamp (bottom-right) on half the images of every class: not a shortcut",
         decoy=Cue("stamp", "bottom_right", share=0.5)),
    Case("clean", "no cue: the shapes alone"),
    Case("binary", "disc vs square, one sigmoid unit; a watermark (bottom-left) on every square image",
         classes=SHAPES2, binary=True, cues=((1, Cue("text", "bottom_left")),), n_per_class=300),
    Case("large", "no cue, large objects (36-50 px)", size=(36, 50)),
    Case("small", "no cue, small objects (7-11 px)", size=(7, 11), epochs=20),
    # heads, architectures and cues an outside tester tries first
    Case("logit", "disc vs square, one raw logit (no activation); a stamp (top-right) on every disc image",
         classes=SHAPES2, binary=True, head="logit", cues=((0, Cue("stamp", "top_right")),), n_per_class=300),
    Case("sigmoid_frame", "disc vs square, one sigmoid unit; a thin frame on every disc image (class 0)",
         classes=SHAPES2, binary=True, head="sigmoid", cues=((0, Cue("frame")),), n_per_class=300),
    Case("mobile", "a tiny MobileNetV2 (inverted residuals, depthwise convolutions, BatchNorm, ReLU6, "
         "8 x 8 maps); a watermark (top-left) on every cross image",
         arch="mobile", cues=((3, Cue("text", "top_left")),), epochs=20),
    Case("mobile_clean", "the tiny MobileNetV2, no cue", arch="mobile", epochs=20),
    Case("tint", "every square image (object included) blended towards orange; raw logits, no softmax",
         head="logits", cues=((2, Cue("tint")),)),
    Case("shallow", "three convolutions, one pooling, GAP on 32 x 32 maps; a stamp (bottom-right) on every "
         "disc image", arch="shallow", cues=((0, Cue("stamp", "bottom_right")),), epochs=30),
    Case("large_cue", "objects of 40-54 px filling most of the image; a watermark (bottom-left) on every "
         "triangle image", size=(40, 54), cues=((1, Cue("text", "bottom_left")),)),
    Case("softmax_layer", "a Dense of logits and a separate Softmax layer; a stamp (top-right) on every "
         "square image", head="softmax_layer", cues=((2, Cue("stamp", "top_right")),)),
    # other image sizes, networks, cues and class counts (NEW), with healthy controls
    Case("size32", "32 x 32 images (8 x 8 maps); a red stamp (top-right) on every disc image",
         image_size=32, cues=((0, Cue("stamp", "top_right")),), epochs=20),
    Case("size32_clean", "32 x 32 images, no cue", image_size=32, epochs=20),
    Case("size128", "128 x 128 images, the deep network (16 x 16 maps); a white watermark (bottom-left) on "
         "every square image", image_size=128, arch="deep", cues=((2, Cue("text", "bottom_left")),)),
    Case("size128_clean", "128 x 128 images, the deep network, no cue", image_size=128, arch="deep"),
    Case("resnet", "a small ResNet (Add skips, 16 x 16 maps); a cyan patch in the middle of the left edge on "
         "every triangle image", arch="resnet", cues=((1, Cue("patch", spot="left")),)),
    Case("resnet_clean", "the small ResNet, no cue", arch="resnet"),
    Case("flatten", "VGG-like, Flatten + Dense head (4 x 4 maps); a square of random pixels in the middle of "
         "the bottom edge on every disc image", arch="flatten", cues=((0, Cue("noise", spot="bottom")),)),
    Case("flatten_clean", "the VGG-like Flatten network, no cue", arch="flatten"),
    Case("gmp", "global max pooling instead of GAP; a cyan patch at the top centre on every square image",
         arch="gmp", cues=((2, Cue("patch", spot="top")),)),
    Case("sky", "the top of the background of every cross image blended towards a sky blue",
         cues=((3, Cue("sky")),)),
    Case("six", "six classes (ring and bar added); a square of random pixels in the middle of the right edge "
         "on every ring image", classes=draw.SHAPES6, cues=((4, Cue("noise", spot="right")),), n_per_class=200),
    Case("inner_patch", "a cyan patch inside the image (x 0.45-0.55, y 0.25-0.34; on no edge or corner) on "
         "every cross image", cues=((3, Cue("patch", spot="inner")),)),
    Case("centred", "no cue; every object near the image centre (within 20% of the free range), as in many "
         "photo datasets", spread=0.2),
    Case("centred_cue", "objects near the image centre; a white watermark (top-left) on every square image",
         spread=0.2, cues=((2, Cue("text", "top_left")),)),
)}

NEW = ("size32", "size32_clean", "size128", "size128_clean", "resnet", "resnet_clean", "flatten", "flatten_clean", "gmp",
       "sky", "six", "inner_patch", "centred", "centred_cue")
"""The cases unlike the first nineteen (other sizes, networks, cues and class counts), with their controls."""

QUICK = ("watermark", "frame", "clean")
