"""Cross entropy of the lm_head on masked positions only, without the ``[M, V]`` logits.

The original BEiT code gathers ``hidden[mask]``, applies ``lm_head`` (a ``[V, D]`` Linear, V = 8192)
and calls ``nn.CrossEntropyLoss`` on the ``[M, V]`` float logits (M ~ 75 per image: ~630 MB of
logits and as much again for their gradient at batch 256). Here:

* forward: one Triton program per block of masked rows streams the vocabulary in chunks, computing
  logits tile by tile (``tl.dot``) with an online log-sum-exp, the label logit and the running
  argmax (first index wins ties, as ``torch.argmax``). Only ``lse`` per row is kept for backward.
* backward: for a bounded chunk of rows (at most ``_SCRATCH_ELEMENTS`` entries of scratch, 16 Mi,
  e.g. 2048 rows at V = 8192), one kernel recomputes the logits and writes ``dlogits = (softmax -
  onehot) * grad / M``; two Triton matmul kernels then scatter ``dlogits @ W`` into d(hidden) at the
  masked positions and accumulate ``dlogitsᵀ @ hidden`` (+ column sums for d(bias)) into float32
  d(weight) / d(bias). Each tile is owned by one program: no atomics, deterministic.

Static shapes, no host sync. The original masks a variable number of patches per image (64-75 of
196), so its boolean gather ``x[mask]`` has a data-dependent size (a ``nonzero``, a host sync, and no
CUDA graph or single compiled graph). Here every image contributes ``max_masked`` rows (75, the most
any mask has): a stable sort of the mask puts its masked positions first, in the order ``x[mask]``
visits them, and a validity mask marks the padding rows past each image's count. Padding rows are
computed and then weighted 0, so the loss and accuracy are the original's mean over the real masked
tokens (summed in another order). An image with more than ``max_masked`` masked patches makes the
loss NaN on the device (``validate=True`` raises instead, at the cost of a sync).

Rows are addressed by flat position ``b * N + n``, so ``hidden`` (e.g. the slice ``x[:, 1:]`` of a
``[B, N+1, D]`` tensor) is read through its strides: nothing is copied. The kernels are PyTorch
operators (``torch.library.custom_op``: ``fastbeit::gathered_ce_fwd`` / ``_bwd`` with fake
implementations and a registered autograd formula), so ``torch.compile`` traces the whole step
through them with ``fullgraph=True``.

Dtype rules. The matmuls multiply in a "compute dtype" and accumulate in float32: the autocast dtype
when autocast is on for the inputs' device (what ``F.linear`` would use), else the common dtype of
``hidden`` and ``weight`` if they agree, else the lower-precision one (bf16 > fp16 > fp32). float32
matmuls use TF32 iff ``torch.backends.cuda.matmul.allow_tf32``. Softmax, log-sum-exp, loss and
accuracy are always float32, and logits are never rounded to 16 bits (the reference under autocast
rounds them to bf16 before its float32 cross entropy, so it is slightly less accurate). Gradients
come back in the dtype of their input; d(weight) and d(bias) are summed in float32. The dlogits
scratch has the compute dtype, like the logits gradient the reference feeds its 16-bit matmuls: in
fp16 it underflows without a loss scale just as the reference does (use a GradScaler, or bf16).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from fastbeit.kernels import interpreting, use_triton
from fastbeit.kernels.triton_helpers import cast_rne, round_to_bf16
from fastbeit.masking import gather_rows, masked_mean, padded_positions

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
_SCRATCH_ELEMENTS = 1 << 24  # backward dlogits chunk: rows * V at most this (64 MiB fp32, 32 MiB bf16)
_TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _operand(x, DOT: tl.constexpr, INTERP: tl.constexpr):
    """A loaded tile as a tl.dot operand of dtype DOT. The interpreter cannot do 16-bit arithmetic,
    so there the tile is rounded to DOT's precision but kept in float32."""
    if INTERP:
        x = x.to(tl.float32)
        if DOT == tl.bfloat16:
            x = round_to_bf16(x)
        elif DOT == tl.float16:
            x = x.to(tl.float16).to(tl.float32)
        return x
    else:
        return x.to(DOT)


@triton.jit
def _logits_tile(h_ptr, w_ptr, b_ptr, row_off, row_ok, cols, col_ok, D, s_hd, s_wv, s_wd,
                 HAS_BIAS: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr, INTERP: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    """float32 logits[BLOCK_M, BLOCK_V] = hidden[rows] @ W[cols]^T + b[cols]; -inf past V."""
    acc = tl.zeros([BLOCK_M, BLOCK_V], tl.float32)
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < D
        h = tl.load(h_ptr + row_off[:, None] + ks[None, :] * s_hd, mask=row_ok[:, None] & k_ok[None, :],
                    other=0.0)
        w = tl.load(w_ptr + cols[:, None] * s_wv + ks[None, :] * s_wd, mask=col_ok[:, None] & k_ok[None, :],
                    other=0.0)
        acc = tl.dot(_operand(h, DOT, INTERP), tl.trans(_operand(w, DOT, INTERP)), acc,
                     input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return tl.where(col_ok[None, :], acc, float("-inf"))


@triton.jit
def _row_addresses(rows_ptr, tgt_ptr, start, M, N, s_hb, s_hn, BLOCK_M: tl.constexpr):
    """Rows start..start+BLOCK_M of the gather: hidden row offsets (int64 math) and their targets."""
    r = start + tl.arange(0, BLOCK_M)
    row_ok = r < M
    pos = tl.load(rows_ptr + r, mask=row_ok, other=0)
    tgt = tl.load(tgt_ptr + r, mask=row_ok, other=0)
    return r, row_ok, pos, (pos // N) * s_hb + (pos % N) * s_hn, tgt


@triton.jit
def _ce_fwd_kernel(
    lse_ptr, nll_ptr, correct_ptr, h_ptr, w_ptr, b_ptr, rows_ptr, tgt_ptr,
    M, N, D, V,
    s_hb, s_hn, s_hd, s_wv, s_wd,
    HAS_BIAS: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr, INTERP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Per masked row: lse, nll = lse - logit[target] (NaN if target is outside [0, V)), top-1 hit."""
    r, row_ok, _, row_off, tgt = _row_addresses(rows_ptr, tgt_ptr, tl.program_id(0) * BLOCK_M, M, N,
                                                s_hb, s_hn, BLOCK_M)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    label = tl.zeros([BLOCK_M], tl.float32)
    best = tl.full([BLOCK_M], float("-inf"), tl.float32)
    best_idx = tl.zeros([BLOCK_M], tl.int64)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < V
        logits = _logits_tile(h_ptr, w_ptr, b_ptr, row_off, row_ok, cols.to(tl.int64), col_ok, D, s_hd,
                              s_wv, s_wd, HAS_BIAS, DOT, PRECISION, INTERP, BLOCK_M, BLOCK_V, BLOCK_K)
        chunk_max, chunk_arg = tl.max(logits, 1, return_indices=True, return_indices_tie_break_left=True)
        m_new = tl.maximum(m_i, chunk_max)
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(logits - m_new[:, None]), 1)
        m_i = m_new
        label += tl.sum(tl.where(cols[None, :] == tgt[:, None], logits, 0.0), 1)
        better = chunk_max > best  # strict: an earlier chunk keeps ties, like torch.argmax
        best_idx = tl.where(better, v0 + chunk_arg.to(tl.int64), best_idx)
        best = tl.where(better, chunk_max, best)
    lse = m_i + tl.log(l_i)
    tgt_ok = (tgt >= 0) & (tgt < V)
    tl.store(lse_ptr + r, lse, mask=row_ok)
    tl.store(nll_ptr + r, tl.where(tgt_ok, lse - label, float("nan")), mask=row_ok)
    tl.store(correct_ptr + r, (best_idx == tgt).to(tl.float32), mask=row_ok)


@triton.jit
def _ce_dlogits_kernel(
    ds_ptr, scale_ptr, lse_ptr, h_ptr, w_ptr, b_ptr, rows_ptr, tgt_ptr,
    M, N, D, V,
    s_hb, s_hn, s_hd, s_wv, s_wd,
    HAS_BIAS: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr, INTERP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dlogits[r, v] = (softmax - onehot) * scale[r] for one (row block, vocab block) of the chunk:
    ``scale[r]`` is d(loss)/d(nll[r]), 0 for padding rows."""
    r, row_ok, _, row_off, tgt = _row_addresses(rows_ptr, tgt_ptr, tl.program_id(0) * BLOCK_M, M, N,
                                                s_hb, s_hn, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = cols < V
    logits = _logits_tile(h_ptr, w_ptr, b_ptr, row_off, row_ok, cols.to(tl.int64), col_ok, D, s_hd, s_wv,
                          s_wd, HAS_BIAS, DOT, PRECISION, INTERP, BLOCK_M, BLOCK_V, BLOCK_K)
    lse = tl.load(lse_ptr + r, mask=row_ok, other=0.0)
    scale = tl.load(scale_ptr + r, mask=row_ok, other=0.0)
    prob = tl.exp(logits - lse[:, None])
    ds = (prob - (cols[None, :] == tgt[:, None]).to(tl.float32)) * scale[:, None]
    offs = r.to(tl.int64)[:, None] * V + cols[None, :]
    tl.store(ds_ptr + offs, cast_rne(ds, ds_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _ce_dhidden_kernel(
    dh_ptr, ds_ptr, w_ptr, rows_ptr,
    M, D, V, s_wv, s_wd,
    DOT: tl.constexpr, PRECISION: tl.constexpr, INTERP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """d(hidden)[pos[r], d] = sum_v dlogits[r, v] * W[v, d], stored at the row's flat position."""
    r = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = r < M
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = d < D
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for v0 in range(0, V, BLOCK_K):
        vs = v0 + tl.arange(0, BLOCK_K)
        v_ok = vs < V
        ds = tl.load(ds_ptr + r.to(tl.int64)[:, None] * V + vs[None, :], mask=row_ok[:, None] & v_ok[None, :],
                     other=0.0)
        w = tl.load(w_ptr + vs.to(tl.int64)[:, None] * s_wv + d[None, :] * s_wd,
                    mask=v_ok[:, None] & d_ok[None, :], other=0.0)
        acc = tl.dot(_operand(ds, DOT, INTERP), _operand(w, DOT, INTERP), acc, input_precision=PRECISION)
    pos = tl.load(rows_ptr + r, mask=row_ok, other=0)
    tl.store(dh_ptr + pos[:, None] * D + d[None, :], cast_rne(acc, dh_ptr.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _ce_dweight_kernel(
    dw_ptr, db_ptr, ds_ptr, h_ptr, rows_ptr,
    M, N, D, V, s_hb, s_hn, s_hd,
    HAS_BIAS: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr, INTERP: tl.constexpr,
    BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dW[v, d] += sum_r dlogits[r, v] * hidden[pos[r], d] (float32); db[v] += sum_r dlogits[r, v]."""
    pid_d = tl.program_id(1)
    vs = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    v_ok = vs < V
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = d < D
    acc = tl.zeros([BLOCK_V, BLOCK_D], tl.float32)
    db = tl.zeros([BLOCK_V], tl.float32)
    for r0 in range(0, M, BLOCK_K):
        r = r0 + tl.arange(0, BLOCK_K)
        r_ok = r < M
        ds = tl.load(ds_ptr + r.to(tl.int64)[:, None] * V + vs[None, :], mask=r_ok[:, None] & v_ok[None, :],
                     other=0.0)
        pos = tl.load(rows_ptr + r, mask=r_ok, other=0)
        row_off = (pos // N) * s_hb + (pos % N) * s_hn
        h = tl.load(h_ptr + row_off[:, None] + d[None, :] * s_hd, mask=r_ok[:, None] & d_ok[None, :],
                    other=0.0)
        acc = tl.dot(tl.trans(_operand(ds, DOT, INTERP)), _operand(h, DOT, INTERP), acc,
                     input_precision=PRECISION)
        if HAS_BIAS:
            db += tl.sum(ds.to(tl.float32), 0)
    tile = vs.to(tl.int64)[:, None] * D + d[None, :]
    tile_ok = v_ok[:, None] & d_ok[None, :]
    tl.store(dw_ptr + tile, tl.load(dw_ptr + tile, mask=tile_ok, other=0.0) + acc, mask=tile_ok)
    if HAS_BIAS:
        db_ok = v_ok & (pid_d == 0)
        tl.store(db_ptr + vs, tl.load(db_ptr + vs, mask=db_ok, other=0.0) + db, mask=db_ok)


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The matmul operand dtype (see the module docstring)."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    if hidden.dtype == weight.dtype:
        return hidden.dtype
    for dtype in (torch.bfloat16, torch.float16):
        if dtype in (hidden.dtype, weight.dtype):
            return dtype
    return torch.float32


def _tiles(dtype: torch.dtype, D: int) -> dict:
    """Fixed tile sizes per kernel (no autotune: the d(weight) kernel accumulates in place, and the
    interpreter cannot autotune). Chosen so that none spills registers when compiled for sm_90 (checked
    with ptxas); 16-bit operands take wider K tiles than float32 (shared memory)."""
    bk = 32 if dtype == torch.float32 else 64
    bd = min(128, max(16, triton.next_power_of_2(D)))
    stages = 1 if interpreting() else 3
    return dict(
        rows=dict(BLOCK_M=64, BLOCK_V=128, BLOCK_K=bk, num_warps=8, num_stages=stages),
        dhidden=dict(BLOCK_M=64, BLOCK_D=bd, BLOCK_K=bk, num_warps=8, num_stages=stages),
        dweight=dict(BLOCK_V=64, BLOCK_D=bd, BLOCK_K=bk, num_warps=4, num_stages=stages),
    )


def _kernel_flags(dtype: torch.dtype, has_bias: bool) -> dict:
    """float32 operands use TF32 only when torch allows it for matmuls (as F.linear would);
    16-bit operands keep Triton's default (the setting only affects float32)."""
    strict = dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32
    precision = "ieee" if strict or interpreting() else "tf32"
    return dict(HAS_BIAS=has_bias, DOT=_TL_DTYPE[dtype], PRECISION=precision, INTERP=interpreting())


def _chunk_rows(V: int, block: int) -> int:
    return max(block, (_SCRATCH_ELEMENTS // max(V, 1)) // block * block)


# --------------------------------------------------------------------------------------------
# The operators: kernels behind torch.library, so torch.compile sees shapes, not Triton launches
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("fastbeit::gathered_ce_fwd", mutates_args=())
def _ce_fwd_op(
    hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], rows: torch.Tensor,
    row_targets: torch.Tensor, dtype: torch.dtype,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per gathered row: float32 log-sum-exp, nll (NaN for a target outside [0, V)) and top-1 hit."""
    B, N, D = hidden.shape
    V, M = weight.shape[0], rows.numel()
    lse, nll, correct = (torch.empty(M, dtype=torch.float32, device=hidden.device) for _ in range(3))
    if M == 0:
        return lse, nll, correct
    cfg = _tiles(dtype, D)["rows"]
    _ce_fwd_kernel[(triton.cdiv(M, cfg["BLOCK_M"]),)](
        lse, nll, correct, hidden, weight, bias if bias is not None else weight, rows, row_targets,
        M, N, D, V, *hidden.stride(), *weight.stride(), **_kernel_flags(dtype, bias is not None), **cfg,
    )
    return lse, nll, correct


@_ce_fwd_op.register_fake
def _(hidden, weight, bias, rows, row_targets, dtype):
    return tuple(hidden.new_empty(rows.numel(), dtype=torch.float32) for _ in range(3))


@torch.library.custom_op("fastbeit::gathered_ce_bwd", mutates_args=())
def _ce_bwd_op(
    grad_nll: torch.Tensor, lse: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor,
    bias: Optional[torch.Tensor], rows: torch.Tensor, row_targets: torch.Tensor, dtype: torch.dtype,
    need_weight: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """d(hidden) ``[B, N, D]`` in hidden's dtype (zero off the gathered rows); d(weight), d(bias) in
    their own dtypes, summed in float32 (empty tensors unless ``need_weight``; d(bias) also when
    there is no bias)."""
    B, N, D = hidden.shape
    V, M = weight.shape[0], rows.numel()
    dev = hidden.device
    dh = torch.zeros(B, N, D, dtype=hidden.dtype, device=dev)
    dw = torch.zeros(V, D, dtype=torch.float32, device=dev) if need_weight else None
    db = torch.zeros(V, dtype=torch.float32, device=dev) if need_weight and bias is not None else None
    tiles, flags = _tiles(dtype, D), _kernel_flags(dtype, bias is not None)
    dot_flags = {k: flags[k] for k in ("DOT", "PRECISION", "INTERP")}
    rows_cfg, dh_cfg, dw_cfg = tiles["rows"], tiles["dhidden"], tiles["dweight"]
    chunk = _chunk_rows(V, rows_cfg["BLOCK_M"])
    ds = torch.empty(min(chunk, M), V, dtype=dtype, device=dev)
    scale = grad_nll.float().contiguous()
    for c0 in range(0, M, chunk):
        r = rows[c0:c0 + chunk]
        m = r.numel()
        grid = (triton.cdiv(m, rows_cfg["BLOCK_M"]), triton.cdiv(V, rows_cfg["BLOCK_V"]))
        _ce_dlogits_kernel[grid](
            ds, scale[c0:c0 + chunk], lse[c0:c0 + chunk], hidden, weight, bias if bias is not None else weight, r,
            row_targets[c0:c0 + chunk], m, N, D, V, *hidden.stride(), *weight.stride(), **flags, **rows_cfg,
        )
        grid = (triton.cdiv(m, dh_cfg["BLOCK_M"]), triton.cdiv(D, dh_cfg["BLOCK_D"]))
        _ce_dhidden_kernel[grid](dh, ds, weight, r, m, D, V, *weight.stride(), **dot_flags, **dh_cfg)
        if need_weight:
            grid = (triton.cdiv(V, dw_cfg["BLOCK_V"]), triton.cdiv(D, dw_cfg["BLOCK_D"]))
            _ce_dweight_kernel[grid](
                dw, db if db is not None else dw, ds, hidden, r, m, N, D, V, *hidden.stride(), **flags, **dw_cfg,
            )
    empty = hidden.new_empty(0)
    return (
        dh,
        dw.to(weight.dtype) if need_weight else empty,
        db.to(bias.dtype) if db is not None else empty,
    )


@_ce_bwd_op.register_fake
def _(grad_nll, lse, hidden, weight, bias, rows, row_targets, dtype, need_weight):
    B, N, D = hidden.shape
    dw = weight.new_empty(weight.shape) if need_weight else hidden.new_empty(0)
    db = bias.new_empty(bias.shape) if need_weight and bias is not None else hidden.new_empty(0)
    return hidden.new_empty(B, N, D), dw, db


def _ce_setup_context(ctx, inputs, output) -> None:
    hidden, weight, bias, rows, row_targets, dtype = inputs
    ctx.save_for_backward(hidden, weight, bias, rows, row_targets, output[0])
    ctx.dtype = dtype
    ctx.mark_non_differentiable(output[0], output[2])


def _ce_backward(ctx, _grad_lse, grad_nll, _grad_correct):
    hidden, weight, bias, rows, row_targets, lse = ctx.saved_tensors
    needs = ctx.needs_input_grad
    if grad_nll is None:
        grad_nll = torch.zeros_like(lse)
    dh, dw, db = _ce_bwd_op(grad_nll, lse, hidden, weight, bias, rows, row_targets, ctx.dtype, needs[1] or needs[2])
    return (
        dh if needs[0] else None,
        dw if needs[1] else None,
        db if bias is not None and needs[2] else None,
        None, None, None,
    )


_ce_fwd_op.register_autograd(_ce_backward, setup_context=_ce_setup_context)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def _validate(hidden, mask, weight, bias, targets, max_masked) -> None:
    """Shape, dtype and device checks (metadata only: no host sync)."""
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be [B, N, D], got shape {tuple(hidden.shape)}")
    B, N, D = hidden.shape
    if tuple(mask.shape) != (B, N):
        raise ValueError(f"mask must be [B, N] = {(B, N)} like hidden, got {tuple(mask.shape)}")
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor, got {mask.dtype}")
    if tuple(targets.shape) != (B, N):
        raise ValueError(f"targets must be [B, N] = {(B, N)} like mask, got {tuple(targets.shape)}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"targets must be int64 (or int32) token ids, got {targets.dtype}")
    if weight.dim() != 2 or weight.shape[1] != D:
        raise ValueError(f"weight must be [V, D] with D = {D}, got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must be [V] = [{weight.shape[0]}], got {tuple(bias.shape)}")
    if max_masked is not None and not 0 <= int(max_masked) <= N:
        raise ValueError(f"max_masked must be in [0, N = {N}], got {max_masked}")
    tensors = [hidden, mask, weight, targets] + ([] if bias is None else [bias])
    if len({t.device for t in tensors}) > 1:
        raise ValueError(f"all inputs must be on one device, got {sorted({str(t.device) for t in tensors})}")


def check_values(mask: torch.Tensor, targets: torch.Tensor, vocab_size: int, max_masked: Optional[int]) -> None:
    """Checks that read values: a host sync on the GPU, so only on request (``validate=True``)."""
    if max_masked is not None:
        most = int(mask.sum(1).max()) if mask.numel() else 0
        if most > max_masked:
            raise ValueError(f"max_masked={max_masked} but an image has {most} masked positions")
    if bool(mask.any()):
        picked = targets[mask]
        lo, hi = picked.min().item(), picked.max().item()
        if lo < 0 or hi >= vocab_size:
            raise ValueError(f"targets at masked positions must be in [0, {vocab_size}), got values in [{lo}, {hi}]")


def gathered_cross_entropy(
    hidden: torch.Tensor,
    mask: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    targets: torch.Tensor,
    max_masked: Optional[int] = None,
    *,
    validate: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(mean cross entropy, top-1 accuracy) of ``hidden[mask] @ weight.T + bias`` vs ``targets[mask]``.

    ``max_masked``: the most masked positions any image has (the masking's target count, 75 for BEiT);
    every image is gathered into that many rows (default N: all positions). No value is read on the
    host unless ``validate=True``; without it a target outside ``[0, V)`` or an image with more than
    ``max_masked`` masked positions turns the loss into NaN.
    """
    _validate(hidden, mask, weight, bias, targets, max_masked)
    floats = [hidden, weight] + ([] if bias is None else [bias])
    if not use_triton(hidden) or any(t.dtype not in _FLOATS for t in floats):
        return gathered_cross_entropy_padded(hidden, mask, weight, bias, targets, max_masked, validate=validate)
    if validate:
        check_values(mask, targets, weight.shape[0], max_masked)
    B, N, _ = hidden.shape
    order, valid = padded_positions(mask, max_masked)
    rows = (order + torch.arange(B, device=mask.device).unsqueeze(1) * N).reshape(-1)
    row_targets = targets.gather(1, order).reshape(-1).to(torch.int64)
    _, nll, correct = _ce_fwd_op(hidden, weight, bias, rows, row_targets, _compute_dtype(hidden, weight))
    return masked_mean(nll, valid, mask, max_masked), masked_mean(correct, valid, mask, max_masked)


def gathered_cross_entropy_padded(
    hidden: torch.Tensor,
    mask: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    targets: torch.Tensor,
    max_masked: Optional[int] = None,
    *,
    validate: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The same padded, sync-free gather in plain PyTorch (``[B·K, V]`` logits): the path
    ``--kernels reference`` compiles, and the kernel's fallback where Triton cannot run."""
    _validate(hidden, mask, weight, bias, targets, max_masked)
    if validate:
        check_values(mask, targets, weight.shape[0], max_masked)
    order, valid = padded_positions(mask, max_masked)
    rows = gather_rows(hidden, order)
    logits = F.linear(rows, weight, bias).flatten(0, 1).float()
    labels = torch.where(valid, targets.gather(1, order), 0).reshape(-1).to(torch.int64)  # padding: any valid id
    nll = F.cross_entropy(logits, labels, reduction="none")
    correct = (logits.argmax(-1) == labels).float()
    return masked_mean(nll, valid, mask, max_masked), masked_mean(correct, valid, mask, max_masked)


def gathered_cross_entropy_reference(
    hidden: torch.Tensor,
    mask: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    targets: torch.Tensor,
    max_masked: Optional[int] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The original computation: boolean gather, full ``[M, V]`` logits, ``F.cross_entropy`` (a host
    sync for the gather's size; values checked)."""
    _validate(hidden, mask, weight, bias, targets, max_masked)
    check_values(mask, targets, weight.shape[0], max_masked)
    logits = F.linear(hidden[mask], weight, bias)
    labels = targets[mask]
    loss = F.cross_entropy(logits, labels)
    acc = (logits.argmax(-1) == labels).float().mean()
    return loss, acc
