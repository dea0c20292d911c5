"""``main``: the process around one ``bound-tuner`` command. SIGTERM stops a run like Ctrl-C, a
lost signal is sent again, thread errors and bound_tuner's warnings become ``bound-tuner: ...``
lines (passwords masked), and an error becomes one line and an exit status: 2 for a user error
(spec, data, storage), 1 for a failed run, 130 for an interrupt, 141 for a closed pipe."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading

from bound_tuner.cli.parser import build_parser
from bound_tuner.config.schema import SpecError
from bound_tuner.execution.errors import TrialError, WorkerConfigError, WorkerError
from bound_tuner.execution.plan import thread_excepthook
from bound_tuner.execution.signals import (
    catch_lost_interrupts,
    install_sigterm_handler,
    restore_unraisable_hook,
)
from bound_tuner.storage.artifacts import ArtifactError
from bound_tuner.storage.database import StorageError, scrub

USER_ERRORS = (SpecError, StorageError, WorkerConfigError, ArtifactError)
RUN_ERRORS = (WorkerError, TrialError)
INTERRUPTED_MESSAGE = (
    "bound-tuner: interrupted; the running trials were marked interrupted and are retried "
    "when the study resumes"
)


class _OneLine(logging.Handler):
    """bound_tuner's warnings (a study with nothing left to run, a chart not saved) as
    ``bound-tuner: ...`` lines on stderr, passwords masked."""

    def __init__(self, storage: str | None) -> None:
        super().__init__(logging.WARNING)
        self.storage = storage

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = scrub(record.getMessage(), self.storage)
            print(f"bound-tuner: {text}", file=sys.stderr, flush=True)
        except (OSError, ValueError):  # stderr closed or gone: nothing left to tell
            self.handleError(record)


def _quiet_stdout() -> None:
    """After a closed pipe (``report | head``): point stdout at /dev/null, so that Python's
    final flush does not fail again (the recipe of Python's signal documentation)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # no file descriptor behind sys.stdout (captured)
        pass
    finally:
        os.close(devnull)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.getLogger("optuna").setLevel(logging.WARNING)
    old_sigterm = install_sigterm_handler()  # SIGTERM stops a run like Ctrl-C
    old_unraisable = catch_lost_interrupts()  # a signal lost in a finalizer is sent again
    # the SIGINT handler it found, put back on return (main may run inside a longer process; an
    # ignored SIGINT would also pass on to every process it starts); main thread only
    main_thread = threading.current_thread() is threading.main_thread()
    old_sigint = signal.getsignal(signal.SIGINT) if main_thread else None
    if old_sigint is signal.SIG_IGN:
        # started with SIGINT ignored (a background job of a shell script, or a parent that
        # ignores it): a run must still answer Ctrl-C and Ray's cancel, which arrive as SIGINT,
        # and the processes it starts would inherit the ignored disposition
        signal.signal(signal.SIGINT, signal.default_int_handler)
    storage = getattr(args, "storage", None)
    old_hook = threading.excepthook
    threading.excepthook = thread_excepthook(old_hook, storage)
    ours = logging.getLogger("bound_tuner")
    handler = _OneLine(storage)
    ours.addHandler(handler)
    propagate, ours.propagate = ours.propagate, False
    try:
        code = args.func(args)
        sys.stdout.flush()  # a closed pipe shows here, not in Python's flush at exit
        return code
    except BrokenPipeError:  # the reader of our output went away (report ... | head)
        _quiet_stdout()
        return 141  # as a process ended by SIGPIPE, the shell's 128 + 13
    except USER_ERRORS as e:
        print(f"bound-tuner: error: {scrub(e, storage)}", file=sys.stderr)
        return 2
    except RUN_ERRORS as e:
        print(f"bound-tuner: error: {scrub(e, storage)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        # the run is over: a late second Ctrl-C must not turn exit status 130 into a traceback
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        # CPython remembers a KeyboardInterrupt that passed through code run by exec or eval of
        # a string (libraries do that) and then ends the process by SIGINT, status -2, even
        # though it was handled here; evaluating a string resets that record (run_eval_code_obj)
        exec("")
        print(INTERRUPTED_MESSAGE, file=sys.stderr)
        return 130
    finally:
        threading.excepthook = old_hook
        restore_unraisable_hook(old_unraisable)
        ours.removeHandler(handler)
        ours.propagate = propagate
        if old_sigterm is not None:
            signal.signal(signal.SIGTERM, old_sigterm)
        if old_sigint is not None:
            signal.signal(signal.SIGINT, old_sigint)
