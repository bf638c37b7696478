"""The fast BEiT encoder and the masked-image-modeling model.

Same computation and the same ``state_dict`` keys as the original code (and
:mod:`fastbeit.reference`), with the hot spots routed to fused paths: attention through the
backend switch (:mod:`fastbeit.attention`), the masked-token embedding and the gathered-logit
cross entropy through :mod:`fastbeit.ops` (Triton kernels or their references).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from fastbeit import ops
from fastbeit.attention import attention_from_qkv, resolve_backend
from fastbeit.config import BeitConfig, make_config
from fastbeit.layers import (
    DropPath,
    Mlp,
    PatchEmbed,
    RelativePositionBias,
    gather_relative_bias,
    init_beit_weights,
    num_relative_distance,
    qkv_projection,
    relative_position_index,
    trunc_normal_,
)
from fastbeit.masking import gather_rows, masked_mean, padded_positions


class Attention(nn.Module):
    """Multi-head self-attention with q/v-only bias and an optional per-layer position bias."""

    def __init__(self, cfg: BeitConfig, per_layer_bias: bool) -> None:
        super().__init__()
        dim = cfg.embed_dim
        self.num_heads = cfg.num_heads
        self.scale = cfg.head_dim**-0.5
        self.backend = cfg.attn_backend
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        if cfg.qkv_bias:
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.v_bias = nn.Parameter(torch.zeros(dim))
        else:
            self.q_bias = self.v_bias = None
        if per_layer_bias:
            self.relative_position_bias_table = nn.Parameter(
                torch.zeros(num_relative_distance(cfg.grid), cfg.num_heads)
            )
            self.register_buffer("relative_position_index", relative_position_index(cfg.grid))
        else:
            self.relative_position_bias_table = None
        self.attn_drop = cfg.attn_drop_rate
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(cfg.drop_rate)

    def forward(self, x: torch.Tensor, rel_pos_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        qkv = qkv_projection(x, self.qkv.weight, self.q_bias, self.v_bias)
        bias = rel_pos_bias
        if self.relative_position_bias_table is not None:
            own = gather_relative_bias(self.relative_position_bias_table, self.relative_position_index)
            bias = own if bias is None else bias + own
        out = attention_from_qkv(qkv, bias, self.num_heads, self.scale, self.backend, self.attn_drop, self.training)
        return self.proj_drop(self.proj(out))


class Block(nn.Module):
    """Pre-norm transformer block with LayerScale and stochastic depth."""

    def __init__(self, cfg: BeitConfig, drop_path: float) -> None:
        super().__init__()
        dim = cfg.embed_dim
        self.norm1 = nn.LayerNorm(dim, eps=cfg.layer_norm_eps)
        self.attn = Attention(cfg, per_layer_bias=cfg.use_rel_pos_bias)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=cfg.layer_norm_eps)
        self.mlp = Mlp(dim, int(dim * cfg.mlp_ratio), cfg.drop_rate)
        if cfg.layer_scale:
            self.gamma_1 = nn.Parameter(cfg.init_values * torch.ones(dim))
            self.gamma_2 = nn.Parameter(cfg.init_values * torch.ones(dim))
        else:
            self.gamma_1 = self.gamma_2 = None

    def forward(self, x: torch.Tensor, rel_pos_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        attn_out = self.attn(self.norm1(x), rel_pos_bias)
        mlp_in = x + self.drop_path(attn_out if self.gamma_1 is None else self.gamma_1 * attn_out)
        mlp_out = self.mlp(self.norm2(mlp_in))
        return mlp_in + self.drop_path(mlp_out if self.gamma_2 is None else self.gamma_2 * mlp_out)


class BeitEncoder(nn.Module):
    """Patch embedding, CLS, position information and the transformer blocks."""

    def __init__(self, cfg: BeitConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg.img_size, cfg.patch_size, cfg.in_chans, cfg.embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        if cfg.use_abs_pos_emb:
            self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches + 1, cfg.embed_dim))
        else:
            self.pos_embed = None
        self.pos_drop = nn.Dropout(cfg.drop_rate)
        self.rel_pos_bias = RelativePositionBias(cfg.grid, cfg.num_heads) if cfg.use_shared_rel_pos_bias else None
        rates = torch.linspace(0, cfg.drop_path_rate, cfg.depth).tolist()
        self.blocks = nn.ModuleList(Block(cfg, rate) for rate in rates)

    def run_blocks(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pos_drop(x)
        rel_pos_bias = self.rel_pos_bias() if self.rel_pos_bias is not None else None
        for block in self.blocks:
            x = block(x, rel_pos_bias)
        return x

    def check_fast_paths(self, device: torch.device, dtype: torch.dtype) -> None:
        """Raise :class:`UserError` now if ``attn_backend`` or ``kernels`` cannot run this model on
        ``device`` in ``dtype``: one clear line before a run starts, not a stack trace out of
        ``torch.compile``'s first trace."""
        cfg = self.cfg
        n = cfg.num_patches + 1
        q = torch.empty(1, cfg.num_heads, n, cfg.head_dim, device=device, dtype=dtype)
        has_bias = cfg.use_shared_rel_pos_bias or cfg.use_rel_pos_bias
        bias = torch.empty(cfg.num_heads, n, n, device=device) if has_bias else None
        resolve_backend(cfg.attn_backend, q, bias, cfg.attn_drop_rate)
        ops.check_impl(cfg.kernels, q)

    def no_weight_decay(self) -> set:
        """Parameter names kept out of weight decay besides 1-D tensors and biases."""
        return {"pos_embed", "cls_token"}


@dataclass
class MIMOutput:
    """Loss and top-1 accuracy over the masked patches (0-dim tensors: no host sync)."""

    loss: torch.Tensor
    mlm_acc: torch.Tensor


class BeitForMaskedImageModeling(BeitEncoder):
    """BEiT pre-training model: predicts the visual tokens of the masked patches."""

    def __init__(self, cfg: BeitConfig) -> None:
        super().__init__(cfg)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.layer_norm_eps)
        self.lm_head = nn.Linear(cfg.embed_dim, cfg.vocab_size)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for param in (self.cls_token, self.mask_token, self.pos_embed):
            if param is not None:
                trunc_normal_(param, self.cfg.init_std)
        init_beit_weights(self, self.cfg.init_std)

    def forward_features(self, images: torch.Tensor, bool_masked_pos: torch.Tensor) -> torch.Tensor:
        """Normalized hidden states ``[B, N+1, D]`` with masked patches replaced by the mask token."""
        patches = self.patch_embed(images)
        x = ops.masked_embed(
            patches, bool_masked_pos, self.mask_token, self.cls_token, self.pos_embed, self.cfg.kernels
        )
        return self.norm(self.run_blocks(x))

    def forward(
        self, images: torch.Tensor, bool_masked_pos: torch.Tensor, return_all_tokens: bool = False
    ) -> torch.Tensor:
        """Logits at the masked positions ``[M, V]`` (all positions with ``return_all_tokens``)."""
        x = self.forward_features(images, bool_masked_pos)[:, 1:]
        if return_all_tokens:
            return self.lm_head(x)
        return self.lm_head(x[bool_masked_pos])

    def forward_loss(
        self,
        images: torch.Tensor,
        bool_masked_pos: torch.Tensor,
        token_ids: torch.Tensor,
        max_masked: Optional[int] = None,
    ) -> MIMOutput:
        """Mean cross entropy and mlm_acc over the masked patches, without full-size logits.

        ``token_ids`` are the tokenizer's ids for every patch ``[B, N]``; ``max_masked`` is the most
        masked patches any image has (the masking's target count: 75 for BEiT, default N). Each image
        is gathered into that many rows with a validity mask, so every shape is static and nothing is
        read back to the host: one graph for ``torch.compile`` and CUDA graphs, with the faithful
        variable-count masks. The loss is still the mean over the real masked tokens.
        """
        x = self.forward_features(images, bool_masked_pos)[:, 1:]
        loss, acc = ops.gathered_cross_entropy(
            x, bool_masked_pos, self.lm_head.weight, self.lm_head.bias, token_ids, max_masked, self.cfg.kernels
        )
        return MIMOutput(loss, acc)

    def forward_pixel_loss(
        self, images: torch.Tensor, bool_masked_pos: torch.Tensor, max_masked: Optional[int] = None
    ) -> MIMOutput:
        """The paper's pixel-regression ablation: ``lm_head`` (``vocab_size = 3·patch²`` outputs)
        regresses the masked patches' normalized pixels with a mean squared error (over the masked
        patches' values, gathered into ``max_masked`` padded rows like the token loss)."""
        x = self.forward_features(images, bool_masked_pos)[:, 1:]
        target = patchify(images, self.cfg.patch_size)
        if self.lm_head.out_features != target.shape[-1]:
            raise ValueError(
                f"pixel targets need vocab_size = {target.shape[-1]} (3·patch²), got {self.lm_head.out_features}"
            )
        order, valid = padded_positions(bool_masked_pos, max_masked)
        pred = self.lm_head(gather_rows(x, order)).float()
        per_row = (pred - gather_rows(target, order).float()).pow(2).mean(-1)
        loss = masked_mean(per_row, valid, bool_masked_pos, max_masked)
        return MIMOutput(loss, torch.full_like(loss, float("nan")))


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``[B, C, H, W]`` → ``[B, N, patch²·C]`` in row-major patch order (the token order)."""
    b, c, h, w = images.shape
    p = patch_size
    x = images.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def create_model(name: str = "beit_base", **overrides) -> BeitForMaskedImageModeling:
    """A pre-training model from a preset name with config fields overridden."""
    return BeitForMaskedImageModeling(make_config(name, **overrides))
