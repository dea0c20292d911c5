"""Training of score networks by the sigma^2-weighted denoising loss (docs/theory.md sections 1.2 and 6).

  l(theta; x) = E_{t ~ U(t_min, T), eps} 1/2 || sigma_t s_theta(alpha_t x + sigma_t eps, t) + eps ||^2

With an eps-predicting network (s = -eps_theta / sigma_t) the integrand is 1/2 ||eps - eps_theta||^2,
summed over data dimensions (nats per sample).

Bound-regularized training (docs/theory.md section 6) adds lambda times a differentiable surrogate of the
generator term I_gen = L^2 int beta / (2m): the same Girsanov integral with the worst-case score
norm L^2 replaced by the mean squared score along the training marginals,

  S(theta) = (T - t_min) E_{t ~ U(t_min, T), x, eps} [ beta(t) || s_theta(x_t, t) ||^2 ] / (2 m),

estimated on each mini-batch with the draws of the denoising loss. lambda = 0 is plain training.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from .sde import Schedule, sample_xt


def draw_times(n: int, T: float, t_min: float, generator: torch.Generator | None) -> torch.Tensor:
    """n times t ~ U(t_min, T) in float64."""
    return t_min + (T - t_min) * torch.rand(n, generator=generator, dtype=torch.float64)


def denoising_terms(
    model: nn.Module,
    x: torch.Tensor,
    schedule: Schedule,
    *,
    T: float,
    t_min: float = 1e-3,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample denoising loss [b] and per-sample beta(t)||s||^2 [b], one draw of (t, eps) each."""
    t = draw_times(x.shape[0], T, t_min, generator)
    eps = torch.randn(x.shape, generator=generator).to(x.device, x.dtype)
    t_dev = t.to(x.device)
    xt, _ = sample_xt(x, t_dev, schedule, noise=eps)
    eps_hat = model(xt, t_dev.to(x.dtype))
    loss = 0.5 * (eps_hat - eps).pow(2).reshape(x.shape[0], -1).sum(dim=1)
    sigma2 = schedule.sigma2(t_dev).to(x.dtype)
    beta = schedule.beta(t_dev).to(x.dtype)
    sq_score = eps_hat.pow(2).reshape(x.shape[0], -1).sum(dim=1) / sigma2
    return loss, beta * sq_score


def generator_surrogate(
    weighted_sq_score: torch.Tensor, *, T: float, m: int, t_min: float = 1e-3
) -> torch.Tensor:
    """S(theta) of the module docstring from per-sample beta(t)||s||^2 values."""
    return (T - t_min) * weighted_sq_score.mean() / (2 * m)


def train_score_model(
    model: nn.Module,
    x: torch.Tensor,
    schedule: Schedule,
    *,
    T: float,
    steps: int = 2000,
    batch_size: int = 256,
    lr: float = 1e-3,
    lam: float = 0.0,
    t_min: float = 1e-3,
    seed: int = 0,
    grad_clip: float | None = 1.0,
    callback: Callable[[int, nn.Module], None] | None = None,
    callback_every: int = 0,
    progress: bool = False,
) -> list[float]:
    """Train ``model`` on x by Adam on the denoising loss (+ lam * S(theta)); returns the losses.

    ``callback(step, model)`` runs every ``callback_every`` steps (for pruning checkpoints); it may
    raise to stop training. A NaN or infinite loss raises FloatingPointError.
    """
    schedule.check_T(T, t_min=t_min)
    if lam < 0:
        raise ValueError(f"lam={lam} must be >= 0")
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    m = x.shape[0]
    history: list[float] = []
    bar = tqdm(range(steps), desc=f"train T={T:g}", disable=not progress, leave=False)
    for step in bar:
        model.train()
        idx = torch.randint(m, (min(batch_size, m),), generator=g).to(x.device)
        loss, wsq = denoising_terms(model, x[idx], schedule, T=T, t_min=t_min, generator=g)
        total = loss.mean()
        if lam > 0:
            total = total + lam * generator_surrogate(wsq, T=T, m=m, t_min=t_min)
        value = float(total.detach())
        if value != value or value in (float("inf"), float("-inf")):
            raise FloatingPointError(f"training loss became {value} at step {step}")
        opt.zero_grad(set_to_none=True)
        total.backward()
        if grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        history.append(value)
        if progress and step % 50 == 0:
            bar.set_postfix(loss=f"{value:.3f}")
        if callback is not None and callback_every and (step + 1) % callback_every == 0:
            callback(step + 1, model)
    return history
