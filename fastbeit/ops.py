"""Dispatch between the fused Triton kernels and their plain PyTorch references.

``impl`` is ``"triton"``, ``"reference"`` or ``"auto"`` (Triton where it can run: CUDA, or the
CPU interpreter under ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from fastbeit.errors import UserError
from fastbeit.kernels import use_triton


def _use_triton(impl: str, tensor: torch.Tensor) -> bool:
    if impl == "reference":
        return False
    available = use_triton(tensor)
    if impl == "triton" and not available:
        raise UserError("--kernels triton needs a CUDA device (or TRITON_INTERPRET=1 on CPU)")
    return available


def masked_embed(
    patch_tokens: torch.Tensor,
    mask: torch.Tensor,
    mask_token: torch.Tensor,
    cls_token: torch.Tensor,
    pos_embed: Optional[torch.Tensor],
    impl: str = "auto",
) -> torch.Tensor:
    """Blend the mask token into masked patches, prepend CLS, add positions: ``[B, N+1, D]``."""
    from fastbeit.kernels import masked_embed as mod

    fn = mod.masked_embed if _use_triton(impl, patch_tokens) else mod.masked_embed_reference
    return fn(patch_tokens, mask, mask_token, cls_token, pos_embed)


def gathered_cross_entropy(
    hidden: torch.Tensor,
    mask: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    targets: torch.Tensor,
    num_masked: Optional[int] = None,
    impl: str = "auto",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mean CE and top-1 accuracy of ``lm_head`` on the masked positions only."""
    from fastbeit.kernels import gathered_ce as mod

    fn = mod.gathered_cross_entropy if _use_triton(impl, hidden) else mod.gathered_cross_entropy_reference
    return fn(hidden, mask, weight, bias, targets, num_masked)
