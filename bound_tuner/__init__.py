"""bound_tuner: Optuna objectives scored by a generalization bound computed from training data.

Heavy pieces are imported lazily, so ``import bound_tuner`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "BoundReport": "bound_tuner.bounds.report",
    "diffusion_bound": "bound_tuner.evaluate",
    "mixture_kl": "bound_tuner.bounds.mixture",
    "prior_kl": "bound_tuner.sde",
    "vae_bound": "bound_tuner.bounds.vae",
    "get_schedule": "bound_tuner.sde",
    "load_dataset": "bound_tuner.data",
    "DiffusionObjective": "bound_tuner.objectives",
    "VAEObjective": "bound_tuner.objectives",
    "load_spec": "bound_tuner.spec",
    "create_study_from_spec": "bound_tuner.study",
    "run_study": "bound_tuner.study",
    "load_model": "bound_tuner.artifacts",
    "prepare_for": "bound_tuner.data",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'bound_tuner' has no attribute {name!r}")
