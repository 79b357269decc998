"""What the causal tests cost: early stops of the screening, settled trials, edits that change nothing."""

import numpy as np

from audit.scan.config import DEFAULT
from audit.scan.probes import Sample, causal_tests
from audit.scan.probes.edits import spare_masks
from audit.scan.probes.places import place_bank
from audit.scan.probes.transplant import Recipients

S = 16


def noisy(n, seed=0):
    return np.random.default_rng(seed).integers(60, 200, (n, S, S, 3), dtype=np.uint8)


def constant(images):
    return np.zeros(len(images), int)


def corner_model(images):
    """Class 1 while the top-left corner is bright (a tag), else 0."""
    return (images[:, :3, :3].mean(axis=(1, 2, 3)) > 220).astype(int)


def test_a_test_that_flips_none_of_the_first_five_stops_there():
    bank = place_bank((S, S))
    res = causal_tests(constant, Sample(noisy(32), bank), DEFAULT)
    places = [t for t in res.tests if t.spec.is_place]
    assert len(places) == len(bank) and all(t.n == DEFAULT.screen_early == 5 and t.k == 0 for t in places)
    assert res.forwards["place"] == 5 * len(bank) and res.forwards["base"] == 5
    assert "placebo" not in res.forwards  # no place went on: no placebo


def test_a_place_that_flips_all_of_its_first_sixteen_is_settled_there():
    imgs = noisy(32)
    imgs[:, :3, :3] = 255
    res = causal_tests(corner_model, Sample(imgs, place_bank((S, S))), DEFAULT)
    corner = res.at("corner:top_left")
    assert corner.flip_rate == 1.0 and corner.n == DEFAULT.min_tested == 16
    assert res.placebo("corner:top_left").n == DEFAULT.screen  # none of 8 flipped: settled on them
    # a place that flipped some but not all of 16 (none here): the whole sample; one that flipped none stops at 5
    assert res.at("corner:bottom_right").n == 5


def test_an_edit_that_changes_nothing_is_not_predicted():
    grey = np.repeat(noisy(32)[..., :1], 3, axis=-1)  # grey images: turning them grey changes nothing
    masks = np.zeros((32, S, S), bool)
    masks[:, 4:12, 4:12] = True
    calls = []

    def model(images):
        calls.append(len(images))
        return constant(images)

    s = Sample(grey, [], masks, spare=spare_masks((S, S), masks))
    res = causal_tests(model, s, DEFAULT)
    for place in ("image:greyscale", "object:greyscale", "background:greyscale"):
        t = res.at(place)
        assert t.n == 5 and t.flip_rate == 0.0  # reported on its images, as if predicted
    assert all(res.forwards.get(k, 0) == 0 for k in ("image-greyscale", "object-greyscale", "background-greyscale"))
    assert sum(calls) == sum(res.forwards.values())  # every forward pass counted once


def test_the_colour_transplant_control_runs_only_where_colours_turned_some():
    imgs = noisy(32)
    pool = Recipients(noisy(16, seed=1), np.zeros(16, int))
    res = causal_tests(constant, Sample(imgs, [], recipients=pool, target=1), DEFAULT)
    t = res.at("image:colour-transplant")
    assert t.n == 16 and t.flip_rate == 0.0 and res.forwards["colour-transplant/follow-up"] == 16

    def colourful(images):  # class 1 when the image is reddish: the class's colours carry it
        return (images[..., 0].mean(axis=(1, 2)) > images[..., 2].mean(axis=(1, 2)) + 30).astype(int)

    red = imgs.copy()
    red[..., 0] = 250
    res = causal_tests(colourful, Sample(red, [], recipients=pool, target=1), DEFAULT)
    t = res.at("image:colour-transplant")
    assert t.flip_rate == 1.0 and res.forwards["colour-transplant/follow-up"] == 32  # given, then the control


def test_the_elementwise_edits_on_a_stack_equal_the_image_by_image_ones():
    from audit.scan.probes.edits import ELEMENTWISE, _attribute, attribute, each_image

    rng = np.random.default_rng(3)
    for channels in (1, 3):
        imgs = rng.integers(0, 256, (6, 20, 24, channels), dtype=np.uint8)
        m = rng.random((6, 20, 24)) < 0.4
        m[2] = False  # an image with nothing to edit stays as it was
        for kind in ELEMENTWISE:
            one = each_image(imgs, m, lambda img, mm, k=kind: _attribute(img, mm, k, 2.0, 1 / 16))
            np.testing.assert_array_equal(attribute(imgs, m, kind), one, err_msg=kind)
        shifted = attribute(imgs, np.ones((6, 20, 24), bool), "shift")  # by 2 px (1/16 of 24), edges repeated
        np.testing.assert_array_equal(shifted[:, 2:, 2:], imgs[:, :-2, :-2])
        np.testing.assert_array_equal(shifted[:, 0, 0], imgs[:, 0, 0])


def test_the_job_s_predictions_stand_for_the_unedited_images_only_where_the_pool_s_first_agree():
    from types import SimpleNamespace

    import pandas as pd

    from audit.scan.causal import Pool, _known, base_predictions, job_predictions

    ids = [f"img{i}" for i in range(64)]
    view = SimpleNamespace(df=pd.DataFrame({"image_id": ids, "status": "ok", "pred": [i % 3 for i in range(64)]}))
    recorded = job_predictions(view)
    assert recorded["img7"] == 1 and job_predictions(SimpleNamespace(df=view.df.drop(columns="pred"))) is None
    images = np.arange(64)[:, None]  # an "image" is its index; the model says index % 3, as the job did
    calls = []

    def model(x, shift=0):
        calls.append(len(x))
        return (x[:, 0] + shift * (x[:, 0] == 5)) % 3

    base, agreed = base_predictions(model, images, ids, recorded, DEFAULT.job_check)
    assert agreed and calls == [DEFAULT.job_check] == [16]  # the other 48 are the job's
    np.testing.assert_array_equal(base, np.arange(64) % 3)
    calls.clear()
    base, agreed = base_predictions(lambda x: model(x, shift=1), images, ids, recorded, 16)
    assert not agreed and calls == [16, 48] and base[5] == 0  # image 5 differs: every image predicted
    calls.clear()
    base, agreed = base_predictions(lambda x: np.zeros((len(x), 3), bool), images, ids, recorded, 16)
    assert not agreed and base.shape == (64, 3)  # multi-label: never the job's
    base, agreed = base_predictions(model, images, ids + ["new"], recorded, 16)
    assert not agreed  # an image the job did not record: all predicted
    pool = Pool(job_preds=recorded)
    np.testing.assert_array_equal(_known(pool, ["img4", "img5"]), [1, 2])
    assert _known(pool, ["img4", "nowhere"]) is None and _known(Pool(), ["img4"]) is None


def test_flips_to_several_classes_are_not_settled_at_sixteen():
    imgs = noisy(32)
    imgs[:, :3, :3] = 255

    def two_ways(images):  # the tag gone: class 1 for the even rows of the sample, 2 for the odd ones
        tag = images[:, :3, :3].mean(axis=(1, 2, 3)) > 220
        return np.where(tag, 0, 1 + (images[:, 5, 5, 0] % 2))

    res = causal_tests(two_ways, Sample(imgs, place_bank((S, S))), DEFAULT)
    corner = res.at("corner:top_left")
    assert corner.flip_rate == 1.0 and corner.n == 32  # every image flipped, to two classes: the whole sample
