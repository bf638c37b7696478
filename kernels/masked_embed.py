"""Masked-token embedding: substitute the mask token, prepend CLS and add position embeddings in one
pass over the activations (the reference does four: blend, expand, cat, add).

The kernel evaluates the reference formula ``x = patch * (1 - w) + mask_token * w`` literally (not
a select), in float32, so NaN/inf behaviour and signed zeros match, and rounds once to the output
dtype. That single rounding equals the reference's: its blend is exact whenever the output is
bf16/fp16 (w is 0 or 1), so only the position-embedding add rounds, as it does here.

Backward reads the output gradient once: d(patch) = g * (1 - w) is written per image, and the
batch reductions d(pos_embed) = sum_b g, d(cls) = sum_b g[:, 0] and d(mask_token) = sum g * w are
accumulated in float32 per (token tile, feature tile, batch slice) program, then summed in torch
over the few batch slices (deterministic, no atomics).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from fastbeit.kernels import use_triton
from fastbeit.kernels.triton_helpers import cast_rne

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _masked_embed_fwd(
    out_ptr, patch_ptr, mask_ptr, mtok_ptr, cls_ptr, pos_ptr,
    rows_total, N, D,
    s_pb, s_pn, s_pd, s_mb, s_mn, s_mt, s_cls, s_post, s_posd,
    HAS_POS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out[b, t, d] for BLOCK_R flattened (image, token) rows; token 0 is CLS, token t >= 1 is patch t-1."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = d < D
    row_ok = rows < rows_total
    b = rows // (N + 1)
    t = rows % (N + 1)
    is_patch = row_ok & (t > 0)
    n = tl.maximum(t - 1, 0)
    tile_ok = is_patch[:, None] & d_ok[None, :]
    patch = tl.load(patch_ptr + b[:, None] * s_pb + n[:, None] * s_pn + d[None, :] * s_pd, mask=tile_ok,
                    other=0.0).to(tl.float32)
    w = tl.load(mask_ptr + b * s_mb + n * s_mn, mask=is_patch, other=0).to(tl.float32)
    mtok = tl.load(mtok_ptr + d * s_mt, mask=d_ok, other=0.0).to(tl.float32)
    cls = tl.load(cls_ptr + d * s_cls, mask=d_ok, other=0.0).to(tl.float32)
    x = patch * (1.0 - w[:, None]) + mtok[None, :] * w[:, None]
    x = tl.where((t == 0)[:, None], cls[None, :], x)
    out_ok = row_ok[:, None] & d_ok[None, :]
    if HAS_POS:
        x += tl.load(pos_ptr + t[:, None] * s_post + d[None, :] * s_posd, mask=out_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows[:, None] * D + d[None, :], cast_rne(x, out_ptr.dtype.element_ty), mask=out_ok)


@triton.jit
def _masked_embed_bwd(
    dpatch_ptr, colsum_ptr, mtok_part_ptr, grad_ptr, mask_ptr,
    B, N, D, SPLIT,
    s_gb, s_gt, s_gd, s_mb, s_mn,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One (token tile, feature tile, batch slice): d(patch) rows plus float32 partial sums."""
    pid_t = tl.program_id(0)
    pid_b = tl.program_id(2)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    t_ok = t < N + 1
    d_ok = d < D
    is_patch = t_ok & (t > 0)
    n = tl.maximum(t - 1, 0).to(tl.int64)
    tile_ok = t_ok[:, None] & d_ok[None, :]
    patch_ok = is_patch[:, None] & d_ok[None, :]
    colsum = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
    mtok = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
    for i in range(0, tl.cdiv(B - pid_b, SPLIT)):
        b64 = pid_b.to(tl.int64) + i * SPLIT
        g = tl.load(grad_ptr + b64 * s_gb + t[:, None] * s_gt + d[None, :] * s_gd, mask=tile_ok,
                    other=0.0).to(tl.float32)
        w = tl.load(mask_ptr + b64 * s_mb + n * s_mn, mask=is_patch, other=0).to(tl.float32)
        colsum += g
        mtok += g * w[:, None]
        dpatch = g * (1.0 - w[:, None])
        tl.store(dpatch_ptr + (b64 * N + n[:, None]) * D + d[None, :],
                 cast_rne(dpatch, dpatch_ptr.dtype.element_ty), mask=patch_ok)
    part = pid_b.to(tl.int64) * (N + 1) + t[:, None]
    tl.store(colsum_ptr + part * D + d[None, :], colsum, mask=tile_ok)
    mtok_row = pid_b.to(tl.int64) * tl.num_programs(0) + pid_t
    tl.store(mtok_part_ptr + mtok_row * D + d, tl.sum(mtok, 0), mask=d_ok)


def _mask_arg(mask: torch.Tensor) -> torch.Tensor:
    return mask.view(torch.uint8) if mask.dtype == torch.bool else mask


def _out_dtype(patch_tokens, mask_token, cls_token, pos_embed) -> torch.dtype:
    """The dtype the reference's type promotion gives (blend, then cat with CLS, then + pos)."""
    dtype = torch.promote_types(patch_tokens.dtype, mask_token.dtype)
    dtype = torch.promote_types(dtype, cls_token.dtype)
    return dtype if pos_embed is None else torch.promote_types(dtype, pos_embed.dtype)


def _split_batch(batch: int, tiles: int) -> int:
    """Batch slices for the backward: enough programs (~512) to fill a GPU, few partial sums."""
    return max(1, min(batch, triton.cdiv(512, max(tiles, 1))))


def _forward(patch_tokens, mask, mask_token, cls_token, pos_embed) -> torch.Tensor:
    B, N, D = patch_tokens.shape
    out = torch.empty(B, N + 1, D, dtype=_out_dtype(patch_tokens, mask_token, cls_token, pos_embed),
                      device=patch_tokens.device)
    block_r, block_d = 16, min(128, triton.next_power_of_2(D))
    grid = (triton.cdiv(B * (N + 1), block_r), triton.cdiv(D, block_d))
    has_pos = pos_embed is not None
    pos = pos_embed if has_pos else cls_token
    pos_strides = (pos_embed.stride(1), pos_embed.stride(2)) if has_pos else (0, 0)
    _masked_embed_fwd[grid](
        out, patch_tokens, _mask_arg(mask), mask_token, cls_token, pos,
        B * (N + 1), N, D,
        *patch_tokens.stride(), *mask.stride(), mask_token.stride(2), cls_token.stride(2), *pos_strides,
        HAS_POS=has_pos, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=4,
    )
    return out


def _backward(grad, mask, patch_dtype):
    """d(patch) [B,N,D] in ``patch_dtype``, float32 column sums [N+1,D] and d(mask_token) [D]."""
    B, n_tok, D = grad.shape
    N = n_tok - 1
    block_t, block_d = 8, min(128, triton.next_power_of_2(D))
    t_blocks, d_blocks = triton.cdiv(n_tok, block_t), triton.cdiv(D, block_d)
    split = _split_batch(B, t_blocks * d_blocks)
    dpatch = torch.empty(B, N, D, dtype=patch_dtype, device=grad.device)
    colsum = torch.empty(split, n_tok, D, dtype=torch.float32, device=grad.device)
    mtok = torch.empty(split * t_blocks, D, dtype=torch.float32, device=grad.device)
    _masked_embed_bwd[(t_blocks, d_blocks, split)](
        dpatch, colsum, mtok, grad, _mask_arg(mask),
        B, N, D, split,
        *grad.stride(), *mask.stride(),
        BLOCK_T=block_t, BLOCK_D=block_d, num_warps=4,
    )
    return dpatch, colsum.sum(0), mtok.sum(0)


@torch.library.custom_op("fastbeit::masked_embed_fwd", mutates_args=())
def _masked_embed_op(
    patch_tokens: torch.Tensor, mask: torch.Tensor, mask_token: torch.Tensor, cls_token: torch.Tensor,
    pos_embed: Optional[torch.Tensor],
) -> torch.Tensor:
    """The forward kernel as a PyTorch operator (torch.compile traces through it)."""
    return _forward(patch_tokens, mask, mask_token, cls_token, pos_embed)


@_masked_embed_op.register_fake
def _(patch_tokens, mask, mask_token, cls_token, pos_embed):
    B, N, D = patch_tokens.shape
    return patch_tokens.new_empty(B, N + 1, D, dtype=_out_dtype(patch_tokens, mask_token, cls_token, pos_embed))


@torch.library.custom_op("fastbeit::masked_embed_bwd", mutates_args=())
def _masked_embed_bwd_op(
    grad: torch.Tensor, mask: torch.Tensor, patch_dtype: torch.dtype
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """d(patch) ``[B, N, D]``, float32 column sums ``[N+1, D]`` (d(pos), d(cls) = row 0), d(mask_token) ``[D]``."""
    return _backward(grad, mask, patch_dtype)


@_masked_embed_bwd_op.register_fake
def _(grad, mask, patch_dtype):
    B, n_tok, D = grad.shape
    f32 = torch.float32
    return grad.new_empty(B, n_tok - 1, D, dtype=patch_dtype), grad.new_empty(n_tok, D, dtype=f32), \
        grad.new_empty(D, dtype=f32)


def _setup_context(ctx, inputs, output) -> None:
    patch_tokens, mask, mask_token, cls_token, pos_embed = inputs
    ctx.save_for_backward(mask)
    ctx.dtypes = (patch_tokens.dtype, mask_token.dtype, cls_token.dtype,
                  None if pos_embed is None else pos_embed.dtype)


def _backward_formula(ctx, grad):
    """The activations are not needed for any gradient: only the mask was saved."""
    (mask,) = ctx.saved_tensors
    p_dtype, m_dtype, c_dtype, pos_dtype = ctx.dtypes
    dpatch, colsum, dmtok = _masked_embed_bwd_op(grad, mask, p_dtype)
    B, n_tok, D = grad.shape
    needs = ctx.needs_input_grad
    dpos = colsum.view(1, n_tok, D).to(pos_dtype) if pos_dtype is not None and needs[4] else None
    return (
        dpatch if needs[0] else None,
        None,
        dmtok.view(1, 1, D).to(m_dtype) if needs[2] else None,
        colsum[0].view(1, 1, D).to(c_dtype) if needs[3] else None,
        dpos,
    )


_masked_embed_op.register_autograd(_backward_formula, setup_context=_setup_context)


def _validate(patch_tokens, mask, mask_token, cls_token, pos_embed) -> None:
    if patch_tokens.dim() != 3:
        raise ValueError(f"patch_tokens must be [B, N, D], got shape {tuple(patch_tokens.shape)}")
    B, N, D = patch_tokens.shape
    if tuple(mask.shape) != (B, N):
        raise ValueError(f"mask must be [B, N] = {(B, N)}, got {tuple(mask.shape)}")
    if mask.dtype.is_floating_point or mask.dtype.is_complex:
        raise ValueError(f"mask must be bool (or an integer 0/1 tensor), got {mask.dtype}")
    for name, tok in (("mask_token", mask_token), ("cls_token", cls_token)):
        if tuple(tok.shape) != (1, 1, D):
            raise ValueError(f"{name} must be [1, 1, {D}], got {tuple(tok.shape)}")
    if pos_embed is not None and tuple(pos_embed.shape) != (1, N + 1, D):
        raise ValueError(f"pos_embed must be [1, N + 1, D] = {(1, N + 1, D)}, got {tuple(pos_embed.shape)}")
    tensors = [patch_tokens, mask, mask_token, cls_token] + ([] if pos_embed is None else [pos_embed])
    if len({t.device for t in tensors}) > 1:
        raise ValueError(f"all inputs must be on one device, got {sorted({str(t.device) for t in tensors})}")


def masked_embed(
    patch_tokens: torch.Tensor,
    mask: torch.Tensor,
    mask_token: torch.Tensor,
    cls_token: torch.Tensor,
    pos_embed: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``[B, N+1, D]`` tokens: masked patches replaced by ``mask_token``, CLS first, ``pos_embed``
    added; the same values and dtype as :func:`masked_embed_reference`, in one kernel."""
    _validate(patch_tokens, mask, mask_token, cls_token, pos_embed)
    floats = [patch_tokens, mask_token, cls_token] + ([] if pos_embed is None else [pos_embed])
    if not use_triton(patch_tokens) or any(t.dtype not in _FLOATS for t in floats):
        return masked_embed_reference(patch_tokens, mask, mask_token, cls_token, pos_embed)
    return _masked_embed_op(patch_tokens, mask, mask_token, cls_token, pos_embed)


def masked_embed_reference(
    patch_tokens: torch.Tensor,
    mask: torch.Tensor,
    mask_token: torch.Tensor,
    cls_token: torch.Tensor,
    pos_embed: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The original BEiT code: blend with the mask token, prepend CLS, add position embeddings."""
    w = mask.unsqueeze(-1).type_as(mask_token)
    x = patch_tokens * (1 - w) + mask_token * w
    x = torch.cat((cls_token.expand(patch_tokens.shape[0], -1, -1), x), dim=1)
    if pos_embed is not None:
        x = x + pos_embed
    return x
