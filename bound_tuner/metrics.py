"""Held-out metrics (bound-spec.md 1.4): recorded beside the bound, never the objective."""

from __future__ import annotations

import math

import torch
from torch import nn

from .bounds.diffusion import prior_kl
from .data.preprocess import LOG_BIN_VOLUME_PER_DIM, dequantize
from .sampling import generate
from .sde import Schedule, sample_xt
from .training import draw_times, evaluate_train_loss


def kde_logpdf(points: torch.Tensor, centers: torch.Tensor, *, bandwidth: float) -> torch.Tensor:
    """log of a Gaussian kernel density with the given centers, evaluated at points [n, d]."""
    points, centers = points.double(), centers.double()
    d = points.shape[1]
    d2 = torch.cdist(points, centers).pow(2)
    log_norm = math.log(centers.shape[0]) + 0.5 * d * math.log(2 * math.pi * bandwidth**2)
    return torch.logsumexp(-d2 / (2 * bandwidth**2), dim=1) - log_norm


def kde_kl(
    test: torch.Tensor, reference: torch.Tensor, generated: torch.Tensor, *, bandwidth: float = 0.1
) -> float:
    """KL(P_data || P_model) estimated at the test points by two Gaussian kernel densities.

    KL ~ mean over test points x of [ln p_ref(x) - ln p_gen(x)], p_ref a density of a reference
    data sample independent of the test points, p_gen a density of generated samples, both with
    the same bandwidth (the paper: 0.1, 1000 points each).
    """
    return float(
        (
            kde_logpdf(test, reference, bandwidth=bandwidth)
            - kde_logpdf(test, generated, bandwidth=bandwidth)
        ).mean()
    )


@torch.no_grad()
def negative_elbo(
    model: nn.Module,
    y: torch.Tensor,
    schedule: Schedule,
    *,
    T: float,
    t_min: float = 1e-3,
    draws: int = 16,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """-ELBO per point (nats, float64) of continuous data y under the VP SDE model:

    -ln p(y) <= E_t [(T - t_min) beta(t) / (2 sigma_t^2) ||eps_theta - eps||^2]   (diffusion)
               + KL(N(alpha_T y, sigma_T^2 I) || N(0, I))                            (prior)
               + d/2 ln(2 pi e sigma_tmin^2 / alpha_tmin^2)                          (decoder)

    with t ~ U(t_min, T) and the Gaussian decoder y ~ N(x_tmin / alpha, sigma^2 / alpha^2 I).
    """
    model.eval()
    d = y[0].numel()
    a0, s0 = float(schedule.alpha(t_min)), float(schedule.sigma2(t_min))
    decoder = 0.5 * d * math.log(2 * math.pi * math.e * s0 / a0**2)
    prior = prior_kl(y, alpha=float(schedule.alpha(T)), sigma2=float(schedule.sigma2(T))).cpu()
    diff = torch.zeros(y.shape[0], dtype=torch.float64)
    for _ in range(draws):
        t = draw_times(y.shape[0], T, t_min, generator)
        diff += _weighted_dsm(model, y, schedule, t, generator)
    return (T - t_min) * diff / draws + prior + decoder


def bits_per_dim(
    model: nn.Module,
    y: torch.Tensor,
    schedule: Schedule,
    *,
    T: float,
    t_min: float = 1e-3,
    draws: int = 16,
    seed: int = 0,
    batch_size: int = 512,
) -> float:
    """Bits per dimension of 8-bit images stored as bin centres in [-1, 1] (data.preprocess).

    Uniformly dequantized y bounds the discrete likelihood: -log2 P(k) <= (-ELBO(y) -
    d ln(2/256)) / ln 2, averaged over the images.
    """
    g = torch.Generator().manual_seed(seed)
    d = y[0].numel()
    total = 0.0
    for start in range(0, y.shape[0], batch_size):
        yb = dequantize(y[start : start + batch_size], generator=g)
        nelbo = negative_elbo(model, yb, schedule, T=T, t_min=t_min, draws=draws, generator=g)
        total += float(nelbo.sum())
    nll = total / y.shape[0]
    return (nll - d * LOG_BIN_VOLUME_PER_DIM) / (d * math.log(2))


def _weighted_dsm(model, y, schedule, t, gen) -> torch.Tensor:
    """beta(t) / (2 sigma_t^2) ||eps_theta(x_t, t) - eps||^2 per point (float64), one draw each."""
    eps = torch.randn(y.shape, generator=gen).to(y.device, y.dtype)
    t_dev = t.to(y.device)
    xt, _ = sample_xt(y, t_dev, schedule, noise=eps)
    err = (model(xt, t_dev.to(y.dtype)) - eps).pow(2).reshape(y.shape[0], -1).sum(1).double()
    w = schedule.beta(t_dev) / (2 * schedule.sigma2(t_dev))
    return (w * err).cpu()


def heldout_metrics(
    model: nn.Module,
    schedule: Schedule,
    *,
    T: float,
    test: torch.Tensor,
    reference: torch.Tensor | None = None,
    n_generated: int = 1000,
    n_steps: int = 1000,
    bandwidth: float = 0.1,
    t_min: float = 1e-3,
    seed: int = 0,
) -> dict[str, float]:
    """Held-out denoising loss for any data; bits per dim for images; test KL for 2-D data.

    ``reference`` is an independent data sample for the test-KL density; without it the first
    half of ``test`` serves as reference and the second half as evaluation points.
    """
    images = test.dim() == 4
    draws = 8 if images else 64  # a UNet pass per draw and point: fewer draws for images
    out = {
        "denoising_loss": float(
            evaluate_train_loss(
                model, test, schedule, T=T, t_min=t_min, draws=draws, seed=seed + 11
            ).mean()
        )
    }
    if images:
        out["bits_per_dim"] = bits_per_dim(
            model, test, schedule, T=T, t_min=t_min, draws=draws, seed=seed + 13
        )
    if test.dim() == 2 and test.shape[1] == 2:
        if reference is None:
            half = test.shape[0] // 2
            reference, test = test[:half], test[half:]
        run = generate(
            model,
            schedule,
            T=T,
            n=n_generated,
            shape=(2,),
            n_steps=n_steps,
            t_min=t_min,
            generator=torch.Generator().manual_seed(seed + 12),
        )
        gen = run.samples
        if not torch.isfinite(gen).all():
            out["test_kl"] = float("inf")
        else:
            out["test_kl"] = kde_kl(test, reference, gen.to(test.device), bandwidth=bandwidth)
    return out
