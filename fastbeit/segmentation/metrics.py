"""Confusion matrix and the mmseg metrics: per-class IoU and accuracy, mIoU, pixel accuracy.

A class absent from both the ground truth and the predictions has no IoU (NaN) and is left out
of the mean; a class absent from the ground truth but predicted somewhere has IoU 0.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch


def confusion_matrix(pred: torch.Tensor, label: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    """``[C, C]`` int64 counts, rows = ground truth, columns = prediction; ignored pixels skipped."""
    if pred.shape != label.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and label {tuple(label.shape)} differ in shape")
    keep = label != ignore_index
    index = label[keep].long() * num_classes + pred[keep].long()
    return torch.bincount(index.flatten().cpu(), minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def segmentation_metrics(conf: torch.Tensor) -> Dict[str, object]:
    """``mIoU``, ``mAcc``, ``aAcc`` (fractions) and per-class ``IoU`` / ``Acc`` lists (NaN where undefined)."""
    conf = conf.double()
    tp = conf.diag()
    gt, predicted = conf.sum(1), conf.sum(0)
    union = gt + predicted - tp
    iou = tp / union  # 0/0 → NaN: the class appears nowhere
    acc = tp / gt
    total = conf.sum()
    return {
        "mIoU": float(iou.nanmean()) if bool((~iou.isnan()).any()) else float("nan"),
        "mAcc": float(acc.nanmean()) if bool((~acc.isnan()).any()) else float("nan"),
        "aAcc": float(tp.sum() / total) if total > 0 else float("nan"),
        "IoU": iou.tolist(),
        "Acc": acc.tolist(),
    }


def format_table(metrics: Dict[str, object], names: Optional[Sequence[str]] = None) -> str:
    """A per-class table (percent) followed by the summary line."""
    iou: List[float] = metrics["IoU"]  # type: ignore[assignment]
    acc: List[float] = metrics["Acc"]  # type: ignore[assignment]
    names = list(names) if names else [str(i) for i in range(len(iou))]
    width = max(len(n) for n in names + ["class"])
    lines = [f"{'class':<{width}}   IoU    Acc"]
    for name, a, b in zip(names, iou, acc):
        lines.append(f"{name:<{width}} {_pct(a)} {_pct(b)}")
    lines.append(f"mIoU {_pct(metrics['mIoU'])}  mAcc {_pct(metrics['mAcc'])}  aAcc {_pct(metrics['aAcc'])}")
    return "\n".join(lines)


def _pct(x: object) -> str:
    value = float(x)  # type: ignore[arg-type]
    return "   n/a" if value != value else f"{100 * value:6.2f}"
