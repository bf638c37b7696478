"""One exception type for user mistakes: CLIs print its message instead of a traceback."""

from __future__ import annotations

import functools
import sys
from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable[..., object])


class UserError(Exception):
    """A mistake in the user's input (a path, a flag, a file): shown as one clear line."""


def cli_entry(func: F) -> F:
    """Wrap a CLI ``main`` so a :class:`UserError` prints ``error: ...`` and exits with status 2."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None

    return wrapper  # type: ignore[return-value]
