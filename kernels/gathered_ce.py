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

Rows are addressed by flat position ``b * N + n``, so ``hidden`` (e.g. the slice ``x[:, 1:]`` of a
``[B, N+1, D]`` tensor) and ``targets`` are read through their strides: nothing is copied. With
``num_masked`` the positions come from a stable sort of the mask (no host sync); otherwise from
``nonzero`` (one sync, as the reference's boolean indexing).

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
def _row_addresses(rows_ptr, tgt_ptr, start, M, N, s_hb, s_hn, s_tb, s_tn, BLOCK_M: tl.constexpr):
    """Rows start..start+BLOCK_M of the gather: hidden row offsets and targets (int64 math)."""
    r = start + tl.arange(0, BLOCK_M)
    row_ok = r < M
    pos = tl.load(rows_ptr + r, mask=row_ok, other=0)
    b = pos // N
    n = pos % N
    tgt = tl.load(tgt_ptr + b * s_tb + n * s_tn, mask=row_ok, other=0)
    return r, row_ok, pos, b * s_hb + n * s_hn, tgt


@triton.jit
def _ce_fwd_kernel(
    lse_ptr, nll_ptr, correct_ptr, h_ptr, w_ptr, b_ptr, rows_ptr, tgt_ptr,
    M, N, D, V,
    s_hb, s_hn, s_hd, s_wv, s_wd, s_tb, s_tn,
    HAS_BIAS: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr, INTERP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Per masked row: lse, nll = lse - logit[target] (NaN if target is outside [0, V)), top-1 hit."""
    r, row_ok, _, row_off, tgt = _row_addresses(rows_ptr, tgt_ptr, tl.program_id(0) * BLOCK_M, M, N,
                                                s_hb, s_hn, s_tb, s_tn, BLOCK_M)
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
    s_hb, s_hn, s_hd, s_wv, s_wd, s_tb, s_tn,
    HAS_BIAS: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr, INTERP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dlogits[r, v] = (softmax - onehot) * scale for one (row block, vocab block) of the chunk."""
    r, row_ok, _, row_off, tgt = _row_addresses(rows_ptr, tgt_ptr, tl.program_id(0) * BLOCK_M, M, N,
                                                s_hb, s_hn, s_tb, s_tn, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = cols < V
    logits = _logits_tile(h_ptr, w_ptr, b_ptr, row_off, row_ok, cols.to(tl.int64), col_ok, D, s_hd, s_wv,
                          s_wd, HAS_BIAS, DOT, PRECISION, INTERP, BLOCK_M, BLOCK_V, BLOCK_K)
    lse = tl.load(lse_ptr + r, mask=row_ok, other=0.0)
    scale = tl.load(scale_ptr)
    prob = tl.exp(logits - lse[:, None])
    ds = (prob - (cols[None, :] == tgt[:, None]).to(tl.float32)) * scale
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


def _common_args(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> tuple:
    return (*hidden.stride(), *weight.stride(), *targets.stride())


def _kernel_flags(dtype: torch.dtype, has_bias: bool) -> dict:
    """float32 operands use TF32 only when torch allows it for matmuls (as F.linear would);
    16-bit operands keep Triton's default (the setting only affects float32)."""
    strict = dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32
    precision = "ieee" if strict or interpreting() else "tf32"
    return dict(HAS_BIAS=has_bias, DOT=_TL_DTYPE[dtype], PRECISION=precision, INTERP=interpreting())


def _forward(hidden, weight, bias, rows, targets, dtype):
    """Per-row float32 lse, nll and top-1 hits for the gathered rows."""
    B, N, D = hidden.shape
    V, M = weight.shape[0], rows.numel()
    lse, nll, correct = (torch.empty(M, dtype=torch.float32, device=hidden.device) for _ in range(3))
    if M == 0:
        return lse, nll, correct
    cfg = _tiles(dtype, D)["rows"]
    _ce_fwd_kernel[(triton.cdiv(M, cfg["BLOCK_M"]),)](
        lse, nll, correct, hidden, weight, bias if bias is not None else weight, rows, targets,
        M, N, D, V, *_common_args(hidden, weight, targets), **_kernel_flags(dtype, bias is not None), **cfg,
    )
    return lse, nll, correct


def _chunk_rows(V: int, block: int) -> int:
    return max(block, (_SCRATCH_ELEMENTS // max(V, 1)) // block * block)


def _backward(scale, lse, hidden, weight, bias, rows, targets, dtype, need_w):
    """d(hidden) [B,N,D] in hidden's dtype and float32 d(weight), d(bias) (None unless needed)."""
    B, N, D = hidden.shape
    V, M = weight.shape[0], rows.numel()
    dev = hidden.device
    dh = torch.zeros(B, N, D, dtype=hidden.dtype, device=dev)
    dw = torch.zeros(V, D, dtype=torch.float32, device=dev) if need_w else None
    db = torch.zeros(V, dtype=torch.float32, device=dev) if need_w and bias is not None else None
    tiles = _tiles(dtype, D)
    flags = _kernel_flags(dtype, bias is not None)
    dot_flags = {k: flags[k] for k in ("DOT", "PRECISION", "INTERP")}
    rows_cfg, dh_cfg, dw_cfg = tiles["rows"], tiles["dhidden"], tiles["dweight"]
    chunk = _chunk_rows(V, rows_cfg["BLOCK_M"])
    ds = torch.empty(min(chunk, M), V, dtype=dtype, device=dev)
    for c0 in range(0, M, chunk):
        r = rows[c0:c0 + chunk]
        m = r.numel()
        grid = (triton.cdiv(m, rows_cfg["BLOCK_M"]), triton.cdiv(V, rows_cfg["BLOCK_V"]))
        _ce_dlogits_kernel[grid](
            ds, scale, lse[c0:c0 + chunk], hidden, weight, bias if bias is not None else weight, r, targets,
            m, N, D, V, *_common_args(hidden, weight, targets), **flags, **rows_cfg,
        )
        grid = (triton.cdiv(m, dh_cfg["BLOCK_M"]), triton.cdiv(D, dh_cfg["BLOCK_D"]))
        _ce_dhidden_kernel[grid](dh, ds, weight, r, m, D, V, *weight.stride(), **dot_flags, **dh_cfg)
        if need_w:
            grid = (triton.cdiv(V, dw_cfg["BLOCK_V"]), triton.cdiv(D, dw_cfg["BLOCK_D"]))
            _ce_dweight_kernel[grid](
                dw, db if db is not None else dw, ds, hidden, r, m, N, D, V, *hidden.stride(), **flags, **dw_cfg,
            )
    return dh, dw, db


class GatheredCrossEntropyFunction(torch.autograd.Function):
    """(hidden, weight, bias, rows, targets) -> (mean loss, accuracy); accuracy has no gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, rows, targets, dtype):
        lse, nll, correct = _forward(hidden, weight, bias, rows, targets, dtype)
        ctx.save_for_backward(hidden, weight, bias, rows, targets, lse)
        ctx.dtype = dtype
        acc = correct.mean()
        ctx.mark_non_differentiable(acc)
        return nll.mean(), acc

    @staticmethod
    def backward(ctx, grad_loss, _grad_acc):
        hidden, weight, bias, rows, targets, lse = ctx.saved_tensors
        needs = ctx.needs_input_grad
        M = rows.numel()
        if M == 0:
            zeros = [torch.zeros_like(t) if t is not None and n else None
                     for t, n in zip((hidden, weight, bias), needs)]
            return (*zeros, None, None, None)
        scale = (grad_loss.float() / M).reshape(1)
        dh, dw, db = _backward(scale, lse, hidden, weight, bias, rows, targets, ctx.dtype,
                               needs[1] or needs[2])
        return (
            dh if needs[0] else None,
            dw.to(weight.dtype) if needs[1] else None,
            db.to(bias.dtype) if needs[2] else None,
            None, None, None,
        )


def _validate(hidden, mask, weight, bias, targets, num_masked) -> None:
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
    if num_masked is not None and not 0 <= int(num_masked) <= N:
        raise ValueError(f"num_masked must be in [0, N = {N}], got {num_masked}")
    tensors = [hidden, mask, weight, targets] + ([] if bias is None else [bias])
    if len({t.device for t in tensors}) > 1:
        raise ValueError(f"all inputs must be on one device, got {sorted({str(t.device) for t in tensors})}")


def _check_values(mask, targets, V, num_masked, rows) -> None:
    """Checks that read values (a host sync on the GPU)."""
    if num_masked is not None:
        counts = mask.sum(1)
        if bool((counts != num_masked).any()):
            raise ValueError(
                f"num_masked={num_masked} but the mask has {counts.min().item()}..{counts.max().item()} "
                "masked positions per image"
            )
    if rows.numel():
        picked = targets.reshape(-1)[rows]
        lo, hi = picked.min().item(), picked.max().item()
        if lo < 0 or hi >= V:
            raise ValueError(f"targets at masked positions must be in [0, {V}), got values in [{lo}, {hi}]")


def _masked_rows(mask: torch.Tensor, num_masked: Optional[int]) -> torch.Tensor:
    """Flat positions b * N + n of the masked entries, in row-major order (as ``x[mask]``)."""
    B, N = mask.shape
    if num_masked is None:
        return mask.reshape(-1).nonzero().squeeze(1)
    order = torch.sort(mask.to(torch.int8), dim=1, descending=True, stable=True).indices[:, :num_masked]
    return (order + torch.arange(B, device=mask.device).unsqueeze(1) * N).reshape(-1)


def gathered_cross_entropy(
    hidden: torch.Tensor,
    mask: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    targets: torch.Tensor,
    num_masked: Optional[int] = None,
    *,
    validate: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(mean cross entropy, top-1 accuracy) of ``hidden[mask] @ weight.T + bias`` vs ``targets[mask]``.

    ``num_masked``: every image has exactly this many masked positions (static shapes, no host
    sync). Value checks (targets in ``[0, V)``, ``num_masked`` agreeing with the mask) run on the
    CPU, on the variable-count path (which syncs anyway) and when ``validate=True``; otherwise on
    the GPU a bad target or count turns the loss into NaN instead of stopping for a check.
    """
    _validate(hidden, mask, weight, bias, targets, num_masked)
    floats = [hidden, weight] + ([] if bias is None else [bias])
    if not use_triton(hidden) or any(t.dtype not in _FLOATS for t in floats):
        return gathered_cross_entropy_reference(hidden, mask, weight, bias, targets, num_masked)
    rows = _masked_rows(mask, num_masked)
    if validate or num_masked is None or not hidden.is_cuda:
        _check_values(mask, targets, weight.shape[0], num_masked, rows)
    loss, acc = GatheredCrossEntropyFunction.apply(hidden, weight, bias, rows, targets,
                                                   _compute_dtype(hidden, weight))
    if num_masked is not None and hidden.is_cuda and not validate:
        loss = torch.where((mask.sum(1) != num_masked).any(), float("nan"), loss)
    return loss, acc


def gathered_cross_entropy_reference(
    hidden: torch.Tensor,
    mask: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    targets: torch.Tensor,
    num_masked: Optional[int] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The original computation: boolean gather, full ``[M, V]`` logits, ``F.cross_entropy``."""
    _validate(hidden, mask, weight, bias, targets, num_masked)
    _check_values(mask, targets, weight.shape[0], num_masked, mask.reshape(-1).nonzero().squeeze(1))
    logits = F.linear(hidden[mask], weight, bias)
    labels = targets[mask]
    loss = F.cross_entropy(logits, labels)
    acc = (logits.argmax(-1) == labels).float().mean()
    return loss, acc
