"""Attention with BEiT's relative position bias: Triton flash attention vs PyTorch SDPA vs eager.

BEiT-Base shape by default: B=256, H=12, N=197 (14·14 + 1), d=64, bf16, the bias ``[12, 197, 197]``
shared by the batch and requiring grad (it is a learned table). Cases:

* fwd+bwd with bias: ``triton`` (d(bias) reduced over the batch in the kernel), ``sdpa``
  (``attn_mask=bias``, forced to the memory-efficient backend, the only fused one taking a bias
  with grad; it expands the bias gradient to [B, H, N, N] and sums it afterwards), ``eager``
  (the plain reference: explicit fp32 softmax).
* forward only with bias (no grad): the same three.
* fwd+bwd without bias: ``triton`` vs ``sdpa`` forced to the flash backend.

Each case records in ``benchmark.extra_info`` the peak memory of one step above what was
allocated before it (``peak_extra_mb``, the name benchmarks/conftest.py uses: inputs excluded;
outputs, gradients and workspaces included); the triton cases also record their largest error
against the eager reference on a batch of 8.

    pytest benchmarks/test_bench_attention.py --benchmark-only
    BENCH_ATTN_BATCH=64 pytest benchmarks/test_bench_attention.py --benchmark-only

The CUDA cases skip without a GPU (and when TRITON_INTERPRET=1); ``test_reference_cpu`` runs a
tiny reference fwd+bwd anywhere so that CI exercises this file.
"""

import os
from typing import Callable, Optional

import pytest
import torch
import torch.nn.functional as F

from fastbeit.kernels import interpreting
from fastbeit.kernels.attention import attention_reference, flash_attention

B = int(os.environ.get("BENCH_ATTN_BATCH", "256"))
H, N, D = 12, 197, 64
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "10"))

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="attention benchmarks need a CUDA GPU")


def _sdpa(backend_name: str) -> Callable:
    """SDPA pinned to one backend, so a silent fallback cannot change what is measured."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, backend_name)

    def run(q, k, v, bias):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)

    return run


IMPLS = {
    "triton": lambda q, k, v, bias: flash_attention(q, k, v, bias),
    "sdpa": _sdpa("EFFICIENT_ATTENTION"),
    "sdpa_flash": _sdpa("FLASH_ATTENTION"),
    "eager": lambda q, k, v, bias: attention_reference(q, k, v, bias),
}


def _make(batch: int, with_bias: bool, grad: bool, device: str = "cuda", dtype=torch.bfloat16) -> tuple:
    """q, k, v ``[batch, H, N, D]``, the shared bias ``[H, N, N]`` (or None), dO."""
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v, do = (torch.randn(batch, H, N, D, device=device, dtype=dtype, generator=g) for _ in range(4))
    bias = torch.randn(H, N, N, device=device, dtype=dtype, generator=g) if with_bias else None
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


def _max_errors(with_bias: bool, backward: bool) -> dict:
    """Largest |triton - eager| of the output and gradients on a batch of 8 (bf16)."""
    q, k, v, bias, do, leaves = _make(8, with_bias, backward)
    errors = {}
    results = []
    for fn in (flash_attention, attention_reference):
        out = fn(q, k, v, bias)
        results.append([out, *(torch.autograd.grad(out, leaves, do) if backward else ())])
    for name, a, b in zip(["out", "dq", "dk", "dv", "dbias"], *results):
        errors[f"max_abs_err_{name}"] = float((a.float() - b.float()).abs().max())
    return errors


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
            "dtype": "bfloat16",
            "bias": "[H, N, N] requires grad" if with_bias and backward else ("[H, N, N]" if with_bias else None),
            "pass": "fwd+bwd" if backward else "fwd",
            "peak_extra_mb": round(peak, 1),
            "ms": round(benchmark.stats.stats.mean * 1e3, 3),
            "device": torch.cuda.get_device_name(),
            "torch": torch.__version__,
        }
    )
    if impl == "triton":
        errors = _max_errors(with_bias, backward)
        benchmark.extra_info.update(errors)
        assert max(errors.values()) < 0.1, errors  # bf16 against the fp32-softmax reference


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


def test_reference_cpu(benchmark):
    """A tiny eager fwd+bwd on CPU: keeps this file exercised where there is no GPU."""
    benchmark.group = "attention reference (CPU, tiny)"
    g = torch.Generator().manual_seed(0)
    q, k, v, do = (torch.randn(2, 2, 37, 16, generator=g) for _ in range(4))
    bias: Optional[torch.Tensor] = torch.randn(2, 37, 37, generator=g)
    leaves = [t.requires_grad_() for t in (q, k, v, bias)]

    def step():
        return torch.autograd.grad(attention_reference(q, k, v, bias), leaves, do)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: intra-op threads only add contention on a shared CPU
    try:
        grads = benchmark.pedantic(step, rounds=20, iterations=1, warmup_rounds=3)
    finally:
        torch.set_num_threads(threads)
    assert grads[3].shape == (2, 37, 37)
