"""UperNet decode head (PPM + FPN) and the auxiliary FCN head, as mmseg builds them for BEiT.

Every conv is mmcv's ``ConvModule``: conv without bias → BatchNorm → ReLU, Kaiming init. The
classifiers are 1×1 convs initialized N(0, 0.01) after a 0.1 Dropout2d. Outputs are at the
resolution of the finest input level; the caller resizes them to the image.
"""

from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn.functional as F
from torch import nn


def resize_to(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear resize with ``align_corners=False`` (mmseg's setting for BEiT)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class ConvBNReLU(nn.Sequential):
    """k×k conv (no bias, 'same' padding) → BatchNorm → ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int) -> None:
        conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        super().__init__(conv, nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


class Classifier(nn.Sequential):
    """Dropout2d → 1×1 conv to class logits."""

    def __init__(self, channels: int, num_classes: int, dropout: float) -> None:
        conv = nn.Conv2d(channels, num_classes, 1)
        nn.init.normal_(conv.weight, 0.0, 0.01)
        nn.init.zeros_(conv.bias)
        super().__init__(nn.Dropout2d(dropout), conv)


class PyramidPooling(nn.Module):
    """PSPNet's pooling module: the map plus its averages over 1×1, 2×2, 3×3, 6×6 bins, upsampled."""

    def __init__(self, in_channels: int, channels: int, scales: Sequence[int] = (1, 2, 3, 6)) -> None:
        super().__init__()
        self.stages = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvBNReLU(in_channels, channels, 1)) for s in scales
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x] + [resize_to(stage(x), x.shape[-2:]) for stage in self.stages], dim=1)


class UperHead(nn.Module):
    """PPM on the coarsest level, FPN laterals + top-down sum, 3×3 smoothing, fuse all levels, classify."""

    def __init__(self, in_channels: Sequence[int], channels: int, num_classes: int,
                 pool_scales: Sequence[int] = (1, 2, 3, 6), dropout: float = 0.1) -> None:
        super().__init__()
        *fine, coarsest = in_channels
        self.ppm = PyramidPooling(coarsest, channels, pool_scales)
        self.ppm_bottleneck = ConvBNReLU(coarsest + len(pool_scales) * channels, channels, 3)
        self.lateral = nn.ModuleList(ConvBNReLU(c, channels, 1) for c in fine)
        self.smooth = nn.ModuleList(ConvBNReLU(channels, channels, 3) for _ in fine)
        self.fuse = ConvBNReLU(len(in_channels) * channels, channels, 3)
        self.classifier = Classifier(channels, num_classes, dropout)

    def forward(self, features: List[torch.Tensor]) -> torch.Tensor:
        *fine, coarsest = features
        levels = [conv(f) for conv, f in zip(self.lateral, fine)]
        levels.append(self.ppm_bottleneck(self.ppm(coarsest)))
        for i in range(len(levels) - 1, 0, -1):  # top-down: add each coarser level to the next finer
            levels[i - 1] = levels[i - 1] + resize_to(levels[i], levels[i - 1].shape[-2:])
        outs = [conv(x) for conv, x in zip(self.smooth, levels[:-1])] + [levels[-1]]
        size = outs[0].shape[-2:]
        return self.classifier(self.fuse(torch.cat([resize_to(o, size) for o in outs], dim=1)))


class FCNHead(nn.Module):
    """The auxiliary head (on the stride-16 level in the original): one 3×3 conv block and a classifier."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.conv = ConvBNReLU(in_channels, channels, 3)
        self.classifier = Classifier(channels, num_classes, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.conv(x))
