"""BEiT as a segmentation backbone: four blocks' patch tokens turned into a 4-level pyramid.

As in the original BEiT/UperNet code, the tokens after blocks [3, 5, 7, 11] (no final norm) are
reshaped to the patch grid and brought to strides patch/4, patch/2, patch and 2·patch (4/8/16/32
for 16 px patches) by two 2× transposed convs (BatchNorm + GELU between), one transposed conv,
identity and a 2× max-pool.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from fastbeit.config import BeitConfig
from fastbeit.errors import UserError
from fastbeit.layers import init_beit_weights, trunc_normal_
from fastbeit.model import BeitEncoder

BASE_OUT_INDICES = (3, 5, 7, 11)  # for a 12-block model


def scaled_out_indices(depth: int, base: Sequence[int] = BASE_OUT_INDICES) -> Tuple[int, ...]:
    """The base 12-block indices scaled to ``depth``: ``round((i+1)·depth/12) − 1`` (24 → 7, 11, 15, 23)."""
    return tuple(min(depth - 1, max(0, round((i + 1) * depth / 12) - 1)) for i in base)


def segmentation_config(cfg: BeitConfig, img_size: int, drop_path_rate: Optional[float] = None) -> BeitConfig:
    """The backbone's config: the training crop as image size and one relative position table per
    layer (the original segmentation setting; a shared pre-training table is cloned into each)."""
    relative = cfg.use_rel_pos_bias or cfg.use_shared_rel_pos_bias
    changes = dict(img_size=img_size, use_rel_pos_bias=relative, use_shared_rel_pos_bias=False)
    if drop_path_rate is not None:
        changes["drop_path_rate"] = drop_path_rate
    try:
        return cfg.replace(**changes)
    except UserError as exc:
        raise UserError(f"cannot build the segmentation backbone: {exc}") from None


class BeitBackbone(BeitEncoder):
    """A BEiT encoder (same parameter names as pre-training) plus the pyramid necks ``fpn1..fpn4``."""

    def __init__(self, cfg: BeitConfig, out_indices: Optional[Sequence[int]] = None) -> None:
        super().__init__(cfg)
        self.out_indices = tuple(out_indices) if out_indices is not None else scaled_out_indices(cfg.depth)
        if len(self.out_indices) != 4 or not all(0 <= i < cfg.depth for i in self.out_indices):
            raise UserError(f"out_indices must be 4 block indices in [0, {cfg.depth}), got {list(self.out_indices)}")
        dim = cfg.embed_dim
        self.fpn1 = nn.Sequential(
            nn.ConvTranspose2d(dim, dim, 2, stride=2), nn.BatchNorm2d(dim), nn.GELU(),
            nn.ConvTranspose2d(dim, dim, 2, stride=2),
        )
        self.fpn2 = nn.ConvTranspose2d(dim, dim, 2, stride=2)
        self.fpn3 = nn.Identity()
        self.fpn4 = nn.MaxPool2d(2, stride=2)
        self.reset_parameters()

    @property
    def strides(self) -> Tuple[int, ...]:
        """Pixels per feature cell of each level."""
        p = self.cfg.patch_size
        return (p // 4, p // 2, p, 2 * p)

    @property
    def channels(self) -> List[int]:
        return [self.cfg.embed_dim] * 4

    def reset_parameters(self) -> None:
        """The original init for the encoder; PyTorch defaults for the transposed convs."""
        for param in (self.cls_token, self.pos_embed):
            if param is not None:
                trunc_normal_(param, self.cfg.init_std)
        init_beit_weights(self, self.cfg.init_std)

    def block_features(self, images: torch.Tensor) -> List[torch.Tensor]:
        """Patch tokens after each block in ``out_indices``, as ``[B, D, h, w]`` maps."""
        b = images.shape[0]
        h, w = self.cfg.grid
        x = torch.cat((self.cls_token.expand(b, -1, -1), self.patch_embed(images)), dim=1)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        x = self.pos_drop(x)
        rel_pos_bias = self.rel_pos_bias() if self.rel_pos_bias is not None else None
        wanted, saved = set(self.out_indices), {}
        for i, block in enumerate(self.blocks[: max(self.out_indices) + 1]):
            x = block(x, rel_pos_bias)
            if i in wanted:
                saved[i] = x[:, 1:].transpose(1, 2).reshape(b, -1, h, w)
        return [saved[i] for i in self.out_indices]

    def forward(self, images: torch.Tensor) -> List[torch.Tensor]:
        """Four maps at strides patch/4, patch/2, patch, 2·patch."""
        necks = (self.fpn1, self.fpn2, self.fpn3, self.fpn4)
        return [neck(f) for neck, f in zip(necks, self.block_features(images))]
