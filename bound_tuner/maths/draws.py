"""Seeded generators and chunk sizes for the Monte Carlo draws of the estimators."""

from __future__ import annotations

import torch


def generator_for(device: torch.device | str, seed: int) -> torch.Generator:
    """A generator on ``device`` seeded with ``seed``: random numbers drawn with it are made on
    the device they are used on (no CPU draw and copy)."""
    return torch.Generator(device=torch.device(device)).manual_seed(int(seed))


# random numbers drawn at once: training, the generator and the ELBO draw many steps per call
NOISE_CHUNK_ELEMS = 1 << 21


MAX_CHUNK_STEPS = 64


def chunk_length(elems_per_step: int, steps: int) -> int:
    """How many steps' random numbers to draw in one call: at most MAX_CHUNK_STEPS and
    NOISE_CHUNK_ELEMS elements. It depends only on its arguments, so a model run alone and the
    same model run in a pack draw the same numbers from the same seed."""
    return max(1, min(steps, MAX_CHUNK_STEPS, NOISE_CHUNK_ELEMS // max(1, elems_per_step)))
