"""DataLoaders whose worker processes leave Ctrl-C and SIGTERM to the main process.

A scheduler's pre-emption (SLURM, ``scancel``, systemd, ``kill -TERM -- -PGID``) and a terminal's
Ctrl-C signal the whole process group. Workers that die of it make the main process fail with
"DataLoader worker ... is killed by signal" before it can save; workers that ignore it keep
serving until the main process has saved its checkpoint and shuts them down. (The DALI loader
needs nothing of the kind: its decoding threads live in the main process, where only the main
thread runs Python's signal handlers, and it starts no worker processes.)

Workers that ignore SIGTERM need one more thing: at interpreter exit ``multiprocessing`` stops
the daemonic children still alive (an iterator held by a traceback, a persistent-worker loader
kept to the end) with SIGTERM and then joins them, which would wait forever. An exit hook that
runs first stops our loaders' workers with SIGKILL instead; they hold nothing that needs saving.
"""

from __future__ import annotations

import atexit
import multiprocessing
import multiprocessing.util  # noqa: F401  (registers its exit hook before ours, below)
import os
import signal
import sys
import weakref
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
    worker's file-descriptor-sharing thread (``multiprocessing.resource_sharer``) was serving; that
    thread then reports it through ``sys.excepthook`` as a traceback: a reset, an end of file or a
    failed handshake, depending on where the connection broke. Nothing is lost (the batch is not
    used), so say nothing of those; anything else is reported as before."""

    DROPPED = (OSError, EOFError, multiprocessing.AuthenticationError)  # OSError: resets, closed sockets

    def __init__(self, previous: Callable[..., Any]) -> None:
        self.previous = previous

    def __call__(self, exc_type, exc, tb) -> None:
        if issubclass(exc_type, ConnectionError):
            return
        if issubclass(exc_type, self.DROPPED) and _from_resource_sharer(tb):
            return
        self.previous(exc_type, exc, tb)


def _from_resource_sharer(tb) -> bool:
    while tb is not None:
        if tb.tb_frame.f_code.co_filename.endswith(f"multiprocessing{os.sep}resource_sharer.py"):
            return True
        tb = tb.tb_next
    return False


class _SignalSafeLoader(torch.utils.data.DataLoader):
    """A DataLoader that remembers its worker processes, so the exit hook knows which processes
    ignore SIGTERM (a started ``multiprocessing.Process`` no longer says what it runs)."""

    def _get_iterator(self):
        iterator = super()._get_iterator()
        _our_workers.update(getattr(iterator, "_workers", ()))
        return iterator


# Weak: multiprocessing holds a child's Process object until the child is reaped, so a worker that
# outlives its iterator stays here. (One does when a dataset error ends the iteration: PyTorch's
# clean-up then falls back to SIGTERM, which these workers ignore.)
_our_workers: weakref.WeakSet = weakref.WeakSet()


def _kill_interrupt_ignoring_workers() -> None:
    """Stop the live workers of our loaders with SIGKILL, which they cannot ignore; any other child
    keeps multiprocessing's SIGTERM. PyTorch's SIGCHLD handler would report each as a failed
    worker; the process is exiting, so the default disposition is restored first."""
    workers = [w for w in list(_our_workers) if w.is_alive()]
    if workers and hasattr(signal, "SIGCHLD"):
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for worker in workers:
        worker.kill()
    for worker in workers:
        worker.join(timeout=5)


# Registered after multiprocessing's own exit hook (imported above): hooks run in reverse order of
# registration, so this one runs before multiprocessing terminates and joins its children.
atexit.register(_kill_interrupt_ignoring_workers)


def data_loader(dataset, **kwargs: Any) -> torch.utils.data.DataLoader:
    """``torch.utils.data.DataLoader(dataset, **kwargs)`` with workers that ignore interrupts."""
    kwargs["worker_init_fn"] = IgnoreInterrupts(kwargs.get("worker_init_fn"))
    return _SignalSafeLoader(dataset, **kwargs)
