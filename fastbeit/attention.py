"""Attention backends and the one place that decides which one runs.

``eager`` is the original explicit softmax; ``sdpa`` is PyTorch's fused attention; ``triton`` is
our flash attention with BEiT's relative position bias (``fastbeit.kernels.attention``);
``xformers`` and ``flash`` (flash-attn) are used only where they support the configuration.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F

from fastbeit.errors import UserError
from fastbeit.kernels import use_triton


@functools.cache
def _xformers_ops():
    try:
        import xformers.ops as xops

        return xops
    except Exception:
        return None


@functools.cache
def _flash_attn_func():
    try:
        from flash_attn import flash_attn_func

        return flash_attn_func
    except Exception:
        return None


def _triton_supports(q: torch.Tensor, bias: Optional[torch.Tensor]) -> tuple[bool, str]:
    if not use_triton(q):
        return False, "Triton kernels need a CUDA device (or TRITON_INTERPRET=1 on CPU)"
    try:
        from fastbeit.kernels.attention import supports
    except ImportError as exc:  # pragma: no cover - only when the kernel file is missing
        return False, f"the Triton attention kernel is unavailable ({exc})"
    return supports(q, bias)


def resolve_backend(requested: str, q: torch.Tensor, bias: Optional[torch.Tensor], dropout_p: float) -> str:
    """The backend that will run: ``auto`` picks triton on CUDA when it applies, else sdpa.

    An explicitly requested backend that cannot run this configuration raises
    :class:`UserError` naming why, rather than silently running something else.
    """
    if requested == "auto":
        if q.is_cuda and dropout_p == 0.0 and _triton_supports(q, bias)[0]:
            return "triton"
        return "sdpa"
    if requested in ("eager", "sdpa"):
        return requested
    if requested == "triton":
        ok, why = _triton_supports(q, bias)
        if not ok:
            raise UserError(f"--attn triton cannot run here: {why}")
        if dropout_p > 0:
            raise UserError("--attn triton has no attention dropout; use --attn sdpa with attn_drop_rate > 0")
        return requested
    if requested == "xformers":
        if _xformers_ops() is None or not q.is_cuda:
            raise UserError("--attn xformers needs the xformers package and a CUDA device (pip install '.[xformers]')")
        return requested
    if requested == "flash":
        if _flash_attn_func() is None or not q.is_cuda:
            raise UserError("--attn flash needs the flash-attn package and a CUDA device (pip install '.[flash]')")
        if bias is not None:
            raise UserError(
                "--attn flash cannot add BEiT's relative position bias (flash-attn takes no bias); "
                "use --attn triton or sdpa, or a model without relative position bias"
            )
        if q.dtype not in (torch.float16, torch.bfloat16):
            raise UserError("--attn flash needs fp16 or bf16 (use --amp bf16)")
        return requested
    raise UserError(f"unknown attention backend {requested!r}")


def eager_attention(q, k, v, bias, scale: float, dropout_p: float, training: bool) -> torch.Tensor:
    """The original computation: (q·scale)·kᵀ + bias → softmax → dropout → ·v."""
    attn = (q * scale) @ k.transpose(-2, -1)
    if bias is not None:
        attn = attn + bias
    attn = attn.softmax(dim=-1)
    attn = F.dropout(attn, dropout_p, training)
    return attn @ v


def attention_from_qkv(
    qkv: torch.Tensor,
    bias: Optional[torch.Tensor],
    num_heads: int,
    scale: float,
    backend: str = "auto",
    dropout_p: float = 0.0,
    training: bool = False,
) -> torch.Tensor:
    """Self-attention of a packed projection ``[B, N, 3·H·d]`` → ``[B, N, H·d]``, as the model calls it.

    The triton backend reads q, k, v from ``qkv`` and writes the ``[B, N, H·d]`` output in place
    (no layout copies); the others split the heads as the original does and merge them back.
    """
    b, n, c3 = qkv.shape
    q, k, v = qkv.reshape(b, n, 3, num_heads, c3 // (3 * num_heads)).permute(2, 0, 3, 1, 4).unbind(0)
    p = dropout_p if training else 0.0
    if resolve_backend(backend, q, bias, p) == "triton":
        from fastbeit.kernels.attention import flash_attention_qkv

        return flash_attention_qkv(qkv, bias, num_heads, scale)
    out = attention(q, k, v, bias, scale, backend, dropout_p, training)
    return out.transpose(1, 2).reshape(b, n, c3 // 3)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: Optional[torch.Tensor],
    scale: float,
    backend: str = "auto",
    dropout_p: float = 0.0,
    training: bool = False,
) -> torch.Tensor:
    """softmax(q·kᵀ·scale + bias)·v for q, k, v ``[B, H, N, d]`` and bias ``[H, N, N]`` (or None)."""
    p = dropout_p if training else 0.0
    chosen = resolve_backend(backend, q, bias, p)
    if chosen == "eager":
        return eager_attention(q, k, v, bias, scale, p, training)
    if chosen == "sdpa":
        mask = None if bias is None else bias.to(q.dtype).unsqueeze(0)  # broadcast over the batch
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, scale=scale)
    if chosen == "triton":
        from fastbeit.kernels.attention import flash_attention

        return flash_attention(q, k, v, bias=bias, scale=scale)
    if chosen == "xformers":
        xops = _xformers_ops()
        attn_bias = None
        if bias is not None:
            attn_bias = bias.to(q.dtype).unsqueeze(0).expand(q.shape[0], -1, -1, -1)
        out = xops.memory_efficient_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=attn_bias, p=p, scale=scale
        )
        return out.transpose(1, 2)
    out = _flash_attn_func()(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=p, softmax_scale=scale)
    return out.transpose(1, 2)
