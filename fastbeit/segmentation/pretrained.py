"""Pre-training (or classification) weights → segmentation backbone.

The work is :func:`fastbeit.classifier.load_pretrained`'s (drop mask token and lm_head, clone the
shared relative position table into every layer, resize tables and position embeddings to the
crop's patch grid); this adds the backbone's own rules: the pyramid necks are the only weights
allowed to stay at their init, and only the parts a backbone has no use for (final norm, a
classifier's fc_norm and head) may go unused.
"""

from __future__ import annotations

from typing import Dict

import torch

from fastbeit.classifier import load_pretrained
from fastbeit.errors import UserError
from fastbeit.segmentation.backbone import BeitBackbone

UNUSED_OK = ("norm.", "fc_norm.", "head.")


def load_pretrained_backbone(
    backbone: BeitBackbone, state: Dict[str, torch.Tensor], path: str, rel_pos_interpolation: str = "geometric"
) -> str:
    """Load ``state`` into ``backbone``; returns a one-line summary of what was adapted.

    Tables are resized with the original's geometric scheme unless ``rel_pos_interpolation`` says otherwise.
    """
    report = load_pretrained(backbone, state, rel_pos_interpolation)  # type: ignore[arg-type]  (any BeitEncoder)
    missing = [k for k in report.missing if not k.startswith("fpn")]
    unused = [k for k in report.unused if not k.startswith(UNUSED_OK)]
    if missing or unused:
        parts = [f"missing {missing[:5]}" if missing else "", f"unexpected {unused[:5]}" if unused else ""]
        raise UserError(f"checkpoint {path} does not fit the backbone: {'; '.join(p for p in parts if p)}")
    return "; ".join(report.notes) or "all weights loaded as they are"
