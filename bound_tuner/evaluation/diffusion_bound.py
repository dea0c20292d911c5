"""The diffusion bound of a trained score model: its measured terms and its value.

The evaluation passes of the bound (the training NELBO on fixed draws, ``nelbo_terms``; with
K-fold references, their cross-fitting terms), one set of generator paths for every generator
term, and the encoder terms are measured by ``bound_terms`` (``bound_terms_members`` for K
models at once); ``diffusion_bound`` turns them into one variant's bound
(``bound_tuner.maths.bounds.variants.variant_report``). The final bound and the checkpoint
(partial) bound both go through here. The formulas are in docs/theory.md section 2;
``bound_tuner.maths.bounds`` holds the pure tensor functions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from bound_tuner.data.preprocess import LOG_BIN_VOLUME_PER_DIM, dequantize
from bound_tuner.evaluation.elbo import denoising_loss_pass, negative_elbo_members
from bound_tuner.maths.bounds.diffusion import (
    ENCODER_VARIANTS,
    FOLD_VARIANTS,
    L_ESTIMATORS,
    SPLIT_VARIANTS,
    check_variant,
    encoder_terms,
    generator_info,
    girsanov_info,
    l_hat_from_norms,
    path_kl,
    reference_R,
    split_info,
)
from bound_tuner.maths.bounds.kfold import CV_Z, fold_info, fold_terms
from bound_tuner.maths.bounds.kfold import fold_sizes as kfold_sizes
from bound_tuner.maths.bounds.report import BoundReport
from bound_tuner.maths.bounds.terms import BoundTerms, ElboEstimate
from bound_tuner.maths.bounds.variants import variant_report
from bound_tuner.maths.draws import generator_for
from bound_tuner.maths.metrics import memorized_share
from bound_tuner.maths.sde import Schedule
from bound_tuner.training.members import Members
from bound_tuner.training.sampling import generate_members, sample_scale

#: draws x training points of the bound's evaluation pass when none are given: the Monte Carlo
#: error of the training NELBO then hardly depends on m (200 points get 256 draws each)
DRAW_BUDGET = 51_200
DRAWS_RANGE = (64, 1024)


def draws_for(m: int, draws: int | None = None) -> int:
    """Draws per training point of the evaluation pass: ``draws`` when given, else
    DRAW_BUDGET / m within DRAWS_RANGE."""
    if draws is not None:
        return int(draws)
    lo, hi = DRAWS_RANGE
    return int(min(hi, max(lo, math.ceil(DRAW_BUDGET / max(m, 1)))))


def nelbo_terms(
    members: Members,
    x: torch.Tensor,
    *,
    T: Sequence[float],
    seeds: Sequence[int],
    draws: int,
    t_min: float = 1e-3,
    fold_refs: Members | None = None,
    folds: torch.Tensor | None = None,
) -> tuple[list[ElboEstimate], dict[str, float] | None]:
    """The evaluation passes of the ELBO variants: each member's per-point training NELBO and,
    with K-fold references (``fold_refs`` stacked, one model in ``members``), the cross-fitting
    terms of docs/theory.md 2.10-2.11 (``fold_terms``), every reference scored on the model's
    draws (common random numbers). The final bound and the certificate at each checkpoint of
    training (``along_training``) both come here, so a step's value is computed one way.

    Images (x of shape [m, C, H, W], bin centres in [-1, 1]) are scored as the discrete data they
    are: the NELBO of uniformly dequantized points plus d ln(256/2), an upper bound on -ln P(k) in
    nats per image (docs/theory.md 1.3), the units of held-out bits per dim times d ln 2."""
    x = x.to(members.device)
    x_eval, offset = x, 0.0
    if x.dim() == 4:  # images: the same dequantization for every model scored with these seeds
        x_eval = dequantize(x, generator=generator_for(x.device, seeds[0] + 5))
        offset = -x[0].numel() * LOG_BIN_VOLUME_PER_DIM
    nelbo = [
        ElboEstimate(e.per_point + offset, e.mc_var)
        for e in negative_elbo_members(
            members, x_eval, T=T, t_min=t_min, draws=draws, seeds=[s + 1 for s in seeds]
        )
    ]
    if fold_refs is None:
        return nelbo, None
    # each reference's NELBO of every point, on the model's draws (common random numbers)
    per_ref = negative_elbo_members(
        fold_refs,
        x_eval,
        T=[T[0]] * fold_refs.k,
        t_min=t_min,
        draws=draws,
        seeds=[seeds[0] + 1] * fold_refs.k,
    )
    fold = fold_terms(
        torch.stack([e.per_point for e in per_ref]) + offset,
        torch.stack([e.mc_var for e in per_ref]),
        folds,
    )
    return nelbo, fold


def bound_terms(
    model: nn.Module,
    x: torch.Tensor,
    schedule: Schedule,
    *,
    T: float,
    variants: tuple[str, ...] = ("paper",),
    l_estimator: str = "path-mean",
    n_steps: int = 1000,
    n_paths: int = 256,
    mc_samples: int = 1,
    train_draws: int = 64,
    t_min: float = 1e-3,
    seed: int = 0,
    encoder: dict[str, float] | None = None,
    split_models: Sequence[nn.Module] = (),
    fold_sizes: Sequence[int] = (),
    fold_models: Sequence[nn.Module] = (),
    folds: torch.Tensor | None = None,
) -> BoundTerms:
    """Run the model once for what ``variants`` need: the evaluation passes on fixed draws, one
    set of generator paths (every generator term comes from them) and the encoder terms.

    ``split_models`` are the two reference models of "elbo-split" (trained on the two halves of
    x, of sizes ``fold_sizes``; ``bound_tuner.training.diffusion.train_split_models``); ``fold_models``
    the K references of "elbo-kfold" with ``folds``, the fold of each point
    (``bound_tuner.training.diffusion.train_fold_models``)."""
    for v in variants:
        if v in SPLIT_VARIANTS and len(split_models) != 2:
            raise ValueError(f"variant {v!r} needs the two reference models; give split_models")
        if v in FOLD_VARIANTS and (not fold_models or folds is None):
            raise ValueError(f"variant {v!r} needs the K-fold references; give fold_models")
    T = schedule.check_T(T, t_min=t_min)
    dsm = None
    if "paper" in variants:
        dsm = denoising_loss_pass(
            model, x, schedule, T=T, draws=train_draws, t_min=t_min, seed=seed + 1
        )
    terms = bound_terms_members(
        Members.single(model, schedule),
        x,
        T=[T],
        seeds=[seed],
        variants=variants,
        l_estimator=l_estimator,
        n_steps=n_steps,
        n_paths=n_paths,
        mc_samples=mc_samples,
        train_draws=train_draws,
        t_min=t_min,
        encoders=None if encoder is None else [encoder],
        references=[Members.single(r, schedule) for r in split_models],
        fold_sizes=fold_sizes,
        fold_refs=Members.of_models(fold_models, [schedule] * len(fold_models))
        if fold_models
        else None,
        folds=folds,
    )[0]
    terms.dsm = dsm
    return terms


def bound_terms_members(
    members: Members,
    x: torch.Tensor,
    *,
    T: Sequence[float],
    seeds: Sequence[int],
    variants: tuple[str, ...] = ("elbo",),
    l_estimator: str = "path-mean",
    n_steps: int = 1000,
    n_paths: int = 256,
    mc_samples: int = 1,
    train_draws: int = 64,
    t_min: float = 1e-3,
    encoders: Sequence[dict[str, float]] | None = None,
    references: Sequence[Members] = (),
    fold_sizes: Sequence[int] = (),
    fold_refs: Members | None = None,
    folds: torch.Tensor | None = None,
) -> list[BoundTerms]:
    """``bound_terms`` of K models at once (``bound_tuner.training.members``): member j with its T[j],
    schedule and seeds[j]. The "paper" variant's denoising pass is left to ``bound_terms`` (its
    ``dsm`` is None here); split references and the K-fold references ``fold_refs`` (stacked,
    reference k trained without the points whose ``folds`` entry is k) need K = 1. The
    evaluation passes are ``nelbo_terms``'s (images as discrete data there)."""
    for v in variants:
        check_variant(v)
    if l_estimator not in L_ESTIMATORS:
        raise ValueError(f"unknown L estimator {l_estimator!r}; choose one of {L_ESTIMATORS}")
    x = x.to(members.device)
    m = x.shape[0]
    nelbo: list[ElboEstimate | None] = [None] * members.k
    fold = None
    if any(v != "paper" for v in variants):
        if fold_refs is not None and (members.k != 1 or folds is None):
            raise ValueError("K-fold references need a single model and the fold of each point")
        nelbo, fold = nelbo_terms(
            members,
            x,
            T=T,
            seeds=seeds,
            draws=train_draws,
            t_min=t_min,
            fold_refs=fold_refs,
            folds=folds,
        )
    runs = generate_members(
        members,
        T=T,
        n=n_paths,
        shape=tuple(x.shape[1:]),
        n_steps=n_steps,
        t_min=t_min,
        seeds=[s + 3 for s in seeds],
        references=(None, *references) + (() if fold_refs is None else (fold_refs,)),
    )
    r_data = reference_R(x)
    out = []
    for j, (run, schedule) in enumerate(zip(runs, members.schedules.schedules, strict=True)):
        Tj = T[j]
        l_hat = l_hat_from_norms(run.score_norms, estimator=l_estimator)
        split = None
        if references:
            kls = [path_kl(run.ref_sq_dev[1 + i], schedule, T=Tj, t_min=t_min) for i in range(2)]
            split = split_info(kls, list(fold_sizes))
        if fold is not None:
            first = 1 + len(references)
            kls = [
                path_kl(run.ref_sq_dev[first + i], schedule, T=Tj, t_min=t_min)
                for i in range(fold_refs.k)
            ]
            sizes = kfold_sizes(folds, fold_refs.k)
            fold.update(
                C_fold=fold_info(kls, sizes),
                folds=fold_refs.k,
                fold_kl_max=max(kls),
                memorized_share=memorized_share(run.samples, x),
            )
        encoder = encoders[j] if encoders is not None else None
        if encoder is None and any(v in ENCODER_VARIANTS for v in variants):
            encoder = encoder_terms(x, schedule, T=Tj, mc_samples=mc_samples, seed=seeds[j])
        settings = {
            "R_data": r_data,
            "T": Tj,
            "schedule": schedule.name,
            **{f"schedule.{k}": v for k, v in schedule.params().items()},
            "L_estimator": l_estimator,
            "m": m,
            "d": x[0].numel(),
            "N": n_steps,
            "k": mc_samples,
            "n_paths": n_paths,
            "train_draws": train_draws,
            "t_min": t_min,
            "alpha_T": float(schedule.alpha(Tj)),
            "sigma2_T": float(schedule.sigma2(Tj)),
            "sample_scale": sample_scale(run.samples, x),
        }
        out.append(
            BoundTerms(
                dsm=None,
                nelbo=nelbo[j],
                l_hat=l_hat,
                i_uniform=generator_info(l_hat, schedule, T=Tj, m=m, n_steps=n_steps, t_min=t_min),
                i_girsanov=girsanov_info(run.ref_sq_dev[0], schedule, T=Tj, m=m, t_min=t_min),
                encoder=encoder,
                settings=settings,
                split=split,
                fold=fold,
            )
        )
    return out


def diffusion_bound(
    model: nn.Module,
    x: torch.Tensor,
    schedule: Schedule,
    *,
    T: float,
    variant: str = "paper",
    R: float | str | None = None,
    cv_z: float = CV_Z,
    **kwargs,
) -> BoundReport:
    """One bound variant (docs/theory.md section 2) for a trained eps-predicting model on data x;
    ``kwargs`` are those of ``bound_terms`` (N, paths, draws, seed, precomputed encoder terms),
    ``cv_z`` is ``variant_report``'s."""
    terms = bound_terms(model, x, schedule, T=T, variants=(variant,), **kwargs)
    return variant_report(terms, variant=variant, R=R, cv_z=cv_z)
