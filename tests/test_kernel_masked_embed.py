"""Masked-token embedding kernel vs the reference formula (interpreter on CPU).

Forward and d(patch) are compared bit for bit (also in bf16: the kernel rounds once, to nearest
even, as torch does); the batch reductions d(mask_token), d(cls), d(pos_embed) sum in another
order, so they get a float32-sized tolerance (or one bf16 ulp).
"""

from __future__ import annotations

import pytest
import torch

from fastbeit.kernels import masked_embed as masked_embed_module
from fastbeit.kernels.masked_embed import masked_embed, masked_embed_reference

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16


def make_inputs(B, N, D, patch_dtype, token_dtype, with_pos, pos_dtype=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape, dtype: torch.randn(*shape, generator=g).to(dtype).requires_grad_(True)
    patch = rand(B, N, D, dtype=patch_dtype)
    mask = torch.rand(B, N, generator=g) < 0.4
    mask[0, 0], mask[0, 1] = True, False
    mask_token = rand(1, 1, D, dtype=token_dtype)
    cls_token = rand(1, 1, D, dtype=token_dtype)
    pos = rand(1, N + 1, D, dtype=pos_dtype or token_dtype) if with_pos else None
    return patch, mask, mask_token, cls_token, pos


def forward_backward(fn, patch, mask, mask_token, cls_token, pos, grad_seed=1):
    out = fn(patch, mask, mask_token, cls_token, pos)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed)).to(out.dtype)
    params = [t for t in (patch, mask_token, cls_token, pos) if t is not None]
    return out, torch.autograd.grad(out, params, grad)


def reduction_tolerance(dtype):
    """float32 sums differ in order only; a 16-bit reference also rounds every term (when the
    output is float32 its gradient is cast to bf16 before the sum), the kernel only the total."""
    return dict(rtol=1e-5, atol=1e-5) if dtype == F32 else dict(rtol=1e-2, atol=5e-2)


@pytest.mark.parametrize("B, N, D", [(3, 13, 40), (3, 49, 72)])
@pytest.mark.parametrize("with_pos", [True, False])
@pytest.mark.parametrize(
    "patch_dtype, token_dtype, pos_dtype",
    [(F32, F32, None), (BF16, BF16, None), (BF16, F32, None), (BF16, BF16, F32), (F16, F16, None)],
)
def test_matches_reference(B, N, D, with_pos, patch_dtype, token_dtype, pos_dtype):
    inputs = make_inputs(B, N, D, patch_dtype, token_dtype, with_pos, pos_dtype)
    out, grads = forward_backward(masked_embed, *inputs)
    ref, ref_grads = forward_backward(masked_embed_reference, *inputs)
    assert out.dtype == ref.dtype and out.shape == (B, N + 1, D)
    assert torch.equal(out, ref)
    assert torch.equal(grads[0], ref_grads[0]), "d(patch) is an exact product"
    for got, want in zip(grads[1:], ref_grads[1:]):
        assert got.dtype == want.dtype and got.shape == want.shape
        torch.testing.assert_close(got, want, **reduction_tolerance(want.dtype))


def test_non_contiguous_inputs_and_grad():
    patch, mask, mask_token, cls_token, pos = make_inputs(2, 13, 40, F32, F32, True)
    patch_t = patch.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_(True)
    mask_t = mask.T.contiguous().T
    out = masked_embed(patch_t, mask_t, mask_token, cls_token, pos)
    ref = masked_embed_reference(patch, mask, mask_token, cls_token, pos)
    assert torch.equal(out, ref)
    grad = torch.randn(2, 40, 14).transpose(1, 2)  # non-contiguous upstream gradient
    got = torch.autograd.grad(out, [patch_t, mask_token, cls_token, pos], grad)
    want = torch.autograd.grad(ref, [patch, mask_token, cls_token, pos], grad)
    assert torch.equal(got[0], want[0])
    for a, b in zip(got[1:], want[1:]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_batch_split_backward(monkeypatch):
    monkeypatch.setattr(masked_embed_module, "_split_batch", lambda batch, tiles: 2)  # 3 images, 2 slices
    inputs = make_inputs(3, 13, 40, F32, F32, True)
    _, grads = forward_backward(masked_embed, *inputs)
    _, ref_grads = forward_backward(masked_embed_reference, *inputs)
    assert torch.equal(grads[0], ref_grads[0])
    for got, want in zip(grads[1:], ref_grads[1:]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy inf * 0
def test_nan_and_inf_propagate_like_the_formula():
    patch, mask, mask_token, cls_token, pos = make_inputs(2, 13, 40, F32, F32, False)
    with torch.no_grad():
        patch[0, 0, :3] = torch.tensor([float("inf"), float("nan"), -0.0])  # masked: inf * 0 = nan
        patch[0, 1, :3] = torch.tensor([float("inf"), float("nan"), -0.0])  # kept as is
    out = masked_embed(patch, mask, mask_token, cls_token, pos)
    ref = masked_embed_reference(patch, mask, mask_token, cls_token, pos)
    torch.testing.assert_close(out, ref, equal_nan=True, rtol=0, atol=0)
    assert torch.equal(out.signbit(), ref.signbit())


def test_integer_mask_and_partial_requires_grad():
    patch, mask, mask_token, cls_token, pos = make_inputs(2, 13, 40, F32, F32, True)
    cls_token.requires_grad_(False)
    out = masked_embed(patch, mask.to(torch.uint8), mask_token, cls_token, pos)
    assert torch.equal(out, masked_embed_reference(patch, mask, mask_token, cls_token, pos))
    d_patch, d_pos = torch.autograd.grad(out.sum(), [patch, pos])
    assert torch.equal(d_patch, (~mask).float().unsqueeze(-1).expand(-1, -1, 40))
    torch.testing.assert_close(d_pos, torch.full((1, 14, 40), 2.0))


def test_float64_falls_back_to_reference():
    inputs = make_inputs(2, 13, 40, torch.float64, torch.float64, True)
    out, grads = forward_backward(masked_embed, *inputs)
    ref, ref_grads = forward_backward(masked_embed_reference, *inputs)
    assert torch.equal(out, ref) and all(torch.equal(a, b) for a, b in zip(grads, ref_grads))


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda a: a.update(patch_tokens=a["patch_tokens"][0]), "patch_tokens must be"),
        (lambda a: a.update(mask=a["mask"][:, :-1]), "mask must be"),
        (lambda a: a.update(mask=a["mask"].float()), "bool"),
        (lambda a: a.update(mask_token=a["mask_token"][..., :-1]), "mask_token must be"),
        (lambda a: a.update(cls_token=a["cls_token"].view(1, 40)), "cls_token must be"),
        (lambda a: a.update(pos_embed=a["pos_embed"][:, 1:]), "pos_embed must be"),
        (lambda a: a.update(mask_token=a["mask_token"].to("meta")), "one device"),
    ],
)
def test_clear_errors(change, match):
    patch, mask, mask_token, cls_token, pos = make_inputs(2, 13, 40, F32, F32, True)
    args = dict(patch_tokens=patch.detach(), mask=mask, mask_token=mask_token.detach(),
                cls_token=cls_token.detach(), pos_embed=pos.detach())
    change(args)
    with pytest.raises(ValueError, match=match):
        masked_embed(**args)
