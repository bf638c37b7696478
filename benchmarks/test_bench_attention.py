"""Attention with BEiT's relative position bias: Triton flash attention vs PyTorch SDPA vs eager.

Each implementation is the model's own path (``fastbeit.attention.attention`` with that backend),
run as the pre-training step runs it: under bf16 autocast, q, k, v in bf16 (what the qkv projection
yields) and the bias as the model passes it, in fp32 (gathered from the fp32 table; ``sdpa``
casts it to bf16 itself, ``eager`` adds it to the bf16 scores, ``triton`` upcasts it on load).
So ``eager`` is the model's bf16 eager attention and ``sdpa`` the model's SDPA call, not an fp32
oracle: the ratios are the ones a user switching ``--attn`` would see. BEiT-Base shape by default:
B=256, H=12, N=197 (14·14 + 1), d=64, the bias ``[12, 197, 197]`` shared by the batch and
requiring grad (it is a learned table). Cases:

* fwd+bwd with bias: ``triton`` (d(bias) reduced over the batch in the kernel), ``sdpa``
  (whichever SDPA backend PyTorch picks for a bias with grad; the memory-efficient one expands the
  bias gradient to [B, H, N, N] and sums it afterwards), ``eager``.
* forward only with bias (no grad): the same three.
* fwd+bwd without bias: ``triton`` vs ``sdpa`` pinned to the flash backend.

Each case records in ``benchmark.extra_info`` the peak memory of one step above what was
allocated before it (``peak_extra_mb``, the name benchmarks/conftest.py uses: inputs excluded;
outputs, gradients and workspaces included) and, for ``triton`` and ``eager``, the largest error
against the fp32-softmax oracle on a batch of 8 (so the eager path's own bf16 error is on record
beside ours).

    pytest benchmarks/test_bench_attention.py --benchmark-only
    BENCH_ATTN_BATCH=64 pytest benchmarks/test_bench_attention.py --benchmark-only

The CUDA cases skip without a GPU (and when TRITON_INTERPRET=1); ``test_eager_path_cpu`` runs a
tiny eager fwd+bwd anywhere so that CI exercises this file.
"""

import os
from typing import Callable, Optional

import pytest
import torch
import torch.nn.functional as F

from fastbeit.attention import attention
from fastbeit.kernels import interpreting
from fastbeit.kernels.attention import attention_reference

B = int(os.environ.get("BENCH_ATTN_BATCH", "256"))
H, N, D = 12, 197, 64
SCALE = D**-0.5
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "10"))

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="attention benchmarks need a CUDA GPU")


def _model_path(backend: str) -> Callable:
    """The model's attention call with one backend, under the step's bf16 autocast."""

    def run(q, k, v, bias):
        with torch.autocast("cuda", torch.bfloat16):
            return attention(q, k, v, bias, SCALE, backend=backend)

    return run


def _sdpa_flash(q, k, v, bias):
    """SDPA pinned to the flash backend (no bias), so a silent fallback cannot change what is measured."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=SCALE)


IMPLS = {
    "triton": _model_path("triton"),
    "sdpa": _model_path("sdpa"),
    "sdpa_flash": _sdpa_flash,
    "eager": _model_path("eager"),
}


def _make(batch: int, with_bias: bool, grad: bool, device: str = "cuda", dtype=torch.bfloat16) -> tuple:
    """q, k, v ``[batch, H, N, D]`` in ``dtype``, the shared fp32 bias ``[H, N, N]`` (or None), dO."""
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v, do = (torch.randn(batch, H, N, D, device=device, dtype=dtype, generator=g) for _ in range(4))
    bias = torch.randn(H, N, N, device=device, dtype=torch.float32, generator=g) if with_bias else None
    leaves = [t.requires_grad_(grad) for t in (q, k, v, bias) if t is not None]
    return q, k, v, bias, do, leaves


def _step(fn: Callable, q, k, v, bias, do, leaves: list, backward: bool) -> Callable:
    def step():
        if backward:
            torch.autograd.grad(fn(q, k, v, bias), leaves, do)
        else:
            with torch.no_grad():
                fn(q, k, v, bias)
        torch.cuda.synchronize()

    return step


def _peak_mb(step: Callable) -> float:
    """Peak allocated memory of one ``step`` above what was allocated before it, in MiB."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _max_errors(impl: str, with_bias: bool, backward: bool) -> dict:
    """Largest |impl - fp32 oracle| of the output and gradients on a batch of 8."""
    q, k, v, bias, do, leaves = _make(8, with_bias, backward)
    results = []
    for fn in (IMPLS[impl], lambda q, k, v, b: attention_reference(q, k, v, b, SCALE)):
        out = fn(q, k, v, bias)
        results.append([out, *(torch.autograd.grad(out, leaves, do) if backward else ())])
    return {f"max_abs_err_{name}": float((a.detach().float() - b.float()).abs().max())
            for name, a, b in zip(["out", "dq", "dk", "dv", "dbias"], *results)}


def _run(benchmark, impl: str, with_bias: bool, backward: bool) -> None:
    if impl == "triton" and interpreting():
        pytest.skip("TRITON_INTERPRET=1 would run the CUDA benchmark in the CPU interpreter")
    fn = IMPLS[impl]
    q, k, v, bias, do, leaves = _make(B, with_bias, backward)
    step = _step(fn, q, k, v, bias, do, leaves, backward)
    try:
        step()  # warm-up: Triton compiles and autotunes, cuDNN/cuBLAS pick their kernels
    except RuntimeError as exc:  # e.g. an SDPA backend refusing this configuration
        if impl == "triton":
            raise  # ours must run: a failure here is a bug, not a skip
        pytest.skip(f"{impl} cannot run this case: {exc}")
    peak = _peak_mb(step)
    benchmark.pedantic(step, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(
        {
            "impl": impl,
            "shape": [B, H, N, D],
            "dtype": "bfloat16 (autocast)",
            "bias": (f"[H, N, N] fp32{' requires grad' if backward else ''}" if with_bias else None),
            "pass": "fwd+bwd" if backward else "fwd",
            "peak_extra_mb": round(peak, 1),
            "ms": round(benchmark.stats.stats.mean * 1e3, 3),
            "device": torch.cuda.get_device_name(),
            "torch": torch.__version__,
        }
    )
    if impl in ("triton", "eager"):
        errors = _max_errors(impl, with_bias, backward)
        benchmark.extra_info.update(errors)
        if impl == "triton":
            assert max(errors.values()) < 0.1, errors  # bf16 against the fp32-softmax oracle


@needs_cuda
@pytest.mark.parametrize("impl", ["triton", "sdpa", "eager"])
def test_fwd_bwd_with_bias(benchmark, impl):
    benchmark.group = "attention fwd+bwd, shared bias with grad"
    _run(benchmark, impl, with_bias=True, backward=True)


@needs_cuda
@pytest.mark.parametrize("impl", ["triton", "sdpa", "eager"])
def test_fwd_with_bias(benchmark, impl):
    benchmark.group = "attention fwd, shared bias"
    _run(benchmark, impl, with_bias=True, backward=False)


@needs_cuda
@pytest.mark.parametrize("impl", ["triton", "sdpa_flash"])
def test_fwd_bwd_no_bias(benchmark, impl):
    benchmark.group = "attention fwd+bwd, no bias"
    _run(benchmark, impl, with_bias=False, backward=True)


def test_eager_path_cpu(benchmark):
    """The model's eager attention, fwd+bwd, tiny and in fp32 on the CPU: keeps this file exercised
    where there is no GPU."""
    benchmark.group = "attention eager (CPU, tiny)"
    g = torch.Generator().manual_seed(0)
    q, k, v, do = (torch.randn(2, 2, 37, 16, generator=g) for _ in range(4))
    bias: Optional[torch.Tensor] = torch.randn(2, 37, 37, generator=g)
    leaves = [t.requires_grad_() for t in (q, k, v, bias)]

    def step():
        return torch.autograd.grad(attention(q, k, v, bias, 16**-0.5, backend="eager"), leaves, do)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: intra-op threads only add contention on a shared CPU
    try:
        grads = benchmark.pedantic(step, rounds=20, iterations=1, warmup_rounds=3)
    finally:
        torch.set_num_threads(threads)
    assert grads[3].shape == (2, 37, 37)
    want = torch.autograd.grad(attention_reference(q, k, v, bias, 16**-0.5), leaves, do)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(grads, want))
