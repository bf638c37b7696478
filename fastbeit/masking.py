"""Masks for masked image modeling on a patch grid.

``blockwise`` is the original BEiT generator, step for step, including its early stop: it never
masks more than the target but often stops a few patches short (mean ≈ 74.5 of 75 on 14×14).
``exact`` tops that up with random unmasked patches to exactly the target (as BEiT v2 does), so
every batch has the same masked count (static shapes). ``random`` masks a uniform random subset
(the paper's ablation).
"""

from __future__ import annotations

import math
import random
from typing import Optional, Tuple

import numpy as np
import torch

MASKING_MODES = ("blockwise", "exact", "random")


class MaskingGenerator:
    """Draw one ``[height, width]`` 0/1 mask per call.

    Args mirror the original: ``num_masking_patches`` is the target, blocks cover at least
    ``min_num_patches`` and at most ``max_num_patches`` (default: the target), aspect ratios are
    log-uniform in ``[min_aspect, max_aspect]`` (default ``1 / min_aspect``).
    """

    def __init__(
        self,
        input_size: Tuple[int, int] | int,
        num_masking_patches: int,
        min_num_patches: int = 4,
        max_num_patches: Optional[int] = None,
        min_aspect: float = 0.3,
        max_aspect: Optional[float] = None,
        mode: str = "blockwise",
    ) -> None:
        if isinstance(input_size, int):
            input_size = (input_size, input_size)
        self.height, self.width = (int(s) for s in input_size)
        self.num_patches = self.height * self.width
        self.num_masking_patches = int(num_masking_patches)
        self.min_num_patches = int(min_num_patches)
        self.max_num_patches = (
            self.num_masking_patches if max_num_patches is None else int(max_num_patches)
        )
        if max_aspect is None:
            max_aspect = 1.0 / min_aspect if min_aspect > 0 else 0.0
        self.min_aspect, self.max_aspect = float(min_aspect), float(max_aspect)
        self.mode = mode
        self._validate()
        self.log_aspect_ratio = (math.log(self.min_aspect), math.log(self.max_aspect))

    def _validate(self) -> None:
        if self.height <= 0 or self.width <= 0:
            raise ValueError(f"mask grid must be positive, got {self.height}x{self.width}")
        if self.mode not in MASKING_MODES:
            raise ValueError(f"unknown masking mode {self.mode!r}; choose one of {MASKING_MODES}")
        if not 0 < self.num_masking_patches <= self.num_patches:
            raise ValueError(
                f"num_masking_patches={self.num_masking_patches} must be in [1, {self.num_patches}] "
                f"for a {self.height}x{self.width} grid"
            )
        if self.mode == "random":
            return
        if self.min_num_patches < 1:
            raise ValueError(f"min_num_patches must be >= 1, got {self.min_num_patches}")
        if self.min_num_patches > self.num_masking_patches:
            raise ValueError(
                f"min_num_patches={self.min_num_patches} exceeds the target "
                f"num_masking_patches={self.num_masking_patches}: no block could ever be placed"
            )
        if self.max_num_patches < self.min_num_patches:
            raise ValueError(
                f"max_num_patches={self.max_num_patches} is below min_num_patches={self.min_num_patches}"
            )
        if not 0 < self.min_aspect <= self.max_aspect:
            raise ValueError(
                f"aspect range must satisfy 0 < min_aspect <= max_aspect, got "
                f"[{self.min_aspect}, {self.max_aspect}]"
            )

    def __repr__(self) -> str:
        return (
            f"MaskingGenerator({self.height}x{self.width}, target={self.num_masking_patches}, "
            f"block=[{self.min_num_patches}, {self.max_num_patches}], "
            f"aspect=[{self.min_aspect:.3g}, {self.max_aspect:.3g}], mode={self.mode})"
        )

    @property
    def shape(self) -> Tuple[int, int]:
        return self.height, self.width

    def _place_block(self, mask: np.ndarray, budget: int, rng: random.Random) -> int:
        """Try up to 10 times to add one block adding 1..budget new patches; return how many."""
        delta = 0
        for _ in range(10):
            target_area = rng.uniform(self.min_num_patches, budget)
            aspect = math.exp(rng.uniform(*self.log_aspect_ratio))
            h = int(round(math.sqrt(target_area * aspect)))
            w = int(round(math.sqrt(target_area / aspect)))
            if w < self.width and h < self.height:
                top = rng.randint(0, self.height - h)
                left = rng.randint(0, self.width - w)
                window = mask[top : top + h, left : left + w]
                new = h * w - int(window.sum())
                if 0 < new <= budget:
                    window[...] = 1
                    delta += new
            if delta > 0:
                break
        return delta

    def _blockwise(self, rng: random.Random) -> np.ndarray:
        mask = np.zeros(self.shape, dtype=np.int64)
        count = 0
        while count < self.num_masking_patches:
            budget = min(self.num_masking_patches - count, self.max_num_patches)
            delta = self._place_block(mask, budget, rng)
            if delta == 0:
                break
            count += delta
        return mask

    def _top_up(self, mask: np.ndarray, rng: random.Random) -> np.ndarray:
        missing = self.num_masking_patches - int(mask.sum())
        if missing > 0:
            free = np.flatnonzero(mask.reshape(-1) == 0).tolist()
            for idx in rng.sample(free, missing):
                mask.reshape(-1)[idx] = 1
        return mask

    def __call__(self, rng: Optional[random.Random] = None) -> np.ndarray:
        """One mask as an int64 array of 0/1. ``rng`` defaults to the global ``random`` module
        (seeded per DataLoader worker by PyTorch), as in the original code."""
        rng = rng if rng is not None else random._inst  # type: ignore[attr-defined]
        if self.mode == "random":
            mask = np.zeros(self.num_patches, dtype=np.int64)
            mask[rng.sample(range(self.num_patches), self.num_masking_patches)] = 1
            return mask.reshape(self.shape)
        mask = self._blockwise(rng)
        if self.mode == "exact":
            mask = self._top_up(mask, rng)
        return mask


def padded_positions(mask: torch.Tensor, max_masked: Optional[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """``[B, K]`` token positions of each image's masked patches, in ``x[mask]`` order, padded with
    unmasked positions, and ``[B, K]`` validity (True for the real ones); ``K = max_masked`` (or N).

    A stable descending sort of the 0/1 mask: static shapes and no ``nonzero``, hence no host sync.
    """
    K = mask.shape[1] if max_masked is None else int(max_masked)
    order = torch.sort(mask.to(torch.int8), dim=1, descending=True, stable=True).indices[:, :K]
    valid = torch.arange(K, device=mask.device) < mask.sum(1, keepdim=True)
    return order, valid


def gather_rows(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """``[B, K, ...]`` rows of ``x`` (``[B, N, ...]``) at the ``[B, K]`` positions ``order``."""
    index = order.reshape(*order.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
    return x.gather(1, index)


def masked_mean(per_row: torch.Tensor, valid: torch.Tensor, mask: torch.Tensor,
                max_masked: Optional[int]) -> torch.Tensor:
    """Mean of the padded ``per_row`` values over the real (``valid``) rows: the original's mean over
    ``x[mask]`` (NaN when nothing is masked, as that mean of nothing), and NaN when an image has more
    masked patches than ``max_masked`` rows hold, so a dropped row can never pass unnoticed."""
    valid = valid.reshape(-1)
    mean = torch.where(valid, per_row.reshape(-1), 0.0).sum() / valid.sum()
    if max_masked is not None:
        mean = torch.where((mask.sum(1) > max_masked).any(), float("nan"), mean)
    return mean
