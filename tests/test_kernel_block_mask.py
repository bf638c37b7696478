"""GPU blockwise mask sampler: same law as the faithful CPU generator, reproducible counters.

The kernel runs in the Triton interpreter here. It packs many images into one program there (one
per program on the GPU); ``test_packing_and_batch_size_do_not_change_masks`` checks that this
choice cannot change a single mask, so the statistics below also hold for the GPU layout.
Tolerances are about 4 standard errors of the sample sizes used (fixed seeds: no flakiness).
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from fastbeit.kernels import block_mask
from fastbeit.kernels.block_mask import sample_block_masks, sample_block_masks_reference
from fastbeit.masking import MaskingGenerator

CPU = torch.device("cpu")


def components(masks: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Number of 4-connected masked regions per mask (propagate the largest index in a region)."""
    m = masks.view(-1, 1, height, width)
    index = torch.arange(1, height * width + 1, dtype=torch.float32).view(1, 1, height, width)
    label = torch.where(m, index, 0.0)
    while True:
        around = torch.maximum(F.max_pool2d(label, (1, 3), 1, (0, 1)), F.max_pool2d(label, (3, 1), 1, (1, 0)))
        around = torch.where(m, around, 0.0)
        if torch.equal(around, label):
            return ((label == index) & m).flatten(1).sum(1)
        label = around


def adjacent_pairs(masks: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Masked 4-neighbour pairs per mask: large for compact blocks, small for scattered patches."""
    m = masks.view(-1, height, width)
    return (m[:, 1:] & m[:, :-1]).flatten(1).sum(1) + (m[:, :, 1:] & m[:, :, :-1]).flatten(1).sum(1)


def summary(masks: torch.Tensor, target: int = 75) -> dict:
    counts = masks.sum(1)
    return {
        "mean": counts.double().mean().item(),
        "exact": (counts == target).double().mean().item(),
        "one_short": (counts == target - 1).double().mean().item(),
        "min": counts.min().item(),
        "max": counts.max().item(),
        "regions": components(masks, 14, 14).double().mean().item(),
        "pairs": adjacent_pairs(masks, 14, 14).double().mean().item(),
        "freq": masks.double().mean(0),
    }


def test_blockwise_distribution_matches_cpu_generator():
    kernel = summary(sample_block_masks(4096, seed=1, device=CPU))
    ref = summary(sample_block_masks_reference(8192, seed=2, device=CPU))
    # design notes (20,000 CPU draws): mean 74.47, 66.6 % exactly 75, 23.3 % at 74, min 64
    assert abs(kernel["mean"] - 74.47) < 0.1 and abs(ref["mean"] - 74.47) < 0.1
    assert abs(kernel["exact"] - ref["exact"]) < 0.035
    assert abs(kernel["one_short"] - ref["one_short"]) < 0.035
    assert kernel["max"] == 75 and kernel["min"] >= 60
    assert abs(kernel["regions"] - ref["regions"]) < 0.06
    assert abs(kernel["pairs"] - ref["pairs"]) < 0.3  # std 3.6 per mask
    freq_k, freq_r = kernel["freq"], ref["freq"]
    assert torch.corrcoef(torch.stack([freq_k, freq_r]))[0, 1] > 0.99
    assert (freq_k - freq_r).abs().max() < 0.05


def test_exact_mode_tops_up_the_blockwise_mask():
    blockwise = sample_block_masks(512, seed=5, offset=3, device=CPU)
    exact = sample_block_masks(512, mode="exact", seed=5, offset=3, device=CPU)
    assert (exact.sum(1) == 75).all()
    assert not (blockwise & ~exact).any(), "the top-up must only add patches"
    assert (blockwise != exact).any(), "some masks stop short and need a top-up"


def test_random_mode_is_an_exact_uniform_subset():
    masks = sample_block_masks(2048, mode="random", seed=9, device=CPU)
    assert (masks.sum(1) == 75).all()
    freq = masks.double().mean(0)
    assert (freq - 75 / 196).abs().max() < 0.05
    assert components(masks[:256], 14, 14).double().mean() > 10  # scattered, not blocks


def test_reproducible_for_seed_and_offset():
    draw = lambda seed, offset: sample_block_masks(12, (7, 9), 20, 4, seed=seed, offset=offset, device=CPU)
    a = draw(3, 11)
    assert torch.equal(a, draw(3, 11))
    assert len({tuple(m.nonzero().flatten().tolist()) for m in a}) == 12, "images must differ"
    for seed, offset in [(3, 12), (4, 11), (3, (1 << 40) + 11)]:  # the high offset bits count too
        assert (draw(seed, offset) != a).any(1).sum() >= 10


@pytest.mark.parametrize("mode", ["blockwise", "exact", "random"])
def test_packing_and_batch_size_do_not_change_masks(mode):
    gen = MaskingGenerator((7, 9), 20, 4, mode=mode)
    one_per_program = block_mask._launch(gen, 5, 7, 2, CPU, images_per_program=1)
    packed = block_mask._launch(gen, 5, 7, 2, CPU, images_per_program=8)
    assert torch.equal(one_per_program, packed)
    prefix = sample_block_masks(3, (7, 9), 20, 4, mode=mode, seed=7, offset=2, device=CPU)
    assert torch.equal(prefix, packed[:3])


def test_odd_grid_small_target():
    kw = dict(grid=(7, 9), num_masking_patches=20, min_num_patches=4, device=CPU)
    blockwise = sample_block_masks(1024, seed=1, **kw)
    ref = sample_block_masks_reference(2048, seed=1, **kw)
    assert blockwise.shape == (1024, 63) and blockwise.dtype == torch.bool
    counts, ref_counts = blockwise.sum(1).double(), ref.sum(1).double()
    assert counts.max() <= 20 and abs(counts.mean() - ref_counts.mean()) < 0.25
    freq, ref_freq = blockwise.double().mean(0), ref.double().mean(0)
    assert (freq - ref_freq).abs().max() < 0.08
    assert (sample_block_masks(256, mode="exact", seed=1, **kw).sum(1) == 20).all()
    assert (sample_block_masks(256, mode="random", seed=1, **kw).sum(1) == 20).all()


def test_reference_is_the_seeded_cpu_generator():
    masks = sample_block_masks_reference(3, grid=(6, 5), num_masking_patches=9, min_num_patches=3,
                                         seed=4, offset=8, device=CPU)
    gen = MaskingGenerator((6, 5), 9, 3)
    for i in range(3):
        expected = torch.from_numpy(gen(random.Random(f"4/8/{i}"))).reshape(-1).bool()
        assert torch.equal(masks[i], expected)


def test_falls_back_to_reference_without_triton(monkeypatch):
    monkeypatch.setattr(block_mask, "use_triton", lambda tensor: False)
    got = sample_block_masks(4, seed=2, offset=1, device=CPU)
    assert torch.equal(got, sample_block_masks_reference(4, seed=2, offset=1, device=CPU))


def test_empty_batch():
    assert sample_block_masks(0, device=CPU).shape == (0, 196)
    assert sample_block_masks_reference(0, device=CPU).shape == (0, 196)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(mode="checkerboard"), "unknown masking mode"),
        (dict(num_masking_patches=197), "num_masking_patches"),
        (dict(min_num_patches=80), "exceeds the target"),
        (dict(max_num_patches=8), "below min_num_patches"),
        (dict(min_aspect=-1.0), "aspect"),
        (dict(seed=-1), "seed"),
        (dict(offset=1 << 61), "offset"),
        (dict(batch_size=-2), "batch_size"),
    ],
)
def test_invalid_arguments(kwargs, match):
    args = dict(batch_size=2, device=CPU)
    args.update(kwargs)
    for fn in (sample_block_masks, sample_block_masks_reference):
        with pytest.raises(ValueError, match=match):
            fn(**args)
