"""The VAE bound of docs/theory.md section 5, as pure tensor functions.

With encoder q(z|x) = N(mu(x), diag s^2(x)), decoder p_theta(x|z) (Bernoulli logits), prior
N(0, I) and the frozen initial decoder theta_0, in nats per sample summed over pixels:

  REC = (1/m) sum_i E_{z~q(z|x_i)} [ -ln p_theta(x_i|z) ]
  KLD = (1/m) sum_i KL(q(z|x_i) || N(0, I))                                   (closed form)
  MI  = (1/m) sum_i E_{z~q(z|x_i)} [ ln p_theta(x_i|z) - ln p_theta0(x_i|z) ]  (the same z)
  bound = REC + sqrt(2) R ( sqrt(KLD) + sqrt(MI / m) )                          (5.2)

R is the sub-Gaussian scale of the per-sample reconstruction loss (docs/theory.md section 5.1): a
number, ``"data"`` (``reference_vae_R``) or ``"estimate"`` (``estimate_R``, half the range of the
trial's own per-sample REC). The paper's form REC + (1 + r) sqrt(KLD) + (1 + r) sqrt(MI / m) is the
case sqrt(2) R = 1 + r (``r_to_R``); without R the paper's r = 1 is used, R = sqrt(2).

REC and MI are Monte Carlo estimates with ``mc_samples`` draws of z per point. ``-ln p(x|z)`` is
the binary cross-entropy with logits summed over pixels; for grey x in [0, 1] it is a
cross-entropy rather than a normalized likelihood.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from bound_tuner.maths.bounds.diffusion import R_SOURCES, assemble_kfold_bound, estimate_R
from bound_tuner.maths.bounds.kfold import (
    CV_Z,
    cross_fitted,
    cv_summary,
    fold_info,
    fold_sizes,
    holdout_fit,
    refs_own_fit,
)
from bound_tuner.maths.bounds.report import BoundReport
from bound_tuner.maths.draws import generator_for

__all__ = [
    "DEFAULT_VAE_VARIANT",
    "KFOLD_MC_SAMPLES",
    "PRIOR_DRAWS",
    "VAE_VARIANTS",
    "bernoulli_kl",
    "decoder_kl",
    "point_nelbo",
    "vae_kfold_bound",
    "MEASURED_R",
    "PAPER_R_SMALL",
    "VAETerms",
    "assemble_vae_bound",
    "gaussian_kl",
    "neg_log_bernoulli",
    "r_to_R",
    "reference_vae_R",
    "resolve_vae_R",
    "vae_batch_terms",
    "vae_bound",
    "vae_terms",
]

#: the paper's r (docs/theory.md section 5): bound = REC + (1 + r)(sqrt(KLD) + sqrt(MI / m))
PAPER_R_SMALL = 1.0
#: an empirical R (docs/theory.md section 5.2): the smallest round number that kept (5.2) above the
#: held-out loss at every epoch of every run measured there (they needed up to 9.11). Calibrated
#: on held-out data of those runs, so a measured scale, not a derived one.
MEASURED_R = 10.0

#: the VAE bounds: "elbo-kfold" (docs/theory.md 5.4, the default) bounds the population NELBO
#: from K-fold reference VAEs; "paper" is (5.2) with the R or r of the settings
VAE_VARIANTS = ("elbo-kfold", "paper")
DEFAULT_VAE_VARIANT = "elbo-kfold"
#: draws of z per point in the K-fold bound's NELBO passes (>= 2, so each point's Monte Carlo
#: variance is measured for the certificate)
KFOLD_MC_SAMPLES = 8
#: prior draws z ~ N(0, I) on which the decoders' KL of eq. 5.4 is averaged
PRIOR_DRAWS = 1024


class VAETerms(NamedTuple):
    """Averages over the m points, nats per sample (docs/theory.md section 5). ``mi`` is nan without theta_0.

    ``rec_min`` and ``rec_max`` are the smallest and largest per-point REC estimates (for R).
    """

    rec: float
    kld: float
    mi: float
    m: int
    rec_min: float = math.nan
    rec_max: float = math.nan


def r_to_R(r: float) -> float:
    """The R of (5.2) that gives the paper's coefficient 1 + r: R = (1 + r) / sqrt(2)."""
    if not (math.isfinite(r) and r >= 0):
        raise ValueError(f"r={r} must be a finite number >= 0 (the paper used r = 1)")
    return (1.0 + r) / math.sqrt(2.0)


def assemble_vae_bound(
    rec: float, kld: float, mi: float, *, m: int, R: float
) -> tuple[float, float, float]:
    """(total, KLD contribution, MI contribution) of (5.2) in docs/theory.md section 5.

    total = rec + sqrt(2) R sqrt(max(kld, 0)) + sqrt(2) R sqrt(max(mi, 0) / m). A negative MI
    estimate (Monte Carlo noise) contributes 0; a nan MI (no theta_0) makes the total nan.
    """
    if not (math.isfinite(R) and R > 0):
        raise ValueError(f"R={R} must be a positive finite number (or pass r, R = (1 + r)/sqrt(2))")
    if m < 1:
        raise ValueError(f"m={m} must be at least 1")
    scale = math.sqrt(2.0) * R
    c_kld = scale * math.sqrt(max(kld, 0.0))
    c_mi = scale * math.sqrt(max(mi, 0.0) / m) if not math.isnan(mi) else math.nan
    return rec + c_kld + c_mi, c_kld, c_mi


def reference_vae_R(x: torch.Tensor) -> float:
    """R from the data alone (docs/theory.md section 5.1): half the range over the training points
    of -ln p(x) under independent Bernoulli pixels with the training means (add-one smoothed).

    The same number for every trial on the same data; Hoeffding's scale of that model's loss.
    """
    x = x.reshape(x.shape[0], -1).double()
    if x.shape[0] < 2:
        raise ValueError("reference_vae_R needs at least 2 points")
    if (x < 0).any() or (x > 1).any():
        raise ValueError("reference_vae_R needs pixels in [0, 1]; binarize or rescale the images")
    p = (x.sum(dim=0) + 1.0) / (x.shape[0] + 2.0)
    nll = -(x * p.log() + (1.0 - x) * torch.log1p(-p)).sum(dim=1)
    return estimate_R(nll)


def resolve_vae_R(
    R: float | str | None,
    *,
    r: float = PAPER_R_SMALL,
    train_x: torch.Tensor | None = None,
    rec_range: tuple[float, float] | None = None,
) -> float:
    """The number R of (5.2) from a setting: a positive number, "data" (needs ``train_x``),
    "estimate" (needs ``rec_range``, the smallest and largest per-point REC) or None (the paper's
    r: R = (1 + r) / sqrt(2))."""
    if R is None:
        return r_to_R(r)
    if isinstance(R, str):
        if R == "data":
            if train_x is None:
                raise ValueError('R="data" needs the training points')
            return reference_vae_R(train_x)
        if R == "estimate":
            if rec_range is None:
                raise ValueError('R="estimate" needs the per-point REC range')
            return max(estimate_R(torch.tensor(rec_range, dtype=torch.float64)), 1e-12)
        raise ValueError(f'R={R!r}; give a positive number, "data" or "estimate"')
    R = float(R)
    if not (math.isfinite(R) and R > 0):
        raise ValueError(f'R={R} must be a positive number (or "data" or "estimate")')
    return R


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, diag exp(logvar)) || N(0, I)) per row [b], closed form."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=1)


def neg_log_bernoulli(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """-ln Bernoulli(x | sigmoid(logits)) summed over each row's values, [b]."""
    nll = nn.functional.binary_cross_entropy_with_logits(
        logits.reshape(logits.shape[0], -1), x.reshape(x.shape[0], -1), reduction="none"
    )
    return nll.sum(dim=1)


def vae_batch_terms(
    model: nn.Module,
    x: torch.Tensor,
    *,
    decoder0: nn.Module | None = None,
    mc_samples: int = 1,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-point REC, KLD and MI estimates [b] for one batch (differentiable; docs/theory.md section 5).

    ``model`` needs ``encode(x) -> (mu, logvar)`` and ``decode(z) -> logits``. The ``mc_samples``
    draws of z per point are shared by ln p_theta and ln p_theta0, so MI is exactly 0 when the
    decoder still equals ``decoder0``. MI is None when ``decoder0`` is None.
    """
    if mc_samples < 1:
        raise ValueError(f"mc_samples={mc_samples} must be >= 1")
    b = x.shape[0]
    mu, logvar = model.encode(x)
    kld = gaussian_kl(mu, logvar)
    eps = torch.randn(
        (mc_samples, *mu.shape), generator=generator, dtype=mu.dtype, device=mu.device
    )
    z = (mu + torch.exp(0.5 * logvar) * eps).reshape(mc_samples * b, -1)
    xr = x.reshape(1, b, -1).expand(mc_samples, b, -1).reshape(mc_samples * b, -1)
    nll = neg_log_bernoulli(model.decode(z), xr).reshape(mc_samples, b)
    rec = nll.mean(dim=0)
    mi = None
    if decoder0 is not None:
        nll0 = neg_log_bernoulli(decoder0(z), xr).reshape(mc_samples, b)
        mi = (nll0 - nll).mean(dim=0)  # ln p_theta - ln p_theta0
    return rec, kld, mi


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def vae_terms(
    model: nn.Module,
    x: torch.Tensor,
    *,
    decoder0: nn.Module | None,
    mc_samples: int = 1,
    batch_size: int = 1024,
    generator: torch.Generator | None = None,
) -> VAETerms:
    """REC, KLD and MI over all points of ``x`` (docs/theory.md section 5), in eval mode without gradients.

    Sums are kept in float64. MI is nan when ``decoder0`` is None.
    """
    if x.shape[0] < 1:
        raise ValueError("x has no points")
    device = _device(model)
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64)
    lo, hi = math.inf, -math.inf
    try:
        with torch.no_grad():
            for start in range(0, x.shape[0], batch_size):
                xb = x[start : start + batch_size].to(device)
                rec, kld, mi = vae_batch_terms(
                    model, xb, decoder0=decoder0, mc_samples=mc_samples, generator=generator
                )
                sums[0] += rec.double().sum().cpu()
                lo = min(lo, float(rec.min()))
                hi = max(hi, float(rec.max()))
                sums[1] += kld.double().sum().cpu()
                if mi is not None:
                    sums[2] += mi.double().sum().cpu()
    finally:
        model.train(was_training)
    m = x.shape[0]
    mi_mean = float(sums[2]) / m if decoder0 is not None else math.nan
    return VAETerms(float(sums[0]) / m, float(sums[1]) / m, mi_mean, m, lo, hi)


def vae_bound(
    model: nn.Module,
    train_x: torch.Tensor,
    *,
    decoder0: nn.Module,
    test_x: torch.Tensor | None = None,
    r: float = PAPER_R_SMALL,
    R: float | str | None = None,
    data_R: float | None = None,
    mc_samples: int = 1,
    seed: int = 0,
    batch_size: int = 1024,
) -> BoundReport:
    """The VAE bound REC + sqrt(2) R (sqrt(KLD) + sqrt(MI / m)) on the m training points, (5.2).

    docs/theory.md section 5. ``R`` is a number, "data" or "estimate" (``resolve_vae_R``); None
    takes the paper's form with ``r``: R = (1 + r) / sqrt(2), REC + (1 + r) sqrt(KLD) + (1 + r)
    sqrt(MI / m). ``data_R`` is the value of R = "data" computed once by a caller that evaluates
    a subset of its training points (``reference_vae_R`` of all of them); None computes it here. ``decoder0`` is the frozen decoder at initialization (``initial_decoder()`` of
    the models in ``bound_tuner.models.vae``). The estimate of MI can come out slightly negative
    by chance (a difference of two Monte Carlo averages); ``terms["mi"]`` keeps the raw estimate
    and the bound uses sqrt(max(MI, 0) / m). ``extras`` holds the encoder-only bound
    REC + sqrt(KLD) and, with ``test_x``, the held-out loss REC_test + sqrt(KLD_test), the test
    -ELBO REC_test + KLD_test and the test terms; they are never part of the total. Draws of z
    come from ``seed`` (the test pass from ``seed + 1``), so equal inputs give equal numbers.
    """
    r_value = r_to_R(r)  # checks r
    if isinstance(R, str) and R not in R_SOURCES:
        raise ValueError(f'R={R!r}; give a positive number, "data" or "estimate"')
    if decoder0 is None:
        raise ValueError("decoder0 is required: pass model.initial_decoder() (theta_0)")
    m = int(train_x.shape[0])
    d = int(train_x[0].numel())
    g = generator_for(_device(model), seed)
    t = vae_terms(
        model, train_x, decoder0=decoder0, mc_samples=mc_samples, batch_size=batch_size, generator=g
    )
    rec, kld, mi = t.rec, t.kld, t.mi
    if R is None:
        R_value = r_value
    elif R == "data" and data_R is not None:
        R_value = resolve_vae_R(float(data_R))
    else:
        R_value = resolve_vae_R(R, train_x=train_x, rec_range=(t.rec_min, t.rec_max))
    total, c_kld, c_mi = assemble_vae_bound(rec, kld, mi, m=m, R=R_value)
    extras = {
        "encoder_only_bound": rec + math.sqrt(max(kld, 0.0)),
        "train_neg_elbo": rec + kld,
        "rec_half_range": (t.rec_max - t.rec_min) / 2.0,
    }
    if test_x is not None:
        gt = generator_for(_device(model), seed + 1)
        rec_t, kld_t, *_ = vae_terms(
            model, test_x, decoder0=None, mc_samples=mc_samples, batch_size=batch_size, generator=gt
        )
        extras.update(
            heldout_loss=rec_t + math.sqrt(max(kld_t, 0.0)),
            test_neg_elbo=rec_t + kld_t,
            test_rec=rec_t,
            test_kld=kld_t,
            test_size=float(test_x.shape[0]),
        )
    settings: dict[str, float | int | str] = {
        "R": R_value,
        "R_source": "r" if R is None else (R if isinstance(R, str) else "number"),
        "m": m,
        "d": d,
        "mc_samples": mc_samples,
        "latent": int(getattr(model, "latent", -1)),
        "seed": seed,
    }
    if R is None:
        settings["r"] = r
    return BoundReport(
        kind="vae",
        total=total,
        terms={"rec": rec, "kld": kld, "mi": mi},
        contributions={"rec": rec, "kld": c_kld, "mi": c_mi},
        settings=settings,
        extras=extras,
    )


# --------------------------------------------------------------------- K-fold bound (5.4)


def point_nelbo(
    model: nn.Module,
    x: torch.Tensor,
    *,
    mc_samples: int = KFOLD_MC_SAMPLES,
    batch_size: int = 1024,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each point's negative ELBO REC_i + KLD_i [m] (float64, CPU; docs/theory.md eq. 5.4a), the
    Monte Carlo variance of its REC average over the ``mc_samples`` draws of z [m], and its
    KLD_i [m]; in eval mode without gradients."""
    if mc_samples < 2:
        raise ValueError(
            f"mc_samples={mc_samples}: the K-fold bound needs at least 2 draws per point"
        )
    device = _device(model)
    was_training = model.training
    model.eval()
    nelbo, var, klds = [], [], []
    try:
        with torch.no_grad():
            for start in range(0, x.shape[0], batch_size):
                xb = x[start : start + batch_size].to(device)
                b = xb.shape[0]
                mu, logvar = model.encode(xb)
                eps = torch.randn(
                    (mc_samples, *mu.shape), generator=generator, dtype=mu.dtype, device=device
                )
                z = (mu + torch.exp(0.5 * logvar) * eps).reshape(mc_samples * b, -1)
                xr = xb.reshape(1, b, -1).expand(mc_samples, b, -1).reshape(mc_samples * b, -1)
                nll = neg_log_bernoulli(model.decode(z), xr).reshape(mc_samples, b).double()
                kld = gaussian_kl(mu, logvar).double()
                nelbo.append((nll.mean(dim=0) + kld).cpu())
                var.append((nll.var(dim=0) / mc_samples).cpu())
                klds.append(kld.cpu())
    finally:
        model.train(was_training)
    return torch.cat(nelbo), torch.cat(var), torch.cat(klds)


def bernoulli_kl(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """KL(Bernoulli(sigmoid(logits_p)) || Bernoulli(sigmoid(logits_q))) summed over each row [b],
    in closed form from log-sigmoids (stable for large logits)."""
    lp, lq = logits_p.reshape(logits_p.shape[0], -1), logits_q.reshape(logits_q.shape[0], -1)
    p = torch.sigmoid(lp)
    ls = nn.functional.logsigmoid
    kl = p * (ls(lp) - ls(lq)) + (1.0 - p) * (ls(-lp) - ls(-lq))
    return kl.sum(dim=1)


def decoder_kl(model: nn.Module, reference: nn.Module, z: torch.Tensor) -> float:
    """KL between the generative laws of two VAEs with the same prior, p(z) p_theta(x|z) against
    p(z) p_ref(x|z): the mean over prior draws ``z`` of the decoders' Bernoulli KL (eq. 5.4b)."""
    was = model.training, reference.training
    model.eval()
    reference.eval()
    try:
        with torch.no_grad():
            z = z.to(_device(model))
            kl = bernoulli_kl(model.decode(z), reference.decode(z.to(_device(reference))))
    finally:
        model.train(was[0])
        reference.train(was[1])
    return float(kl.double().mean())


def vae_kfold_bound(
    model: nn.Module,
    references: list[nn.Module],
    train_x: torch.Tensor,
    folds: torch.Tensor,
    *,
    test_x: torch.Tensor | None = None,
    mc_samples: int = KFOLD_MC_SAMPLES,
    prior_draws: int = PRIOR_DRAWS,
    seed: int = 0,
    batch_size: int = 1024,
    z: float = CV_Z,
) -> BoundReport:
    """The VAE's "elbo-kfold" bound on its population NELBO (docs/theory.md eq. 5.4):

      min( NELBO_train + sqrt(2) R_cv C_fold ,  max(NELBO_cv + 2 se_cv, NELBO_train) ),

    with reference k (``references[k]``, trained with the trial's settings, initialization and
    noise on the points outside fold k; ``folds`` holds each point's fold) measured on fold k's
    points for the cross-fitted NELBO and against the model, through the decoders' KL on
    ``prior_draws`` prior draws, for C_fold = (1/m) sum_k sqrt(n_k KL_k). R_cv is the
    sub-Gaussian scale of the cross-fitted NELBOs (eq. 2.11a). Every NELBO pass uses the same
    ``seed`` (common random numbers); the test pass, when ``test_x`` is given, fills the held-out
    extras (test_neg_elbo, test_rec, test_kld, heldout_loss), which are never part of the total.
    ``z`` replaces the 2 of the margin when the epoch was chosen among C checkpoints (eq. 2.12)."""
    K = len(references)
    m = int(train_x.shape[0])
    if folds.shape != (m,) or K < 2 or int(folds.max()) != K - 1:
        raise ValueError(
            f"need one fold index in [0, {K}) per training point and K >= 2 references"
        )
    device = _device(model)
    nelbo, mc_var, kld = point_nelbo(
        model,
        train_x,
        mc_samples=mc_samples,
        batch_size=batch_size,
        generator=generator_for(device, seed),
    )
    per_ref = torch.empty(K, m, dtype=torch.float64)
    ref_var = torch.empty(K, m, dtype=torch.float64)
    for k, ref in enumerate(references):
        per_ref[k], ref_var[k], _ = point_nelbo(
            ref,
            train_x,
            mc_samples=mc_samples,
            batch_size=batch_size,
            generator=generator_for(_device(ref), seed),
        )
    cv = cv_summary(cross_fitted(per_ref, folds), cross_fitted(ref_var, folds))
    latent = int(model.latent)
    prior_z = torch.randn(prior_draws, latent, generator=torch.Generator().manual_seed(seed))
    kls = [decoder_kl(model, ref, prior_z) for ref in references]
    sizes = fold_sizes(folds, K)
    c_fold = fold_info(kls, sizes)
    train_nelbo = float(nelbo.mean())
    train_mc_se = float(mc_var.sum().sqrt()) / m
    refs_fit = refs_own_fit(per_ref, folds)  # eq. 2.10a: the shift of eq. 2.10b
    settings = {
        "variant": "elbo-kfold",
        "R": cv["R_cv"],
        "R_source": "cv",
        "m": m,
        "d": int(train_x[0].numel()),
        "folds": K,
        "mc_samples": mc_samples,
        "prior_draws": prior_draws,
        "latent": latent,
        "seed": seed,
    }
    report = assemble_kfold_bound(
        train_nelbo=train_nelbo,
        c_fold=c_fold,
        R=cv["R_cv"],
        cv_nelbo=cv["cv_nelbo"],
        cv_se=cv["cv_se"],
        m=m,
        train_mc_se=train_mc_se,
        refs_train_nelbo=refs_fit,
        z=z,
        settings=settings,
        kind="vae",
    )
    report.extras.update(
        train_rec=float((nelbo - kld).mean()),
        train_kld=float(kld.mean()),
        train_mc_se=train_mc_se,
        R_cv_std=cv["R_cv_std"],
        R_cv_half_range=cv["R_cv_half_range"],
        holdout_nelbo=holdout_fit(per_ref, folds),
        refs_train_nelbo=refs_fit,
        decoder_kl_max=max(kls),
    )
    if test_x is not None:
        t_nelbo, _, t_kld = point_nelbo(
            model,
            test_x,
            mc_samples=mc_samples,
            batch_size=batch_size,
            generator=generator_for(device, seed + 1),
        )
        t_rec, t_kl = float((t_nelbo - t_kld).mean()), float(t_kld.mean())
        report.extras.update(
            heldout_loss=t_rec + math.sqrt(max(t_kl, 0.0)),
            test_neg_elbo=float(t_nelbo.mean()),
            test_neg_elbo_se=float(t_nelbo.std()) / math.sqrt(t_nelbo.numel()),
            test_rec=t_rec,
            test_kld=t_kl,
            test_size=float(test_x.shape[0]),
        )
    return report
