"""Run logs people read: a JSONL metrics file and a PNG of the curves."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Dict, Iterable, List, Sequence


class JsonlLogger:
    """Append one JSON object per line; flushed each write so a crash loses nothing."""

    def __init__(self, path: str | os.PathLike, enabled: bool = True) -> None:
        self.path = Path(path)
        self.enabled = enabled
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: Dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")


def read_jsonl(path: str | os.PathLike) -> List[Dict]:
    path = Path(path)
    if not path.is_file():
        return []
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def plot_curves(
    records: Iterable[Dict], path: str | os.PathLike, keys: Sequence[str] = ("loss", "mlm_acc"),
    x_key: str = "step", title: str = "",
) -> bool:
    """One panel per key against ``x_key``; returns False when there is nothing to plot."""
    rows = [r for r in records if x_key in r and any(k in r for k in keys)]
    if not rows:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.6), squeeze=False)
    for ax, key in zip(axes[0], keys):
        pts = [(r[x_key], r[key]) for r in rows if key in r and r[key] is not None and math.isfinite(r[key])]
        if pts:
            ax.plot(*zip(*pts), marker="." if len(pts) < 50 else None)
        ax.set_xlabel(x_key)
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
