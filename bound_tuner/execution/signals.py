"""Ctrl-C and SIGTERM during a run: the running trial ends as interrupted and is retried on resume."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any


class Interrupted(KeyboardInterrupt):
    """SIGTERM (or the parent's end) stopped the run; handled like Ctrl-C."""


INTERRUPTED = "interrupted"  # fail_reason of a trial stopped by Ctrl-C or SIGTERM


def _raise_interrupted(signum: int, frame: Any) -> None:
    raise Interrupted(signal.Signals(signum).name)


def install_sigterm_handler() -> Any:
    """Make SIGTERM stop this process like Ctrl-C (its running trial ends as interrupted).

    Returns the handler it replaced (None off the main thread, where nothing changes)."""
    if threading.current_thread() is threading.main_thread():
        return signal.signal(signal.SIGTERM, _raise_interrupted)
    return None


def ignore_signals() -> dict:
    """Ignore SIGINT and SIGTERM while an interrupted trial is written down (main thread only);
    returns the handlers to restore."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}


def restore_signals(old: dict) -> None:
    for s, handler in old.items():
        signal.signal(s, handler)


@contextlib.contextmanager
def signals_ignored() -> Iterator[None]:
    """SIGINT and SIGTERM ignored inside the block (main thread only): an executor that stops its
    workers after Ctrl-C must not be stopped halfway by a second one."""
    old = ignore_signals()
    try:
        yield
    finally:
        restore_signals(old)
