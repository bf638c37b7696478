"""Flash attention with BEiT's bias (kernels/attention.py) against the plain reference.

By default the kernels run on CPU in Triton's interpreter (conftest sets TRITON_INTERPRET=1),
which is slow: sizes are small but odd (N = 37, 65, 197 are not multiples of the 32-wide
interpreter blocks), so every case has full and partial blocks. fp32 is compared tightly;
fp16/bf16 with a tolerance (the interpreter computes them in fp32 after loading, so the error is
the final rounding). On a GPU machine, ``TRITON_INTERPRET=0 pytest tests/test_kernel_attention.py``
runs the same tests on CUDA with the compiled kernels (looser half-precision tolerances: there
P and dS are rounded to the input dtype before their matmuls, as in every flash attention).
"""

import math
from typing import Optional

import pytest
import torch
from helpers import cpu_allocations
from sm90_compile import run_in_subprocess

from fastbeit.kernels import attention as attn_mod
from fastbeit.kernels import interpreting
from fastbeit.kernels.attention import attention_reference, flash_attention, supports

if interpreting():
    DEVICE = "cpu"
elif torch.cuda.is_available():
    DEVICE = "cuda"
else:
    DEVICE = None
pytestmark = pytest.mark.skipif(DEVICE is None, reason="needs TRITON_INTERPRET=1 (tests/conftest.py) or CUDA")

# (rtol, atol) per dtype. CPU fp32: both sides compute in fp32, only the summation order differs.
TOL = {
    "cpu": {torch.float32: (1e-5, 1e-5), torch.float16: (5e-3, 5e-3), torch.bfloat16: (3e-2, 3e-2)},
    # Not yet run on a GPU: 3xTF32 for fp32; P and dS rounded to fp16/bf16 before the matmuls.
    "cuda": {torch.float32: (1e-4, 1e-4), torch.float16: (1e-2, 1e-2), torch.bfloat16: (6e-2, 6e-2)},
}


@pytest.fixture(autouse=True)
def _two_dbias_chunks(monkeypatch):
    """Split the batch into (at most) 2 chunks on every device, so that small batches exercise
    both halves of the shared-bias reduction: the in-kernel sum over a chunk's images, and the
    sum of the chunks' partials. (On CUDA the real choice would give every image its own chunk.)"""
    monkeypatch.setattr(attn_mod, "_dbias_chunks", lambda batch, *args: min(batch, 2))


def _inputs(
    B: int, H: int, N: int, d: int, dtype: torch.dtype, bias: Optional[str], bias_dtype: Optional[torch.dtype] = None
) -> tuple:
    """q, k, v (leaves needing grad), bias ('shared' [H,N,N], 'shared4' [1,H,N,N], 'batch' [B,H,N,N])."""
    q, k, v = (torch.randn(B, H, N, d, dtype=dtype, device=DEVICE).requires_grad_() for _ in range(3))
    shape = {None: None, "shared": (H, N, N), "shared4": (1, H, N, N), "batch": (B, H, N, N)}[bias]
    b = None if shape is None else torch.randn(shape, dtype=bias_dtype or dtype, device=DEVICE).requires_grad_()
    return q, k, v, b


def _both(q, k, v, bias, do, scale=None) -> tuple[list, list]:
    """(output, grads) of the kernel and of the reference, grads for every leaf needing one."""
    leaves = [t for t in (q, k, v, bias) if t is not None and t.requires_grad]
    results = []
    for fn in (flash_attention, attention_reference):
        out = fn(q, k, v, bias, scale)
        grads = torch.autograd.grad(out, leaves, do) if leaves else ()
        results.append([out, *grads])
    return results[0], results[1]


def _assert_all_close(got: list, want: list, dtype: torch.dtype, names: list) -> None:
    rtol, atol = TOL[DEVICE][dtype]
    for name, a, b in zip(names, got, want):
        assert a.shape == b.shape and a.dtype == b.dtype, (name, a.shape, b.shape, a.dtype, b.dtype)
        torch.testing.assert_close(a.float(), b.float(), rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


CASES = [
    # B, H, N, d, dtype, bias kind, bias dtype
    (2, 3, 37, 32, torch.float32, None, None),
    (3, 2, 65, 64, torch.float32, "shared", None),  # B=3 over 2 chunks: a 2-image chunk and a 1-image one
    (2, 3, 37, 32, torch.float32, "batch", None),
    (2, 2, 37, 32, torch.float32, "shared4", None),
    (2, 2, 37, 40, torch.float32, "shared", None),  # head dim padded to 64 internally
    (1, 2, 197, 64, torch.float32, "shared", None),  # BEiT's N = 14·14 + 1
    (2, 3, 65, 32, torch.float16, "shared", None),
    (2, 2, 37, 64, torch.float16, None, None),
    (2, 2, 37, 64, torch.bfloat16, "shared", torch.float32),  # autocast: fp32 bias with bf16 q
    (2, 2, 37, 32, torch.bfloat16, "batch", None),
]


@pytest.mark.parametrize("B,H,N,d,dtype,bias_kind,bias_dtype", CASES)
def test_matches_reference(B, H, N, d, dtype, bias_kind, bias_dtype):
    torch.manual_seed(0)
    q, k, v, bias = _inputs(B, H, N, d, dtype, bias_kind, bias_dtype)
    do = torch.randn(B, H, N, d, dtype=dtype, device=DEVICE)
    got, want = _both(q, k, v, bias, do)
    _assert_all_close(got, want, dtype, ["out", "dq", "dk", "dv", "dbias"])


@pytest.mark.skipif(DEVICE != "cuda", reason="BEiT-Base sizes are too slow for the interpreter")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_beit_base_shape_cuda(dtype, monkeypatch):
    """BEiT-Base heads at a batch large enough for the real chunking (up to 32 chunks)."""
    monkeypatch.undo()  # the real _dbias_chunks
    torch.manual_seed(6)
    q, k, v, bias = _inputs(48, 12, 197, 64, dtype, "shared", torch.float32)
    do = torch.randn_like(q)
    got, want = _both(q, k, v, bias, do)
    _assert_all_close(got, want, dtype, ["out", "dq", "dk", "dv", "dbias"])


def test_bias_without_grad_and_partial_grads():
    """A frozen bias gets no gradient (None); q not needing grad skips dq; the rest still match."""
    torch.manual_seed(1)
    q, k, v, bias = _inputs(2, 2, 37, 32, torch.float32, "shared")
    bias.requires_grad_(False)
    q.requires_grad_(False)
    do = torch.randn_like(q)
    got, want = _both(q, k, v, bias, do)
    _assert_all_close(got, want, torch.float32, ["out", "dk", "dv"])
    flash_attention(q, k, v, bias).backward(do)
    assert bias.grad is None and q.grad is None and k.grad is not None


def test_non_contiguous_inputs_and_scale():
    """q, k, v as views of one qkv tensor (the model's layout), a transposed bias, a strided dO."""
    torch.manual_seed(2)
    B, H, N, d = 2, 2, 37, 32
    qkv = torch.randn(B, N, 3, H, d, device=DEVICE).permute(2, 0, 3, 1, 4).detach().requires_grad_()
    q, k, v = qkv.unbind(0)
    assert not q.is_contiguous()
    bias_t = torch.randn(H, N, N, device=DEVICE).requires_grad_()
    bias = bias_t.transpose(-1, -2)
    do = torch.randn(B, N, H, d, device=DEVICE).transpose(1, 2)
    outs = []
    for fn in (flash_attention, attention_reference):
        out = fn(q, k, v, bias, scale=0.3)
        outs.append([out, *torch.autograd.grad(out, [qkv, bias_t], do)])
    _assert_all_close(outs[0], outs[1], torch.float32, ["out", "dqkv", "dbias"])


def test_masked_keys_with_inf_bias():
    """-inf bias entries (a whole first key block, for every row) give the reference's result, no NaN."""
    torch.manual_seed(3)
    q, k, v, _ = _inputs(1, 2, 65, 32, torch.float32, None)
    bias = torch.zeros(2, 65, 65, device=DEVICE)
    bias[:, :, :33] = float("-inf")
    bias.requires_grad_()
    do = torch.randn_like(q)
    got, want = _both(q, k, v, bias, do)
    assert all(torch.isfinite(t).all() for t in got)
    _assert_all_close(got, want, torch.float32, ["out", "dq", "dk", "dv", "dbias"])


def test_dbias_shape_and_dtype():
    """The gradient has the bias's own shape and dtype: [H,N,N] summed over the batch, or per image."""
    torch.manual_seed(4)
    B, H, N, d = 2, 1, 37, 32
    q, k, v, _ = _inputs(B, H, N, d, torch.bfloat16, None)
    for shape, dtype in (((H, N, N), torch.bfloat16), ((1, H, N, N), torch.float32), ((B, H, N, N), torch.float16)):
        bias = torch.randn(shape, dtype=dtype, device=DEVICE, requires_grad=True)
        out = flash_attention(q, k, v, bias)
        assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()
        (g,) = torch.autograd.grad(out.float().sum(), [bias])
        assert g.shape == bias.shape and g.dtype == dtype


def test_empty_batch():
    q = torch.randn(0, 2, 37, 32, device=DEVICE, requires_grad=True)
    bias = torch.randn(2, 37, 37, device=DEVICE, requires_grad=True)
    out = flash_attention(q, q, q, bias)
    assert out.shape == q.shape
    gq, gb = torch.autograd.grad(out.sum(), [q, bias], allow_unused=True)
    assert gq.shape == q.shape and (gb is None or not gb.any())


def test_never_materialises_batch_sized_scores():
    """No [B, H, N, N] tensor in the forward or the backward with a shared bias needing grad.

    Peak GPU memory cannot be measured on CPU, so this watches every allocation torch makes, inside
    the operators too (the kernels allocate only through torch). With B=3 and N=37 > d, the
    largest legitimate tensors are the 2-chunk fp32 partial sums of d(bias), [2, H, N, 48] at the
    aligned row stride; anything of B·H·N·N elements would be the full-size gradient or score
    matrix that SDPA's memory-efficient kernel allocates. The eager reference trips the same probe.
    """
    torch.manual_seed(5)
    B, H, N, d = 3, 2, 37, 16
    q, k, v, bias = _inputs(B, H, N, d, torch.float32, "shared")
    do = torch.randn_like(q)
    full = 4 * B * H * N * N  # float32 bytes
    grads = []
    seen = cpu_allocations(lambda: grads.extend(torch.autograd.grad(flash_attention(q, k, v, bias),
                                                                    [q, k, v, bias], do)))
    assert grads[3].shape == (H, N, N)
    assert len(seen) > 5 and max(seen) < full, f"an allocation of {max(seen)} bytes >= B·H·N·N floats = {full}"
    seen = cpu_allocations(lambda: torch.autograd.grad(attention_reference(q, k, v, bias), [bias], do))
    assert max(seen) >= full  # the probe does see score-sized tensors


def test_dbias_chunks_are_bounded(monkeypatch):
    """The shared-bias partial sums never grow with the batch: at most 32 chunks."""
    monkeypatch.undo()
    chunks = attn_mod._dbias_chunks(4096, 4, 12, torch.device(DEVICE))
    assert 1 <= chunks <= attn_mod._MAX_DBIAS_CHUNKS


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: (torch.randn(2, 37, 32),) * 3 + (None,), "rank 4"),
        (lambda: (torch.randn(2, 2, 37, 32), torch.randn(2, 2, 36, 32), torch.randn(2, 2, 37, 32), None), "same shape"),
        (lambda: (torch.randn(1, 2, 37, 32),) * 3 + (torch.randn(2, 37, 36),), r"bias must be \[H, N, N\]"),
        (lambda: (torch.randn(1, 2, 37, 32),) * 3 + (torch.randn(37, 37),), r"bias must be \[H, N, N\]"),
        (lambda: (torch.randn(2, 2, 37, 32),) * 3 + (torch.randn(3, 2, 37, 37),), r"bias must be \[H, N, N\]"),
        (lambda: (torch.randn(1, 2, 37, 32),) * 3 + (torch.ones(2, 37, 37, dtype=torch.int64),), "float tensor"),
        (lambda: (torch.randn(1, 2, 37, 32),) * 3 + (torch.randn(2, 37, 37, device="meta"),), "bias is on meta"),
        (lambda: (torch.randn(1, 2, 37, 256),) * 3 + (None,), "head dim 256"),
        (lambda: (torch.randn(1, 2, 37, 32, dtype=torch.float64),) * 3 + (None,), "dtype torch.float64"),
        (lambda: (torch.randn(1, 2, 8, 16),) * 2 + (torch.randn(1, 2, 8, 16, dtype=torch.float16), None), "one dtype"),
        (lambda: (torch.randn(1, 2, 8, 16),) * 2 + (torch.randn(1, 2, 8, 16, device="meta"), None), "one device"),
    ],
)
def test_bad_inputs_raise(make, message):
    q, k, v, bias = make()
    with pytest.raises(ValueError, match=message):
        flash_attention(q, k, v, bias)


def test_supports():
    q = torch.randn(1, 2, 37, 64, device=DEVICE)
    assert supports(q, torch.randn(2, 37, 37, device=DEVICE)) == (True, "ok")
    assert supports(q.half())[0] and supports(q.bfloat16())[0]
    ok, why = supports(q.double())
    assert not ok and "float64" in why
    ok, why = supports(torch.randn(1, 2, 37, 256, device=DEVICE))
    assert not ok and "head dim" in why
    ok, why = supports(q, torch.randn(2, 37, 37, device="meta"))
    assert not ok and "meta" in why
    ok, why = supports(torch.randn(1, 2, 37, 64, device="meta"))
    assert not ok and "CUDA" in why


@pytest.mark.slow
@pytest.mark.skipif(DEVICE != "cpu", reason="a CPU-only check of the compiled path")
def test_kernels_compile_for_sm90(tmp_path):
    """The interpreter never compiles; this builds each kernel for sm_90 (Triton + its bundled
    ptxas, no GPU needed), catching type errors the interpreter lets through (~10 s)."""
    compiled = run_in_subprocess(tmp_path, "attention")  # tests/sm90_compile.py
    assert len(compiled) == 4, compiled


def test_reference_is_softmax_attention():
    """The oracle itself, on a case small enough to write out: one head, two tokens, first row."""
    q = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    k = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    v = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    bias = torch.tensor([[[0.0, 0.5], [0.0, 0.0]]])
    w = torch.softmax(torch.tensor([1 / math.sqrt(2), 0.5]), 0)
    want = w[0] * v[0, 0, 0] + w[1] * v[0, 0, 1]
    torch.testing.assert_close(attention_reference(q, k, v, bias)[0, 0, 0], want)
