"""The bounds as pure tensor functions (no Optuna, no model runs here; see bound_tuner.evaluation).

Names are imported lazily, so that ``bound_tuner.maths.bounds.report`` loads without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "BoundReport": "bound_tuner.maths.bounds.report",
    "DEFAULT_R": "bound_tuner.maths.bounds.diffusion",
    "DEFAULT_VARIANT": "bound_tuner.maths.bounds.diffusion",
    "ENCODER_VARIANTS": "bound_tuner.maths.bounds.diffusion",
    "L_ESTIMATORS": "bound_tuner.maths.bounds.diffusion",
    "R_SOURCES": "bound_tuner.maths.bounds.diffusion",
    "SPLIT_VARIANTS": "bound_tuner.maths.bounds.diffusion",
    "VARIANTS": "bound_tuner.maths.bounds.diffusion",
    "assemble_diffusion_bound": "bound_tuner.maths.bounds.diffusion",
    "beta_integral": "bound_tuner.maths.bounds.diffusion",
    "encoder_terms": "bound_tuner.maths.bounds.diffusion",
    "estimate_R": "bound_tuner.maths.bounds.diffusion",
    "generator_info": "bound_tuner.maths.bounds.diffusion",
    "girsanov_info": "bound_tuner.maths.bounds.diffusion",
    "l_hat_from_norms": "bound_tuner.maths.bounds.diffusion",
    "mixture_kl": "bound_tuner.maths.bounds.mixture",
    "mixture_kl_broadcast": "bound_tuner.maths.bounds.mixture",
    "path_kl": "bound_tuner.maths.bounds.diffusion",
    "prior_kl": "bound_tuner.maths.sde",
    "prior_kl_sqrt": "bound_tuner.maths.bounds.diffusion",
    "reference_R": "bound_tuner.maths.bounds.diffusion",
    "split_info": "bound_tuner.maths.bounds.diffusion",
    "step_weights": "bound_tuner.maths.bounds.diffusion",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'bound_tuner.maths.bounds' has no attribute {name!r}")
