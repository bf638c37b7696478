"""The faithful BEiT two-view augmentation (torchvision, CPU).

ColorJitter → horizontal flip → ONE RandomResizedCrop box, resized twice: to 224 px bicubic
(the patch view, normalized) and to 112 px Lanczos (the tokenizer view, ``map_pixels``).
"""

from __future__ import annotations

import math
import random
from typing import Optional, Sequence, Tuple

import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from fastbeit.masking import MaskingGenerator

LOGIT_LAPLACE_EPS = 0.1
BEIT_MEAN = (0.5, 0.5, 0.5)  # the original default (Inception mean/std)
BEIT_STD = (0.5, 0.5, 0.5)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

INTERPOLATIONS = {
    "bicubic": InterpolationMode.BICUBIC,
    "bilinear": InterpolationMode.BILINEAR,
    "lanczos": InterpolationMode.LANCZOS,
    "nearest": InterpolationMode.NEAREST,
}


def map_pixels(x: torch.Tensor, eps: float = LOGIT_LAPLACE_EPS) -> torch.Tensor:
    """DALL-E's input scaling: [0, 1] → [eps, 1 - eps] (the logit-Laplace support)."""
    return (1 - 2 * eps) * x + eps


def unmap_pixels(x: torch.Tensor, eps: float = LOGIT_LAPLACE_EPS) -> torch.Tensor:
    """Inverse of :func:`map_pixels`, clamped to [0, 1]."""
    return torch.clamp((x - eps) / (1 - 2 * eps), 0, 1)


def sample_crop_box(
    width: int,
    height: int,
    scale: Tuple[float, float] = (0.08, 1.0),
    ratio: Tuple[float, float] = (3 / 4, 4 / 3),
    rng: Optional[random.Random] = None,
) -> Tuple[int, int, int, int]:
    """RandomResizedCrop's box ``(top, left, h, w)``: 10 tries, then a centre crop fallback."""
    rng = rng if rng is not None else random._inst  # type: ignore[attr-defined]
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class TwoViewTransform:
    """PIL image → (patch view ``[3, S, S]`` normalized, tokenizer view ``[3, s, s]`` mapped)."""

    def __init__(
        self,
        input_size: int = 224,
        second_input_size: int = 112,
        color_jitter: float = 0.4,
        scale: Tuple[float, float] = (0.08, 1.0),
        ratio: Tuple[float, float] = (3 / 4, 4 / 3),
        interpolation: str = "bicubic",
        second_interpolation: str = "lanczos",
        mean: Sequence[float] = BEIT_MEAN,
        std: Sequence[float] = BEIT_STD,
        flip: bool = True,
    ) -> None:
        for name in (interpolation, second_interpolation):
            if name not in INTERPOLATIONS:
                raise ValueError(f"unknown interpolation {name!r}; choose from {sorted(INTERPOLATIONS)}")
        self.input_size, self.second_input_size = input_size, second_input_size
        self.jitter = T.ColorJitter(color_jitter, color_jitter, color_jitter) if color_jitter > 0 else None
        self.flip = flip
        self.scale, self.ratio = scale, ratio
        self.interpolation = INTERPOLATIONS[interpolation]
        self.second_interpolation = INTERPOLATIONS[second_interpolation]
        self.normalize = T.Normalize(mean, std)

    def crop_views(self, img: Image.Image) -> Tuple[Image.Image, Image.Image]:
        """The two resized PIL views of one jittered, flipped, cropped image."""
        if self.jitter is not None:
            img = self.jitter(img)
        if self.flip and torch.rand(1).item() < 0.5:
            img = TF.hflip(img)
        top, left, h, w = sample_crop_box(img.width, img.height, self.scale, self.ratio)
        size, second = (self.input_size,) * 2, (self.second_input_size,) * 2
        first_view = TF.resized_crop(img, top, left, h, w, list(size), self.interpolation)
        second_view = TF.resized_crop(img, top, left, h, w, list(second), self.second_interpolation)
        return first_view, second_view

    def __call__(self, img: Image.Image) -> Tuple[torch.Tensor, torch.Tensor]:
        first_view, second_view = self.crop_views(img)
        patches = self.normalize(TF.to_tensor(first_view))
        tokens = map_pixels(TF.to_tensor(second_view))
        return patches, tokens


class BeitPretrainTransform:
    """Two views plus a mask: the sample the pre-training loop consumes.

    With ``mask_generator=None`` (GPU mask sampling) the mask is left out.
    """

    def __init__(self, views: TwoViewTransform, mask_generator: Optional[MaskingGenerator]) -> None:
        self.views = views
        self.mask_generator = mask_generator

    def __call__(self, img: Image.Image):
        patches, tokens = self.views(img)
        if self.mask_generator is None:
            return patches, tokens
        mask = torch.from_numpy(self.mask_generator()).flatten().bool()
        return patches, tokens, mask
