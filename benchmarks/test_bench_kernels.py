"""Kernels vs their references at BEiT-Base shapes (CUDA), plus tiny CPU smoke cases.

Shapes: batch 256, 196 patches (+ CLS), width 768, vocabulary 8192, ~75 masked patches per image;
mask sampling for 2048 images (a global batch) against the CPU generator for the same batch.
Training steps run fwd + bwd under bf16 autocast with float32 parameters, as the pre-training
loop does. Peak memory (``peak_mem_mb``, ``peak_extra_mb``) goes into ``extra_info``.

    pytest benchmarks/test_bench_kernels.py --benchmark-only
"""

from __future__ import annotations

import pytest
import torch

from fastbeit.kernels.block_mask import sample_block_masks, sample_block_masks_reference
from fastbeit.kernels.gathered_ce import gathered_cross_entropy, gathered_cross_entropy_reference
from fastbeit.kernels.masked_embed import masked_embed, masked_embed_reference

B, N, D, V, TARGET = 256, 196, 768, 8192, 75
MASK_BATCH = 2048
GRID = (14, 14)

cuda = pytest.mark.cuda


def _masks(batch: int, mode: str, device: torch.device) -> torch.Tensor:
    return sample_block_masks(batch, GRID, TARGET, mode=mode, seed=0, offset=0, device=device)


def _embed_inputs(device: torch.device, with_pos: bool):
    """bf16 patch tokens (conv output under autocast), float32 tokens: the output is float32."""
    g = torch.Generator(device=device).manual_seed(0)
    patch = torch.randn(B, N, D, device=device, generator=g, dtype=torch.bfloat16, requires_grad=True)
    tokens = [torch.randn(1, n, D, device=device, generator=g, requires_grad=True) for n in (1, 1, N + 1)]
    return patch, _masks(B, "blockwise", device), tokens[0], tokens[1], tokens[2] if with_pos else None


def _embed_step(fn, patch, mask, mask_token, cls_token, pos):
    def step():
        out = fn(patch, mask, mask_token, cls_token, pos)
        params = [t for t in (patch, mask_token, cls_token, pos) if t is not None]
        return torch.autograd.grad(out, params, torch.ones_like(out))

    return step


def _ce_inputs(device: torch.device, mode: str):
    """Final-norm output (float32 under autocast) as the slice x[:, 1:], float32 lm_head."""
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(B, N + 1, D, device=device, generator=g, requires_grad=True)
    weight = (torch.randn(V, D, device=device, generator=g) * 0.02).requires_grad_(True)
    bias = torch.zeros(V, device=device, requires_grad=True)
    targets = torch.randint(0, V, (B, N), device=device, generator=g)
    mask = _masks(B, "exact" if mode == "exact" else "blockwise", device)
    return x, mask, weight, bias, targets, TARGET if mode == "exact" else None


def _ce_step(fn, x, mask, weight, bias, targets, num_masked, device_type="cuda", backward=True):
    def step():
        with torch.autocast(device_type, dtype=torch.bfloat16):
            loss, acc = fn(x[:, 1:], mask, weight, bias, targets, num_masked)
        if not backward:
            return loss, acc
        return torch.autograd.grad(loss, [x, weight, bias])

    return step


# ----------------------------------------------------------------------------- CUDA, full size


@cuda
@pytest.mark.parametrize("mode", ["blockwise", "exact", "random"])
def test_mask_sampling_kernel(measure, mode):
    measure(lambda: _masks(MASK_BATCH, mode, torch.device("cuda")), rounds=20, images=MASK_BATCH)


@cuda
def test_mask_sampling_cpu_generator(measure):
    measure(lambda: sample_block_masks_reference(MASK_BATCH, GRID, TARGET, device="cuda"), rounds=3,
            images=MASK_BATCH)


@cuda
@pytest.mark.parametrize("with_pos", [False, True], ids=["no_pos", "abs_pos"])
@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_masked_embed_fwd_bwd(measure, impl, with_pos):
    fn = masked_embed if impl == "triton" else masked_embed_reference
    measure(_embed_step(fn, *_embed_inputs(torch.device("cuda"), with_pos)), rounds=20)


@cuda
@pytest.mark.parametrize("mode", ["exact", "variable"])
@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_gathered_ce_fwd_bwd(measure, impl, mode):
    fn = gathered_cross_entropy if impl == "triton" else gathered_cross_entropy_reference
    inputs = _ce_inputs(torch.device("cuda"), mode)
    measure(_ce_step(fn, *inputs), rounds=10, masked_rows=int(inputs[1].sum()))


@cuda
@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_gathered_ce_forward_only(measure, impl):
    fn = gathered_cross_entropy if impl == "triton" else gathered_cross_entropy_reference
    with torch.no_grad():
        measure(_ce_step(fn, *_ce_inputs(torch.device("cuda"), "exact"), backward=False), rounds=10)


# ----------------------------------------------------------------------------- CPU smoke (tiny)

CPU = torch.device("cpu")


def test_smoke_mask_sampling_cpu(measure):
    masks = measure(lambda: sample_block_masks_reference(8, GRID, TARGET, device=CPU), device=CPU, rounds=2)
    assert masks.shape == (8, 196) and (masks.sum(1) <= TARGET).all()


def test_smoke_masked_embed_cpu(measure):
    patch = torch.randn(2, 9, 16, requires_grad=True)
    mask = torch.rand(2, 9) < 0.4
    tokens = [torch.randn(1, n, 16, requires_grad=True) for n in (1, 1, 10)]
    grads = measure(_embed_step(masked_embed_reference, patch, mask, *tokens), device=CPU, rounds=2)
    assert grads[0].shape == patch.shape


def test_smoke_gathered_ce_cpu(measure):
    x = torch.randn(2, 10, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    bias = torch.zeros(50, requires_grad=True)
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[:, :4] = True
    targets = torch.randint(0, 50, (2, 9))
    step = _ce_step(gathered_cross_entropy_reference, x, mask, weight, bias, targets, 4, device_type="cpu")
    grads = measure(step, device=CPU, rounds=2)
    assert grads[1].shape == weight.shape
