"""Fused Triton kernels for BEiT (imported as ``fastbeit.kernels``).

One file per op: the Triton kernel(s), a ``torch.autograd.Function`` where gradients flow, and a
plain PyTorch reference with the same signature. ``use_triton(tensor)`` is the one place that
decides whether a kernel can run: on CUDA, or on CPU when ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import os
import sys

if __name__ == "kernels":
    # Imported by the bare name: this folder is on sys.path as the working directory (the repository
    # root), where it would shadow PyPI's ``kernels``, which Hugging Face transformers imports. Load
    # that package instead, or fail as a missing module would.
    import importlib.machinery
    import importlib.util

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _path = [p for p in sys.path if os.path.abspath(p or os.curdir) != _root]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _path)
    del sys.modules["kernels"]
    if _spec is None:
        raise ModuleNotFoundError("No module named 'kernels' (this repository's kernels/ is fastbeit.kernels)",
                                  name="kernels")
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _module
    _spec.loader.exec_module(_module)
else:
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
