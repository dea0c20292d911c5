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
