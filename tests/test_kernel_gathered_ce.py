"""Fused gathered cross entropy vs the original boolean-gather + full-logits computation.

Runs the Triton kernels in the interpreter. Sizes are odd on purpose: M is not a multiple of the
64-row block, V is not a power of two, D is not a multiple of the K tile, and ``hidden`` is the
non-contiguous slice ``x[:, 1:]`` the model passes.
"""

from __future__ import annotations

import pytest
import torch

from fastbeit.kernels import gathered_ce
from fastbeit.kernels.gathered_ce import (
    gathered_cross_entropy,
    gathered_cross_entropy_padded,
    gathered_cross_entropy_reference,
    padded_positions,
)


def make_case(B, N, D, V, dtype=torch.float32, num_masked=None, bias=True, seed=0):
    """Inputs as the model produces them; about half the targets are the argmax (so accuracy is
    neither 0 nor 1)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N + 1, D, generator=g).to(dtype).requires_grad_(True)
    if num_masked is None:
        mask = torch.rand(B, N, generator=g) < 0.4
    else:
        mask = torch.zeros(B, N, dtype=torch.bool)
        for i in range(B):
            mask[i, torch.randperm(N, generator=g)[:num_masked]] = True
    weight = (torch.randn(V, D, generator=g) * 0.2).to(dtype).requires_grad_(True)
    b = (torch.randn(V, generator=g) * 0.2).to(dtype).requires_grad_(True) if bias else None
    with torch.no_grad():
        best = (x[:, 1:].float() @ weight.float().T).argmax(-1)
    targets = torch.where(torch.rand(B, N, generator=g) < 0.5, best, torch.randint(0, V, (B, N), generator=g))
    return x, mask, weight, b, targets


def run(fn, x, mask, weight, bias, targets, num_masked=None):
    """loss, accuracy and the gradients of x (so of the slice), weight and bias."""
    loss, acc = fn(x[:, 1:], mask, weight, bias, targets, num_masked)
    params = [x, weight] + ([bias] if bias is not None else [])
    grads = torch.autograd.grad(loss, params)
    return loss, acc, grads


def as_float(case):
    x, mask, weight, bias, targets = case
    up = lambda t: None if t is None else t.detach().float().requires_grad_(True)
    return up(x), mask, up(weight), up(bias), targets


@pytest.mark.parametrize(
    "B, N, D, V, num_masked, bias",
    [(3, 13, 48, 1000, None, True), (4, 49, 72, 1000, 11, False), (2, 49, 40, 8191, 20, True)],
)
def test_fp32_matches_reference(B, N, D, V, num_masked, bias):
    case = make_case(B, N, D, V, num_masked=num_masked, bias=bias)
    loss, acc, grads = run(gathered_cross_entropy, *case, num_masked)
    ref_loss, ref_acc, ref_grads = run(gathered_cross_entropy_reference, *case, num_masked)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    assert acc.dim() == 0 and acc == ref_acc and 0 < acc < 1
    for got, want in zip(grads, ref_grads):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert (grads[0][:, 0] == 0).all() and (grads[0][:, 1:][~case[1]] == 0).all()


def test_bf16_matches_fp32_math_and_the_bf16_reference():
    case = make_case(3, 13, 48, 1000, dtype=torch.bfloat16)
    loss, acc, grads = run(gathered_cross_entropy, *case)
    # bf16 operands, fp32 accumulation and softmax: the fp32 computation on the same values
    exact_loss, exact_acc, exact_grads = run(gathered_cross_entropy_reference, *as_float(case))
    torch.testing.assert_close(loss, exact_loss, rtol=1e-5, atol=1e-5)
    assert acc == exact_acc
    for got, want in zip(grads, exact_grads):
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2 * want.abs().max().item())
    # the bf16 reference rounds its logits and loss to bf16: agree to bf16 precision
    ref_loss, ref_acc, _ = run(gathered_cross_entropy_reference, *case)
    torch.testing.assert_close(loss, ref_loss.float(), rtol=2e-2, atol=0)


def test_bf16_hidden_fp32_weight_under_autocast():
    x, mask, weight, bias, targets = as_float(make_case(2, 13, 48, 1000))
    x = x.detach().bfloat16().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, acc, grads = run(gathered_cross_entropy, x, mask, weight, bias, targets)
        ref_loss, ref_acc, ref_grads = run(gathered_cross_entropy_reference, x, mask, weight, bias, targets)
    assert loss.dtype == torch.float32
    assert [g.dtype for g in grads] == [torch.bfloat16, torch.float32, torch.float32]
    torch.testing.assert_close(loss, ref_loss, rtol=1e-2, atol=0)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.float(), want.float(), rtol=3e-2, atol=3e-2 * want.abs().max().item())


def test_padded_positions_follow_the_boolean_gather_order():
    case = make_case(3, 13, 48, 1000)
    mask = case[1]
    order, valid = padded_positions(mask, 13)  # stable sort: no nonzero, same order as x[mask]
    flat = (order + torch.arange(3).unsqueeze(1) * 13)[valid]
    assert torch.equal(flat, mask.reshape(-1).nonzero().squeeze(1))
    assert torch.equal(valid.sum(1), mask.sum(1))


@pytest.mark.parametrize("fn", [gathered_cross_entropy, gathered_cross_entropy_padded])
def test_variable_counts_padded_to_the_maximum_equal_the_boolean_gather(fn):
    """The faithful masks' variable count: K = the most any image has, padding rows weighted 0."""
    case = make_case(4, 29, 40, 1000)
    most = int(case[1].sum(1).max())
    assert case[1].sum(1).min() < most  # really variable
    for max_masked in (most, most + 3):
        loss, acc, grads = run(fn, *case, max_masked)
        ref_loss, ref_acc, ref_grads = run(gathered_cross_entropy_reference, *case)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(acc, ref_acc, rtol=1e-6, atol=0)
        for got, want in zip(grads, ref_grads):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("fn", [gathered_cross_entropy, gathered_cross_entropy_padded])
def test_more_masked_than_max_masked_gives_nan_without_a_check(fn):
    case = make_case(2, 13, 40, 1000, num_masked=6)
    loss, acc, _ = run(fn, *case, 5)
    assert loss.isnan() and acc.isnan()


def test_backward_in_several_row_chunks(monkeypatch):
    monkeypatch.setattr(gathered_ce, "_SCRATCH_ELEMENTS", 64 * 1000)  # 64 rows per chunk
    case = make_case(4, 49, 40, 1000, num_masked=40)  # 160 rows: chunks of 64, 64, 32
    _, _, grads = run(gathered_cross_entropy, *case, 40)
    _, _, ref_grads = run(gathered_cross_entropy_reference, *case, 40)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_argmax_ties_pick_the_first_index_like_torch():
    x, mask, weight, bias, targets = make_case(2, 13, 48, 1000, bias=False)
    with torch.no_grad():
        row = weight[7].clone() * 0 + 5.0
        for v in (7, 8, 900):  # same chunk (7, 8) and another chunk (900)
            weight[v] = row
    for label, want in ((7, 1.0), (8, 0.0), (900, 0.0)):
        targets.fill_(label)
        x_pos = x.detach().abs()  # positive inputs: the tied rows are the largest logits
        _, acc = gathered_cross_entropy(x_pos[:, 1:], mask, weight, None, targets)
        _, ref_acc = gathered_cross_entropy_reference(x_pos[:, 1:], mask, weight, None, targets)
        assert acc.item() == want == ref_acc.item()


def test_non_contiguous_weight_and_targets():
    x, mask, weight, bias, targets = make_case(2, 13, 40, 1000)
    weight_t = weight.detach().T.contiguous().T.requires_grad_(True)  # [V, D] with strides (1, V)
    targets_t = targets.T.contiguous().T
    loss, acc, grads = run(gathered_cross_entropy, x, mask, weight_t, bias, targets_t)
    ref_loss, ref_acc, ref_grads = run(gathered_cross_entropy_reference, x, mask, weight, bias, targets)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_no_masked_positions():
    x, mask, weight, bias, targets = make_case(2, 13, 40, 1000)
    mask = torch.zeros_like(mask)
    loss, acc, grads = run(gathered_cross_entropy, x, mask, weight, bias, targets)
    ref_loss, ref_acc = gathered_cross_entropy_reference(x[:, 1:], mask, weight, bias, targets)
    assert loss.isnan() and ref_loss.isnan() and acc.isnan() and ref_acc.isnan()
    assert all((g == 0).all() for g in grads)


def test_bad_target_without_checks_gives_nan():
    x, mask, weight, bias, targets = make_case(2, 13, 40, 1000)
    targets[mask] = 1000
    loss, _ = gathered_cross_entropy(x[:, 1:], mask, weight, bias, targets)
    assert loss.isnan()


def test_bad_target_on_a_padding_row_is_ignored():
    x, mask, weight, bias, targets = make_case(2, 13, 40, 1000)
    targets[~mask] = 1000  # unmasked positions' ids are never a target
    for fn in (gathered_cross_entropy, gathered_cross_entropy_padded):
        loss, acc = fn(x[:, 1:], mask, weight, bias, targets)
        assert loss.isfinite() and acc.isfinite()


SHAPE_ERRORS = [
    (lambda c: c.update(hidden=c["hidden"][:, :, :-1]), "weight must be"),
    (lambda c: c.update(mask=c["mask"][:, :-1]), "mask must be"),
    (lambda c: c.update(mask=c["mask"].float()), "bool"),
    (lambda c: c.update(targets=c["targets"][:1]), "targets must be"),
    (lambda c: c.update(bias=c["bias"][:-1]), "bias must be"),
    (lambda c: c.update(max_masked=99), "max_masked must be"),
    (lambda c: c.update(weight=c["weight"].to("meta")), "one device"),
]
VALUE_ERRORS = [
    (lambda c: c["targets"].__setitem__(c["mask"], 1000), r"\[0, 1000\)"),
    (lambda c: c["targets"].__setitem__(c["mask"], -100), r"\[0, 1000\)"),
    (lambda c: c.update(max_masked=2), "max_masked=2"),
]


def _case_dict():
    x, mask, weight, bias, targets = make_case(2, 13, 40, 1000)
    return dict(hidden=x.detach()[:, 1:], mask=mask, weight=weight.detach(), bias=bias.detach(),
                targets=targets.clone(), max_masked=None)


@pytest.mark.parametrize("change, match", SHAPE_ERRORS)
def test_clear_shape_errors(change, match):
    case = _case_dict()
    change(case)
    for fn in (gathered_cross_entropy, gathered_cross_entropy_padded, gathered_cross_entropy_reference):
        with pytest.raises(ValueError, match=match):
            fn(**case)


@pytest.mark.parametrize("change, match", VALUE_ERRORS)
def test_value_errors_when_asked_to_validate(change, match):
    case = _case_dict()
    change(case)
    with pytest.raises(ValueError, match=match):
        gathered_cross_entropy_reference(**case)
    for fn in (gathered_cross_entropy, gathered_cross_entropy_padded):
        with pytest.raises(ValueError, match=match):
            fn(**case, validate=True)
