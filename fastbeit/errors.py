"""One exception type for user mistakes: CLIs print its message instead of a traceback."""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import sys
import threading
import warnings
from typing import Callable, Iterator, TypeVar

F = TypeVar("F", bound=Callable[..., object])


class UserError(Exception):
    """A mistake in the user's input (a path, a flag, a file): shown as one clear line."""


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Treat SIGTERM like Ctrl-C while the block runs: schedulers (SLURM pre-emption, ``timeout``,
    ``docker stop``) send it before killing, and the training CLIs save a checkpoint on Ctrl-C."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def user_message(exc: UserError) -> str:
    """The message of a :class:`UserError`; one raised in a DataLoader worker arrives wrapped in
    "Caught UserError in DataLoader worker process N" and the worker's traceback: keep its own line."""
    text = str(exc)
    if text.startswith("Caught UserError in DataLoader worker") and "UserError: " in text:
        return text.rsplit("UserError: ", 1)[1].strip()
    return text


@contextlib.contextmanager
def one_line_warnings() -> Iterator[None]:
    """fastbeit's own warnings print as ``warning: ...`` (one line, no source line) while the block
    runs; DataLoader workers forked meanwhile inherit it. Others keep Python's format."""
    default = warnings.formatwarning

    def short(message, category, filename, lineno, line=None):
        if f"{os.sep}fastbeit{os.sep}" in filename:
            return f"warning: {message}\n"
        return default(message, category, filename, lineno, line)

    warnings.formatwarning = short
    try:
        yield
    finally:
        warnings.formatwarning = default


def cli_entry(func: F) -> F:
    """Wrap a CLI ``main``: a :class:`UserError` prints ``error: ...`` and exits with status 2;
    SIGTERM is handled as Ctrl-C (:func:`sigterm_as_interrupt`)."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            with sigterm_as_interrupt(), one_line_warnings():
                return func(*args, **kwargs)
        except UserError as exc:
            print(f"error: {user_message(exc)}", file=sys.stderr)
            raise SystemExit(2) from None

    return wrapper  # type: ignore[return-value]
