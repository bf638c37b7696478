"""Flash attention with an additive bias (BEiT's relative position bias), forward and backward.

``flash_attention(q, k, v, bias, scale)`` computes ``softmax(q·kᵀ·scale + bias)·v`` for q, k, v
``[B, H, N, d]`` without materialising the ``[B, H, N, N]`` scores, and - the reason this file
exists - takes BEiT's relative position bias as ``[H, N, N]`` shared by the batch and returns its
gradient summed over the batch *inside* the backward kernel. PyTorch SDPA's memory-efficient
kernel instead expands the bias to ``[B, H, N, N]`` and allocates a full-size gradient (~240 MB
per layer at B=256, N=197) before summing it. flash-attn takes no bias at all.

Design (FlashAttention-2):

* forward: one program per (query block, head, image); online softmax over key blocks in base 2
  (``exp2``, with ``log2 e`` folded into the scale); saves the row log-sum-exp (base 2) ``[B, H, N]``.
* backward: ``δ = rowsum(dO∘O)`` in a small pre-kernel; then a key-block kernel (dK, dV and
  d(bias)) and a query-block kernel (dQ), both recomputing ``P = exp2(S - lse)`` so that neither
  needs atomics.
* d(bias) for a shared ``[H, N, N]`` bias: a key-block program loops over a *chunk* of the batch
  and accumulates ``dS = P∘(dP - δ)`` of every image into an fp32 tile it alone owns
  (read-add-write, no atomics). ``chunks`` (≤ 32) is set to fill the GPU; the chunks' partial sums
  ``[chunks, H, N, N]`` are added at the end (one chunk: nothing to add). A ``[B, H, N, N]`` bias
  gets its gradient written per image directly.

Conventions: any ``N`` (e.g. 197 = 14·14 + 1) by masking; any head dim ``1 ≤ d ≤ 128``, padded
internally to a power of two ≥ 16 by masked loads (so d = 32, 64, 128 waste nothing); inputs of
any strides (e.g. q, k, v from ``qkv.unbind`` of a permuted tensor) are passed to the kernels as
strides, not copied (unless offsets inside one head's slice overflow int32); fp16 / bf16 / fp32
with fp32 softmax and accumulators, output in the input dtype; the bias in any float dtype (e.g.
fp32 bias with bf16 q under autocast), upcast on load, its gradient returned in its own dtype.
fp32 inputs multiply at ~fp32 accuracy (3xTF32) unless ``torch.set_float32_matmul_precision``
allows plain TF32, as for PyTorch's own matmuls.

Repeatability: with no atomics, results are bitwise repeatable as long as the tiles and the d(bias)
chunk count stay the same. The tiles are pinned (the first candidate of each list below, the same
on every process; ``FASTBEIT_AUTOTUNE=1`` times them instead, and then the pick may differ between
processes and runs). The chunk count follows the GPU's SM count, so two kinds of GPU sum d(bias) in
different orders: a run resumed on another kind of GPU continues with results equal to within
rounding, not bit for bit.

The model calls :func:`flash_attention_qkv` (the ``fastbeit::flash_attn_qkv_*`` operators), which
reads q, k, v from the packed projection and writes ``[B, N, H·d]``; :func:`flash_attention` is the
same kernels for separate q, k, v (an autograd Function, for eager use and tests).
"""

import contextlib
import functools
import math
import os
from typing import Any, Optional

import torch

from fastbeit.kernels import interpreting, triton_available, use_triton

try:
    import triton
    import triton.language as tl
except ImportError:  # the reference and ``supports`` stay importable without Triton
    triton = None

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_HEAD_DIM = 128
_MAX_DBIAS_CHUNKS = 32  # bounds the shared-bias partial sums to 32·H·N·N fp32 whatever B is
_LOG2E = math.log2(math.e)  # softmax runs in base 2: exp(x) = exp2(x·log2 e)


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------

if triton is not None:
    _LOG2E_C = tl.constexpr(_LOG2E)

    # Tile candidates (BLOCK_M, BLOCK_N, warps, stages), checked to compile for sm_90 (ptxas, no
    # GPU). The FIRST of each list is pinned: a run, its resume and every DDP rank then use the same
    # tiles, hence the same accumulation order (bitwise-repeatable results on one device kind).
    # FASTBEIT_AUTOTUNE=1 times all of them instead (picks may differ between processes).
    # Forward: a query block holds q and an fp32 accumulator; taller query blocks reuse K/V more.
    _FWD_TILES = [(128, 64, 8, 3), (128, 32, 8, 2), (64, 64, 4, 3), (64, 32, 4, 2)]
    # dK/dV/d(bias): a key block holds k, v and two fp32 accumulators, so query tiles stay short;
    # (32, 64, 4 warps) spills at d = 64 in bf16, so the 8-warp variant is pinned.
    _DKDV_TILES = [(32, 64, 8, 2), (32, 64, 4, 2), (16, 128, 8, 2), (32, 32, 4, 2)]
    # dQ: the mirror image, lighter (one accumulator).
    _DQ_TILES = [(64, 64, 4, 2), (64, 32, 4, 2), (128, 32, 8, 2), (128, 64, 8, 2)]
    # The interpreter runs one small tile (it cannot autotune); 32×32 still splits N = 37 or 65
    # into full and partial blocks.
    _INTERPRETER_TILE = (32, 32, 4, 1)
    TILE_CANDIDATES = {"fwd": _FWD_TILES, "dkdv": _DKDV_TILES, "dq": _DQ_TILES}

    @triton.jit
    def _attn_fwd_kernel(
        Q, K, V, BIAS, OUT, LSE,
        sqb, sqh, sqn, sqd,
        skb, skh, skn, skd,
        svb, svh, svn, svd,
        sbb, sbh, sbm, sbn,
        sob, soh, son, sod,
        H, N, D, qk_scale,
        HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        """One query block of one (image, head): online softmax over all key blocks."""
        pid_m = tl.program_id(0)
        h = tl.program_id(1).to(tl.int64)  # int64: b·stride overflows int32 at large B·H·N·N
        b = tl.program_id(2).to(tl.int64)
        Q += b * sqb + h * sqh
        K += b * skb + h * skh
        V += b * svb + h * svh
        OUT += b * sob + h * soh
        BIAS += b * sbb + h * sbh
        LSE += (b * H + h) * N

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        m_mask = offs_m < N
        d_mask = offs_d < D
        q = tl.load(
            Q + offs_m[:, None] * sqn + offs_d[None, :] * sqd, mask=m_mask[:, None] & d_mask[None, :], other=0.0
        )
        if UPCAST:
            q = q.to(tl.float32)

        # A finite start keeps exp2(m_i - m_new) at 0, not NaN, when a block is all -inf (masked).
        m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for start_n in range(0, N, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            n_mask = offs_n < N
            kv_mask = n_mask[:, None] & d_mask[None, :]
            k = tl.load(K + offs_n[:, None] * skn + offs_d[None, :] * skd, mask=kv_mask, other=0.0)
            v = tl.load(V + offs_n[:, None] * svn + offs_d[None, :] * svd, mask=kv_mask, other=0.0)
            if UPCAST:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale  # log2 domain
            if HAS_BIAS:
                bias = tl.load(
                    BIAS + offs_m[:, None] * sbm + offs_n[None, :] * sbn,
                    mask=m_mask[:, None] & n_mask[None, :],
                    other=0.0,
                )
                s += bias.to(tl.float32) * _LOG2E_C
            s = tl.where(n_mask[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
            m_i = m_new

        acc = acc / l_i[:, None]
        tl.store(
            OUT + offs_m[:, None] * son + offs_d[None, :] * sod,
            acc.to(OUT.dtype.element_ty),
            mask=m_mask[:, None] & d_mask[None, :],
        )
        tl.store(LSE + offs_m, m_i + tl.log2(l_i), mask=m_mask)

    @triton.jit
    def _attn_bwd_delta_kernel(
        OUT, DO, DELTA,
        sob, soh, son, sod,
        sdb, sdh, sdn, sdd,
        H, N, D,
        BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        """δ = rowsum(dO∘O) (= rowsum(P∘dP)), once per row instead of once per key block."""
        pid_m = tl.program_id(0)
        h = tl.program_id(1).to(tl.int64)
        b = tl.program_id(2).to(tl.int64)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        m_mask = offs_m < N
        mask = m_mask[:, None] & (offs_d < D)[None, :]
        o = tl.load(OUT + b * sob + h * soh + offs_m[:, None] * son + offs_d[None, :] * sod, mask=mask, other=0.0)
        do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sdn + offs_d[None, :] * sdd, mask=mask, other=0.0)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        tl.store(DELTA + (b * H + h) * N + offs_m, delta, mask=m_mask)

    @triton.jit
    def _attn_bwd_dkdv_kernel(
        Q, K, V, BIAS, DO, LSE, DELTA, DK, DV, DB,
        sqb, sqh, sqn, sqd,
        skb, skh, skn, skd,
        svb, svh, svn, svd,
        sbb, sbh, sbm, sbn,
        sdob, sdoh, sdon, sdod,
        sdkb, sdkh, sdkn, sdkd,
        sdvb, sdvh, sdvn, sdvd,
        sdbc, sdbh, sdbm, sdbn,
        H, N, D, B, BATCH_PER_PROG, qk_scale, sm_scale,
        HAS_BIAS: tl.constexpr, HAS_DBIAS: tl.constexpr, ACC_DBIAS: tl.constexpr,
        UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        """dK, dV (and d(bias)) of one key block, for each image of a chunk of the batch.

        Works on transposed tiles (keys × queries) so that dK = dSᵀ·q and dV = Pᵀ·dO need no
        transposes. d(bias) goes to DB[chunk, h]: with ACC_DBIAS (shared bias) the tile is
        read-added-written for every image after the chunk's first; this program is the only
        writer of its column block, so no atomics are needed. Without ACC_DBIAS a chunk is one
        image and DB is the per-image gradient.
        """
        pid_n = tl.program_id(0)
        h = tl.program_id(1).to(tl.int64)
        chunk = tl.program_id(2)
        b_start = chunk * BATCH_PER_PROG
        b_end = tl.minimum(b_start + BATCH_PER_PROG, B)

        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        n_mask = offs_n < N
        d_mask = offs_d < D
        kv_mask = n_mask[:, None] & d_mask[None, :]
        DB += chunk.to(tl.int64) * sdbc + h * sdbh

        for i in range(0, b_end - b_start):
            b = b_start.to(tl.int64) + i
            Qb = Q + b * sqb + h * sqh
            DOb = DO + b * sdob + h * sdoh
            BIASb = BIAS + b * sbb + h * sbh
            LSEb = LSE + (b * H + h) * N
            DELTAb = DELTA + (b * H + h) * N
            k = tl.load(K + b * skb + h * skh + offs_n[:, None] * skn + offs_d[None, :] * skd, mask=kv_mask, other=0.0)
            v = tl.load(V + b * svb + h * svh + offs_n[:, None] * svn + offs_d[None, :] * svd, mask=kv_mask, other=0.0)
            if UPCAST:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
            dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
            for start_m in range(0, N, BLOCK_M):
                offs_m = start_m + tl.arange(0, BLOCK_M)
                m_mask = offs_m < N
                qd_mask = m_mask[:, None] & d_mask[None, :]
                tile_mask = n_mask[:, None] & m_mask[None, :]
                q = tl.load(Qb + offs_m[:, None] * sqn + offs_d[None, :] * sqd, mask=qd_mask, other=0.0)
                do = tl.load(DOb + offs_m[:, None] * sdon + offs_d[None, :] * sdod, mask=qd_mask, other=0.0)
                if UPCAST:
                    q = q.to(tl.float32)
                    do = do.to(tl.float32)
                lse = tl.load(LSEb + offs_m, mask=m_mask, other=0.0)
                delta = tl.load(DELTAb + offs_m, mask=m_mask, other=0.0)
                st = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale
                if HAS_BIAS:
                    bias_t = tl.load(BIASb + offs_m[None, :] * sbm + offs_n[:, None] * sbn, mask=tile_mask, other=0.0)
                    st += bias_t.to(tl.float32) * _LOG2E_C
                pt = tl.where(tile_mask, tl.exp2(st - lse[None, :]), 0.0)
                dv += tl.dot(pt.to(do.dtype), do, input_precision=DOT_PREC)
                dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
                dst = pt * (dpt - delta[None, :])  # dS = dL/d(logits) = dL/d(bias)
                dk += tl.dot(dst.to(q.dtype), q, input_precision=DOT_PREC)
                if HAS_DBIAS:
                    db_ptrs = DB + offs_m[None, :] * sdbm + offs_n[:, None] * sdbn
                    if ACC_DBIAS:
                        # The chunk's first image overwrites (no zero-fill, and re-runs such as
                        # autotuning stay correct); later ones add what the earlier ones wrote.
                        dst += tl.load(db_ptrs, mask=tile_mask & (i > 0), other=0.0)
                    tl.store(db_ptrs, dst.to(DB.dtype.element_ty), mask=tile_mask)
            tl.store(
                DK + b * sdkb + h * sdkh + offs_n[:, None] * sdkn + offs_d[None, :] * sdkd,
                (dk * sm_scale).to(DK.dtype.element_ty),
                mask=kv_mask,
            )
            tl.store(
                DV + b * sdvb + h * sdvh + offs_n[:, None] * sdvn + offs_d[None, :] * sdvd,
                dv.to(DV.dtype.element_ty),
                mask=kv_mask,
            )
            if ACC_DBIAS:
                # The next image re-reads the d(bias) tiles, maybe from other threads of this
                # program: make this image's stores visible to the whole CTA first.
                tl.debug_barrier()

    @triton.jit
    def _attn_bwd_dq_kernel(
        Q, K, V, BIAS, DO, LSE, DELTA, DQ,
        sqb, sqh, sqn, sqd,
        skb, skh, skn, skd,
        svb, svh, svn, svd,
        sbb, sbh, sbm, sbn,
        sdob, sdoh, sdon, sdod,
        sdqb, sdqh, sdqn, sdqd,
        H, N, D, qk_scale, sm_scale,
        HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        """dQ of one query block: recomputes P and dS per key block rather than using atomics."""
        pid_m = tl.program_id(0)
        h = tl.program_id(1).to(tl.int64)
        b = tl.program_id(2).to(tl.int64)
        K += b * skb + h * skh
        V += b * svb + h * svh
        BIAS += b * sbb + h * sbh

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        m_mask = offs_m < N
        d_mask = offs_d < D
        qd_mask = m_mask[:, None] & d_mask[None, :]
        q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :] * sqd, mask=qd_mask, other=0.0)
        do = tl.load(
            DO + b * sdob + h * sdoh + offs_m[:, None] * sdon + offs_d[None, :] * sdod, mask=qd_mask, other=0.0
        )
        if UPCAST:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        lse = tl.load(LSE + (b * H + h) * N + offs_m, mask=m_mask, other=0.0)
        delta = tl.load(DELTA + (b * H + h) * N + offs_m, mask=m_mask, other=0.0)

        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for start_n in range(0, N, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            n_mask = offs_n < N
            kv_mask = n_mask[:, None] & d_mask[None, :]
            tile_mask = m_mask[:, None] & n_mask[None, :]
            k = tl.load(K + offs_n[:, None] * skn + offs_d[None, :] * skd, mask=kv_mask, other=0.0)
            v = tl.load(V + offs_n[:, None] * svn + offs_d[None, :] * svd, mask=kv_mask, other=0.0)
            if UPCAST:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
            if HAS_BIAS:
                bias = tl.load(BIAS + offs_m[:, None] * sbm + offs_n[None, :] * sbn, mask=tile_mask, other=0.0)
                s += bias.to(tl.float32) * _LOG2E_C
            # Masking matters here: a padded key's p could overflow, and inf·0 would poison dq.
            p = tl.where(tile_mask, tl.exp2(s - lse[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)
        tl.store(
            DQ + b * sdqb + h * sdqh + offs_m[:, None] * sdqn + offs_d[None, :] * sdqd,
            (dq * sm_scale).to(DQ.dtype.element_ty),
            mask=qd_mask,
        )


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def autotuning() -> bool:
    """Whether the tiles are timed per shape (FASTBEIT_AUTOTUNE=1) rather than pinned."""
    return os.environ.get("FASTBEIT_AUTOTUNE", "0") == "1" and not interpreting()


def _kernel(name: str):
    """The jitted kernel (pinned tiles), or its ``triton.autotune`` wrapper when autotuning."""
    if autotuning():
        return _autotuned(name)
    return {"fwd": _attn_fwd_kernel, "dkdv": _attn_bwd_dkdv_kernel, "dq": _attn_bwd_dq_kernel}[name]


@functools.cache
def _autotuned(name: str):
    kernel, tiles, key = {
        "fwd": (_attn_fwd_kernel, _FWD_TILES, ["N", "BLOCK_D", "HAS_BIAS"]),
        "dkdv": (_attn_bwd_dkdv_kernel, _DKDV_TILES, ["N", "BLOCK_D", "HAS_BIAS", "HAS_DBIAS", "ACC_DBIAS"]),
        "dq": (_attn_bwd_dq_kernel, _DQ_TILES, ["N", "BLOCK_D", "HAS_BIAS"]),
    }[name]
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in tiles]
    return triton.autotune(configs=configs, key=key)(kernel)


def _launch_tile(name: str) -> dict:
    """Launch keywords of the pinned tile (none when autotuning: the autotuner sets them)."""
    if autotuning():
        return {}
    m, n, w, s = _INTERPRETER_TILE if interpreting() else TILE_CANDIDATES[name][0]
    return dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=s)


def pinned_tiles() -> dict:
    """The tiles every launch uses, by kernel, for results notes (empty values when autotuning)."""
    return {name: _launch_tile(name) for name in ("fwd", "dkdv", "dq")}


def _dkdv_block_n() -> int:
    """BLOCK_N of the dK/dV launch (when autotuning: the largest candidate, so the d(bias) chunking
    never under-fills the GPU)."""
    if autotuning():
        return max(t[1] for t in _DKDV_TILES)
    return _launch_tile("dkdv")["BLOCK_N"]




def _block_d(head_dim: int) -> int:
    """Head dim padded to a power of two ≥ 16 (tl.arange needs a power of two, tl.dot ≥ 16)."""
    return max(16, triton.next_power_of_2(head_dim))


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs follow torch's matmul precision setting; half inputs ignore it.

    "highest" maps to 3xTF32 (error-compensated, ~fp32 accurate, on tensor cores), not "ieee":
    Triton's ieee fp32 dot on sm_90 spills registers by kilobytes per thread at d ≥ 64.
    """
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "tf32x3"
    return "tf32"


def _bias_strides(bias: Optional[torch.Tensor]) -> tuple:
    """Strides (batch, head, row, col) of the bias; batch stride 0 when shared by the batch."""
    if bias is None:
        return (0, 0, 0, 0)
    if bias.dim() == 3:
        return (0, *bias.stride())
    if bias.shape[0] == 1:
        return (0, *bias.stride()[1:])
    return tuple(bias.stride())


def _in_head_offsets_fit(t: torch.Tensor) -> torch.Tensor:
    """``t``, or a contiguous copy if offsets within one (image, head) slice overflow int32.

    The kernels offset each slice's base in int64 but index rows and columns in int32 (cheaper
    registers); only exotic layouts (e.g. [N, B, H, d] memory at huge B·H) need the copy.
    """
    span = sum((size - 1) * stride for size, stride in zip(t.shape[-2:], t.stride()[-2:]))
    return t if span < 2**31 else t.contiguous()


def _is_shared(bias: torch.Tensor) -> bool:
    return bias.dim() == 3 or bias.shape[0] == 1


def _dbias_chunks(batch: int, key_blocks: int, heads: int, device: torch.device) -> int:
    """How many batch chunks the shared-bias gradient is split over: enough programs to fill
    the GPU (≈ 4 per SM), at most 32 so the fp32 partial sums stay ≤ 32·H·N·N."""
    if device.type != "cuda":
        return min(batch, 2)  # interpreter: still exercises multi-image chunks and the final sum
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    want = math.ceil(4 * sms / max(1, key_blocks * heads))
    return max(1, min(batch, want, _MAX_DBIAS_CHUNKS))


def _on_device(device: torch.device) -> contextlib.AbstractContextManager:
    """Launch on the tensors' GPU, not the current one (Triton launches on the current device)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor], scale: float,
    out: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Output ``[B, H, N, d]`` in q's dtype (written into ``out``, any strides, when given; else a new
    contiguous tensor) and the base-2 row log-sum-exp ``[B, H, N]``."""
    B, H, N, D = q.shape
    o = torch.empty((B, H, N, D), dtype=q.dtype, device=q.device) if out is None else out
    lse = torch.empty((B, H, N), dtype=torch.float32, device=q.device)
    if o.numel() == 0:
        return o, lse
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_M"]), H, B)
    with _on_device(q.device):
        _kernel("fwd")[grid](
            q, k, v, q if bias is None else bias, o, lse,
            *q.stride(), *k.stride(), *v.stride(), *_bias_strides(bias), *o.stride(),
            H, N, D, scale * _LOG2E,
            HAS_BIAS=bias is not None, UPCAST=interpreting() or q.dtype == torch.float32,
            DOT_PREC=_dot_precision(q.dtype), BLOCK_D=_block_d(D), **_launch_tile("fwd"),
        )  # fmt: skip
    return o, lse


def aligned_row_stride(n: int) -> int:
    """Row stride for an ``[..., N, N]`` bias or its gradient: N rounded up to 16 elements, so every
    row starts 32/64-byte aligned (197 → 208) for vectorized loads (PyTorch's SDPA pads an unaligned
    mask itself, with a copy per call)."""
    return n + (-n) % 16


def _backward(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: Optional[torch.Tensor],
    o: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    need_dq: bool,
    need_dbias: bool,
    grads: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None,
) -> tuple[Optional[torch.Tensor], torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """dq (None unless ``need_dq``), dk, dv, d(bias) (None unless ``need_dbias``). ``grads``: views
    (any strides) to write dq, dk, dv into, e.g. the three slices of one packed ``d(qkv)``."""
    B, H, N, D = q.shape
    if grads is not None:
        dq, dk, dv = grads
    else:
        dk = torch.empty((B, H, N, D), dtype=q.dtype, device=q.device)
        dv = torch.empty_like(dk)
        dq = torch.empty_like(dk) if need_dq else None
    if dk.numel() == 0:
        dbias = torch.zeros_like(bias) if need_dbias else None
        return (dq.zero_() if need_dq else None), dk.zero_(), dv.zero_(), dbias

    do = _in_head_offsets_fit(do.to(q.dtype))
    block_d = _block_d(D)
    upcast = interpreting() or q.dtype == torch.float32
    prec = _dot_precision(q.dtype)
    qk_scale = scale * _LOG2E
    has_bias = bias is not None
    bias_arg = q if bias is None else bias
    bias_strides = _bias_strides(bias)

    shared_dbias = need_dbias and _is_shared(bias)
    row = aligned_row_stride(N)
    if shared_dbias:
        chunks = _dbias_chunks(B, triton.cdiv(N, _dkdv_block_n()), H, q.device)
        per_prog = math.ceil(B / chunks)
        chunks = math.ceil(B / per_prog)
        db = torch.empty((chunks, H, N, row), dtype=torch.float32, device=q.device)[..., :N]  # partial sums
        db_strides = db.stride()
    elif need_dbias:  # per-image bias: each image's gradient is written once, in the bias dtype
        chunks, per_prog = B, 1
        db = torch.empty((B, H, N, row), dtype=bias.dtype, device=q.device)[..., :N]
        db_strides = db.stride()
    else:
        chunks, per_prog, db, db_strides = B, 1, dk, (0, 0, 0, 0)

    with _on_device(q.device):
        delta = torch.empty((B, H, N), dtype=torch.float32, device=q.device)
        _attn_bwd_delta_kernel[(triton.cdiv(N, 64), H, B)](
            o, do, delta, *o.stride(), *do.stride(), H, N, D, BLOCK_M=64, BLOCK_D=block_d,
        )  # fmt: skip
        _kernel("dkdv")[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), H, chunks)](
            q, k, v, bias_arg, do, lse, delta, dk, dv, db,
            *q.stride(), *k.stride(), *v.stride(), *bias_strides, *do.stride(),
            *dk.stride(), *dv.stride(), *db_strides,
            H, N, D, B, per_prog, qk_scale, scale,
            HAS_BIAS=has_bias, HAS_DBIAS=need_dbias, ACC_DBIAS=shared_dbias,
            UPCAST=upcast, DOT_PREC=prec, BLOCK_D=block_d, **_launch_tile("dkdv"),
        )  # fmt: skip
        if need_dq:
            _kernel("dq")[lambda meta: (triton.cdiv(N, meta["BLOCK_M"]), H, B)](
                q, k, v, bias_arg, do, lse, delta, dq,
                *q.stride(), *k.stride(), *v.stride(), *bias_strides, *do.stride(), *dq.stride(),
                H, N, D, qk_scale, scale,
                HAS_BIAS=has_bias, UPCAST=upcast, DOT_PREC=prec, BLOCK_D=block_d, **_launch_tile("dq"),
            )  # fmt: skip
    dbias = None
    if shared_dbias:
        summed = db[0] if chunks == 1 else db.sum(0)
        dbias = summed.to(bias.dtype).reshape(bias.shape)
    elif need_dbias:
        dbias = db
    return dq, dk, dv, dbias


class FlashAttentionFunction(torch.autograd.Function):
    """Autograd wrapper: saves q, k, v, bias, the output and the row log-sum-exp (no N×N)."""

    @staticmethod
    def forward(
        ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor], scale: float
    ) -> torch.Tensor:
        o, lse = _forward(q, k, v, bias, scale)
        ctx.save_for_backward(q, k, v, bias, o, lse)
        ctx.scale = scale
        return o

    @staticmethod
    def backward(ctx: Any, do: torch.Tensor) -> tuple:
        q, k, v, bias, o, lse = ctx.saved_tensors
        need_q, need_k, need_v, need_bias = ctx.needs_input_grad[:4]
        if not (need_q or need_k or need_v or need_bias):
            return None, None, None, None, None
        dq, dk, dv, dbias = _backward(
            do, q, k, v, bias, o, lse, ctx.scale, need_dq=need_q, need_dbias=bias is not None and need_bias
        )
        return dq, (dk if need_k else None), (dv if need_v else None), dbias, None


# --------------------------------------------------------------------------------------------
# The model's operator: packed qkv in, [B, N, H·d] out, no layout copies either way
# --------------------------------------------------------------------------------------------


def _heads(t: torch.Tensor, parts: int, num_heads: int) -> list[torch.Tensor]:
    """``[B, N, parts·H·d]`` → ``parts`` views ``[B, H, N, d]`` (strides; a copy only for a tensor
    whose last dim is not dense, such as an incoming gradient of exotic layout)."""
    B, N, C = t.shape
    return list(t.reshape(B, N, parts, num_heads, C // (parts * num_heads)).permute(2, 0, 3, 1, 4).unbind(0))


if triton is not None:

    @torch.library.custom_op("fastbeit::flash_attn_qkv_fwd", mutates_args=())
    def _qkv_fwd_op(
        qkv: torch.Tensor, bias: Optional[torch.Tensor], num_heads: int, scale: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention of a packed ``[B, N, 3·H·d]`` projection: ``[B, N, H·d]`` output (the layout the
        output projection reads) and the base-2 log-sum-exp ``[B, H, N]``."""
        B, N, C = qkv.shape
        out = torch.empty((B, N, C // 3), dtype=qkv.dtype, device=qkv.device)
        q, k, v = _heads(qkv, 3, num_heads)
        _, lse = _forward(q, k, v, bias, scale, out=_heads(out, 1, num_heads)[0])
        return out, lse

    @_qkv_fwd_op.register_fake
    def _(qkv, bias, num_heads, scale):
        B, N, C = qkv.shape
        return qkv.new_empty(B, N, C // 3), qkv.new_empty(B, num_heads, N, dtype=torch.float32)

    @torch.library.custom_op("fastbeit::flash_attn_qkv_bwd", mutates_args=())
    def _qkv_bwd_op(
        grad_out: torch.Tensor, qkv: torch.Tensor, bias: Optional[torch.Tensor], out: torch.Tensor,
        lse: torch.Tensor, num_heads: int, scale: float, need_dbias: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """d(qkv) written in the packed layout by the kernels, and d(bias) (empty unless asked)."""
        dqkv = torch.empty_like(qkv, memory_format=torch.contiguous_format)
        q, k, v = _heads(qkv, 3, num_heads)
        _, _, _, dbias = _backward(
            _heads(grad_out, 1, num_heads)[0], q, k, v, bias, _heads(out, 1, num_heads)[0], lse, scale,
            need_dq=True, need_dbias=need_dbias, grads=tuple(_heads(dqkv, 3, num_heads)),
        )
        return dqkv, (dbias if dbias is not None else qkv.new_empty(0))

    @_qkv_bwd_op.register_fake
    def _(grad_out, qkv, bias, out, lse, num_heads, scale, need_dbias):
        dbias = bias.new_empty(bias.shape) if need_dbias else qkv.new_empty(0)
        return qkv.new_empty(qkv.shape), dbias

    def _qkv_setup_context(ctx, inputs, output) -> None:
        qkv, bias, num_heads, scale = inputs
        out, lse = output
        ctx.save_for_backward(qkv, bias, out, lse)
        ctx.num_heads, ctx.scale = num_heads, scale
        ctx.mark_non_differentiable(lse)

    def _qkv_backward(ctx, grad_out, _grad_lse):
        qkv, bias, out, lse = ctx.saved_tensors
        need_dbias = bias is not None and ctx.needs_input_grad[1]
        dqkv, dbias = _qkv_bwd_op(grad_out, qkv, bias, out, lse, ctx.num_heads, ctx.scale, need_dbias)
        return dqkv, (dbias if need_dbias else None), None, None

    _qkv_fwd_op.register_autograd(_qkv_backward, setup_context=_qkv_setup_context)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def _check_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
    """ValueError for inputs that are not [B, H, N, d] self-attention with a [H|B, ..., N, N] bias."""
    if q.dim() != 4:
        raise ValueError(f"q must be [B, H, N, d] (rank 4), got shape {tuple(q.shape)}")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            f"q, k, v must have the same shape [B, H, N, d]; got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device; got {q.device}, {k.device}, {v.device}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must have one dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if bias is None:
        return
    B, H, N, _ = q.shape
    if bias.device != q.device:
        raise ValueError(f"bias is on {bias.device} but q is on {q.device}")
    if not bias.is_floating_point():
        raise ValueError(f"bias must be a float tensor (an additive bias), got {bias.dtype}")
    ok = (bias.dim() == 3 and tuple(bias.shape) == (H, N, N)) or (
        bias.dim() == 4 and tuple(bias.shape[1:]) == (H, N, N) and bias.shape[0] in (1, B)
    )
    if not ok:
        raise ValueError(
            f"bias must be [H, N, N] = [{H}, {N}, {N}] (shared by the batch) or [B, H, N, N] = "
            f"[{B}, {H}, {N}, {N}]; got {tuple(bias.shape)}"
        )


def supports(q: torch.Tensor, bias: Optional[torch.Tensor] = None) -> tuple[bool, str]:
    """Whether :func:`flash_attention` can run for ``q`` (and ``bias``), and if not, why.

    For the model's backend switch: it does not check shapes against k and v (the call does).
    """
    if not triton_available():
        return False, "triton is not installed"
    if not use_triton(q):
        return False, f"Triton kernels need a CUDA device (or TRITON_INTERPRET=1 on CPU), got {q.device}"
    if q.dim() != 4:
        return False, f"q must be [B, H, N, d], got shape {tuple(q.shape)}"
    if q.dtype not in _DTYPES:
        return False, f"dtype {q.dtype} is not supported (float16, bfloat16, float32)"
    if not 1 <= q.shape[-1] <= _MAX_HEAD_DIM:
        return False, f"head dim {q.shape[-1]} is not supported (1 to {_MAX_HEAD_DIM})"
    if q.is_cuda:
        major, minor = torch.cuda.get_device_capability(q.device)
        if (major, minor) < (7, 5):
            return False, f"compute capability {major}.{minor} is below Triton's 7.5"
        if q.dtype == torch.bfloat16 and major < 8:
            return False, f"bfloat16 needs compute capability 8.0+, got {major}.{minor}"
    if bias is not None:
        if bias.device != q.device:
            return False, f"bias is on {bias.device} but q is on {q.device}"
        if not bias.is_floating_point():
            return False, f"bias must be a float tensor, got {bias.dtype}"
        if bias.dim() not in (3, 4):
            return False, f"bias must be [H, N, N] or [B, H, N, N], got shape {tuple(bias.shape)}"
    return True, "ok"


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """softmax(q·kᵀ·scale + bias)·v with the Triton kernels; differentiable in q, k, v and bias.

    q, k, v: ``[B, H, N, d]``, one dtype (fp16, bf16, fp32), any strides, 1 ≤ d ≤ 128.
    bias: ``[H, N, N]`` (or ``[1, H, N, N]``) shared by the batch - its gradient is summed over the
    batch inside the kernel - or ``[B, H, N, N]``; any float dtype. scale: default ``d ** -0.5``.
    Returns a contiguous ``[B, H, N, d]`` tensor in q's dtype.
    """
    _check_shapes(q, k, v, bias)
    if q.dtype not in _DTYPES:
        raise ValueError(f"dtype {q.dtype} is not supported (float16, bfloat16, float32)")
    if not 1 <= q.shape[-1] <= _MAX_HEAD_DIM:
        raise ValueError(
            f"head dim {q.shape[-1]} is not supported: 1 ≤ d ≤ {_MAX_HEAD_DIM} (padded internally to a power of 2)"
        )
    if not use_triton(q):
        raise RuntimeError(
            f"flash_attention needs Triton on a CUDA device (or TRITON_INTERPRET=1 on CPU), got {q.device}; "
            "use attention_reference"
        )
    if q.shape[0] > 65535:
        raise ValueError(f"batch size {q.shape[0]} exceeds the kernels' grid limit of 65535; split the batch")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    q, k, v = (_in_head_offsets_fit(t) for t in (q, k, v))
    bias = None if bias is None else _in_head_offsets_fit(bias)
    return FlashAttentionFunction.apply(q, k, v, bias, scale)


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """The plain computation, explicit [B, H, N, N] softmax in fp32, returned in q's dtype: the oracle."""
    _check_shapes(q, k, v, bias)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    scores = torch.matmul(q.float(), k.float().transpose(-2, -1)) * scale
    if bias is not None:
        scores = scores + bias.float()
    return torch.matmul(torch.softmax(scores, dim=-1), v.float()).to(q.dtype)


def flash_attention_qkv(
    qkv: torch.Tensor, bias: Optional[torch.Tensor], num_heads: int, scale: Optional[float] = None
) -> torch.Tensor:
    """Attention straight from the qkv projection: ``qkv`` ``[B, N, 3·H·d]`` (q, k, v packed as the
    original's ``reshape(B, N, 3, H, d)`` reads them) → ``[B, N, H·d]``, ready for the output
    projection. The kernels read q, k, v and write the output and d(qkv) through strides: no
    permute, unbind or reshape copies in the forward or the backward. A PyTorch operator
    (``fastbeit::flash_attn_qkv_fwd`` / ``_bwd``): ``torch.compile(fullgraph=True)`` traces it."""
    if qkv.dim() != 3 or qkv.shape[-1] % (3 * num_heads):
        raise ValueError(f"qkv must be [B, N, 3·H·d] with H = {num_heads}, got shape {tuple(qkv.shape)}")
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    B, N, C = qkv.shape
    head_dim = C // (3 * num_heads)
    q = _heads(qkv, 3, num_heads)[0]  # a view, for the checks
    _check_shapes(q, q, q, bias)
    ok, why = supports(q, bias)
    if not ok:
        raise ValueError(f"flash_attention_qkv cannot run this input: {why}")
    if B > 65535:
        raise ValueError(f"batch size {B} exceeds the kernels' grid limit of 65535; split the batch")
    scale = head_dim**-0.5 if scale is None else float(scale)
    return _qkv_fwd_op(qkv, bias, num_heads, scale)[0]
