"""Low-dimensional data: the paper's Swiss roll and Gaussian data with closed forms."""

from __future__ import annotations

import numpy as np
import torch


def swiss_roll(m: int, *, seed: int = 0, noise: float = 0.5) -> torch.Tensor:
    """The paper's 2-D Swiss roll: make_swiss_roll(noise=0.5), columns 0 and 2, divided by 5."""
    if m < 1:
        raise ValueError(f"m={m} must be a positive number of points")
    from sklearn.datasets import make_swiss_roll

    x, _ = make_swiss_roll(n_samples=m, noise=noise, random_state=seed)
    return torch.from_numpy(x[:, [0, 2]] / 5.0).float()


def gaussian(
    m: int, *, d: int = 2, mean: float = 0.0, std: float = 2.0, seed: int = 0
) -> torch.Tensor:
    """X ~ N(mean, std^2 I_d): the data of the closed-form checks in docs/theory.md section 2."""
    if m < 1 or d < 1:
        raise ValueError(f"m={m} and d={d} must be positive")
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.normal(mean, std, size=(m, d))).float()


def two_moons(m: int, *, seed: int = 0, noise: float = 0.1) -> torch.Tensor:
    """2-D two moons (scikit-learn's make_moons), centred and scaled by 1/0.7 to unit scale."""
    if m < 1:
        raise ValueError(f"m={m} must be a positive number of points")
    from sklearn.datasets import make_moons

    x, _ = make_moons(n_samples=m, noise=noise, random_state=seed)
    return torch.from_numpy((x - [0.5, 0.25]) / 0.7).float()


def ring(m: int, *, seed: int = 0, modes: int = 8, radius: float = 2.0, std: float = 0.15):
    """2-D mixture of ``modes`` Gaussians (std ``std``) evenly spaced on a circle of ``radius``."""
    if m < 1:
        raise ValueError(f"m={m} must be a positive number of points")
    rng = np.random.default_rng(seed)
    k = rng.integers(modes, size=m)
    angle = 2 * np.pi * k / modes
    centres = radius * np.stack([np.cos(angle), np.sin(angle)], axis=1)
    return torch.from_numpy(centres + std * rng.normal(size=(m, 2))).float()
