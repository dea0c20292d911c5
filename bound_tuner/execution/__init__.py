"""Execution: trial accounting, the study lock, the worker loop, the local process pool and Ray.

Every executor runs the same worker loop (``bound_tuner.execution.loop``) against the study's
database; they differ only in where the loops run."""
