"""Score network for low-dimensional data: the paper's Swiss-roll MLP with a time input."""

from __future__ import annotations

import math

import torch
from torch import nn


class TimeFeatures(nn.Module):
    """Fourier features of absolute time t: [t, sin(2^k pi t / 4), cos(2^k pi t / 4)]."""

    def __init__(self, n_freq: int = 8) -> None:
        super().__init__()
        self.register_buffer("freqs", (2.0 ** torch.arange(n_freq)) * math.pi / 4)
        self.dim = 1 + 2 * n_freq

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t = t.reshape(-1, 1)
        a = t * self.freqs
        return torch.cat([t, torch.sin(a), torch.cos(a)], dim=1)


class ScoreMLP(nn.Module):
    """Predicts the noise eps from (x_t, t); the score is -eps/sigma_t.

    Default: 3 hidden layers of 128 units with Swish (SiLU), as in the paper's Swiss-roll runs.
    """

    def __init__(self, dim: int = 2, *, hidden: int = 128, layers: int = 3) -> None:
        super().__init__()
        self.time = TimeFeatures()
        sizes = [dim + self.time.dim] + [hidden] * layers
        blocks: list[nn.Module] = []
        for a, b in zip(sizes[:-1], sizes[1:], strict=True):
            blocks += [nn.Linear(a, b), nn.SiLU()]
        blocks.append(nn.Linear(sizes[-1], dim))
        self.net = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([x, self.time(t.to(x.dtype))], dim=1))
