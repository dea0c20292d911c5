"""The generator G_T: Euler-Maruyama on the reverse VP SDE (docs/theory.md, section 1.2).

  dy = [beta(t) s(y, t) + 1/2 beta(t) y] dt' + sqrt(beta(t)) dW,  t from T down to t_min,

on the uniform grid t_k = T - k h, h = (T - t_min)/N, k = 0..N-1. The score is queried at the
time t_k of the state it is applied to. Along the way it records, per step and path, the score
norm ||s_theta|| (for the paper's L_hat) and ||s_theta - s_ref||^2 against each reference score
(for the Girsanov generator terms): the data-free reference -y, or reference models (trained on
other data). Both stay on the model's device until the end.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .device import generator_for
from .models import model_device, model_dtype
from .sde import Schedule, reference_score, reverse_step, time_grid


def score(model: nn.Module, y: torch.Tensor, t: torch.Tensor, schedule: Schedule) -> torch.Tensor:
    """s_theta(y, t) = -eps_theta(y, t) / sigma_t for an eps-predicting network."""
    sigma = schedule.sigma2(t).sqrt().to(y.dtype).view((-1,) + (1,) * (y.dim() - 1))
    return -model(y, t.to(y.dtype)) / sigma


@dataclass
class GeneratorRun:
    """Samples at t_min (on the model's device) and the per-step statistics of the paths (CPU,
    float64)."""

    samples: torch.Tensor  # [n, ...] at t_min
    score_norms: torch.Tensor  # [N, n]: ||s_theta(y_k, t_k)||
    ref_sq_dev: torch.Tensor  # [R, N, n]: ||s_theta(y_k, t_k) - s_ref(y_k, t_k)||^2 per reference
    grid: torch.Tensor  # [N]: t_k


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
    seed: int = 0,
    batch_size: int = 4096,
    references: Sequence[nn.Module | None] = (None,),
) -> GeneratorRun:
    """Run n generator paths from pi = N(0, I) at T to t_min with N Euler-Maruyama steps.

    The paths run on the model's device and in its dtype, with their noise drawn there from ``seed`` (the same
    seed gives the same paths on the same device). ``references`` are the scores that ``ref_sq_dev``
    compares s_theta with along the paths: None for the data-free -y, or eps-predicting models.
    """
    if n_steps < 1:
        raise ValueError(f"n_steps={n_steps} must be at least 1")
    model.eval()
    device, dtype = model_device(model), model_dtype(model)
    generator = generator_for(device, seed)
    grid = time_grid(T, n_steps, t_min=t_min)
    h = (T - t_min) / n_steps
    betas = schedule.beta(grid).tolist()
    out, norms, devs = [], [], []
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        y = torch.randn((b, *shape), generator=generator, dtype=dtype, device=device)
        path_norms = torch.empty(n_steps, b, dtype=torch.float64, device=device)
        path_devs = torch.empty(len(references), n_steps, b, dtype=torch.float64, device=device)
        for k in range(n_steps):
            t = torch.full((b,), float(grid[k]), dtype=torch.float64, device=device)
            s = score(model, y, t, schedule)
            path_norms[k] = s.reshape(b, -1).norm(dim=1)
            for r, ref in enumerate(references):
                s_ref = reference_score(y) if ref is None else score(ref, y, t, schedule)
                path_devs[r, k] = (s - s_ref).reshape(b, -1).pow(2).sum(dim=1)
            z = torch.randn((b, *shape), generator=generator, dtype=dtype, device=device)
            y = reverse_step(y, s, beta=betas[k], h=h, noise=z)
        out.append(y)
        norms.append(path_norms.cpu())
        devs.append(path_devs.cpu())
    return GeneratorRun(torch.cat(out), torch.cat(norms, dim=1), torch.cat(devs, dim=2), grid)
