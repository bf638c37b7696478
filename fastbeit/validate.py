"""Checks of command-line values shared by every CLI, run before any work starts.

A bad value (``--lr nan``, ``--device tpu``, an ``--output`` that is a file) becomes one
:class:`~fastbeit.errors.UserError` line here, instead of a traceback (or a wasted epoch) later.
``None`` means "not given, a default follows" and always passes.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import Iterable, Optional

import torch

from fastbeit.errors import UserError


class FlagChecks:
    """Range checks on an argparse namespace; messages name the flag as the user spells it."""

    def __init__(self, args: argparse.Namespace, dashes: bool = False) -> None:
        self.args, self.dashes = args, dashes

    def flag(self, name: str) -> str:
        return "--" + (name.replace("_", "-") if self.dashes else name)

    def _values(self, names: Iterable[str]):
        for name in names:
            value = getattr(self.args, name, None)
            if value is None:
                continue
            for v in value if isinstance(value, (list, tuple)) else (value,):
                if isinstance(v, float) and not math.isfinite(v):
                    raise UserError(f"{self.flag(name)} must be a finite number, got {v}")
                yield name, v

    def positive(self, *names: str) -> None:
        """Each value > 0."""
        for name, v in self._values(names):
            if not v > 0:
                raise UserError(f"{self.flag(name)} must be positive, got {v}")

    def non_negative(self, *names: str) -> None:
        """Each value >= 0."""
        for name, v in self._values(names):
            if not v >= 0:
                raise UserError(f"{self.flag(name)} must be >= 0, got {v}")

    def within(self, name: str, low: float, high: float, low_open: bool = False, high_open: bool = False) -> None:
        """Each value in the interval; ``*_open`` leaves that end out."""
        for _, v in self._values([name]):
            above = v > low if low_open else v >= low
            below = v < high if high_open else v <= high
            if not (above and below):
                span = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
                raise UserError(f"{self.flag(name)} must be in {span}, got {v:g}")

    def choice(self, name: str, allowed: Iterable[str]) -> None:
        allowed = sorted(allowed)
        for _, v in self._values([name]):
            if v not in allowed:
                raise UserError(f"{self.flag(name)} {v!r} is unknown; choose from {', '.join(allowed)}")


def resolve_device(requested: Optional[str]) -> str:
    """``cpu``, ``cuda`` or ``cuda:N`` (default: cuda when available); anything else is refused."""
    if requested is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    name = requested.strip().lower()
    kind, _, index = name.partition(":")
    if name == "cpu":
        return name
    if kind != "cuda" or (index and not index.isdigit()):
        raise UserError(f"--device {requested!r} is not a device: use cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise UserError(f"--device {requested} requested but no CUDA device is available")
    if index and int(index) >= torch.cuda.device_count():
        raise UserError(f"--device {requested}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                        f"cuda:0..cuda:{torch.cuda.device_count() - 1}")
    return name


def _nearest_existing(path: Path) -> Path:
    for parent in (path, *path.parents):
        if parent.exists():
            return parent
    return Path(".")


def _require_writable(path: Path, flag: str) -> None:
    """The folder that will hold ``path`` (or the first existing folder above it) accepts new files."""
    base = _nearest_existing(path.parent)
    if not base.is_dir():
        raise UserError(f"{flag} {path}: {base} is a file, not a folder")
    if not os.access(base, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: cannot write in {base} (permission denied or a read-only file system)")


def check_output_dir(path: Optional[str], flag: str = "--output") -> None:
    """A folder the run may create or write into: not an existing file, and writable."""
    if path is None:
        return
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise UserError(f"{flag} {path} is a file; give a folder (it will hold checkpoints and logs)")
    _require_writable(out / "x", flag)


def check_output_file(path: Optional[str], flag: str = "--output", folder_ok: bool = False) -> None:
    """A file the run will write: not an existing folder (unless ``folder_ok``), in a writable folder."""
    if path is None:
        return
    out = Path(path)
    if out.is_dir() and not folder_ok:
        raise UserError(f"{flag} {path} is a folder; give a file name")
    _require_writable(out / "x" if out.is_dir() else out, flag)
