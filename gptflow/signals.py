"""SIGINT and SIGTERM: a run stops, says so, and can resume.

While :func:`handled` is active (the runner, a worker) either signal raises
:class:`Interrupted`, so the run is recorded ``interrupted`` and the process
exits 130 or 143, as a scheduler that preempts a job expects. Code that can stop
at a safe point — a training step's end, where it saves a checkpoint — runs in
:func:`deferred`: there the first signal only sets :func:`pending`, and a
second Ctrl-C stops at once.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived (a BaseException: ``except Exception`` lets it pass)."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(signal.Signals(signum).name)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # what a shell reports for a process the signal ended


class _State:
    deferring = 0
    pending: int | None = None


def _on_signal(signum: int, frame: FrameType | None) -> None:
    if _State.pending is None and _State.deferring:
        _State.pending = signum  # stop at the next safe point
        return
    if _State.pending is not None and signum == signal.SIGTERM:
        return  # already stopping; only a second Ctrl-C hurries it
    raise Interrupted(signum)


@contextmanager
def handled() -> Iterator[None]:
    """Turn SIGINT and SIGTERM into :class:`Interrupted` (main thread only;
    elsewhere, and when already active, a no-op)."""
    if threading.current_thread() is not threading.main_thread() \
            or signal.getsignal(signal.SIGTERM) is _on_signal:
        yield
        return
    previous = {s: signal.signal(s, _on_signal) for s in SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _State.pending = None


@contextmanager
def deferred() -> Iterator[None]:
    """Inside, a first signal sets :func:`pending` instead of raising; the code
    checks it at its safe points and raises :func:`stop` there."""
    _State.deferring += 1
    try:
        yield
    finally:
        _State.deferring -= 1
    if _State.pending is not None and not _State.deferring:
        stop()  # it arrived after the last safe point


def pending() -> int | None:
    """The signal that asked to stop, if one did."""
    return _State.pending


def stop() -> None:
    """Raise :class:`Interrupted` for the pending signal."""
    signum, _State.pending = _State.pending, None
    if signum is not None:
        raise Interrupted(signum)
