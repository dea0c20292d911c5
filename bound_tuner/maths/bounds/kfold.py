"""K-fold references: the per-point information term and cross-fitting (docs/theory.md 2.9-2.11).

The training set is cut into K folds. Reference k is a model trained with the trial's settings,
initialization and noise draws on every point outside fold k, so a point of fold k is measured
against a model that never saw it. Pure tensor functions; ``bound_tuner.evaluation`` runs the models.

- ``fold_info``: (1/m) sum_k sqrt(n_k KL_k), the per-sample information term of eq. 2.9
  (KL_k: Girsanov's path KL between the model and reference k, along the model's paths).
- ``cross_fitted``: each point's NELBO under the reference that did not see it; their mean is the
  K-fold cross-validated NELBO (eq. 2.10), their spread the cross-fitted scale R (eq. 2.11).
- ``fold_terms``: every cross-fitting term from the references' per-point NELBOs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist

import torch

#: folds of the default bound; fold 0's reference is also the plain 80/20 split's model
DEFAULT_FOLDS = 5
#: one-sided normal quantile of the 95% certificate (bound.total_upper95)
Z95 = 1.6448536269514722
#: standard errors of the cross-fitted margin of a model scored at one step (eq. 2.11)
CV_Z = 2.0
#: the chance that the value of the step certified early stopping keeps falls below that step's
#: expected population NELBO, shared by its C checkpoints (docs/theory.md eq. 2.12)
STOP_ALPHA = 0.025


def checkpoint_z(checkpoints: int, *, alpha: float = STOP_ALPHA) -> float:
    """z of the margin z se_cv when the value is the smallest over ``checkpoints`` steps
    (docs/theory.md eq. 2.12): Bonferroni's Phi^-1(1 - alpha / C), never below CV_Z, the
    margin of one step (2.50 for C = 4, 2.73 for C = 8, 2.96 for C = 16)."""
    if checkpoints < 1:
        raise ValueError(f"checkpoints={checkpoints}: the value needs at least one step")
    return max(CV_Z, NormalDist().inv_cdf(1.0 - alpha / checkpoints))


def folds_for(m: int, folds: int | None = None) -> int:
    """K: ``folds`` when given, else DEFAULT_FOLDS, lowered to m // 2 for fewer than
    2 * DEFAULT_FOLDS points (every fold keeps at least two points)."""
    return int(folds) if folds is not None else max(2, min(DEFAULT_FOLDS, m // 2))


def fold_assignment(m: int, folds: int, *, seed: int) -> torch.Tensor:
    """The fold of each of m points [m] (int64, CPU): a permutation from ``seed`` cut into
    ``folds`` parts whose sizes differ by at most one."""
    if folds < 2:
        raise ValueError(f"folds={folds}: K-fold references need at least 2 folds")
    if m < 2 * folds:
        raise ValueError(
            f"{folds} folds need at least {2 * folds} training points, got m={m}; lower [bound] folds"
        )
    perm = torch.randperm(m, generator=torch.Generator().manual_seed(seed))
    out = torch.empty(m, dtype=torch.int64)
    out[perm] = torch.arange(m) % folds
    return out


def fold_rows(assignment: torch.Tensor, folds: int) -> list[torch.Tensor]:
    """The training rows of each reference: reference k gets every point outside fold k."""
    return [torch.nonzero(assignment != k).flatten() for k in range(folds)]


def fold_sizes(assignment: torch.Tensor, folds: int) -> list[int]:
    """n_k, the number of points in fold k."""
    return [int((assignment == k).sum()) for k in range(folds)]


def fold_info(path_kls: Sequence[float], sizes: Sequence[int]) -> float:
    """C_fold = (1/m) sum_k sqrt(n_k KL_k)  (docs/theory.md eq. 2.9).

    The n_k points of fold k are independent of each other and of the other folds, so their
    individual informations sum to at most KL_k (chain rule and the golden formula with reference
    k as Q); by Cauchy-Schwarz sum_{i in k} sqrt(I_i) <= sqrt(n_k KL_k)."""
    if len(path_kls) != len(sizes):
        raise ValueError(f"{len(path_kls)} path KLs for {len(sizes)} folds")
    m = sum(sizes)
    return sum(math.sqrt(n * max(kl, 0.0)) for kl, n in zip(path_kls, sizes)) / m


def cross_fitted(per_member: torch.Tensor, assignment: torch.Tensor) -> torch.Tensor:
    """Each point's value under the reference that did not see it: per_member [K, m] holds every
    reference's value on every point; returns [m] with row assignment[i] at point i."""
    return per_member.gather(0, assignment.to(per_member.device)[None]).squeeze(0)


def refs_own_fit(per_member: torch.Tensor, assignment: torch.Tensor) -> float:
    """NELBO_refs (docs/theory.md eq. 2.10a): each reference's mean value on the points it was
    trained on (every point outside its own fold), averaged over the K references."""
    assignment = assignment.to(per_member.device)
    seen = torch.arange(per_member.shape[0], device=per_member.device)[:, None] != assignment[None]
    per_ref = (per_member.double() * seen).sum(dim=1) / seen.sum(dim=1)
    return float(per_ref.mean())


def holdout_fit(per_member: torch.Tensor, assignment: torch.Tensor) -> float:
    """The plain 80/20 split's held-out value (K = 5): reference 0's mean on fold 0, the points
    it did not see (``bound.holdout_nelbo``, a baseline)."""
    return float(per_member[0, assignment.to(per_member.device) == 0].double().mean())


def cv_summary(values: torch.Tensor, mc_var: torch.Tensor | None = None) -> dict[str, float]:
    """The cross-fitted NELBO's mean (eq. 2.10), its standard error as an estimate of the
    references' population NELBO (points and draws), and the cross-fitted scale R_cv, the
    sub-Gaussian scale of the per-point values (eq. 2.11a), with their standard deviation and
    half range beside it."""
    v = values.double()
    n = v.numel()
    std = float(v.std()) if n > 1 else math.inf
    se = std / math.sqrt(n)
    if mc_var is not None:  # the points' spread already holds the draws' part; keep the larger
        se = max(se, float(mc_var.double().sum().sqrt()) / n)
    half_range = float(v.max() - v.min()) / 2
    return {
        "cv_nelbo": float(v.mean()),
        "cv_se": se,
        "R_cv": subgaussian_scale(v),
        "R_cv_std": std,
        "R_cv_half_range": half_range,
    }


def fold_terms(
    per_ref: torch.Tensor, mc_var: torch.Tensor, folds: torch.Tensor
) -> dict[str, float]:
    """Cross-fitting from every reference's per-point NELBO [K, m] (docs/theory.md 2.10-2.11):
    the K-fold cross-validated NELBO, its standard error, the cross-fitted scale R_cv, the
    references' NELBO on their own training points (their mean over the references, the fit
    that the cross-validated NELBO is compared with) and the plain 80/20 split's held-out NELBO
    (reference 0 on fold 0) as a baseline."""
    folds = folds.to(per_ref.device)
    out = cv_summary(cross_fitted(per_ref, folds), cross_fitted(mc_var, folds))
    out["refs_train_nelbo"] = refs_own_fit(per_ref, folds)
    out["holdout_nelbo"] = holdout_fit(per_ref, folds)
    return out


#: grid points x values that ``subgaussian_scale`` holds at once (float64: 32 MiB)
LAMBDA_BLOCK = 1 << 22


def subgaussian_scale(values: torch.Tensor, *, grid: int = 400) -> float:
    """The sample's sub-Gaussian scale: the smallest s with mean exp(lam (v - mean)) <=
    exp(lam^2 s^2 / 2) for every lam >= 0 on a grid (the upper tail, which bounds a gap from
    above), with Bessel's correction. It is the standard deviation for a Gaussian sample and
    exceeds it for a sample with a long upper tail (docs/theory.md 2.11a)."""
    v = values.double()
    c = v - v.mean()
    std = float(v.std()) if v.numel() > 1 else 0.0
    if not std > 0:
        return 0.0
    lam = torch.logspace(-3, 2, grid, dtype=torch.float64) / std
    m = v.numel()
    rows = max(1, LAMBDA_BLOCK // m)  # grid x m at once would be 6 GB for a million points
    log_mgf = torch.cat(
        [torch.logsumexp(lam[i : i + rows, None] * c[None], dim=1) for i in range(0, grid, rows)]
    ) - math.log(m)
    # m/(m-1): Bessel's correction, so that the small-lam limit is the sample variance
    return float((2 * log_mgf / lam**2).clamp(min=0).max() * m / (m - 1)) ** 0.5
