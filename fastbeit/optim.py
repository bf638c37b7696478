"""AdamW with the original decay groups, and the per-step cosine schedule with warmup."""

from __future__ import annotations

import math
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np
import torch
from torch import nn


def no_decay_names(model: nn.Module, rel_pos_bias: bool = False) -> set:
    """Names kept out of weight decay besides 1-D tensors and biases: the model's
    ``no_weight_decay()`` (pos_embed, cls_token), plus every relative position table with
    ``rel_pos_bias`` (the original's ``--disable_weight_decay_on_rel_pos_bias``)."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    if rel_pos_bias:
        skip |= {name for name, _ in model.named_parameters() if name.endswith("relative_position_bias_table")}
    return skip


def decay_groups(
    model: nn.Module, weight_decay: float, skip: Optional[Iterable[str]] = None
) -> List[Dict]:
    """Two parameter groups as in the original code: no decay for 1-D tensors, biases and the
    names in ``skip`` (default :func:`no_decay_names`: pos_embed, cls_token); decay for the
    rest, including mask_token and the shared relative position bias table."""
    skip = set(no_decay_names(model) if skip is None else skip)
    decay, no_decay = [], []
    decay_names, kept_names = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim == 1 or name.endswith(".bias") or name in skip:
            no_decay.append(param)
            kept_names.append(name)
        else:
            decay.append(param)
            decay_names.append(name)
    return [
        {"params": no_decay, "weight_decay": 0.0, "param_names": kept_names},
        {"params": decay, "weight_decay": weight_decay, "param_names": decay_names},
    ]


def build_adamw(
    groups: Sequence[Dict],
    lr: float,
    betas=(0.9, 0.999),
    eps: float = 1e-8,
    fused: Optional[bool] = None,
) -> torch.optim.AdamW:
    """AdamW over ``groups``; PyTorch's fused kernel (the native stand-in for apex) on CUDA and the
    CPU: one launch per step, and its step counters stay on the device (the foreach version reads
    them back with ``.item()``, a host sync per parameter group)."""
    params = [p for g in groups for p in g["params"]]
    if fused is None:
        fused = bool(params) and all(p.device.type in ("cuda", "cpu") for p in params)
    clean = [{k: v for k, v in g.items() if k != "param_names"} for g in groups]
    return torch.optim.AdamW(clean, lr=lr, betas=tuple(betas), eps=eps, fused=fused or None)


def cosine_schedule(
    base_value: float,
    final_value: float,
    epochs: int,
    steps_per_epoch: int,
    warmup_epochs: float = 0,
    start_warmup_value: float = 0.0,
    warmup_steps: int = -1,
) -> np.ndarray:
    """One value per step: linear warmup from ``start_warmup_value``, then half a cosine from
    ``base_value`` down to ``final_value`` (the original ``cosine_scheduler``)."""
    total = epochs * steps_per_epoch
    warmup = warmup_steps if warmup_steps > 0 else int(round(warmup_epochs * steps_per_epoch))
    warmup = min(warmup, total)
    head = np.linspace(start_warmup_value, base_value, warmup) if warmup > 0 else np.array([])
    iters = np.arange(total - warmup)
    tail = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(math.pi * iters / max(len(iters), 1)))
    schedule = np.concatenate((head, tail))
    assert len(schedule) == total
    return schedule


def set_step_values(optimizer: torch.optim.Optimizer, lr: float, weight_decay: Optional[float]) -> None:
    """Apply this step's lr (times any ``lr_scale`` of a group) and decay (to decayed groups)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
        if weight_decay is not None and group["weight_decay"] > 0:
            group["weight_decay"] = weight_decay
