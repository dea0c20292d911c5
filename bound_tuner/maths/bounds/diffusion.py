"""The diffusion-model bounds of docs/theory.md, term by term, as pure functions of tensors.

Variant "paper" (arXiv 2506.00849, docs/theory.md eq. 2.1):

  bound = L_dsm - C_mix + sqrt(2) R ( C_prior + sqrt(I_gen) ),  I_gen = L_hat^2 h sum_k beta(t_k) / (2m)

Variant "elbo" (docs/theory.md eq. 2.6): the same information-theoretic argument applied to the
negative ELBO, a loss comparable across T, schedules and t_min, with the generator's information
measured by Girsanov's theorem step by step against the data-free reference score:

  bound = NELBO_train + sqrt(2) R sqrt(I_gir),  I_gir = h sum_k beta(t_k) E||s_theta - s_ref||^2 / (2m)

Variant "elbo-split" (docs/theory.md eq. 2.8) measures the generator's information about each
training point against a model trained without it: the training set is split in two halves, a
reference model is trained on each, and for the points of one half the Girsanov KL is taken
between the model and the reference trained on the other half:

  bound = NELBO_train + sqrt(2) R (1/m) sum_i sqrt(KL_i),  KL_i = 1/2 h sum_k beta(t_k) E||s_theta - s_ref(i)||^2

Variant "elbo-encoder" adds the paper's encoder terms to "elbo": NELBO_train - C_mix +
sqrt(2) R (C_prior + sqrt(I_gir)).

Nothing here runs a model: ``bound_tuner.evaluation.diffusion_bound`` does that, and
``bound_tuner.maths.bounds.variants`` calls ``assemble_diffusion_bound`` on what it measured.
"""

from __future__ import annotations

import math

import torch

from bound_tuner.maths.bounds.kfold import CV_Z, Z95
from bound_tuner.maths.bounds.mixture import mixture_kl
from bound_tuner.maths.bounds.report import BoundReport
from bound_tuner.maths.sde import Schedule, prior_kl, time_grid

L_ESTIMATORS = ("path-mean", "path-max")
#: the bound variants of docs/theory.md; "paper" is the formula of arXiv 2506.00849 as published
VARIANTS = ("elbo-kfold", "paper", "elbo", "elbo-split", "elbo-encoder")
DEFAULT_VARIANT = "elbo-kfold"  # docs/theory.md 2.11 and 7: the one rule for every regime
#: the ways to set R besides a number (docs/theory.md section 3)
R_SOURCES = ("estimate", "data")
#: the cross-fitted scale of the K-fold references (docs/theory.md eq. 2.11), "elbo-kfold" only
CV_R_SOURCE = "cv"
#: R when the user gives none: the paper's Swiss-roll value for "paper", the cross-fitted scale
#: for "elbo-kfold", else the data's scale
DEFAULT_R: dict[str, float | str] = {
    "elbo-kfold": CV_R_SOURCE,
    "paper": 5.0,
    "elbo": "data",
    "elbo-split": "data",
    "elbo-encoder": "data",
}
#: variants that train reference models on the two halves of the training set
SPLIT_VARIANTS = ("elbo-split",)
#: variants that train K-fold references (docs/theory.md 2.9-2.11)
FOLD_VARIANTS = ("elbo-kfold",)
#: the chance that a sample's training mean falls below its population mean by more than the
#: information form's sample term allows (docs/theory.md eq. 2.11b)
SAMPLE_DELTA = 0.05

#: variants with the paper's encoder terms C_mix and C_prior
ENCODER_VARIANTS = ("paper", "elbo-encoder")


def check_variant(variant: str) -> str:
    if variant not in VARIANTS:
        raise ValueError(f"unknown bound variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    return variant


def prior_kl_sqrt(x: torch.Tensor, *, alpha: float, sigma2: float) -> float:
    """C_prior = (1/m) sum_i sqrt(KL(E_T(x_i) || pi))  (docs/theory.md eq. 2.1)."""
    return float(prior_kl(x, alpha=alpha, sigma2=sigma2).clamp(min=0).sqrt().mean())


def step_weights(
    schedule: Schedule, *, T: float, n_steps: int, t_min: float = 1e-3
) -> torch.Tensor:
    """h beta(t_k) on the generator's grid t_k (float64): the weights of every per-step sum."""
    grid = time_grid(T, n_steps, t_min=t_min)
    return schedule.beta(grid).double() * ((T - t_min) / n_steps)


def beta_integral(schedule: Schedule, *, T: float, n_steps: int, t_min: float = 1e-3) -> float:
    """h sum_k beta(t_k) on the generator's grid: the Riemann sum of int_{t_min}^T beta = B(T)-B(t_min)."""
    return float(step_weights(schedule, T=T, n_steps=n_steps, t_min=t_min).sum())


def generator_info(
    l_hat: float, schedule: Schedule, *, T: float, m: int, n_steps: int, t_min: float = 1e-3
) -> float:
    """I_gen = L_hat^2 h sum_k beta(t_k) / (2 m), on the generator's Euler-Maruyama grid (eq. 2.3)."""
    return l_hat**2 * beta_integral(schedule, T=T, n_steps=n_steps, t_min=t_min) / (2 * m)


def girsanov_info(
    ref_sq_dev: torch.Tensor, schedule: Schedule, *, T: float, m: int, t_min: float = 1e-3
) -> float:
    """I_gir = h sum_k beta(t_k) mean_paths ||s_theta(y_k, t_k) - s_ref(y_k)||^2 / (2 m)  (eq. 2.4).

    ``ref_sq_dev`` [N, n] comes from the generator's paths (``GeneratorRun.ref_sq_dev``); its
    step-k mean estimates E||s_theta - s_ref||^2 under the generator's law, so the sum is
    Girsanov's KL between the generator's path law and the data-free reference's, over m.
    """
    return path_kl(ref_sq_dev, schedule, T=T, t_min=t_min) / m


def path_kl(
    ref_sq_dev: torch.Tensor, schedule: Schedule, *, T: float, t_min: float = 1e-3
) -> float:
    """Girsanov's KL between the generator's path law and a reference's (eq. 2.4 without 1/m):
    1/2 h sum_k beta(t_k) mean_paths ||s_theta(y_k, t_k) - s_ref(y_k, t_k)||^2, from [N, n]."""
    w = step_weights(schedule, T=T, n_steps=ref_sq_dev.shape[0], t_min=t_min)
    return 0.5 * float((w * ref_sq_dev.double().mean(dim=1)).sum())


def split_info(path_kls: list[float], fold_sizes: list[int]) -> float:
    """(1/m) sum_i sqrt(KL_i) (eq. 2.8): the points of fold j are measured against the reference
    trained on the other fold, whose path KL is ``path_kls[1 - j]`` (two folds)."""
    if len(path_kls) != 2 or len(fold_sizes) != 2:
        raise ValueError("split_info takes two folds and the path KL of each fold's reference")
    m = sum(fold_sizes)
    return (
        fold_sizes[0] * math.sqrt(max(path_kls[1], 0.0))
        + fold_sizes[1] * math.sqrt(max(path_kls[0], 0.0))
    ) / m


def l_hat_from_norms(norms: torch.Tensor, *, estimator: str = "path-mean") -> float:
    """L_hat from score norms [N steps, n paths]: max over steps of the mean (or max) over paths."""
    if estimator == "path-mean":
        return float(norms.mean(dim=1).max())
    if estimator == "path-max":
        return float(norms.max())
    raise ValueError(f"unknown L estimator {estimator!r}; choose one of {', '.join(L_ESTIMATORS)}")


def estimate_R(per_sample_losses: torch.Tensor) -> float:
    """An estimate of the sub-Gaussian scale R: half the range of the per-sample losses.

    A variable in [a, b] is (b-a)/2 sub-Gaussian (Hoeffding's lemma); the range is taken from the
    training losses, so this is an estimate, not a guarantee (docs/theory.md, section 3).
    """
    v = per_sample_losses.double()
    return float((v.max() - v.min()) / 2)


def reference_R(x: torch.Tensor) -> float:
    """R from the data alone: half the range over the training points of the per-sample negative
    log-likelihood of the data-free model N(0, I), ||x||^2/2 + const (docs/theory.md section 3).

    Hoeffding's scale of that model's loss on the sample; the same for every trial on the same
    data, so it adds no trial-to-trial noise to a ranking."""
    return estimate_R(0.5 * x.reshape(x.shape[0], -1).double().pow(2).sum(dim=1))


def encoder_terms(
    x: torch.Tensor, schedule: Schedule, *, T: float, mc_samples: int = 1, seed: int = 0
) -> dict[str, float]:
    """The model-free terms at T: C_mix and C_prior (they depend on the data and alpha_T only)."""
    alpha = float(schedule.alpha(T))
    sigma2 = float(schedule.sigma2(T))
    return {
        "c_mix": mixture_kl(alpha * x, sigma2, mc_samples=mc_samples, seed=seed + 2),
        "c_prior": prior_kl_sqrt(x, alpha=alpha, sigma2=sigma2),
    }


def assemble_diffusion_bound(
    *,
    variant: str = "paper",
    train_loss: float,
    i_gen: float,
    R: float,
    c_mix: float = 0.0,
    c_prior: float = 0.0,
    settings: dict | None = None,
) -> BoundReport:
    """Combine a variant's terms into the total and its signed contributions.

    ``train_loss`` is the variant's empirical term (the sigma^2-weighted denoising loss for
    "paper", the negative ELBO for the others) and ``i_gen`` its generator information (I_gen,
    I_gir, or for "elbo-split" the mean square root (1/m) sum_i sqrt(KL_i)). The encoder terms
    enter for ENCODER_VARIANTS only.
    """
    check_variant(variant)
    k = math.sqrt(2.0) * R
    gen = k * math.sqrt(max(i_gen, 0.0))
    if variant == "elbo-split":
        # i_gen is (1/m) sum_i sqrt(KL_i) here: already a mean of square roots
        terms = {"train_nelbo": train_loss, "split_info": i_gen}
        contributions = {"train_nelbo": train_loss, "split_info": k * i_gen}
    elif variant == "elbo":
        terms = {"train_nelbo": train_loss, "generator_info": i_gen}
        contributions = {"train_nelbo": train_loss, "generator_info": gen}
    else:
        empirical = "train_loss" if variant == "paper" else "train_nelbo"
        terms = {
            empirical: train_loss,
            "encoder_mixture_kl": c_mix,
            "prior_kl_sqrt": c_prior,
            "generator_info": i_gen,
        }
        contributions = {
            empirical: train_loss,
            "encoder_mixture_kl": -c_mix,
            "prior_kl_sqrt": k * c_prior,
            "generator_info": gen,
        }
    total = sum(contributions.values())
    return BoundReport("diffusion", total, terms, contributions, dict(settings or {}))


def sample_deviation(m: int, *, delta: float = SAMPLE_DELTA) -> float:
    """sqrt(ln(1/delta) / m): times sqrt(2) R, the amount by which the mean of m independent
    R-sub-Gaussian losses falls below its expectation with probability at most delta
    (Chernoff; docs/theory.md eq. 2.11b)."""
    return math.sqrt(math.log(1.0 / delta) / m) if delta > 0 else 0.0


def certified_value(
    *,
    train_nelbo: float,
    cv_nelbo: float,
    cv_se: float,
    refs_train_nelbo: float | None,
    z: float = CV_Z,
) -> float:
    """The value of eq. 2.11 for a model and its references at one step:
    max(NELBO_cv + (NELBO_train - NELBO_refs) + z se_cv, NELBO_train) (no shift without
    ``refs_train_nelbo``). z = 2 for one step; ``kfold.checkpoint_z`` when the step is the
    smallest of several (certified early stopping, eq. 2.12)."""
    shift = 0.0 if refs_train_nelbo is None else train_nelbo - refs_train_nelbo
    return max(cv_nelbo + shift + z * cv_se, train_nelbo)


def assemble_kfold_bound(
    *,
    train_nelbo: float,
    c_fold: float,
    R: float,
    cv_nelbo: float,
    cv_se: float,
    m: int,
    delta: float = SAMPLE_DELTA,
    train_mc_se: float = 0.0,
    refs_train_nelbo: float | None = None,
    z: float = CV_Z,
    settings: dict | None = None,
    kind: str = "diffusion",
) -> BoundReport:
    """The "elbo-kfold" bound (docs/theory.md eq. 2.11): the cross-fitted upper bound on the
    expected population NELBO from the K-fold references,

      max(NELBO_cv + shift + z se_cv, NELBO_train),   shift = NELBO_train - NELBO_refs

    (``refs_train_nelbo``, NELBO_refs, is the references' NELBO on their own training points, so
    NELBO_cv - NELBO_refs is the references' generalization gap, moved onto the model's own fit:
    a model that fits its points worse or better than its references fit theirs is taken to be
    as much worse or better out of sample, eq. 2.10b; None: no shift). z se_cv (z = 2) cover the
    cross-fitted mean's sampling and Monte Carlo error, so the value is also the 95% certificate
    ``total_upper95`` (eq. 2.11b). The information form of the same references (eq. 2.9),

      NELBO_train + sqrt(2) R C_fold + 1.645 mc_se,

    is recorded beside it (``extras["info_bound"]``; terms ``fold_info`` and ``mc_margin``) and
    does not enter the value: it fell below the held-out NELBO where the cross-fitted form did
    not and, for VAEs, is looser by orders of magnitude (docs/theory.md 2.11 and 7.1). ``z``
    replaces the 2 of the margin when the step was chosen among several (eq. 2.12).
    ``extras`` also keep ``cv_floor`` (1 where the training NELBO floored the value). ``kind``
    names the model of the report (the VAE bound of docs/theory.md 5.4 uses the same assembly);
    ``m`` and ``delta`` give the information form's sample term (``info_upper95``)."""
    k = math.sqrt(2.0) * R
    mc_margin = Z95 * train_mc_se
    info = train_nelbo + k * c_fold + mc_margin
    # never below the model's own training NELBO: a references' gap below zero (unseen points
    # fit better than seen ones) says nothing of the model's (theory.md 2.11)
    shift = 0.0 if refs_train_nelbo is None else train_nelbo - refs_train_nelbo
    cv = certified_value(
        train_nelbo=train_nelbo,
        cv_nelbo=cv_nelbo,
        cv_se=cv_se,
        refs_train_nelbo=refs_train_nelbo,
        z=z,
    )
    terms = {
        "train_nelbo": train_nelbo,
        "fold_info": c_fold,
        "cv_nelbo": cv_nelbo,
        "cv_shift": shift,
        "cv_margin": z * cv_se,
        "mc_margin": mc_margin,
    }
    contributions = {
        "cv_nelbo": cv_nelbo,
        "cv_shift": shift,
        "cv_margin": cv - cv_nelbo - shift,  # the floor, where it binds, is part of the margin
    }
    extras = {
        "info_bound": info,
        "info_upper95": info + k * sample_deviation(m, delta=delta),
        "cv_bound": cv,
        "cv_se": cv_se,
        "cv_floor": 1.0 if cv_nelbo + shift + z * cv_se < train_nelbo else 0.0,
        "cv_z": z,
        "total_upper95": cv,
    }
    return BoundReport(kind, cv, terms, contributions, dict(settings or {}), extras)
