"""The errors of a run: bad worker settings (a user's mistake) and workers or trials that failed."""

from __future__ import annotations


class WorkerConfigError(ValueError):
    """Worker options that cannot work together (bad --gpus, --workers, heartbeat); one line."""


class WorkerError(RuntimeError):
    """One or more worker processes ended with a non-zero exit status."""


class TrialError(RuntimeError):
    """A trial that could not run or be recorded (disk full, read-only database); one line."""


class TooManyFailures(TrialError):
    """A worker stopped after ``max_consecutive_failures`` trials in a row raised; one line."""
