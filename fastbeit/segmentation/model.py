"""The segmentation model: BEiT backbone → pyramid → UperNet head (+ auxiliary FCN head in training)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

from fastbeit.config import BeitConfig
from fastbeit.errors import UserError
from fastbeit.segmentation.backbone import BeitBackbone, scaled_out_indices
from fastbeit.segmentation.head import FCNHead, UperHead, resize_to

AUX_LEVEL = 2  # the stride-16 map (patch stride), as the original's in_index=2


@dataclass
class HeadConfig:
    """Decode-head settings; ``channels`` defaults to the backbone width (768 for Base, as the original)."""

    num_classes: int
    channels: Optional[int] = None
    aux_channels: int = 256
    pool_scales: Tuple[int, ...] = (1, 2, 3, 6)
    dropout: float = 0.1
    out_indices: Optional[Tuple[int, ...]] = None

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> HeadConfig:
        data = dict(data)
        for key in ("pool_scales", "out_indices"):
            if data.get(key) is not None:
                data[key] = tuple(data[key])
        return cls(**data)


class BeitSegmenter(nn.Module):
    """``forward(images)`` → logits at the image size; ``forward_train`` → (main, aux) at feature size."""

    def __init__(self, cfg: BeitConfig, head: HeadConfig) -> None:
        super().__init__()
        if head.num_classes < 1:
            raise UserError(f"num_classes must be >= 1, got {head.num_classes}")
        self.cfg = cfg
        self.head_cfg = dataclasses.replace(
            head,
            channels=head.channels or cfg.embed_dim,
            out_indices=tuple(head.out_indices) if head.out_indices else scaled_out_indices(cfg.depth),
        )
        self.backbone = BeitBackbone(cfg, self.head_cfg.out_indices)
        widths = self.backbone.channels
        self.decode_head = UperHead(widths, self.head_cfg.channels, head.num_classes, head.pool_scales, head.dropout)
        self.aux_head = FCNHead(widths[AUX_LEVEL], head.aux_channels, head.num_classes, head.dropout)

    @property
    def num_classes(self) -> int:
        return self.head_cfg.num_classes

    def forward_train(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        features = self.backbone(images)
        return self.decode_head(features), self.aux_head(features[AUX_LEVEL])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return resize_to(self.decode_head(self.backbone(images)), images.shape[-2:])


def describe(model: BeitSegmenter) -> str:
    """One line for the log: sizes and the blocks the pyramid reads."""
    params = sum(p.numel() for p in model.parameters()) / 1e6
    cfg = model.cfg
    return (f"BEiT {cfg.embed_dim}w×{cfg.depth} patch {cfg.patch_size} at {cfg.img_size} px + UperNet "
            f"({model.head_cfg.channels} ch), blocks {list(model.head_cfg.out_indices)} → strides "
            f"{list(model.backbone.strides)}, {model.num_classes} classes, {params:.1f}M params")

