"""Seeds for torch, numpy and random, and per-trial seeds derived from a study seed."""

from __future__ import annotations

import hashlib
import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed python's random, numpy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def derive_seed(study_seed: int, trial_number: int) -> int:
    """A stable 31-bit seed for one trial from the study seed and the trial number."""
    h = hashlib.blake2b(f"{study_seed}:{trial_number}".encode(), digest_size=4).digest()
    return int.from_bytes(h, "little") & 0x7FFFFFFF


RETRY_ATTR = "failed_trial"  # system attr of a retry: the number of the trial it first replaced


def original_trial_number(trial) -> int:
    """The number of the trial that ``trial`` stands for: itself, or for a retry (a trial re-run
    after its worker died or was interrupted) the first trial of its retry series. Optuna's
    RetryHeartbeatStaleTrialCallback and bound_tuner's own retries record that number in the
    system attr ``failed_trial``.

    ``trial`` is an ``optuna.Trial`` (its record is read through its study), a FrozenTrial or a
    FixedTrial. An ``optuna.Trial`` that has no parameters yet is not a retry (a retry is queued
    with the parameters of the trial it replaces), so called before a trial samples, this reads
    the study's trials only for retries and enqueued trials."""
    attrs = getattr(trial, "system_attrs", None)  # FrozenTrial, FixedTrial
    if attrs is None:
        study = getattr(trial, "study", None)
        attrs = {}
        if study is not None and trial.params:  # its record, through the public study API
            for t in study.get_trials(deepcopy=False):
                if t.number == trial.number:
                    attrs = t.system_attrs
                    break
    original = attrs.get(RETRY_ATTR)
    return int(original) if original is not None else int(trial.number)


def trial_seed(trial, study_seed: int) -> int:
    """The training seed of ``trial``: ``derive_seed(study_seed, n)`` with n its own number, or
    for a retry the number of the trial it replaces, so a retry repeats that trial exactly."""
    return derive_seed(study_seed, original_trial_number(trial))
