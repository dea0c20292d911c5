"""The VAE bounds of a trained VAE: its terms measured by running it, and the bound's value.

``vae_terms`` and ``vae_bound``: REC, KLD and MI over the training points and the bound (5.2) of
docs/theory.md section 5; ``point_nelbo``, ``decoder_kl`` and ``vae_kfold_bound``: each point's
negative ELBO, the decoders' KL and the default "elbo-kfold" bound (docs/theory.md 5.4). The
formulas, as pure tensor functions, are in ``bound_tuner.maths.bounds.vae``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from bound_tuner.maths.bounds.diffusion import R_SOURCES, assemble_kfold_bound
from bound_tuner.maths.bounds.kfold import CV_Z, fold_info, fold_sizes, fold_terms
from bound_tuner.maths.bounds.report import BoundReport
from bound_tuner.maths.bounds.vae import (
    KFOLD_MC_SAMPLES,
    PAPER_R_SMALL,
    PRIOR_DRAWS,
    VAETerms,
    assemble_vae_bound,
    bernoulli_kl,
    gaussian_kl,
    neg_log_bernoulli,
    r_to_R,
    resolve_vae_R,
)
from bound_tuner.maths.draws import generator_for
from bound_tuner.models import model_device
from bound_tuner.training.vae import vae_batch_terms

__all__ = ["decoder_kl", "point_nelbo", "vae_bound", "vae_kfold_bound", "vae_terms"]


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
    device = model_device(model)
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
    g = generator_for(model_device(model), seed)
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
        gt = generator_for(model_device(model), seed + 1)
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
    device = model_device(model)
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


def decoder_kl(model: nn.Module, reference: nn.Module, z: torch.Tensor) -> float:
    """KL between the generative laws of two VAEs with the same prior, p(z) p_theta(x|z) against
    p(z) p_ref(x|z): the mean over prior draws ``z`` of the decoders' Bernoulli KL (eq. 5.4b)."""
    was = model.training, reference.training
    model.eval()
    reference.eval()
    try:
        with torch.no_grad():
            z = z.to(model_device(model))
            kl = bernoulli_kl(model.decode(z), reference.decode(z.to(model_device(reference))))
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
    """The VAE's "elbo-kfold" bound on its population NELBO (docs/theory.md eq. 5.4, the
    cross-fitted form of eq. 2.11):

      max( NELBO_cv + (NELBO_train - NELBO_refs) + z se_cv ,  NELBO_train ),

    with reference k (``references[k]``, trained with the trial's settings, initialization and
    noise on the points outside fold k; ``folds`` holds each point's fold) measured on fold k's
    points for the cross-fitted NELBO_cv and its standard error se_cv, and on the points it
    trained on for NELBO_refs (``refs_train_nelbo``, eq. 2.10a). z = ``z`` (2; more when the
    epoch was chosen among C checkpoints, eq. 2.12). The value is also ``total_upper95``. The
    information form NELBO_train + sqrt(2) R_cv C_fold + 1.645 mc_se, with C_fold = (1/m) sum_k
    sqrt(n_k KL_k) from the decoders' KL against each reference on ``prior_draws`` prior draws
    (eq. 5.4b) and R_cv the sub-Gaussian scale of the cross-fitted NELBOs (eq. 2.11a), is
    recorded in ``extras["info_bound"]`` and is not part of the value. Every NELBO pass uses the
    same ``seed`` (common random numbers); the test pass, when ``test_x`` is given, fills the
    held-out extras (test_neg_elbo, test_rec, test_kld, heldout_loss), which are never part of
    the total."""
    K = len(references)
    m = int(train_x.shape[0])
    if folds.shape != (m,) or K < 2 or int(folds.max()) != K - 1:
        raise ValueError(
            f"need one fold index in [0, {K}) per training point and K >= 2 references"
        )
    device = model_device(model)
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
            generator=generator_for(model_device(ref), seed),
        )
    cv = fold_terms(per_ref, ref_var, folds)
    latent = int(model.latent)
    prior_z = torch.randn(prior_draws, latent, generator=torch.Generator().manual_seed(seed))
    kls = [decoder_kl(model, ref, prior_z) for ref in references]
    sizes = fold_sizes(folds, K)
    c_fold = fold_info(kls, sizes)
    train_nelbo = float(nelbo.mean())
    train_mc_se = float(mc_var.sum().sqrt()) / m
    refs_fit = cv["refs_train_nelbo"]  # eq. 2.10a: the shift of eq. 2.10b
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
        holdout_nelbo=cv["holdout_nelbo"],
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
