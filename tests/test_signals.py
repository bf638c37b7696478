"""Ctrl-C and SIGTERM: converted, held until a step is whole, handlers restored."""

from __future__ import annotations

import os
import signal

import pytest

from fastbeit.cli import whole_step
from fastbeit.errors import sigterm_as_interrupt


def test_a_signal_inside_a_step_waits_for_its_end():
    done = []
    with pytest.raises(KeyboardInterrupt, match=f"signal {int(signal.SIGTERM)}"):
        with sigterm_as_interrupt(), whole_step():
            os.kill(os.getpid(), signal.SIGTERM)
            done.append("rest of the step")
    assert done == ["rest of the step"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_no_signal_no_interrupt_and_handlers_restored():
    before = signal.getsignal(signal.SIGINT)
    with whole_step():
        pass
    assert signal.getsignal(signal.SIGINT) is before


def test_an_ignored_sigint_stays_ignored():
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with whole_step():
            os.kill(os.getpid(), signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_an_exception_in_the_step_is_not_replaced():
    with pytest.raises(ValueError):
        with whole_step():
            os.kill(os.getpid(), signal.SIGINT)
            raise ValueError("the step's own error")
