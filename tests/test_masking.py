"""The blockwise generator's statistics (DESIGN.md §3), modes and argument checks."""

from __future__ import annotations

import random

import numpy as np
import pytest

from fastbeit.masking import MaskingGenerator


@pytest.fixture(scope="module")
def faithful_draws():
    gen = MaskingGenerator(14, 75, min_num_patches=16)
    blocks = []
    place = gen._place_block

    def counting(mask, budget, rng):
        delta = place(mask, budget, rng)
        blocks[-1] += delta > 0
        return delta

    gen._place_block = counting
    rng = random.Random(1234)
    masks = []
    for _ in range(20000):
        blocks.append(0)
        masks.append(gen(rng))
    return np.stack(masks), np.array(blocks)


def test_faithful_count_statistics(faithful_draws):
    masks, _ = faithful_draws
    counts = masks.reshape(len(masks), -1).sum(1)
    # DESIGN.md: 66.6 % exactly 75, 23.3 % 74, mean 74.47, minimum 64, never above 75.
    assert counts.max() == 75
    assert abs((counts == 75).mean() - 0.666) < 0.015
    assert abs((counts == 74).mean() - 0.233) < 0.015
    assert abs(counts.mean() - 74.47) < 0.05
    assert 60 <= counts.min() <= 68


def test_faithful_block_count_and_spatial_spread(faithful_draws):
    masks, blocks = faithful_draws
    assert abs(blocks.mean() - 4.1) < 0.25
    freq = masks.mean(0)
    # Blocks overlap the centre far more than the corners (measured: ~0.71 vs ~0.04) ...
    assert freq.min() > 0.02 and freq[0, 0] < 0.07 and freq[6:8, 6:8].mean() > 0.65
    # ... and the map is symmetric: block corners are drawn with an inclusive randint, so the
    # last row and column are reachable (an exclusive bound would break this symmetry).
    assert np.allclose(freq, freq[:, ::-1], atol=0.02) and np.allclose(freq, freq[::-1, :], atol=0.02)
    assert np.allclose(freq, freq.T, atol=0.03)  # aspect ratios are log-symmetric (noise ~0.005 a cell)


def test_exact_mode_always_hits_the_target():
    gen = MaskingGenerator(14, 75, min_num_patches=16, mode="exact")
    rng = random.Random(0)
    assert all(gen(rng).sum() == 75 for _ in range(500))


def test_random_mode_is_uniform():
    gen = MaskingGenerator(14, 75, mode="random")
    rng = random.Random(0)
    masks = np.stack([gen(rng) for _ in range(4000)])
    assert (masks.reshape(4000, -1).sum(1) == 75).all()
    freq = masks.mean(0)
    assert abs(freq.mean() - 75 / 196) < 1e-9 and freq.std() < 0.02


def test_odd_grid_and_reproducibility():
    gen = MaskingGenerator((7, 9), 20, min_num_patches=4)
    a = [gen(random.Random(5)) for _ in range(3)]
    b = [gen(random.Random(5)) for _ in range(3)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert a[0].shape == (7, 9) and a[0].sum() <= 20


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(input_size=14, num_masking_patches=300), "must be in"),
        (dict(input_size=14, num_masking_patches=0), "must be in"),
        (dict(input_size=14, num_masking_patches=10, min_num_patches=16), "exceeds the target"),
        (dict(input_size=14, num_masking_patches=75, min_num_patches=16, max_num_patches=8), "below"),
        (dict(input_size=14, num_masking_patches=75, min_aspect=-1), "aspect"),
        (dict(input_size=0, num_masking_patches=1), "positive"),
        (dict(input_size=14, num_masking_patches=5, mode="checker"), "unknown masking mode"),
    ],
)
def test_bad_arguments_are_explained(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MaskingGenerator(**kwargs)
