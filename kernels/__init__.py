"""Fused Triton kernels for BEiT (imported as ``fastbeit.kernels``).

One file per op: the Triton kernel(s), a ``torch.autograd.Function`` where gradients flow, and a
plain PyTorch reference with the same signature. ``use_triton(tensor)`` is the one place that
decides whether a kernel can run: on CUDA, or on CPU when ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import os

import torch


def triton_available() -> bool:
    """True when the ``triton`` package imports."""
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(tensor: torch.Tensor) -> bool:
    """Whether a Triton kernel can run on ``tensor``'s device."""
    if not triton_available():
        return False
    if tensor.is_cuda:
        return True
    return tensor.device.type == "cpu" and interpreting()
