"""The fused tokenizer head (ReLU + 1×1 conv + argmax): the same ids as ``argmax`` of the logits,
at odd sizes, with ties broken as ``torch.argmax`` breaks them, and no ``[M, V]`` logits allocated."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from fastbeit.kernels import interpreting
from fastbeit.kernels import token_argmax as ta
from fastbeit.kernels.token_argmax import token_argmax, token_argmax_reference

pytestmark = pytest.mark.skipif(not interpreting(), reason="the kernel runs in the interpreter on CPU")


def integer_case(M: int, C: int, V: int, seed: int = 0, dtype=torch.float32):
    """Small integers: every logit is exact in fp32 whatever the summation order, so ties are real."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-3, 4, (M, C), generator=g).to(dtype)
    w = torch.randint(-2, 3, (V, C), generator=g).to(dtype)
    b = torch.randint(-2, 3, (V,), generator=g).float()
    return x, w, b


def full_argmax(x, w, b, relu):
    x = torch.relu(x) if relu else x
    return F.linear(x.double(), w.double(), None if b is None else b.double()).argmax(-1)


@pytest.mark.parametrize("M,C,V", [(1, 1, 2), (37, 19, 45), (70, 33, 97), (5, 64, 200)])
@pytest.mark.parametrize("relu", [False, True])
def test_same_ids_as_argmax_of_logits_odd_sizes(M, C, V, relu):
    x, w, b = integer_case(M, C, V, seed=M + C + V)
    expected = full_argmax(x, w, b, relu)
    for impl in ("triton", "reference"):
        assert torch.equal(token_argmax(x, w, b, relu=relu, impl=impl), expected), impl
    assert torch.equal(token_argmax(x, w, None, relu=relu, impl="triton"), full_argmax(x, w, None, relu))


def test_bf16_operands_fp32_logits():
    x, w, b = integer_case(41, 23, 75, dtype=torch.bfloat16)  # small integers are exact in bf16
    expected = full_argmax(x.float(), w.float(), b, True)
    assert torch.equal(token_argmax(x, w, b, relu=True, impl="triton"), expected)
    assert torch.equal(token_argmax_reference(x, w, b, relu=True), expected)


def test_ties_go_to_the_first_index_across_tiles():
    """Equal maxima inside one vocabulary tile and in later tiles (the interpreter's tile is 32)."""
    M, C, V = 9, 5, 100
    x, w, b = integer_case(M, C, V, seed=3)
    w[:] = 0  # all logits equal the bias: the ties are decided by the bias alone
    b[:] = 0
    b[[7, 8, 40, 71, 99]] = 5.0  # a tie inside tile 0 and in tiles 1, 2, 3
    ids = token_argmax(x, w, b, impl="triton")
    assert torch.equal(ids, torch.full((M,), 7)) and torch.equal(ids, full_argmax(x, w, b, False))
    b[7] = b[8] = 0
    assert torch.equal(token_argmax(x, w, b, impl="triton"), torch.full((M,), 40))
    # relu(x) = 0 everywhere: logits = bias, every column ties except the biased ones
    neg = -x.abs() - 1
    w2 = torch.randn(V, C)
    ids = token_argmax(neg, w2, torch.zeros(V), relu=True, impl="triton")
    assert torch.equal(ids, torch.zeros(M, dtype=torch.long))


def test_random_floats_agree_up_to_rounding():
    g = torch.Generator().manual_seed(1)
    x, w, b = torch.randn(53, 40, generator=g), torch.randn(130, 40, generator=g), torch.randn(130, generator=g)
    logits = F.linear(torch.relu(x).double(), w.double(), b.double())
    ids = token_argmax(x, w, b, relu=True, impl="triton")
    best = logits.max(-1).values
    assert bool((best - logits.gather(1, ids[:, None]).squeeze(1) <= 1e-4).all())
    assert (ids == logits.argmax(-1)).float().mean() > 0.95


class LargestAllocation(TorchDispatchMode):
    """Records the largest tensor (in bytes) any op returns: the wrapper's and torch's allocations,
    and the interpreter's host copies of the kernel's arguments."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_never_allocates_the_logits(impl, monkeypatch):
    """B = 2 images of 14×14 patches, V = 8192: the [B·196, 8192] logits never exist (the
    reference works in chunks; shrunk here so that the test stays small)."""
    monkeypatch.setattr(ta, "_CHUNK_ELEMENTS", 1 << 16)
    M, C, V = 2 * 196 if impl == "reference" else 20, 2, 8192
    x, w, b = integer_case(M, C, V)
    with LargestAllocation() as seen:
        ids = token_argmax(x, w, b, relu=True, impl=impl)
    assert torch.equal(ids, full_argmax(x, w, b, True))
    logits_bytes = M * V * 4
    assert 0 < seen.largest < logits_bytes // 2, (seen.largest, logits_bytes)


def test_bad_shapes():
    with pytest.raises(ValueError, match="expected x"):
        token_argmax(torch.zeros(3, 4), torch.zeros(5, 3))
    with pytest.raises(ValueError, match="bias"):
        token_argmax(torch.zeros(3, 4), torch.zeros(5, 4), torch.zeros(4))
