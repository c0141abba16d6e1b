"""SIGTERM as an interrupt, and the short writes it must not cut.

The command line turns SIGTERM (a stopped worker, a cancelled flow run, `kill`) into
KeyboardInterrupt (`interrupt_on_sigterm`), so a command ends as it does on Ctrl-C: its MLflow run
is marked KILLED and half-written files are removed. Inside `uninterrupted()` the signal waits until
the block ends. The MLflow calls go there: an interrupt in the middle of a write to the sqlite
tracking store leaves it locked (7 of 100 interrupts timed at random in a loop of metric writes),
and marking the run KILLED then fails with `database is locked`.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator

_held = 0  # depth of nested uninterrupted() blocks
_pending: int | None = None  # a signal that came while held


def _interrupt(signum: int, frame: object) -> None:
    global _pending
    if _held:
        _pending = signum
        return
    raise KeyboardInterrupt(f"signal {signum}")


def interrupt_on_sigterm() -> None:
    """From now on SIGTERM raises KeyboardInterrupt in the main thread, outside uninterrupted()."""
    signal.signal(signal.SIGTERM, _interrupt)


@contextlib.contextmanager
def uninterrupted() -> Iterator[None]:
    """Hold SIGTERM for the block; one that came meanwhile is raised when the outermost block ends."""
    global _held, _pending
    _held += 1
    try:
        yield
    finally:
        _held -= 1
        if not _held and _pending is not None:
            signum, _pending = _pending, None
            raise KeyboardInterrupt(f"signal {signum}")
