"""Layer-wise learning-rate decay groups and the poly / cosine schedules with mmcv's linear warmup.

Layer ids as in the original: 0 = embeddings (patch_embed, cls_token, pos_embed), i+1 = block i,
depth+1 = everything else (pyramid necks, heads); a group's lr is scaled by
``decay^(depth + 1 − id)``. No weight decay for 1-D tensors, biases, pos_embed and cls_token;
the per-layer relative position tables are decayed, as in the original.
"""

from __future__ import annotations

import math
from typing import Dict, List

from torch import nn

from fastbeit.classifier import layer_decay_groups as backbone_groups

SCHEDULES = ("poly", "cosine")


def layer_decay_groups(model: nn.Module, weight_decay: float, layer_decay: float) -> List[Dict]:
    """AdamW groups with ``lr_scale``: the backbone's per layer (the classifier's rule), the heads at
    the full rate; names carry the model's ``backbone.`` prefix."""
    groups = backbone_groups(model.backbone, weight_decay, layer_decay)
    for group in groups:
        group["param_names"] = [f"backbone.{n}" for n in group["param_names"]]
    top = max(g["layer_id"] for g in groups) if groups else 0
    heads: Dict[bool, Dict] = {}
    for name, param in model.named_parameters():
        if name.startswith("backbone.") or not param.requires_grad:
            continue
        decayed = not (param.ndim == 1 or name.endswith(".bias"))
        group = heads.setdefault(decayed, {"params": [], "param_names": [], "lr_scale": 1.0, "layer_id": top,
                                           "weight_decay": weight_decay if decayed else 0.0})
        group["params"].append(param)
        group["param_names"].append(name)
    return groups + [heads[k] for k in sorted(heads)]


def learning_rate(step: int, total_steps: int, base_lr: float, schedule: str = "poly", min_lr: float = 0.0,
                  power: float = 1.0, warmup_steps: int = 0, warmup_ratio: float = 1e-6) -> float:
    """The lr at ``step`` (0-based): poly ``(1 − t/T)^power`` or half a cosine from ``base_lr`` to
    ``min_lr``; during warmup it is multiplied by a ramp from ``warmup_ratio`` to 1 (mmcv's linear warmup)."""
    progress = min(step / max(total_steps, 1), 1.0)
    if schedule == "poly":
        lr = (base_lr - min_lr) * (1 - progress) ** power + min_lr
    elif schedule == "cosine":
        lr = min_lr + 0.5 * (base_lr - min_lr) * (1 + math.cos(math.pi * progress))
    else:
        raise ValueError(f"unknown schedule {schedule!r}; choose from {SCHEDULES}")
    if step < warmup_steps:
        lr *= 1 - (1 - step / warmup_steps) * (1 - warmup_ratio)
    return lr


def apply_lr(optimizer, lr: float) -> None:
    """Set this step's lr on every group, times the group's ``lr_scale``."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
