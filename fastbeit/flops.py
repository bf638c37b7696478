"""Analytic FLOPs of a pre-training step, and the device's achieved matmul rate (for MFU).

Counts multiply-adds of matmuls and convolutions as 2 FLOPs, as ``torch.utils.flop_counter``
does; element-wise work (norms, softmax, GELU, biases) is left out. Per image, BEiT-Base at 224
with the DALL-E tokenizer: encoder ≈ 35 GFLOP forward, lm_head on 75 tokens ≈ 0.9, tokenizer
≈ 52; training counts 3× forward for the encoder and head (forward + two backward matmuls) and
1× for the tokenizer (no grad): ≈ 160 GFLOP per image.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Dict

import torch

from fastbeit.config import BeitConfig
from fastbeit.tokenizer.dvae import GROUP_COUNT, DVAEConfig

GFLOP = 1e9


def encoder_forward_breakdown(cfg: BeitConfig) -> Dict[str, float]:
    """Forward FLOPs per image of the encoder's parts: patch_embed, qkv, attention (QKᵀ and PV),
    proj, mlp (over all layers)."""
    n_patch = cfg.num_patches
    n = n_patch + 1  # with CLS
    d, hidden, depth = cfg.embed_dim, int(cfg.embed_dim * cfg.mlp_ratio), cfg.depth
    return {
        "patch_embed": 2.0 * n_patch * cfg.in_chans * cfg.patch_size**2 * d,
        "qkv": depth * 2.0 * n * d * 3 * d,
        "attention": depth * 2 * (2.0 * n * n * d),  # QKᵀ and PV, all heads together
        "proj": depth * 2.0 * n * d * d,
        "mlp": depth * 2 * (2.0 * n * d * hidden),
    }


def encoder_forward_flops(cfg: BeitConfig) -> float:
    """Forward FLOPs per image of the encoder (patch embedding and all blocks)."""
    return sum(encoder_forward_breakdown(cfg).values())


def head_forward_flops(cfg: BeitConfig, num_masked: float) -> float:
    """Forward FLOPs per image of ``lm_head`` applied to the masked tokens only."""
    return 2.0 * num_masked * cfg.embed_dim * cfg.vocab_size


def _conv(pixels: int, n_in: int, n_out: int, kernel: int) -> float:
    return 2.0 * pixels * n_in * n_out * kernel * kernel


def tokenizer_forward_flops(cfg: DVAEConfig) -> float:
    """Forward FLOPs per image of the dVAE encoder at its actual width (ids = argmax, free).

    7×7 input conv; four groups of residual blocks (bottleneck n/4 with kernels 3, 3, 3, 1 and a
    1×1 id-path conv where the width changes), max-pool after the first three; 1×1 output conv.
    """
    side = cfg.image_size
    widths = [cfg.n_hid * m for m in (1, 2, 4, 8)]
    total = _conv(side * side, cfg.input_channels, widths[0], 7)
    n_in = widths[0]
    for g in range(GROUP_COUNT):
        pixels, n_out = side * side, widths[g]
        for blk in range(cfg.n_blk_per_group):
            c_in = n_in if blk == 0 else n_out
            hid = n_out // 4
            if c_in != n_out:
                total += _conv(pixels, c_in, n_out, 1)
            total += _conv(pixels, c_in, hid, 3) + 2 * _conv(pixels, hid, hid, 3) + _conv(pixels, hid, n_out, 1)
        n_in = n_out
        if g < GROUP_COUNT - 1:
            side //= 2
    return total + _conv(side * side, n_in, cfg.vocab_size, 1)


@dataclass(frozen=True)
class StepFlops:
    """FLOPs per image of one pre-training step, by part."""

    encoder_forward: float
    head_forward: float
    tokenizer_forward: float

    @property
    def model_training(self) -> float:
        """Encoder and head: forward + backward ≈ 3× forward."""
        return 3.0 * (self.encoder_forward + self.head_forward)

    @property
    def training(self) -> float:
        """The whole step: model training plus one tokenizer forward."""
        return self.model_training + self.tokenizer_forward

    def as_dict(self) -> Dict[str, float]:
        return {
            "encoder_forward": self.encoder_forward,
            "head_forward": self.head_forward,
            "tokenizer_forward": self.tokenizer_forward,
            "model_training": self.model_training,
            "training": self.training,
        }


def step_flops(cfg: BeitConfig, tokenizer: DVAEConfig, num_masked: float) -> StepFlops:
    """Per-image FLOPs of a step with ``num_masked`` masked patches per image (mean)."""
    return StepFlops(
        encoder_forward_flops(cfg), head_forward_flops(cfg, num_masked), tokenizer_forward_flops(tokenizer)
    )


def measure_matmul_tflops(
    device: str | torch.device, dtype: torch.dtype = torch.bfloat16, size: int | None = None, repeats: int = 3,
) -> float:
    """The device's achieved dense matmul rate in TFLOP/s: best of ``repeats`` timed batches of
    ``size × size`` products (8192 on CUDA, 512 on CPU). The MFU denominator of a run."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    size = size or (8192 if cuda else 512)
    per_batch = 10 if cuda else 3
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    torch.mm(a, b)  # warm-up: library handles, kernel selection
    best = float("inf")
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(per_batch):
                torch.mm(a, b)
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            for _ in range(per_batch):
                torch.mm(a, b)
            seconds = time.perf_counter() - t0
        best = min(best, seconds / per_batch)
    return 2.0 * size**3 / best / 1e12


def mfu(img_per_s: float, flops_per_image: float, tflops: float) -> float:
    """Model FLOPs utilization: achieved FLOP/s over the measured matmul rate."""
    return img_per_s * flops_per_image / (tflops * 1e12) if tflops > 0 else float("nan")
