"""One diffusion bound variant's value from its measured terms (docs/theory.md section 2).

``variant_report`` picks the variant's empirical loss, generator term and scale R from a
``BoundTerms`` and assembles the bound (``assemble_diffusion_bound``, or ``assemble_kfold_bound``
for "elbo-kfold", eq. 2.11). Nothing here runs a model: ``bound_tuner.evaluation.diffusion_bound``
measures the terms.
"""

from __future__ import annotations

import math

from bound_tuner.maths.bounds.diffusion import (
    CV_R_SOURCE,
    DEFAULT_R,
    FOLD_VARIANTS,
    R_SOURCES,
    SPLIT_VARIANTS,
    assemble_diffusion_bound,
    assemble_kfold_bound,
    check_variant,
    estimate_R,
)
from bound_tuner.maths.bounds.kfold import CV_Z, Z95
from bound_tuner.maths.bounds.report import BoundReport
from bound_tuner.maths.bounds.terms import BoundTerms


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
