"""Blockwise MIM masks sampled on the GPU: one launch, one program per image, no CPU work per step.

The kernel runs the algorithm of :class:`fastbeit.masking.MaskingGenerator` step for step: place
rectangles of log-uniform aspect ratio and uniform area in ``[min_num_patches, budget]``, up to 10
attempts per rectangle, accept a rectangle only if it adds ``1..budget`` new patches, and stop early
when 10 attempts in a row fail. ``exact`` then tops up with uniformly random unmasked patches to the
target; ``random`` picks a uniform random subset.

Randomness is counter based (Philox via ``tl.philox``): image ``i`` of the call with ``(seed,
offset)`` draws from the counter ``(draw, i, offset_lo, offset_hi | stream)``. Masks are therefore a
pure function of ``(seed, offset, i)``: training step ``k`` with ``offset=k`` is reproducible, and
the same image gets the same mask whatever the batch size or how images are packed into programs.
The generator works in float32 where the CPU one uses float64, so the two agree in distribution,
not draw for draw (the CPU reference seeds Python's ``random`` from the same triple instead).
"""

from __future__ import annotations

import random
from typing import Optional, Tuple, Union

import numpy as np
import torch
import triton
import triton.language as tl

from fastbeit.kernels import interpreting, use_triton
from fastbeit.masking import MaskingGenerator

_MODES = {"blockwise": 0, "exact": 1, "random": 2}
MAX_ATTEMPTS = tl.constexpr(10)  # per block, as in the original generator
_OFFSET_LIMIT = 1 << 60  # offset splits into 31 + 29 counter bits; 2 bits name the stream
_SEED_LIMIT = 1 << 63


@triton.jit
def _uniform(bits):
    """uint32 Philox word -> float32 uniform in [0, 1) (31 bits folded, as tl.rand does)."""
    x = bits.to(tl.int32, bitcast=True)
    x = tl.where(x < 0, ~x, x)
    return x.to(tl.float32) * 4.6566127342e-10


@triton.jit
def _philox(seed, c0, img, off_lo, off_hi, STREAM: tl.constexpr):
    """Four uint32 words for counter (c0, image, offset, stream); c0 and img share one shape."""
    zero = c0 * 0
    return tl.philox(seed, c0, img, zero + off_lo, zero + (off_hi + STREAM * 536870912))


@triton.jit
def _blockwise(seed, off_lo, off_hi, img, img_ok, row, col, pos_ok, min_block, max_block,
               log_amin, log_amax, H: tl.constexpr, W: tl.constexpr, TARGET: tl.constexpr,
               IMGS: tl.constexpr, BLOCK: tl.constexpr):
    """MaskingGenerator._blockwise for IMGS images at once (lock-step, per-image state vectors)."""
    masked = tl.zeros([IMGS, BLOCK], tl.int32)
    count = tl.zeros([IMGS], tl.int32)
    active = img_ok
    n_active = tl.sum(active.to(tl.int32), 0)
    step = n_active * 0  # loop counters as int32 tensors (loop-carried on the GPU)
    while n_active > 0:
        budget = tl.minimum(TARGET - count, max_block)
        delta = tl.zeros([IMGS], tl.int32)
        searching = active
        n_searching = n_active
        attempt = step * 0
        while n_searching > 0:
            draw = tl.zeros([IMGS], tl.int32) + (step * MAX_ATTEMPTS + attempt)
            r0, r1, r2, r3 = _philox(seed, draw, img, off_lo, off_hi, 0)
            area = min_block + (budget - min_block).to(tl.float32) * _uniform(r0)
            aspect = tl.exp(log_amin + (log_amax - log_amin) * _uniform(r1))
            h = tl.floor(tl.sqrt(area * aspect) + 0.5).to(tl.int32)
            w = tl.floor(tl.sqrt(area / aspect) + 0.5).to(tl.int32)
            fits = (w < W) & (h < H)
            # randint(0, n) inclusive == floor(u * (n + 1)); clamp guards float rounding up to n + 1
            top = tl.minimum(tl.floor(_uniform(r2) * (H - h + 1).to(tl.float32)).to(tl.int32), H - h)
            left = tl.minimum(tl.floor(_uniform(r3) * (W - w + 1).to(tl.float32)).to(tl.int32), W - w)
            inside = ((row[None, :] >= top[:, None]) & (row[None, :] < (top + h)[:, None])
                      & (col[None, :] >= left[:, None]) & (col[None, :] < (left + w)[:, None])
                      & pos_ok[None, :])
            covered = tl.sum((inside & (masked > 0)).to(tl.int32), 1)
            new = h * w - covered
            ok = searching & fits & (new > 0) & (new <= budget)
            masked = tl.where(inside & ok[:, None], 1, masked)
            delta = tl.where(ok, new, delta)
            attempt += 1
            searching = searching & (~ok) & (attempt < MAX_ATTEMPTS)
            n_searching = tl.sum(searching.to(tl.int32), 0)
        count += delta
        active = active & (delta > 0) & (count < TARGET)
        n_active = tl.sum(active.to(tl.int32), 0)
        step += 1
    return masked


@triton.jit
def _pick_random(free, missing, seed, off_lo, off_hi, img, pos, STREAM: tl.constexpr,
                 IMGS: tl.constexpr, BLOCK: tl.constexpr, KEY_BITS: tl.constexpr):
    """Uniformly choose ``missing[i]`` of the ``free`` positions of each image (a random subset).

    Each position gets a unique key (31 random bits, then its index as tie-break); the ``missing``
    smallest keys among the free positions win. The cut-off key is found by bisection on the key
    value (KEY_BITS rounds of compare-and-count), which is cheaper than a sort both on the GPU and
    in the interpreter.
    """
    c0 = tl.zeros([IMGS, BLOCK], tl.int32) + pos[None, :]
    c1 = tl.zeros([IMGS, BLOCK], tl.int32) + img[:, None]
    r0, _, _, _ = _philox(seed, c0, c1, off_lo, off_hi, STREAM)
    key = (r0 >> 1).to(tl.int64) * BLOCK + c0.to(tl.int64)
    lo = tl.zeros([IMGS], tl.int64) - 1  # count(key <= lo) < missing
    hi = tl.zeros([IMGS], tl.int64) + (2147483648 * BLOCK - 1)  # count(key <= hi) >= missing
    for _ in range(KEY_BITS):
        mid = lo + (hi - lo) // 2
        below = tl.sum((free & (key <= mid[:, None])).to(tl.int32), 1)
        enough = below >= missing
        hi = tl.where(enough, mid, hi)
        lo = tl.where(enough, lo, mid)
    return free & (key <= hi[:, None]) & (missing > 0)[:, None]


@triton.jit
def _block_mask_kernel(out_ptr, batch, seed, off_lo, off_hi, min_block, max_block, log_amin, log_amax,
                       H: tl.constexpr, W: tl.constexpr, TARGET: tl.constexpr, MODE: tl.constexpr,
                       IMGS: tl.constexpr, BLOCK: tl.constexpr, KEY_BITS: tl.constexpr):
    """Masks of IMGS images (1 on the GPU: one program per image) into out[batch, H*W] (uint8)."""
    img = tl.program_id(0) * IMGS + tl.arange(0, IMGS)
    img_ok = img < batch
    pos = tl.arange(0, BLOCK)
    row = pos // W
    col = pos % W
    pos_ok = pos < H * W
    valid = img_ok[:, None] & pos_ok[None, :]
    if MODE == 2:
        taken = _pick_random(valid, tl.zeros([IMGS], tl.int32) + TARGET, seed, off_lo, off_hi, img, pos,
                             2, IMGS, BLOCK, KEY_BITS)
    else:
        masked = _blockwise(seed, off_lo, off_hi, img, img_ok, row, col, pos_ok, min_block, max_block,
                            log_amin, log_amax, H, W, TARGET, IMGS, BLOCK)
        taken = masked > 0
        if MODE == 1:
            missing = TARGET - tl.sum(taken.to(tl.int32), 1)
            taken = taken | _pick_random(valid & (~taken), missing, seed, off_lo, off_hi, img, pos,
                                         1, IMGS, BLOCK, KEY_BITS)
    offs = img.to(tl.int64)[:, None] * (H * W) + pos[None, :]
    tl.store(out_ptr + offs, taken.to(tl.uint8), mask=valid)


def _generator(grid, num_masking_patches, min_num_patches, max_num_patches, min_aspect, max_aspect,
               mode) -> MaskingGenerator:
    """Build (and so validate) the CPU generator these arguments describe."""
    return MaskingGenerator(grid, num_masking_patches, min_num_patches, max_num_patches, min_aspect,
                            max_aspect, mode)


def _check_counters(batch_size: int, seed: int, offset: int) -> None:
    if int(batch_size) != batch_size or batch_size < 0:
        raise ValueError(f"batch_size must be a non-negative integer, got {batch_size!r}")
    if int(seed) != seed or not 0 <= seed < _SEED_LIMIT:
        raise ValueError(f"seed must be an integer in [0, 2**63), got {seed!r}")
    if int(offset) != offset or not 0 <= offset < _OFFSET_LIMIT:
        raise ValueError(f"offset must be an integer in [0, 2**60), got {offset!r}")


def _launch(gen: MaskingGenerator, batch_size: int, seed: int, offset: int, device: torch.device,
            images_per_program: int) -> torch.Tensor:
    """Run the kernel; ``images_per_program`` only trades speed (results do not depend on it)."""
    hw = gen.height * gen.width
    out = torch.empty(batch_size, hw, dtype=torch.bool, device=device)
    if batch_size == 0:
        return out
    grid = (triton.cdiv(batch_size, images_per_program),)
    block = triton.next_power_of_2(hw)
    _block_mask_kernel[grid](
        out.view(torch.uint8), batch_size, int(seed), offset & 0x7FFFFFFF, offset >> 31,
        gen.min_num_patches, gen.max_num_patches, gen.log_aspect_ratio[0], gen.log_aspect_ratio[1],
        H=gen.height, W=gen.width, TARGET=gen.num_masking_patches, MODE=_MODES[gen.mode],
        IMGS=images_per_program, BLOCK=block, KEY_BITS=32 + block.bit_length(), num_warps=1,
    )
    return out


@torch.library.custom_op("fastbeit::sample_block_masks", mutates_args=())
def _sample_op(
    batch_size: int, height: int, width: int, num_masking_patches: int, min_num_patches: int,
    max_num_patches: int, min_aspect: float, max_aspect: float, mode: str, seed: int, offset: int,
    device: torch.device,
) -> torch.Tensor:
    """The sampler as a PyTorch operator: a compiled region may draw its masks inside the graph
    (``seed``/``offset`` are plain ints, so a new offset per step would re-specialize a graph: the
    training loop draws outside the compiled step)."""
    gen = _generator((height, width), num_masking_patches, min_num_patches, max_num_patches, min_aspect,
                     max_aspect, mode)
    return _launch(gen, batch_size, seed, offset, device, _images_per_program(batch_size))


@_sample_op.register_fake
def _(batch_size, height, width, num_masking_patches, min_num_patches, max_num_patches, min_aspect, max_aspect,
      mode, seed, offset, device):
    return torch.empty(batch_size, height * width, dtype=torch.bool, device=device)


def _images_per_program(batch_size: int) -> int:
    """One image per program on the GPU; the interpreter pays per op, so it packs up to 4096."""
    if not interpreting():
        return 1
    return min(4096, triton.next_power_of_2(max(1, batch_size)))


def sample_block_masks(
    batch_size: int,
    grid: Union[Tuple[int, int], int] = (14, 14),
    num_masking_patches: int = 75,
    min_num_patches: int = 16,
    max_num_patches: Optional[int] = None,
    min_aspect: float = 0.3,
    max_aspect: Optional[float] = None,
    mode: str = "blockwise",
    seed: int = 0,
    offset: int = 0,
    device: Union[str, torch.device] = "cuda",
) -> torch.Tensor:
    """``[batch_size, H*W]`` bool masks drawn on ``device`` in one launch (same law as the CPU
    generator). Falls back to :func:`sample_block_masks_reference` where Triton cannot run."""
    gen = _generator(grid, num_masking_patches, min_num_patches, max_num_patches, min_aspect,
                     max_aspect, mode)
    _check_counters(batch_size, seed, offset)
    device = torch.device(device)
    if not use_triton(torch.empty(0, device=device)):
        return _reference(gen, batch_size, seed, offset, device)
    return _sample_op(batch_size, gen.height, gen.width, gen.num_masking_patches, gen.min_num_patches,
                      gen.max_num_patches, gen.min_aspect, gen.max_aspect,
                      gen.mode, int(seed), int(offset), device)


def _reference(gen: MaskingGenerator, batch_size: int, seed: int, offset: int,
               device: torch.device) -> torch.Tensor:
    masks = [gen(random.Random(f"{seed}/{offset}/{i}")).reshape(-1) for i in range(batch_size)]
    stacked = np.stack(masks) if masks else np.zeros((0, gen.num_patches), dtype=np.int64)
    return torch.from_numpy(stacked).to(torch.bool).to(device)


def sample_block_masks_reference(
    batch_size: int,
    grid: Union[Tuple[int, int], int] = (14, 14),
    num_masking_patches: int = 75,
    min_num_patches: int = 16,
    max_num_patches: Optional[int] = None,
    min_aspect: float = 0.3,
    max_aspect: Optional[float] = None,
    mode: str = "blockwise",
    seed: int = 0,
    offset: int = 0,
    device: Union[str, torch.device] = "cuda",
) -> torch.Tensor:
    """The faithful CPU generator, image ``i`` seeded from ``(seed, offset, i)``, moved to ``device``."""
    gen = _generator(grid, num_masking_patches, min_num_patches, max_num_patches, min_aspect,
                     max_aspect, mode)
    _check_counters(batch_size, seed, offset)
    return _reference(gen, batch_size, seed, offset, torch.device(device))


__all__ = ["sample_block_masks", "sample_block_masks_reference"]
