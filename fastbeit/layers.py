"""Building blocks shared by the fast and the reference model, and the original init."""

from __future__ import annotations

import math
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def trunc_normal_(tensor: torch.Tensor, std: float) -> torch.Tensor:
    """Normal(0, std) truncated at ±std (the original BEiT cut: a=-std, b=std, not ±2).

    Exact rejection sampling that redraws only the rejected entries: the same distribution as
    ``nn.init.trunc_normal_``, which redraws the whole tensor each round (about 1 s for one
    BEiT-Base MLP matrix on a CPU, 30 s to build the model).
    """
    flat = tensor.view(-1) if tensor.is_contiguous() else torch.empty(tensor.numel(), dtype=tensor.dtype,
                                                                       device=tensor.device)
    flat.normal_(0.0, std)
    bad = (flat.abs() > std).nonzero().squeeze(1)
    while bad.numel():
        flat[bad] = torch.empty(bad.numel(), dtype=flat.dtype, device=flat.device).normal_(0.0, std)
        bad = bad[flat[bad].abs() > std]
    if not tensor.is_contiguous():
        tensor.copy_(flat.view_as(tensor))
    return tensor


def relative_position_index(grid: Tuple[int, int]) -> torch.Tensor:
    """``[N+1, N+1]`` indices into a ``[(2h-1)(2w-1)+3, heads]`` table.

    Patch pairs index by their 2-D offset; the last three rows are cls→token, token→cls and
    cls→cls, exactly as in the original code.
    """
    h, w = grid
    coords = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0).contiguous()
    rel[:, :, 0] += h - 1
    rel[:, :, 1] += w - 1
    rel[:, :, 0] *= 2 * w - 1
    num_relative = (2 * h - 1) * (2 * w - 1) + 3
    index = torch.zeros((h * w + 1,) * 2, dtype=torch.long)
    index[1:, 1:] = rel.sum(-1)
    index[0, 0:] = num_relative - 3
    index[0:, 0] = num_relative - 2
    index[0, 0] = num_relative - 1
    return index


def num_relative_distance(grid: Tuple[int, int]) -> int:
    return (2 * grid[0] - 1) * (2 * grid[1] - 1) + 3


def gather_relative_bias(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Table ``[R, H]`` and index ``[N, N]`` → bias ``[H, N, N]``, a view whose rows are 16 elements
    apart (N = 197 → 208) so each starts aligned for the attention kernels' vectorized loads."""
    n = index.shape[0]
    bias = table[index.view(-1)].view(n, n, -1).permute(2, 0, 1)
    return F.pad(bias, (0, (-n) % 16))[..., :n]


class RelativePositionBias(nn.Module):
    """The learned relative position bias table shared by all layers (zero-initialized)."""

    def __init__(self, grid: Tuple[int, int], num_heads: int) -> None:
        super().__init__()
        self.grid = grid
        self.relative_position_bias_table = nn.Parameter(torch.zeros(num_relative_distance(grid), num_heads))
        self.register_buffer("relative_position_index", relative_position_index(grid))

    def forward(self) -> torch.Tensor:
        return gather_relative_bias(self.relative_position_bias_table, self.relative_position_index)


class DropPath(nn.Module):
    """Stochastic depth: drop the residual branch per sample, rescale the kept ones."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        return x * x.new_empty(shape).bernoulli_(keep).div_(keep)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class Mlp(nn.Module):
    """fc1 → GELU → fc2 → dropout (0 by default). One dropout, after fc2, as the original: its
    dropout after the activation is commented out to follow the original BERT."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.act(self.fc1(x))))


class PatchEmbed(nn.Module):
    """Non-overlapping ``patch × patch`` convolution: image → ``[B, N, D]`` tokens."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.img_size, self.patch_size = img_size, patch_size
        self.grid = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid[0] * self.grid[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(
                f"input size {tuple(x.shape[-2:])} does not match the model's {self.img_size}x{self.img_size}"
            )
        return self.proj(x).flatten(2).transpose(1, 2)


def qkv_projection(x: torch.Tensor, weight: torch.Tensor, q_bias, v_bias) -> torch.Tensor:
    """One matmul for q, k, v; k has no bias (BEiT's q/v-only bias)."""
    bias = None
    if q_bias is not None:
        bias = torch.cat((q_bias, torch.zeros_like(v_bias, requires_grad=False), v_bias))
    return F.linear(x, weight, bias)


def wide_trunc_normal_(tensor: torch.Tensor, std: float) -> torch.Tensor:
    """Normal(0, std) cut at the absolute values ±2 (timm's ``trunc_normal_`` defaults, which the
    original fine-tuning model uses: for std 0.02 the cut is 100σ away, so in effect untruncated)."""
    return nn.init.trunc_normal_(tensor, std=std, a=-2.0, b=2.0)


def init_beit_weights(model: nn.Module, std: float, finetune: bool = False) -> None:
    """The original init: truncated normal (±1σ) for Linear/Conv weights, zero biases,
    LayerNorm (1, 0); then each block's ``attn.proj`` and ``mlp.fc2`` weights divided by
    ``sqrt(2·layer)`` (1-based).

    ``finetune=True`` is the original fine-tuning model's variant: Linear weights from
    :func:`wide_trunc_normal_`, Conv2d layers (the patch embedding) left at PyTorch's default init.
    """
    for module in model.modules():
        if isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and not finetune):
            (wide_trunc_normal_ if finetune else trunc_normal_)(module.weight, std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    for layer_id, block in enumerate(getattr(model, "blocks", []), start=1):
        with torch.no_grad():
            block.attn.proj.weight.div_(math.sqrt(2.0 * layer_id))
            block.mlp.fc2.weight.div_(math.sqrt(2.0 * layer_id))
