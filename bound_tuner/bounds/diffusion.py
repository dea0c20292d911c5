"""The diffusion-model bound of bound-spec.md 1.3, term by term.

  bound(T) = L_train - C_mix + sqrt(2) R ( C_prior + sqrt(I_gen) )

Each term is a pure function of tensors; ``diffusion_bound`` runs the model where a term needs it
(the evaluation pass for L_train, the generator paths for L_hat) and assembles a BoundReport.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..sampling import generate, time_grid
from ..sde import Schedule
from ..training import evaluate_train_loss
from .mixture import mixture_kl
from .report import BoundReport

L_ESTIMATORS = ("path-mean", "path-max")
#: the bound variants of docs/theory.md; "paper" is the formula of arXiv 2506.00849 as published
VARIANTS = ("paper", "elbo", "elbo-encoder")
DEFAULT_VARIANT = "paper"


def prior_kl(x: torch.Tensor, *, alpha: float, sigma2: float) -> torch.Tensor:
    """KL(N(alpha x_i, sigma2 I) || N(0, I)) per point, shape [m] (closed form, float64).

    KL_i = 1/2 (alpha^2 ||x_i||^2 + d (sigma2 - 1 - ln sigma2)).
    """
    x = x.reshape(x.shape[0], -1).double()
    d = x.shape[1]
    alpha, sigma2 = float(alpha), float(sigma2)
    if not (0 < sigma2 <= 1):
        raise ValueError(f"sigma2={sigma2} must lie in (0, 1]")
    return 0.5 * (alpha**2 * (x * x).sum(dim=1) + d * (sigma2 - 1.0 - math.log(sigma2)))


def prior_kl_sqrt(x: torch.Tensor, *, alpha: float, sigma2: float) -> float:
    """C_prior = (1/m) sum_i sqrt(KL(E_T(x_i) || pi))."""
    return float(prior_kl(x, alpha=alpha, sigma2=sigma2).clamp(min=0).sqrt().mean())


def beta_integral(schedule: Schedule, *, T: float, n_steps: int, t_min: float = 1e-3) -> float:
    """h sum_k beta(t_k) on the generator's grid: the Riemann sum of int_{t_min}^T beta = B(T)-B(t_min)."""
    grid = time_grid(T, n_steps, t_min=t_min)
    return float(schedule.beta(grid).sum()) * (T - t_min) / n_steps


def generator_info(
    l_hat: float, schedule: Schedule, *, T: float, m: int, n_steps: int, t_min: float = 1e-3
) -> float:
    """I_gen = L_hat^2 h sum_k beta(t_k) / (2 m), on the generator's Euler-Maruyama grid."""
    return l_hat**2 * beta_integral(schedule, T=T, n_steps=n_steps, t_min=t_min) / (2 * m)


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
    training losses, so this is an estimate, not a guarantee.
    """
    v = per_sample_losses.double()
    return float((v.max() - v.min()) / 2)


def assemble_diffusion_bound(
    *,
    train_loss: float,
    c_mix: float,
    c_prior: float,
    i_gen: float,
    R: float,
    settings: dict,
) -> BoundReport:
    """Combine the terms into the total and its signed contributions."""
    k = math.sqrt(2.0) * R
    contributions = {
        "train_loss": train_loss,
        "encoder_mixture_kl": -c_mix,
        "prior_kl_sqrt": k * c_prior,
        "generator_info": k * math.sqrt(max(i_gen, 0.0)),
    }
    total = sum(contributions.values())
    terms = {
        "train_loss": train_loss,
        "encoder_mixture_kl": c_mix,
        "prior_kl_sqrt": c_prior,
        "generator_info": i_gen,
    }
    return BoundReport("diffusion", total, terms, contributions, settings)


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


def model_terms(
    model: nn.Module,
    x: torch.Tensor,
    schedule: Schedule,
    *,
    T: float,
    l_estimator: str = "path-mean",
    n_steps: int = 1000,
    n_paths: int = 256,
    train_draws: int = 64,
    t_min: float = 1e-3,
    seed: int = 0,
) -> dict[str, float]:
    """The model's terms at T: L_train (evaluation pass), L_hat (generator paths), I_gen, R estimate."""
    per_sample = evaluate_train_loss(
        model, x, schedule, T=T, draws=train_draws, t_min=t_min, seed=seed + 1
    )
    run = generate(
        model,
        schedule,
        T=T,
        n=n_paths,
        shape=tuple(x.shape[1:]),
        n_steps=n_steps,
        t_min=t_min,
        generator=torch.Generator().manual_seed(seed + 3),
        device=x.device,
    )
    l_hat = l_hat_from_norms(run.score_norms, estimator=l_estimator)
    return {
        "train_loss": float(per_sample.mean()),
        "L_hat": l_hat,
        "i_gen": generator_info(l_hat, schedule, T=T, m=x.shape[0], n_steps=n_steps, t_min=t_min),
        "R_estimate": estimate_R(per_sample),
    }


def diffusion_bound(
    model: nn.Module,
    x: torch.Tensor,
    schedule: Schedule,
    *,
    T: float,
    R: float | None = None,
    l_estimator: str = "path-mean",
    n_steps: int = 1000,
    n_paths: int = 256,
    mc_samples: int = 1,
    train_draws: int = 64,
    t_min: float = 1e-3,
    seed: int = 0,
) -> BoundReport:
    """The full bound of bound-spec.md 1.3 for a trained eps-predicting score model on data x.

    ``R=None`` uses ``estimate_R`` on the per-sample training losses (settings say R_source).
    """
    T = schedule.check_T(T, t_min=t_min)
    if l_estimator not in L_ESTIMATORS:
        raise ValueError(f"unknown L estimator {l_estimator!r}; choose one of {L_ESTIMATORS}")
    enc = encoder_terms(x, schedule, T=T, mc_samples=mc_samples, seed=seed)
    mt = model_terms(
        model,
        x,
        schedule,
        T=T,
        l_estimator=l_estimator,
        n_steps=n_steps,
        n_paths=n_paths,
        train_draws=train_draws,
        t_min=t_min,
        seed=seed,
    )
    settings = {
        "T": T,
        "schedule": schedule.name,
        **{f"schedule.{k}": v for k, v in schedule.params().items()},
        "R": float(R) if R is not None else mt["R_estimate"],
        "R_source": "user" if R is not None else "estimate",
        "R_estimate": mt["R_estimate"],
        "L_estimator": l_estimator,
        "L_hat": mt["L_hat"],
        "m": x.shape[0],
        "d": x[0].numel(),
        "N": n_steps,
        "k": mc_samples,
        "n_paths": n_paths,
        "t_min": t_min,
        "alpha_T": float(schedule.alpha(T)),
        "sigma2_T": float(schedule.sigma2(T)),
    }
    return assemble_diffusion_bound(
        train_loss=mt["train_loss"],
        c_mix=enc["c_mix"],
        c_prior=enc["c_prior"],
        i_gen=mt["i_gen"],
        R=settings["R"],
        settings=settings,
    )
