"""Held-out metrics (bound-spec.md 1.4): recorded beside the bound, never the objective."""

from __future__ import annotations

import math

import torch
from torch import nn

from .sampling import generate
from .schedules import Schedule
from .training import evaluate_train_loss


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
    """Held-out denoising loss for any data; test KL by kernel density for 2-D data.

    ``reference`` is an independent data sample for the test-KL density; without it the first
    half of ``test`` serves as reference and the second half as evaluation points.
    """
    out = {
        "denoising_loss": float(
            evaluate_train_loss(model, test, schedule, T=T, t_min=t_min, seed=seed + 11).mean()
        )
    }
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
