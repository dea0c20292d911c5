"""The negative ELBO and the denoising loss of a trained score model on fixed draws.

``negative_elbo`` (docs/theory.md eq. 1.5, per point, with its Monte Carlo variance),
``negative_elbo_members`` (K models at once), ``bits_per_dim`` (8-bit images, docs/theory.md 1.3)
and ``denoising_loss_pass`` (the sigma^2-weighted denoising loss). Every pass draws from a fixed
seed, so every model is scored on the same draws. The bound's terms
(``bound_tuner.evaluation.diffusion_bound``) and the held-out metrics
(``bound_tuner.evaluation.heldout``) are built on them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from bound_tuner.data.preprocess import LOG_BIN_VOLUME_PER_DIM, dequantize
from bound_tuner.maths.bounds.terms import ElboEstimate
from bound_tuner.maths.draws import chunk_length, generator_for
from bound_tuner.maths.sde import Schedule, prior_kl
from bound_tuner.models import model_device
from bound_tuner.training.loop import denoising_terms
from bound_tuner.training.members import Members

#: data elements a member's forward of the ELBO pass takes at most (a chunk of draws of every
#: point at once for 2-D data, a few dozen images)
EVAL_ELEMS = 1 << 16


@torch.no_grad()
def denoising_loss_pass(
    model: nn.Module,
    x: torch.Tensor,
    schedule: Schedule,
    *,
    T: float,
    draws: int = 64,
    t_min: float = 1e-3,
    seed: int = 1234,
    batch_size: int = 4096,
) -> torch.Tensor:
    """Per-sample sigma^2-weighted denoising loss [m] (float64, CPU): ``draws`` (t, eps) pairs each,
    t ~ U(t_min, T), on the model's device. The fixed seed gives every model the same draws."""
    model.eval()
    x = x.to(model_device(model))
    g = generator_for(x.device, seed)
    m = x.shape[0]
    total = torch.zeros(m, dtype=torch.float64, device=x.device)
    for _ in range(draws):
        for start in range(0, m, batch_size):
            xb = x[start : start + batch_size]
            loss, _ = denoising_terms(model, xb, schedule, T=T, t_min=t_min, generator=g)
            total[start : start + batch_size] += loss.double()
    return (total / draws).cpu()


@torch.no_grad()
def negative_elbo(
    model: nn.Module,
    y: torch.Tensor,
    schedule: Schedule,
    *,
    T: float,
    t_min: float = 1e-3,
    draws: int = 64,
    seed: int = 4321,
    batch_size: int = 4096,
) -> ElboEstimate:
    """-ELBO of each point of y under the VP SDE model (docs/theory.md eq. 1.5):

      -ln p(y) <= 1/2 int_{lambda_T}^{lambda_tmin} E||eps_theta(x_t, t) - eps||^2 d lambda   (diffusion)
                  + KL(N(alpha_T y, sigma_T^2 I) || N(0, I))                               (prior)
                  + d/2 ln(2 pi e sigma_tmin^2 / alpha_tmin^2)                             (decoder)

    The diffusion integral is taken in the log-SNR lambda (beta/sigma^2 dt = -d lambda), with
    ``draws`` stratified draws of lambda uniform on [lambda_T, lambda_tmin] per point: importance
    sampling of t by its ELBO weight, so the estimate has a small, finite variance. The draws come
    from a fixed seed (common random numbers: every model is scored on the same draws).
    """
    return negative_elbo_members(
        Members.single(model, schedule),
        y,
        T=[T],
        t_min=t_min,
        draws=draws,
        seeds=[seed],
        batch_size=batch_size,
    )[0]


@torch.no_grad()
def negative_elbo_members(
    members: Members,
    y: torch.Tensor,
    *,
    T: Sequence[float],
    t_min: float = 1e-3,
    draws: int = 64,
    seeds: Sequence[int],
    batch_size: int = 4096,
) -> list[ElboEstimate]:
    """``negative_elbo`` of K models at once (``bound_tuner.training.members``), member j with its T[j],
    schedule and seeds[j]; one ElboEstimate per member."""
    k, dev = members.k, members.device
    y = y.to(dev)
    n, d = y.shape[0], y[0].numel()
    extra = (1,) * (y.dim() - 1)
    sch = members.schedules
    ends = torch.tensor([[t_min, Tj] for Tj in T], dtype=torch.float64, device=dev)  # [K, 2]
    lam = sch.log_snr(ends)
    lam_hi, width = lam[:, 0], lam[:, 0] - lam[:, 1]
    alpha, sigma2, _ = sch.coefficients(ends)
    decoder = 0.5 * d * torch.log(2 * math.pi * math.e * sigma2[:, 0] / alpha[:, 0] ** 2)
    prior = prior_kl(y, alpha=alpha[:, 1:], sigma2=sigma2[:, 1:])  # [K, n]
    t_hi = ends[:, 1:]
    gens = [generator_for(dev, s) for s in seeds]
    chunk = chunk_length(n * d, draws)
    s1 = torch.zeros(k, n, dtype=torch.float64, device=dev)
    s2 = torch.zeros(k, n, dtype=torch.float64, device=dev)
    # a chunk's draws run as one batch of (draw, point) rows, at most ``rows`` per forward
    rows = max(1, min(batch_size, EVAL_ELEMS // d))
    for first in range(0, draws, chunk):
        c = min(chunk, draws - first)
        # each member draws the chunk's (u, eps) from its own generator
        u_all = torch.stack(
            [torch.rand((c, n), generator=g, dtype=torch.float64, device=dev) for g in gens]
        )
        eps = torch.stack(
            [torch.randn((c, *y.shape), generator=g, dtype=y.dtype, device=dev) for g in gens]
        ).reshape(k, c * n, *y.shape[1:])
        # stratified: draw j lies in [j/draws, (j+1)/draws)
        j = torch.arange(first, first + c, dtype=torch.float64, device=dev).view(1, c, 1)
        u = (j + u_all) / draws
        t = sch.time_at_log_snr(lam_hi.view(k, 1, 1) - width.view(k, 1, 1) * u)
        t = torch.minimum(torch.maximum(t, ends[:, :1, None]), t_hi[:, :, None]).reshape(k, c * n)
        point = torch.arange(n, device=dev).repeat(c)  # the point of each (draw, point) row
        for start in range(0, c * n, rows):
            sl = slice(start, start + rows)
            a, v2, _ = sch.coefficients(t[:, sl])
            b = a.shape[1]
            yb = y[point[sl]]
            xt = (
                a.to(y.dtype).view(k, b, *extra) * yb
                + v2.sqrt().to(y.dtype).view(k, b, *extra) * eps[:, sl]
            )
            err = (members.eps(xt, t[:, sl]) - eps[:, sl]).pow(2).reshape(k, b, -1).sum(2)
            v = 0.5 * width[:, None] * err.double()
            s1.index_add_(1, point[sl], v)
            s2.index_add_(1, point[sl], v * v)
    mean = s1 / draws
    var = (s2 / draws - mean * mean).clamp(min=0) / max(draws - 1, 1)
    total = (mean + prior + decoder[:, None]).cpu()
    var = var.cpu()
    return [ElboEstimate(total[j], var[j]) for j in range(k)]


def bits_per_dim(
    model: nn.Module,
    y: torch.Tensor,
    schedule: Schedule,
    *,
    T: float,
    t_min: float = 1e-3,
    draws: int = 16,
    seed: int = 0,
) -> tuple[float, float]:
    """Bits per dimension of 8-bit images stored as bin centres in [-1, 1], and its standard error.

    Uniformly dequantized y bounds the discrete likelihood: -log2 P(k) <= (-ELBO(y) -
    d ln(2/256)) / ln 2, averaged over the images (data.preprocess).
    """
    y = y.to(model_device(model))
    g = generator_for(y.device, seed)
    d = y[0].numel()
    est = negative_elbo(
        model, dequantize(y, generator=g), schedule, T=T, t_min=t_min, draws=draws, seed=seed + 1
    )
    scale = d * math.log(2)
    return (est.mean - d * LOG_BIN_VOLUME_PER_DIM) / scale, est.se / scale
