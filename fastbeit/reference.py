"""The reference eager model: the original BEiT computation, line for line.

No fused path anywhere: boolean gather of the masked positions, ``x*(1-w) + mask_token*w``,
explicit softmax attention, full logits and ``nn.CrossEntropyLoss``. It is the oracle the fast
model is tested against and the baseline it is benchmarked against; its ``state_dict`` keys are
the fast model's (and the original checkpoints').
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from fastbeit.config import BeitConfig, make_config
from fastbeit.layers import (
    DropPath,
    Mlp,
    PatchEmbed,
    RelativePositionBias,
    init_beit_weights,
    num_relative_distance,
    relative_position_index,
    trunc_normal_,
)
from fastbeit.model import MIMOutput


class ReferenceAttention(nn.Module):
    def __init__(self, cfg: BeitConfig, per_layer_bias: bool) -> None:
        super().__init__()
        dim = cfg.embed_dim
        self.num_heads = cfg.num_heads
        self.scale = cfg.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        if cfg.qkv_bias:
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.v_bias = nn.Parameter(torch.zeros(dim))
        else:
            self.q_bias = self.v_bias = None
        if per_layer_bias:
            self.window_size = cfg.grid
            self.relative_position_bias_table = nn.Parameter(
                torch.zeros(num_relative_distance(cfg.grid), cfg.num_heads)
            )
            self.register_buffer("relative_position_index", relative_position_index(cfg.grid))
        else:
            self.relative_position_bias_table = None
        self.attn_drop = nn.Dropout(cfg.attn_drop_rate)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(cfg.drop_rate)

    def forward(self, x: torch.Tensor, rel_pos_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, N, C = x.shape
        qkv_bias = None
        if self.q_bias is not None:
            qkv_bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias, requires_grad=False), self.v_bias))
        qkv = F.linear(input=x, weight=self.qkv.weight, bias=qkv_bias)
        qkv = qkv.reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]

        q = q * self.scale
        attn = q @ k.transpose(-2, -1)

        if self.relative_position_bias_table is not None:
            n = self.relative_position_index.shape[0]
            relative_position_bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(
                n, n, -1
            )
            relative_position_bias = relative_position_bias.permute(2, 0, 1).contiguous()
            attn = attn + relative_position_bias.unsqueeze(0)

        if rel_pos_bias is not None:
            attn = attn + rel_pos_bias

        attn = attn.softmax(dim=-1)
        attn = self.attn_drop(attn)

        x = (attn @ v).transpose(1, 2).reshape(B, N, -1)
        x = self.proj(x)
        x = self.proj_drop(x)
        return x


class ReferenceBlock(nn.Module):
    def __init__(self, cfg: BeitConfig, drop_path: float) -> None:
        super().__init__()
        dim = cfg.embed_dim
        self.norm1 = nn.LayerNorm(dim, eps=cfg.layer_norm_eps)
        self.attn = ReferenceAttention(cfg, per_layer_bias=cfg.use_rel_pos_bias)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=cfg.layer_norm_eps)
        self.mlp = Mlp(dim, int(dim * cfg.mlp_ratio), cfg.drop_rate)
        if cfg.layer_scale:
            self.gamma_1 = nn.Parameter(cfg.init_values * torch.ones(dim), requires_grad=True)
            self.gamma_2 = nn.Parameter(cfg.init_values * torch.ones(dim), requires_grad=True)
        else:
            self.gamma_1, self.gamma_2 = None, None

    def forward(self, x: torch.Tensor, rel_pos_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.gamma_1 is None:
            x = x + self.drop_path(self.attn(self.norm1(x), rel_pos_bias=rel_pos_bias))
            x = x + self.drop_path(self.mlp(self.norm2(x)))
        else:
            x = x + self.drop_path(self.gamma_1 * self.attn(self.norm1(x), rel_pos_bias=rel_pos_bias))
            x = x + self.drop_path(self.gamma_2 * self.mlp(self.norm2(x)))
        return x


class ReferenceBeitForMaskedImageModeling(nn.Module):
    """``VisionTransformerForMaskedImageModeling`` of the original code."""

    def __init__(self, cfg: BeitConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg.img_size, cfg.patch_size, cfg.in_chans, cfg.embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        if cfg.use_abs_pos_emb:
            self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches + 1, cfg.embed_dim))
        else:
            self.pos_embed = None
        self.pos_drop = nn.Dropout(p=cfg.drop_rate)
        if cfg.use_shared_rel_pos_bias:
            self.rel_pos_bias = RelativePositionBias(cfg.grid, cfg.num_heads)
        else:
            self.rel_pos_bias = None
        dpr = [x.item() for x in torch.linspace(0, cfg.drop_path_rate, cfg.depth)]
        self.blocks = nn.ModuleList([ReferenceBlock(cfg, dpr[i]) for i in range(cfg.depth)])
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.layer_norm_eps)
        self.lm_head = nn.Linear(cfg.embed_dim, cfg.vocab_size)

        if self.pos_embed is not None:
            trunc_normal_(self.pos_embed, cfg.init_std)
        trunc_normal_(self.cls_token, cfg.init_std)
        trunc_normal_(self.mask_token, cfg.init_std)
        init_beit_weights(self, cfg.init_std)

    def no_weight_decay(self) -> set:
        return {"pos_embed", "cls_token"}

    def forward_features(self, x: torch.Tensor, bool_masked_pos: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        batch_size, seq_len, _ = x.size()

        cls_tokens = self.cls_token.expand(batch_size, -1, -1)
        mask_token = self.mask_token.expand(batch_size, seq_len, -1)

        # replace the masked visual tokens by mask_token
        w = bool_masked_pos.unsqueeze(-1).type_as(mask_token)
        x = x * (1 - w) + mask_token * w

        x = torch.cat((cls_tokens, x), dim=1)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        x = self.pos_drop(x)

        rel_pos_bias = self.rel_pos_bias() if self.rel_pos_bias is not None else None
        for blk in self.blocks:
            x = blk(x, rel_pos_bias=rel_pos_bias)

        return self.norm(x)

    def forward(
        self, x: torch.Tensor, bool_masked_pos: torch.Tensor, return_all_tokens: bool = False
    ) -> torch.Tensor:
        x = self.forward_features(x, bool_masked_pos=bool_masked_pos)
        x = x[:, 1:]
        if return_all_tokens:
            return self.lm_head(x)
        # only return the masked tokens
        return self.lm_head(x[bool_masked_pos])

    def forward_loss(
        self,
        images: torch.Tensor,
        bool_masked_pos: torch.Tensor,
        token_ids: torch.Tensor,
        num_masked: Optional[int] = None,
    ) -> MIMOutput:
        """The original engine's step: labels = ids[mask]; CE on the gathered logits."""
        labels = token_ids[bool_masked_pos]
        outputs = self(images, bool_masked_pos=bool_masked_pos, return_all_tokens=False)
        loss = nn.CrossEntropyLoss()(input=outputs.float(), target=labels)
        mlm_acc = (outputs.max(-1)[1] == labels).float().mean()
        return MIMOutput(loss, mlm_acc)


def create_reference_model(name: str = "beit_base", **overrides) -> ReferenceBeitForMaskedImageModeling:
    return ReferenceBeitForMaskedImageModeling(make_config(name, **overrides))
