"""What every training CLI shares: flag spellings, autocast, and starting a (distributed) run."""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Iterator, List, Optional, Tuple

import numpy as np
import torch

from fastbeit.checkpoint import CheckpointWriteError
from fastbeit.distributed import DistInfo, init_distributed
from fastbeit.errors import UserError

AMP_CHOICES = ("bf16", "fp16", "none")


def flag_adder(parser: argparse.ArgumentParser) -> Callable[..., None]:
    """``add("--input_size", ...)`` registers the original underscore name and the dashed spelling."""

    def add(*names: str, **kw: Any) -> None:
        spellings = [s for n in names for s in (n, n.replace("_", "-"))]
        parser.add_argument(*dict.fromkeys(spellings), **kw)

    return add


def add_run_flags(add: Callable[..., None], default_output: Optional[str]) -> None:
    """The flags every run shares: where it writes, its seed, its device, its progress bar."""
    add("--output", "--output_dir", default=default_output, help="folder for checkpoints, logs and plots")
    add("--seed", type=int, default=0)
    add("--device", default=None, help="cuda or cpu (default: cuda when available)")
    add("--no_progress", action="store_true", help="no progress bar")


def resolve_train_val(args: argparse.Namespace) -> None:
    """``--data DIR`` means DIR/train and DIR/val unless ``--train`` / ``--val`` say otherwise."""
    if args.data is None and (args.train is None or args.val is None):
        raise UserError("give --data DIR (with DIR/train and DIR/val) or both --train and --val")
    if args.data is not None:
        args.train = args.train or str(Path(args.data) / "train")
        args.val = args.val or str(Path(args.data) / "val")


def amp_context(amp: str, device: torch.device):
    """bf16 / fp16 autocast on ``device``, or nothing for ``"none"``."""
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def leave_cores_for_workers(num_workers: int, processes: int = 1) -> int:
    """On a CPU run, give the compute threads only the cores the data workers don't use.

    OpenMP threads spin-wait at every op's barrier: when a worker process holds one of their
    cores, each op waits for a descheduled thread (measured 10x slower on 2 cores). An explicit
    OMP_NUM_THREADS wins.
    """
    if "OMP_NUM_THREADS" in os.environ:
        return torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, cores // max(1, processes) - num_workers)
    torch.set_num_threads(threads)
    return threads


def start_run(args: argparse.Namespace) -> Tuple[DistInfo, torch.device]:
    """Join torchrun's process group if any, pick this process's device, seed every RNG per rank."""
    dist = init_distributed("cuda" if args.device.startswith("cuda") else "cpu")
    if not args.device.startswith("cuda"):
        leave_cores_for_workers(getattr(args, "num_workers", 0), dist.world_size)
    if args.device == "cuda" and dist.enabled:
        args.device = f"cuda:{dist.local_rank}"
    seed = args.seed + dist.rank
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    return dist, torch.device(args.device)


class NonFiniteLoss(RuntimeError):
    """A loss went NaN/inf: the run stops and keeps its last good checkpoint."""


@contextlib.contextmanager
def _signals_held(note: Optional[str] = None) -> Iterator[List[int]]:
    """Record Ctrl-C and SIGTERM instead of acting on them while the block runs (main thread only);
    the caller decides what the recorded signals mean. Signals a process ignores stay ignored."""
    held: List[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield held
        return

    def hold(signum: int, frame: object) -> None:
        held.append(signum)
        if note:
            print(note, file=sys.stderr)

    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(sig) is not signal.SIG_IGN:
            previous[sig] = signal.signal(sig, hold)
    try:
        yield held
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def whole_step() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM until the block (one optimizer step and its counters) is done, then
    raise KeyboardInterrupt: an interrupt mid-update would save half-updated weights under the old
    step count, and a resumed run would not continue where this one stopped. Signals a process
    ignores (SIGINT in a background job) stay ignored."""
    with _signals_held() as held:
        yield
    if held:
        raise KeyboardInterrupt(f"signal {held[0]}")


def add_overwrite_flag(add: Callable[..., None]) -> None:
    add("--overwrite", action="store_true",
        help="delete the earlier run in --output and start afresh (without it, a folder that holds a run is "
             "refused unless --resume continues it)")


def save_checkpoint_or_warn(save: Callable[[], None], final: bool) -> bool:
    """One checkpoint save, whole (a signal during it acts after it). A failed save of a run that goes
    on warns and keeps training (the next save retries; the previous checkpoint is intact); a failed
    final save raises :class:`~fastbeit.checkpoint.CheckpointWriteError` (an ``error:`` line)."""
    with _signals_held() as held:
        try:
            save()
            saved = True
        except CheckpointWriteError as exc:
            if final:
                raise
            print(f"warning: {exc}; training goes on and the next save tries again", file=sys.stderr)
            saved = False
    if held:  # after the warning too: the interrupt's own save tries again
        raise KeyboardInterrupt(f"signal {held[0]}")
    return saved


def save_after_interrupt(save: Callable[[], None]) -> None:
    """The save an interrupt asked for: a second Ctrl-C or SIGTERM during it does not abort it."""
    with _signals_held("still writing the checkpoint; the run stops when it is safely on disk"):
        save()


def tell_interrupted(step: int, checkpoint: Path) -> int:
    """After Ctrl-C saved ``checkpoint``: say how to continue; the exit status for an interrupt."""
    print(f"\ninterrupted at step {step}; checkpoint saved to {checkpoint}\ncontinue with: --resume {checkpoint}",
          file=sys.stderr)
    return 130


def tell_non_finite(exc: Exception, checkpoint: Path) -> int:
    """After a non-finite loss: say what is kept; the exit status for it."""
    print(f"error: {exc}; stopping. The last good checkpoint ({checkpoint}) is kept.", file=sys.stderr)
    return 3
