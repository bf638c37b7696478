"""Small shared builders for tests: tiny configs, random masks, weight copies."""

from __future__ import annotations

import random

import torch

from fastbeit.config import make_config
from fastbeit.masking import MaskingGenerator
from fastbeit.model import BeitForMaskedImageModeling
from fastbeit.reference import ReferenceBeitForMaskedImageModeling

TINY = dict(img_size=32, patch_size=4, embed_dim=48, depth=2, num_heads=3, vocab_size=97, drop_path_rate=0.0)


def tiny_pair(**overrides):
    """A fast and a reference model with identical, non-trivial weights (bias tables, gammas)."""
    cfg = make_config("beit_tiny", **{**TINY, **overrides})
    torch.manual_seed(0)
    fast = BeitForMaskedImageModeling(cfg)
    with torch.no_grad():
        for name, p in fast.named_parameters():
            if "relative_position_bias_table" in name or "gamma" in name or name.endswith("_bias"):
                p.normal_(0, 0.5)
    ref = ReferenceBeitForMaskedImageModeling(cfg)
    ref.load_state_dict(fast.state_dict())
    return fast, ref


def variable_masks(batch: int, grid: int, target: int, seed: int = 0) -> torch.Tensor:
    """Blockwise masks whose counts differ per image (the faithful generator's early stop)."""
    gen = MaskingGenerator(grid, target, min_num_patches=4)
    rng = random.Random(seed)
    masks = torch.stack([torch.from_numpy(gen(rng)).flatten().bool() for _ in range(batch)])
    if batch > 1 and len(set(masks.sum(1).tolist())) == 1:
        masks[0, masks[0].nonzero()[0]] = False  # force differing counts
    return masks


def cpu_allocations(fn) -> list:
    """Bytes of every CPU allocation ``fn()`` makes, inside our operators too: the profiler sees the
    ``torch.empty`` a kernel wrapper calls, which a dispatch mode above a ``torch.library``
    operator would not (the operator is one call to it). Peak GPU memory's stand-in on the CPU."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return [e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage > 0]


def interrupt_on_call(monkeypatch, owner, name: str, call: int):
    """Replace ``owner.name`` so that its ``call``-th call raises KeyboardInterrupt (a Ctrl-C at
    that point of a run); the other calls go through. Returns the real one (to put back)."""
    real, calls = getattr(owner, name), []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, interrupted)
    return real


def free_port() -> str:
    """A TCP port nobody listens on right now (for torchrun's rendezvous in tests)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def import_transformers():
    """Hugging Face ``transformers`` with its BEiT classes loaded, or a skip. (transformers imports
    PyPI's ``kernels`` as BEiT's modules load; this repository's ``kernels/`` steps aside for it.)"""
    import pytest

    transformers = pytest.importorskip("transformers")
    transformers.BeitForImageClassification  # noqa: B018  (loads modeling_beit and its imports)
    return transformers
