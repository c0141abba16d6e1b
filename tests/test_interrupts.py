"""SIGTERM as an interrupt, held during writes that must not be cut."""

from __future__ import annotations

import os
import signal
import time

import pytest

from shapeflow.interrupts import interrupt_on_sigterm, uninterrupted


@pytest.fixture
def sigterm_interrupts():
    before = signal.getsignal(signal.SIGTERM)
    interrupt_on_sigterm()
    yield
    signal.signal(signal.SIGTERM, before)


def test_sigterm_interrupts_at_once_outside_a_held_block(sigterm_interrupts):
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(2)  # the handler runs as soon as the kill returns


def test_a_sigterm_during_a_held_write_lets_it_finish_then_interrupts(sigterm_interrupts):
    done = []
    with pytest.raises(KeyboardInterrupt):
        with uninterrupted():
            with uninterrupted():
                os.kill(os.getpid(), signal.SIGTERM)
                done.append("inner")
            done.append("outer")  # the inner block's end does not raise yet
    assert done == ["inner", "outer"]
    with uninterrupted():  # the signal was raised once, not kept
        done.append("next")
    assert done[-1] == "next"
