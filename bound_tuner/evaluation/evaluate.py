"""Runs a trained score model to get what the bounds and the held-out metrics need.

The evaluation passes (the denoising loss and the negative ELBO on fixed draws), the generator
paths with their per-step statistics, and the assembly of a bound variant (``diffusion_bound``)
live here; the final bound and the checkpoint (partial) bound both go through
``diffusion_bound``. Held-out metrics (validation mode only, never the objective) are
``heldout_metrics``. The formulas are in docs/theory.md; ``bound_tuner.maths.bounds`` holds the pure
tensor functions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from bound_tuner.data.preprocess import LOG_BIN_VOLUME_PER_DIM, dequantize
from bound_tuner.maths.bounds.diffusion import (
    CV_R_SOURCE,
    DEFAULT_R,
    ENCODER_VARIANTS,
    FOLD_VARIANTS,
    L_ESTIMATORS,
    R_SOURCES,
    SPLIT_VARIANTS,
    assemble_diffusion_bound,
    assemble_kfold_bound,
    check_variant,
    encoder_terms,
    estimate_R,
    generator_info,
    girsanov_info,
    l_hat_from_norms,
    path_kl,
    reference_R,
    split_info,
)
from bound_tuner.maths.bounds.kfold import (
    CV_Z,
    Z95,
    cross_fitted,
    cv_summary,
    fold_info,
    holdout_fit,
    refs_own_fit,
)
from bound_tuner.maths.bounds.kfold import fold_sizes as kfold_sizes
from bound_tuner.maths.bounds.report import BoundReport
from bound_tuner.maths.draws import chunk_length, generator_for
from bound_tuner.maths.metrics import frechet_distance, kde_kl, knn_kl, memorized_share
from bound_tuner.maths.sde import Schedule, prior_kl
from bound_tuner.models import model_device
from bound_tuner.training.loop import denoising_terms
from bound_tuner.training.members import Members
from bound_tuner.training.sampling import generate, generate_members, sample_scale

#: data of at most this many dimensions get the k-NN sample KL (docs/theory.md, section 4)
SAMPLE_KL_MAX_DIM = 10
#: generator samples and steps of the held-out metrics when none are given: (points, images)
HELDOUT_DEFAULTS = {"points": (10_000, 1000), "images": (256, 100)}


#: draws x training points of the bound's evaluation pass when none are given: the Monte Carlo
#: error of the training NELBO then hardly depends on m (200 points get 256 draws each)
DRAW_BUDGET = 51_200
DRAWS_RANGE = (64, 1024)
#: data elements a member's forward of the ELBO pass takes at most (a chunk of draws of every
#: point at once for 2-D data, a few dozen images)
EVAL_ELEMS = 1 << 16


def draws_for(m: int, draws: int | None = None) -> int:
    """Draws per training point of the evaluation pass: ``draws`` when given, else
    DRAW_BUDGET / m within DRAWS_RANGE."""
    if draws is not None:
        return int(draws)
    lo, hi = DRAWS_RANGE
    return int(min(hi, max(lo, math.ceil(DRAW_BUDGET / max(m, 1)))))


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


@dataclass
class ElboEstimate:
    """Per-point negative ELBO (nats, float64, CPU) and the Monte Carlo variance of each mean."""

    per_point: torch.Tensor  # [n]
    mc_var: torch.Tensor  # [n]: variance of each per-point mean over its draws

    @property
    def mean(self) -> float:
        return float(self.per_point.mean())

    @property
    def mc_se(self) -> float:
        """Standard error of ``mean`` from the Monte Carlo draws alone (the points held fixed)."""
        return float(self.mc_var.sum().sqrt()) / self.per_point.numel()

    @property
    def se(self) -> float:
        """Standard error of ``mean`` as an estimate of the population mean (points and draws)."""
        n = self.per_point.numel()
        return float(self.per_point.std()) / math.sqrt(n) if n > 1 else math.inf


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


@dataclass
class BoundTerms:
    """The measured ingredients of every bound variant for one model (docs/theory.md section 2).

    ``dsm`` and ``nelbo`` are per-sample training losses (None when not measured), the rest are
    numbers: L_hat, the uniform generator information I_gen, the Girsanov one I_gir, the
    encoder terms C_mix and C_prior (None when not needed) and the split term (None without
    reference models). ``settings`` says how.
    """

    dsm: torch.Tensor | None
    nelbo: ElboEstimate | None
    l_hat: float
    i_uniform: float
    i_girsanov: float
    encoder: dict[str, float] | None
    settings: dict
    split: float | None = None  # (1/m) sum_i sqrt(KL_i) against the half-trained references
    fold: dict[str, float] | None = None  # the K-fold references' terms (``fold_terms``)


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


def variant_report(
    terms: BoundTerms, *, variant: str, R: float | str | None = None, cv_z: float = CV_Z
) -> BoundReport:
    """The bound of one variant from measured terms. ``R`` is a number, ``"estimate"``
    (``estimate_R`` on the per-sample values of the variant's empirical loss), ``"data"``
    (``reference_R`` of the training data) or None for the variant's default (``DEFAULT_R``);
    settings say which (R_source). ``cv_z``: the standard errors of "elbo-kfold"'s margin (2;
    more when the step was chosen among checkpoints, docs/theory.md eq. 2.12)."""
    check_variant(variant)
    needed = terms.dsm if variant == "paper" else terms.nelbo
    if (
        needed is None
        or (variant in SPLIT_VARIANTS and terms.split is None)
        or (variant in FOLD_VARIANTS and terms.fold is None)
    ):
        raise ValueError(f"the terms were measured without what variant {variant!r} needs")
    if variant == "paper":
        per_sample, mc_se, i_gen = terms.dsm, math.nan, terms.i_uniform
    else:
        per_sample, mc_se = terms.nelbo.per_point, terms.nelbo.mc_se
        i_gen = terms.split if variant in SPLIT_VARIANTS else terms.i_girsanov
    R_est = estimate_R(per_sample)
    if R is None:
        R = DEFAULT_R[variant]
    allowed = R_SOURCES + ((CV_R_SOURCE,) if variant in FOLD_VARIANTS else ())
    if isinstance(R, str) and R not in allowed:
        raise ValueError(f"R={R!r}: give a positive number or one of {', '.join(allowed)}")
    sources = {"estimate": R_est, "data": terms.settings["R_data"]}
    if terms.fold is not None:
        sources[CV_R_SOURCE] = terms.fold["R_cv"]
    r_value = sources[R] if isinstance(R, str) else float(R)
    settings = {
        "variant": variant,
        **terms.settings,
        "R": r_value,
        "R_source": R if isinstance(R, str) else "user",
        "R_estimate": R_est,
        "L_hat": terms.l_hat,
        "I_uniform": terms.i_uniform,
        "I_girsanov": terms.i_girsanov,
        "C_split": math.nan if terms.split is None else terms.split,
        "train_mc_se": mc_se,
    }
    if variant in FOLD_VARIANTS:
        fold = terms.fold
        settings.update({k: v for k, v in fold.items() if k not in ("cv_nelbo", "cv_se")})
        return assemble_kfold_bound(
            train_nelbo=float(per_sample.mean()),
            c_fold=fold["C_fold"],
            R=r_value,
            cv_nelbo=fold["cv_nelbo"],
            cv_se=fold["cv_se"],
            m=terms.settings["m"],
            train_mc_se=mc_se,
            refs_train_nelbo=fold["refs_train_nelbo"],
            z=cv_z,
            settings=settings,
        )
    enc = terms.encoder or {}
    report = assemble_diffusion_bound(
        variant=variant,
        train_loss=float(per_sample.mean()),
        i_gen=i_gen,
        R=r_value,
        c_mix=enc.get("c_mix", 0.0),
        c_prior=enc.get("c_prior", 0.0),
        settings=settings,
    )
    if math.isfinite(mc_se):  # the 95% certificate: the training NELBO's Monte Carlo error
        report.extras["total_upper95"] = report.total + Z95 * mc_se
    return report


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
