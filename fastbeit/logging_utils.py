"""Run logs people read: a JSONL metrics file and a PNG of the curves."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence


class JsonlLogger:
    """Append one JSON object per line; flushed each write so a crash loses nothing."""

    def __init__(self, path: str | os.PathLike, enabled: bool = True) -> None:
        self.path = Path(path)
        self.enabled = enabled
        self.failed = False
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def keep_until(self, step: int) -> int:
        """On resuming at global step ``step``: drop the records after it (logged by the part of the
        earlier run that no checkpoint kept, and about to be logged again) and any torn line, so the
        log reads as one run. Returns how many lines were dropped."""
        if not self.enabled or not self.path.is_file():
            return 0
        text = self.path.read_text(encoding="utf-8", errors="replace")
        records = [r for r in map(_parse, text.splitlines()) if r is not None]
        kept = [json.dumps(r) for r in records if not (_number(r.get("step")) and r["step"] > step)]
        dropped = sum(1 for line in text.splitlines() if line.strip()) - len(kept)
        if dropped or not text.endswith("\n"):
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
            os.replace(tmp, self.path)
        return dropped

    def write(self, record: Dict) -> None:
        if not self.enabled:
            return
        try:
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")
        except OSError as exc:  # a full disk must not stop training; readers skip a torn line
            if not self.failed:
                print(f"warning: could not append to {self.path} ({exc.strerror or exc}); training goes on",
                      file=sys.stderr)
            self.failed = True


def _parse(line: str) -> Optional[Dict]:
    """One record, or None for a blank, torn or foreign line."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def read_jsonl(path: str | os.PathLike) -> List[Dict]:
    """The records of a JSONL log; a torn line (a crash or full disk during an append) is skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    with open(path, encoding="utf-8", errors="replace") as fh:
        return [r for r in map(_parse, fh) if r is not None]


def plot_curves(
    records: Iterable[Dict], path: str | os.PathLike, keys: Sequence[str] = ("loss", "mlm_acc"),
    x_key: str = "step", title: str = "",
) -> bool:
    """One panel per key against ``x_key``; returns False when there is nothing to plot."""
    rows = [r for r in records if x_key in r and any(k in r for k in keys)]
    if not rows:
        return False
    try:
        return _draw(rows, path, keys, x_key, title)
    except Exception as exc:  # a plot is a view of metrics.jsonl: never worth a crashed run
        print(f"warning: could not draw the plot {path} ({type(exc).__name__}: {exc})", file=sys.stderr)
        return False


def preload_plotting() -> None:
    """Import matplotlib now, before training: its first import takes a second, and a Ctrl-C or
    SIGTERM landing inside it (at the first end-of-epoch plot) would leave it half-imported for the
    plot the interrupt handler draws."""
    _pyplot()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _draw(rows: List[Dict], path: str | os.PathLike, keys: Sequence[str], x_key: str, title: str) -> bool:
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.6), squeeze=False)
    for ax, key in zip(axes[0], keys):
        pts = [(r[x_key], r[key]) for r in rows if _number(r.get(key)) and _number(r[x_key])]
        if pts:
            ax.plot(*zip(*pts), marker="." if len(pts) < 50 else None)
        ax.set_xlabel(x_key)
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)
    except OSError as exc:
        print(f"warning: could not write the plot {path} ({exc.strerror or exc})", file=sys.stderr)
        return False
    finally:
        plt.close(fig)
    return True
