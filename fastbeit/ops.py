"""Dispatch between the fused Triton kernels and their plain PyTorch references.

``impl`` is ``"triton"``, ``"reference"`` or ``"auto"`` (Triton where it can run: CUDA, or the
CPU interpreter under ``TRITON_INTERPRET=1``). Both choices are free of host syncs and
data-dependent shapes, so the step compiles as one graph either way; the original's boolean-gather
computation stays in each kernel module as ``*_reference`` (the tests' oracle).
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


def check_impl(impl: str, tensor: torch.Tensor) -> None:
    """:class:`UserError` if ``impl`` cannot run on ``tensor``'s device (for a check before a run)."""
    _use_triton(impl, tensor)


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
    max_masked: Optional[int] = None,
    impl: str = "auto",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mean CE and top-1 accuracy of ``lm_head`` on the masked positions only, gathered into
    ``max_masked`` padded rows per image (static shapes, no host sync) by the fused kernel or, for
    ``reference``, by plain PyTorch ops with full ``[B·max_masked, V]`` logits."""
    from fastbeit.kernels import gathered_ce as mod

    fn = mod.gathered_cross_entropy if _use_triton(impl, hidden) else mod.gathered_cross_entropy_padded
    return fn(hidden, mask, weight, bias, targets, max_masked)
