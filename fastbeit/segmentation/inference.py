"""Sliding-window inference (mmseg's ``slide`` mode) for a model that takes one fixed square size.

Windows of the training crop size step by ``stride`` (2/3 of the crop by default); the last
window of each row and column is shifted back to end at the border, overlapping logits are
averaged. An image smaller than the window is zero-padded (the normalized mean colour) and the
padding cut away again.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import torch
import torch.nn.functional as F

from fastbeit.segmentation.head import resize_to


def default_stride(crop: int) -> int:
    """2/3 of the crop, rounded down (512 → 341 as in the original configs)."""
    return max(1, crop * 2 // 3)


def window_starts(size: int, crop: int, stride: int) -> List[int]:
    """Start offsets along one axis of length ``size`` (≥ ``crop``) covering it completely."""
    count = max(size - crop + stride - 1, 0) // stride + 1
    return sorted({max(min(i * stride + crop, size) - crop, 0) for i in range(count)})


@torch.no_grad()
def slide_logits(model: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, num_classes: int,
                 crop: int, stride: Optional[int] = None, max_batch: int = 16) -> torch.Tensor:
    """Averaged window logits ``[B, C, H, W]`` for images ``[B, 3, H, W]``; windows run batched."""
    stride = stride or default_stride(crop)
    b, _, h, w = images.shape
    padded = F.pad(images, (0, max(crop - w, 0), 0, max(crop - h, 0)))
    ph, pw = padded.shape[-2:]
    boxes = [(y, x) for y in window_starts(ph, crop, stride) for x in window_starts(pw, crop, stride)]
    logits = images.new_zeros((b, num_classes, ph, pw), dtype=torch.float32)
    count = images.new_zeros((1, 1, ph, pw), dtype=torch.float32)
    for i in range(0, len(boxes), max(1, max_batch // b)):
        chunk: Sequence = boxes[i : i + max(1, max_batch // b)]
        windows = torch.cat([padded[:, :, y : y + crop, x : x + crop] for y, x in chunk])
        out = model(windows).float()
        for j, (y, x) in enumerate(chunk):
            logits[:, :, y : y + crop, x : x + crop] += out[j * b : (j + 1) * b]
            count[:, :, y : y + crop, x : x + crop] += 1
    return (logits / count)[:, :, :h, :w]


@torch.no_grad()
def predict(model: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, num_classes: int, crop: int,
            out_size: Sequence[int], stride: Optional[int] = None) -> torch.Tensor:
    """Class map ``[B, H', W']`` at ``out_size`` (the label's): window logits resized, then argmax."""
    logits = slide_logits(model, images, num_classes, crop, stride)
    return resize_to(logits, out_size).argmax(1)
