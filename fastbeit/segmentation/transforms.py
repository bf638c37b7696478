"""Joint image + label augmentation in mmseg's order, with torch's RNG (saved on checkpoints).

Train: random rescale (ratio 0.5–2.0 of a (long, short) scale, aspect kept; bilinear image,
nearest label) → random crop (retried up to 10× while one class fills ≥ ``cat_max_ratio`` of it)
→ horizontal flip p 0.5 → photometric distortion → normalize → pad to the crop (0 / ignore).
Eval: the same rescale without the random ratio; the label stays at its original size.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import functional as TF

from fastbeit.data.transforms import BEIT_MEAN, BEIT_STD


def uniform(lo: float, hi: float) -> float:
    return lo + (hi - lo) * torch.rand(()).item()


def coin() -> bool:
    return bool(torch.rand(()) < 0.5)


def rescale_size(width: int, height: int, scale: Sequence[int]) -> Tuple[int, int]:
    """(w, h) that fits ``scale`` = (long, short) bounds with the aspect kept (mmcv's ``imrescale``)."""
    long_side, short_side = max(scale), min(scale)
    factor = min(long_side / max(width, height), short_side / min(width, height))
    return max(1, int(width * factor + 0.5)), max(1, int(height * factor + 0.5))


def rescale(image: Image.Image, label: Optional[np.ndarray], scale: Sequence[int]):
    size = rescale_size(image.width, image.height, scale)
    if size != image.size:
        image = image.resize(size, Image.BILINEAR)
        if label is not None:
            label = np.asarray(Image.fromarray(label).resize(size, Image.NEAREST))
    return image, label


def photometric_distortion(img: torch.Tensor) -> torch.Tensor:
    """mmseg's PhotoMetricDistortion on a float image in [0, 255], each step with p 0.5: brightness
    ±32, contrast ×[0.5, 1.5] (before or after the colour steps), saturation ×[0.5, 1.5], hue ±18/180."""
    if coin():
        img = (img + uniform(-32, 32)).clamp(0, 255)
    contrast_first = coin()
    if contrast_first and coin():
        img = (img * uniform(0.5, 1.5)).clamp(0, 255)
    if coin():
        img = TF.adjust_saturation(img / 255, uniform(0.5, 1.5)) * 255
    if coin():
        img = TF.adjust_hue(img / 255, float(torch.randint(-18, 19, ()).item()) / 180) * 255
    if not contrast_first and coin():
        img = (img * uniform(0.5, 1.5)).clamp(0, 255)
    return img


class Normalize:
    def __init__(self, mean: Sequence[float] = BEIT_MEAN, std: Sequence[float] = BEIT_STD) -> None:
        self.mean = torch.tensor(mean).view(3, 1, 1) * 255
        self.std = torch.tensor(std).view(3, 1, 1) * 255

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        return (img.float() - self.mean) / self.std


class TrainTransform:
    """(PIL RGB, uint8 label) → (normalized ``[3, crop, crop]``, int64 ``[crop, crop]``)."""

    def __init__(self, crop: int, scale: Sequence[int] = (480, 360), ratio_range: Sequence[float] = (0.5, 2.0),
                 cat_max_ratio: float = 0.75, photometric: bool = True, ignore_index: int = 255,
                 mean: Sequence[float] = BEIT_MEAN, std: Sequence[float] = BEIT_STD) -> None:
        self.crop, self.scale, self.ratio_range = crop, tuple(scale), tuple(ratio_range)
        self.cat_max_ratio, self.photometric, self.ignore_index = cat_max_ratio, photometric, ignore_index
        self.normalize = Normalize(mean, std)

    def crop_box(self, h: int, w: int) -> Tuple[int, int]:
        top = int(torch.randint(0, max(h - self.crop, 0) + 1, ()))
        left = int(torch.randint(0, max(w - self.crop, 0) + 1, ()))
        return top, left

    def pick_crop(self, label: torch.Tensor) -> Tuple[int, int]:
        """A crop box; retried while a single class covers ≥ ``cat_max_ratio`` of the labelled pixels."""
        h, w = label.shape
        top, left = self.crop_box(h, w)
        if self.cat_max_ratio >= 1:
            return top, left
        for _ in range(10):
            window = label[top : top + self.crop, left : left + self.crop]
            values, counts = window.unique(return_counts=True)
            counts = counts[values != self.ignore_index]
            if len(counts) > 1 and counts.max().item() / counts.sum().item() < self.cat_max_ratio:
                break
            top, left = self.crop_box(h, w)
        return top, left

    def __call__(self, image: Image.Image, label: np.ndarray) -> Tuple[torch.Tensor, torch.Tensor]:
        ratio = uniform(*self.ratio_range)
        image, label = rescale(image, label, [int(s * ratio) for s in self.scale])
        img = TF.pil_to_tensor(image)
        lab = torch.from_numpy(np.array(label, dtype=np.int64))
        top, left = self.pick_crop(lab)
        img = img[:, top : top + self.crop, left : left + self.crop]
        lab = lab[top : top + self.crop, left : left + self.crop]
        if coin():
            img, lab = img.flip(-1), lab.flip(-1)
        img = img.float()
        if self.photometric:
            img = photometric_distortion(img)
        img = self.normalize(img)
        pad_h, pad_w = self.crop - img.shape[1], self.crop - img.shape[2]
        if pad_h or pad_w:
            img = F.pad(img, (0, pad_w, 0, pad_h), value=0.0)
            lab = F.pad(lab, (0, pad_w, 0, pad_h), value=self.ignore_index)
        return img.contiguous(), lab.contiguous()


class EvalTransform:
    """(PIL RGB, uint8 label) → (normalized image at the test scale, int64 label at its own size)."""

    def __init__(self, scale: Sequence[int] = (480, 360), mean: Sequence[float] = BEIT_MEAN,
                 std: Sequence[float] = BEIT_STD) -> None:
        self.scale = tuple(scale)
        self.normalize = Normalize(mean, std)

    def __call__(self, image: Image.Image, label: np.ndarray) -> Tuple[torch.Tensor, torch.Tensor]:
        image, _ = rescale(image, None, self.scale)
        return self.normalize(TF.pil_to_tensor(image)), torch.from_numpy(np.array(label, dtype=np.int64))

