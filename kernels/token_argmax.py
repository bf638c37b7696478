"""The tokenizer's last layer and its argmax in one pass: ids without the ``[B, V, h, w]`` logits.

The dVAE encoder ends with ReLU → 1×1 conv to V = 8192 logits → argmax over V. Per patch that is a
GEMM row ``relu(x[m]) @ W.T + b`` (``x``: ``[M, C]``, M = B·h·w, C = 2048 for DALL-E) whose only use
is its argmax; at batch 256 the logits would be ~0.8 GB in bf16. Here one Triton program per block
of rows streams the vocabulary in tiles, computes each logits tile in registers (``tl.dot``,
float32 accumulation, the bias added in float32) and keeps a running (max, index) per row; only the
ids are written. Ties go to the lowest index, as ``torch.argmax``: ``tl.max`` breaks them to the
left within a tile and a later tile replaces the best only when strictly greater. NaN logits are
not treated specially (torch.argmax would return the first NaN; a frozen tokenizer gives none).

Operands are multiplied in ``x``'s dtype (bf16, fp16 or fp32; fp32 uses TF32 iff
``torch.backends.cuda.matmul`` allows it), and the logits stay float32: with bf16 operands this is
more accurate than a bf16 conv, whose rounded bf16 logits tie far more often.

:func:`token_argmax_reference` is the same function in PyTorch. It also never holds all the
logits: it works in chunks of rows (at most ``_CHUNK_ELEMENTS`` logits at a time), which is how
the CPU runs it.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from fastbeit.kernels import interpreting, use_triton
from fastbeit.kernels.gathered_ce import _operand

_FLOATS = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
_CHUNK_ELEMENTS = 1 << 22  # reference: logits per chunk (16 MiB in fp32)


def _configs():
    if interpreting():
        return [triton.Config(dict(BLOCK_M=32, BLOCK_V=32, BLOCK_K=32), num_warps=4, num_stages=1)]
    return [
        triton.Config(dict(BLOCK_M=128, BLOCK_V=128, BLOCK_K=64), num_warps=8, num_stages=3),
        triton.Config(dict(BLOCK_M=128, BLOCK_V=256, BLOCK_K=32), num_warps=8, num_stages=3),
        triton.Config(dict(BLOCK_M=64, BLOCK_V=128, BLOCK_K=64), num_warps=4, num_stages=4),
        # IEEE fp32 (no tensor cores) spills registers in the tiles above (ptxas, sm_90): a small one
        triton.Config(dict(BLOCK_M=64, BLOCK_V=64, BLOCK_K=32), num_warps=4, num_stages=3),
    ]


@triton.autotune(configs=_configs(), key=["C", "V", "DOT"])
@triton.jit
def _token_argmax_kernel(
    ids_ptr, x_ptr, w_ptr, b_ptr, M, C, V, s_xm, s_xc, s_wv, s_wc,
    RELU: tl.constexpr, HAS_BIAS: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
    INTERP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """ids[m] = argmax_v (relu(x[m]) @ W[v] + b[v]) for one block of BLOCK_M rows."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * s_xm
    best = tl.full([BLOCK_M], float("-inf"), tl.float32)
    best_idx = tl.zeros([BLOCK_M], tl.int64)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < V
        w_rows = w_ptr + cols.to(tl.int64)[:, None] * s_wv
        acc = tl.zeros([BLOCK_M, BLOCK_V], tl.float32)
        for k0 in range(0, C, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < C
            x = tl.load(x_rows + ks[None, :] * s_xc, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            if RELU:
                x = tl.maximum(x, 0.0)
            w = tl.load(w_rows + ks[None, :] * s_wc, mask=col_ok[:, None] & k_ok[None, :], other=0.0)
            acc = tl.dot(_operand(x, DOT, INTERP), tl.trans(_operand(w, DOT, INTERP)), acc,
                         input_precision=PRECISION)
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        acc = tl.where(col_ok[None, :], acc, float("-inf"))
        tile_max, tile_arg = tl.max(acc, 1, return_indices=True, return_indices_tie_break_left=True)
        better = tile_max > best  # strict: an earlier tile keeps a tie
        best_idx = tl.where(better, v0 + tile_arg.to(tl.int64), best_idx)
        best = tl.where(better, tile_max, best)
    tl.store(ids_ptr + rows, best_idx, mask=row_ok)


def _validate(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"expected x [M, C] and weight [V, C], got {tuple(x.shape)} and {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must be [V] = [{weight.shape[0]}], got {tuple(bias.shape)}")
    if weight.shape[0] == 0:
        raise ValueError("the vocabulary is empty")


def token_argmax(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
                 relu: bool = False, impl: str = "auto") -> torch.Tensor:
    """``argmax(relu?(x) @ weight.T + bias, -1)`` as int64 ``[M]``, never storing the ``[M, V]`` logits.

    ``impl``: ``triton`` (the fused kernel), ``reference`` (row chunks in PyTorch) or ``auto``
    (triton where it can run: CUDA, or the interpreter). Operands in ``x``'s dtype, logits fp32.
    """
    _validate(x, weight, bias)
    if impl not in ("auto", "triton", "reference"):
        raise ValueError(f"impl must be auto, triton or reference, got {impl!r}")
    fused = impl == "triton" or (impl == "auto" and use_triton(x))
    if not fused or x.dtype not in _FLOATS:
        return token_argmax_reference(x, weight, bias, relu=relu)
    M, C = x.shape
    V = weight.shape[0]
    ids = torch.empty(M, dtype=torch.int64, device=x.device)
    if M == 0:
        return ids
    weight = weight.to(x.dtype)
    matmul = torch.backends.cuda.matmul
    tf32 = matmul.fp32_precision == "tf32" if hasattr(matmul, "fp32_precision") else matmul.allow_tf32
    strict = x.dtype == torch.float32 and not tf32
    precision = "ieee" if strict or interpreting() else "tf32"
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]),)
    _token_argmax_kernel[grid](
        ids, x, weight, bias if bias is not None else weight, M, C, V, *x.stride(), *weight.stride(),
        RELU=relu, HAS_BIAS=bias is not None, DOT=_FLOATS[x.dtype], PRECISION=precision, INTERP=interpreting(),
    )
    return ids


def token_argmax_reference(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
                           relu: bool = False, impl: str = "reference") -> torch.Tensor:
    """The same ids in PyTorch: fp32 logits of ``x``'s-dtype operands, argmax, a chunk of rows at a time."""
    _validate(x, weight, bias)
    w = weight.to(x.dtype).float()
    b = bias.float() if bias is not None else None
    step = max(1, _CHUNK_ELEMENTS // weight.shape[0])
    out = []
    for start in range(0, x.shape[0], step):
        rows = x[start:start + step]
        rows = torch.relu(rows) if relu else rows
        out.append(F.linear(rows.float(), w, b).argmax(-1))
    return torch.cat(out) if out else torch.empty(0, dtype=torch.int64, device=x.device)
