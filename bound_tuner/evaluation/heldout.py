"""Held-out metrics of a trained score model (docs/theory.md section 4; validation mode only,
never the objective): the held-out negative ELBO or bits per dim, the held-out denoising loss,
and sample metrics of generated points (k-NN and kernel KL, pixel Frechet distance).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from bound_tuner.evaluation.elbo import bits_per_dim, denoising_loss_pass, negative_elbo
from bound_tuner.maths.metrics import frechet_distance, kde_kl, knn_kl
from bound_tuner.maths.sde import Schedule
from bound_tuner.training.sampling import generate

#: data of at most this many dimensions get the k-NN sample KL (docs/theory.md, section 4)
SAMPLE_KL_MAX_DIM = 10
#: generator samples and steps of the held-out metrics when none are given: (points, images)
HELDOUT_DEFAULTS = {"points": (10_000, 1000), "images": (256, 100)}


def heldout_metrics(
    model: nn.Module,
    schedule: Schedule,
    *,
    T: float,
    test: torch.Tensor,
    n_generated: int | None = None,
    n_steps: int | None = None,
    bandwidth: float = 0.1,
    t_min: float = 1e-3,
    seed: int = 0,
) -> dict[str, float]:
    """Held-out metrics of a trained model (docs/theory.md section 4); never the objective.

    Any data: the held-out negative ELBO per point (``neg_elbo``, with ``neg_elbo_se``) and the
    held-out denoising loss. Data of at most SAMPLE_KL_MAX_DIM dimensions: ``sample_kl``, the
    k-NN estimate of KL(data || generated) from ``n_generated`` generator samples (N =
    ``n_steps``; defaults in HELDOUT_DEFAULTS) against all test points (the ground truth for selection, with ``sample_kl_se``), and for 2-D data the
    paper's kernel-density ``test_kl`` (first half of the test points as the reference density,
    the second half as evaluation points, 1000 of each at most). Images: ``bits_per_dim`` (with
    ``bits_per_dim_se``) and ``pixel_fd``, the Frechet distance between generated and test
    images in pixel space.
    """
    images = test.dim() == 4
    draws = 8 if images else 64  # a UNet pass per draw and point: fewer draws for images
    default_n, default_steps = HELDOUT_DEFAULTS["images" if images else "points"]
    n_generated = default_n if n_generated is None else n_generated
    n_steps = default_steps if n_steps is None else n_steps
    out: dict[str, float] = {
        "denoising_loss": float(
            denoising_loss_pass(
                model, test, schedule, T=T, t_min=t_min, draws=draws, seed=seed + 11
            ).mean()
        )
    }
    if images:
        bpd, bpd_se = bits_per_dim(
            model, test, schedule, T=T, t_min=t_min, draws=draws, seed=seed + 13
        )
        out["bits_per_dim"], out["bits_per_dim_se"] = bpd, bpd_se
    else:
        est = negative_elbo(model, test, schedule, T=T, t_min=t_min, draws=draws, seed=seed + 13)
        out["neg_elbo"], out["neg_elbo_se"] = est.mean, est.se
    d = test[0].numel()
    if not images and d > SAMPLE_KL_MAX_DIM:
        return out
    run = generate(
        model,
        schedule,
        T=T,
        n=n_generated,
        shape=tuple(test.shape[1:]),
        n_steps=n_steps,
        t_min=t_min,
        seed=seed + 12,
    )
    gen = run.samples.cpu()
    test = test.cpu()
    finite = bool(torch.isfinite(gen).all())
    if images:
        out["pixel_fd"] = frechet_distance(test, gen) if finite else math.inf
        return out
    if not finite:
        out.update(sample_kl=math.inf, sample_kl_se=math.inf)
    else:
        kl, se = knn_kl(test, gen)
        out.update(sample_kl=kl, sample_kl_se=se)
    if d == 2:
        half = min(test.shape[0] // 2, 1000)
        ref, pts = test[:half], test[half : 2 * half]
        out["test_kl"] = kde_kl(pts, ref, gen[:1000], bandwidth=bandwidth) if finite else math.inf
    return out
