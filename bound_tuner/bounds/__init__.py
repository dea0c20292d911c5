"""The bounds as pure tensor functions (no Optuna, no model runs here; see bound_tuner.evaluate)."""

from ..sde import prior_kl
from .diffusion import (
    DEFAULT_R,
    DEFAULT_VARIANT,
    L_ESTIMATORS,
    R_SOURCES,
    SPLIT_VARIANTS,
    VARIANTS,
    assemble_diffusion_bound,
    beta_integral,
    encoder_terms,
    estimate_R,
    generator_info,
    girsanov_info,
    l_hat_from_norms,
    path_kl,
    prior_kl_sqrt,
    reference_R,
    split_info,
)
from .mixture import mixture_kl, mixture_kl_broadcast
from .report import BoundReport

__all__ = [
    "BoundReport",
    "DEFAULT_R",
    "DEFAULT_VARIANT",
    "L_ESTIMATORS",
    "R_SOURCES",
    "SPLIT_VARIANTS",
    "VARIANTS",
    "assemble_diffusion_bound",
    "beta_integral",
    "encoder_terms",
    "estimate_R",
    "generator_info",
    "girsanov_info",
    "l_hat_from_norms",
    "mixture_kl",
    "path_kl",
    "split_info",
    "mixture_kl_broadcast",
    "prior_kl",
    "prior_kl_sqrt",
    "reference_R",
]
