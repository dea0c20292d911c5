"""The stop of a worker's packs (``bound_tuner.objectives.packed``), torch-free so that the worker
loop (``bound_tuner.execution.loop``) can tell it apart without loading torch."""

from __future__ import annotations

#: the message of a PackInterrupted
PACK_STOPPED = "the pack was stopped: the worker is stopping"


class PackInterrupted(Exception):
    """The worker is stopping (``PackCoordinator.abort``): this thread's trial ends as
    interrupted and is retried. Not a KeyboardInterrupt: nothing but the worker loop's outcome
    (``bound_tuner.execution.loop.decide``) reads it as a stop."""
