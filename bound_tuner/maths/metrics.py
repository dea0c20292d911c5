"""Held-out estimators as pure functions (docs/theory.md, section 4).

Sample-based divergences between data and generated points. Nothing here runs a model
(``bound_tuner.evaluation.heldout`` does); the selection statistics are in ``bound_tuner.maths.selection``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.spatial import cKDTree


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


def knn_kl(data: torch.Tensor, generated: torch.Tensor, *, k: int = 5) -> tuple[float, float]:
    """KL(data || generated) by k nearest neighbours (Wang, Kulkarni and Verdu 2009), and its s.e.

      KL ~ (d/n) sum_i ln(nu_k(i) / rho_k(i)) + ln(M / (n - 1))

    with n data points x_i, M generated points, rho_k(i) the distance from x_i to its k-th
    neighbour among the other data points and nu_k(i) to its k-th neighbour among the generated
    points (docs/theory.md eq. 4.1). The standard error treats the n terms as independent.
    Uses scipy's cKDTree: exact neighbours, fast in the low dimensions this is meant for.
    """
    x = data.reshape(data.shape[0], -1).double().cpu().numpy()
    y = generated.reshape(generated.shape[0], -1).double().cpu().numpy()
    n, d = x.shape
    m = y.shape[0]
    if n <= k or m < k:
        raise ValueError(f"knn_kl needs more than k={k} data points and at least k generated ones")
    rho = cKDTree(x).query(x, k=k + 1)[0][:, k]
    nu = cKDTree(y).query(x, k=k)[0]
    nu = nu[:, k - 1] if k > 1 else nu
    tiny = np.finfo(np.float64).tiny
    terms = d * (np.log(np.maximum(nu, tiny)) - np.log(np.maximum(rho, tiny)))
    kl = float(terms.mean() + math.log(m / (n - 1)))
    return kl, float(terms.std(ddof=1) / math.sqrt(n))


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to two samples [n, ...] (flattened):
    ||mu_a - mu_b||^2 + tr(C_a + C_b - 2 (C_a C_b)^(1/2)). In pixel space for images."""
    x = a.reshape(a.shape[0], -1).double().cpu().numpy()
    y = b.reshape(b.shape[0], -1).double().cpu().numpy()
    mu = x.mean(0) - y.mean(0)
    ca, cb = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    # tr (C_a C_b)^(1/2) = sum of the square roots of the eigenvalues of C_a C_b, which are real
    # and >= 0 for positive semi-definite C_a, C_b (rank-deficient ones included)
    ev = np.clip(np.linalg.eigvals(ca @ cb).real, 0.0, None)
    return float(mu @ mu + np.trace(ca) + np.trace(cb) - 2 * np.sqrt(ev).sum())


#: a generated sample is a copy of a training point when its nearest training point is nearer
#: than this fraction of the distance to the second nearest (Favero, Sclocchi and Wyart 2025)
MEMORIZED_RATIO = 1.0 / 3.0


#: sample-to-training-point distances held at once by ``memorized_share`` (float64: 32 MiB)
DISTANCE_BLOCK = 1 << 22


def memorized_share(
    samples: torch.Tensor, train: torch.Tensor, *, block: int | None = DISTANCE_BLOCK
) -> float:
    """The share of generated samples whose nearest training point is much nearer than the second
    nearest (||x - NN1|| / ||x - NN2|| < MEMORIZED_RATIO): a memorization statistic computed from
    the training data alone (docs/theory.md 2.11). NaN with fewer than two training points or
    non-finite samples.

    The training points are taken in blocks of about ``block`` distances (None: all at once),
    keeping each sample's two nearest so far, so that the memory stays bounded however many
    training points there are (1,000,000 points and 256 samples would be 2 GB at once)."""
    if train.shape[0] < 2 or samples.shape[0] == 0:
        return math.nan
    a = samples.reshape(samples.shape[0], -1).double()
    if not bool(torch.isfinite(a).all()):
        return math.nan
    flat = train.reshape(train.shape[0], -1)
    rows = flat.shape[0] if block is None else max(2, block // a.shape[0])
    two = None
    for start in range(0, flat.shape[0], rows):
        b = flat[start : start + rows].double().to(a.device)
        near = torch.cdist(a, b).topk(min(2, b.shape[0]), dim=1, largest=False).values
        if two is not None:
            near = torch.cat([two, near], dim=1).topk(2, dim=1, largest=False).values
        two = near
    return float((two[:, 0] < MEMORIZED_RATIO * two[:, 1]).double().mean())
