"""DataLoaders whose worker processes leave Ctrl-C and SIGTERM to the main process.

A scheduler's pre-emption (SLURM, ``scancel``, systemd, ``kill -TERM -- -PGID``) and a terminal's
Ctrl-C signal the whole process group. Workers that die of it make the main process fail with
"DataLoader worker ... is killed by signal" before it can save; workers that ignore it keep
serving until the main process has saved its checkpoint and shuts them down. (The DALI loader
needs nothing of the kind: its decoding threads live in the main process, where only the main
thread runs Python's signal handlers, and it starts no worker processes.)
"""

from __future__ import annotations

import signal
import sys
from typing import Any, Callable, Optional

import torch


class IgnoreInterrupts:
    """A ``worker_init_fn`` that ignores SIGINT and SIGTERM, then runs ``then`` (any earlier init)."""

    def __init__(self, then: Optional[Callable[[int], Any]] = None) -> None:
        self.then = then

    def __call__(self, worker_id: int) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        sys.excepthook = _QuietOnReset(sys.excepthook)
        if self.then is not None:
            self.then(worker_id)


class _QuietOnReset:
    """An interrupt that reaches the main process while it receives a batch drops the connection a
    worker's file-descriptor-sharing thread was serving; that thread then reports the reset through
    ``sys.excepthook`` as a traceback. Nothing is lost (the batch is not used), so say nothing."""

    def __init__(self, previous: Callable[..., Any]) -> None:
        self.previous = previous

    def __call__(self, exc_type, exc, tb) -> None:
        if not issubclass(exc_type, ConnectionError):
            self.previous(exc_type, exc, tb)


def data_loader(dataset, **kwargs: Any) -> torch.utils.data.DataLoader:
    """``torch.utils.data.DataLoader(dataset, **kwargs)`` with workers that ignore interrupts."""
    kwargs["worker_init_fn"] = IgnoreInterrupts(kwargs.get("worker_init_fn"))
    return torch.utils.data.DataLoader(dataset, **kwargs)
