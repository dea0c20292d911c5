"""The bounds as pure tensor functions (no Optuna here)."""

from .diffusion import (
    L_ESTIMATORS,
    assemble_diffusion_bound,
    beta_integral,
    diffusion_bound,
    encoder_terms,
    estimate_R,
    generator_info,
    l_hat_from_norms,
    model_terms,
    prior_kl,
    prior_kl_sqrt,
)
from .mixture import mixture_kl, mixture_kl_broadcast
from .report import BoundReport

__all__ = [
    "BoundReport",
    "L_ESTIMATORS",
    "assemble_diffusion_bound",
    "beta_integral",
    "diffusion_bound",
    "encoder_terms",
    "estimate_R",
    "generator_info",
    "l_hat_from_norms",
    "model_terms",
    "mixture_kl",
    "mixture_kl_broadcast",
    "prior_kl",
    "prior_kl_sqrt",
]
