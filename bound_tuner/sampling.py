"""The generator G_T: Euler-Maruyama on the reverse VP SDE (bound-spec.md 1.2).

  dy = [beta(t) s(y, t) + 1/2 beta(t) y] dt' + sqrt(beta(t)) dW,  t from T down to t_min,

on the uniform grid t_k = T - k h, h = (T - t_min)/N, k = 0..N-1. The score is queried at the
time t_k of the state it is applied to, and its norms are recorded for L_hat.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .sde import Schedule


def score(model: nn.Module, y: torch.Tensor, t: torch.Tensor, schedule: Schedule) -> torch.Tensor:
    """s_theta(y, t) = -eps_theta(y, t) / sigma_t for an eps-predicting network."""
    sigma = schedule.sigma2(t).sqrt().to(y.dtype).view((-1,) + (1,) * (y.dim() - 1))
    return -model(y, t.to(y.dtype)) / sigma


def time_grid(T: float, n_steps: int, *, t_min: float = 1e-3) -> torch.Tensor:
    """The generator's grid t_k = T - k (T - t_min)/N, k = 0..N-1 (float64)."""
    h = (T - t_min) / n_steps
    return T - h * torch.arange(n_steps, dtype=torch.float64)


@dataclass
class GeneratorRun:
    samples: torch.Tensor  # [n, ...] at t_min
    score_norms: torch.Tensor  # [N, n]: ||s_theta(y_k, t_k)|| per step and path


@torch.no_grad()
def generate(
    model: nn.Module,
    schedule: Schedule,
    *,
    T: float,
    n: int,
    shape: tuple[int, ...],
    n_steps: int = 1000,
    t_min: float = 1e-3,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    batch_size: int = 4096,
) -> GeneratorRun:
    """Run n generator paths from pi = N(0, I) at T to t_min, with N Euler-Maruyama steps."""
    if n_steps < 1:
        raise ValueError(f"n_steps={n_steps} must be at least 1")
    model.eval()
    grid = time_grid(T, n_steps, t_min=t_min)
    h = (T - t_min) / n_steps
    betas = schedule.beta(grid)
    out, norms = [], []
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        y = torch.randn((b, *shape), generator=generator).to(device)
        path_norms = torch.empty(n_steps, b, dtype=torch.float64)
        for k in range(n_steps):
            t = torch.full((b,), float(grid[k]), dtype=torch.float64, device=device)
            s = score(model, y, t, schedule)
            path_norms[k] = s.reshape(b, -1).norm(dim=1).cpu()
            beta = float(betas[k])
            z = torch.randn((b, *shape), generator=generator).to(device)
            y = y + h * beta * (s + 0.5 * y) + (beta * h) ** 0.5 * z
        out.append(y)
        norms.append(path_norms)
    return GeneratorRun(torch.cat(out), torch.cat(norms, dim=1))
