"""Ctrl-C and SIGTERM during a run: the running trial ends as interrupted and is retried on resume.

The protocol, in one place (``SignalGate``, used by the worker loop of
``bound_tuner.execution.loop``):

* While a trial's objective runs, and while the worker waits (for a free slot, for the database
  to come back), SIGINT and SIGTERM act at once: KeyboardInterrupt (``Interrupted`` for
  SIGTERM, see ``install_sigterm_handler``).
* While the worker writes the study (from taking the study lock to claim a trial until its
  objective starts, and from the end of the objective until the trial is recorded and, when
  interrupted, queued again), they are *deferred*: noted, never lost, and handed to the handler
  the process had as soon as that step ends. Those steps are bounded by the database's timeouts
  (``bound_tuner.execution.lock.LOCK_TIMEOUT_S``), so a deferral lasts seconds.
* Nothing is ignored in a worker, and the handlers it found are put back on every path (a
  ``finally``). Only the main thread handles signals; elsewhere the gate does nothing.

A signal's exception raised where Python cannot pass it on (a finalizer or weakref callback run
by the garbage collector, for example a database connection's) would be printed as "Exception
ignored" and lost, and the run would go on. ``catch_lost_interrupts`` (installed by the command
line and by every worker) sends that signal again a moment later, when the callback is over.

An executor that stops its workers after Ctrl-C (the pool, Ray) ignores a second one for the
time it waits for them (``signals_ignored``, at most the stop's timeout), so that it does not
leave workers behind.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any


class Interrupted(KeyboardInterrupt):
    """SIGTERM (or the parent's end) stopped the run; handled like Ctrl-C."""


INTERRUPTED = "interrupted"  # fail_reason of a trial stopped by Ctrl-C or SIGTERM
SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _raise_interrupted(signum: int, frame: Any) -> None:
    raise Interrupted(signal.Signals(signum).name)


REDELIVER_S = 0.05  # a signal lost in a finalizer is sent again this much later


def catch_lost_interrupts() -> Any:
    """Send again, shortly after, a signal whose KeyboardInterrupt was raised inside a finalizer
    or a garbage-collector callback (where Python can only print it as "Exception ignored" and
    drop it); other unraisable errors go to the hook found, which this returns (for
    ``restore_unraisable_hook``)."""
    previous = sys.unraisablehook

    def hook(unraisable: Any) -> None:
        kind = unraisable.exc_type
        if kind is not None and issubclass(kind, KeyboardInterrupt):
            signum = signal.SIGTERM if issubclass(kind, Interrupted) else signal.SIGINT
            again = threading.Timer(REDELIVER_S, os.kill, (os.getpid(), signum))
            again.daemon = True
            again.start()
            return
        previous(unraisable)

    sys.unraisablehook = hook
    return previous


def restore_unraisable_hook(previous: Any) -> None:
    sys.unraisablehook = previous


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def install_sigterm_handler() -> Any:
    """Make SIGTERM stop this process like Ctrl-C (its running trial ends as interrupted).

    Returns the handler it replaced (None off the main thread, where nothing changes)."""
    if _main_thread():
        return signal.signal(signal.SIGTERM, _raise_interrupted)
    return None


class SignalGate:
    """Defers SIGINT and SIGTERM while the worker writes the study (see the module's protocol).

    ``hold()`` starts deferring (a signal that arrives is noted), ``release()`` puts the
    handlers back and hands a noted signal to them (usually: KeyboardInterrupt raised there),
    ``close()`` puts them back without acting (on the way out of an exception). Off the main
    thread all three do nothing. Reentrant: ``hold`` while holding keeps the first handlers."""

    def __init__(self) -> None:
        self._saved: dict[int, Any] = {}
        self.pending: int | None = None  # the first signal noted while holding

    @property
    def holding(self) -> bool:
        return bool(self._saved)

    def _note(self, signum: int, frame: Any) -> None:
        if self.pending is None:
            self.pending = signum

    def hold(self) -> None:
        if self._saved or not _main_thread():
            return
        saved = {}
        for s in SIGNALS:
            saved[s] = signal.signal(s, self._note)
        self._saved = saved

    def close(self) -> None:
        """Put the handlers back; a noted signal stays in ``pending`` (not acted on)."""
        saved, self._saved = self._saved, {}
        for s, handler in saved.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)

    def release(self) -> None:
        """Put the handlers back and deliver a noted signal to them."""
        self.close()
        signum, self.pending = self.pending, None
        if signum is not None and _main_thread():
            signal.raise_signal(signum)

    def forget(self) -> None:
        """Drop a noted signal (it was answered: the trial ended as interrupted)."""
        self.pending = None


@contextlib.contextmanager
def signals_ignored() -> Iterator[None]:
    """SIGINT and SIGTERM ignored inside the block (main thread only): an executor that stops its
    workers after Ctrl-C must not be stopped halfway by a second one. The handlers are put back
    on every path."""
    if not _main_thread():
        yield
        return
    old = {s: signal.signal(s, signal.SIG_IGN) for s in SIGNALS}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
