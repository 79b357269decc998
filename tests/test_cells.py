"""The grid cells inside the image: a mark away from every edge and corner is found without masks."""

import numpy as np

from audit.scan.config import DEFAULT
from audit.scan.probes import Sample, causal_tests
from audit.scan.probes.base import Where
from audit.scan.probes.places import place_bank, spot_named
from audit.scan.verdict import causal_cue

S = 48
MARK = (slice(20, 28), slice(33, 38))  # rows, columns: inside cell:right (x 32-48, y 16-32), off every edge band


def test_the_cells_and_the_corners_tile_the_image_once():
    bank = {p.name: p for p in place_bank((S, S), cells=True)}
    cells = [p for p in bank.values() if p.where is Where.CELL]
    assert sorted(p.name for p in cells) == ["cell:bottom", "cell:left", "cell:right", "cell:top"]
    np.testing.assert_allclose(bank["cell:right"].box, (2 / 3, 1 / 3, 1, 2 / 3))
    np.testing.assert_allclose(bank["cell:top"].box, (1 / 3, 0, 2 / 3, 1 / 3))
    grid = np.sum([p.mask for p in cells] + [p.mask for p in bank.values() if p.where is Where.CORNER], axis=0)
    centre = np.zeros((S, S), int)
    centre[16:32, 16:32] = 1  # the centre cell, where objects usually sit, is left out
    np.testing.assert_array_equal(grid, 1 - centre)  # the other eight cells, each pixel in one
    assert all(abs(p.area - 1 / 9) < 1e-9 for p in cells)
    assert not any(p.where is Where.CELL for p in place_bank((S, S)))  # with masks: the bank without them
    np.testing.assert_allclose(spot_named("cell:left", (S, S)).box, (0, 1 / 3, 1 / 3, 2 / 3))  # found again by name


def marked_images(n, seed=0):
    """Grey images with a dark object at a random place; the first half carry a bright mark at ``MARK``."""
    rng = np.random.default_rng(seed)
    imgs = np.full((n, S, S, 3), 120, np.uint8)
    for i in range(n):
        y, x = rng.integers(0, S - 10, 2)
        imgs[i, y:y + 10, x:x + 10] = 30
    imgs[:, MARK[0], MARK[1]] = 250
    return imgs


def mark_model(images):
    """Class 1 when the mark is there: a shortcut at one place inside the image."""
    return (images[:, MARK[0], MARK[1]].mean(axis=(1, 2, 3)) > 200).astype(int)


def test_a_mark_inside_the_image_is_found_in_its_cell_and_only_there():
    imgs = marked_images(32)
    with_cells = causal_tests(mark_model, Sample(imgs, place_bank((S, S), cells=True), target=1), DEFAULT)
    right = with_cells.at("cell:right")
    assert right.flip_rate == 1.0 and with_cells.placebo("cell:right").flip_rate == 0.0
    assert with_cells.at("edge:right").flip_rate == 0.0  # the edge band (x 38-48) leaves the mark
    found = causal_cue(with_cells, {}, DEFAULT, mode=-1)
    assert found.score >= 0.5 and found.flip.place == "cell:right"
    without = causal_tests(mark_model, Sample(imgs, place_bank((S, S)), target=1), DEFAULT)
    places = [t for t in without.places if t.n and t.flip_rate > 0]
    assert not places  # no place of the fixed bank touches the mark (only the shift edit moves it)
