"""bound_tuner: Optuna objectives scored by a generalization bound computed from training data.

The public names below are imported lazily, on first use, so ``import bound_tuner`` stays cheap
(no torch); so are the submodules (``bound_tuner.execution.pool.run_workers`` after a plain
``import bound_tuner``).
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

__version__ = "0.1.0"

# public name -> the module that defines it
_LAZY = {
    # specs and studies
    "load_spec": "bound_tuner.config.spec",
    "parse_spec": "bound_tuner.config.spec",
    "run_study": "bound_tuner.study",
    # data
    "load_dataset": "bound_tuner.data",
    "prepare_for": "bound_tuner.data",
    # objectives and the settings of one trial
    "DiffusionObjective": "bound_tuner.objectives.diffusion",
    "DiffusionConfig": "bound_tuner.training.config",
    "VAEObjective": "bound_tuner.objectives.vae",
    "VAEConfig": "bound_tuner.objectives.vae",
    # trained models, and models trained elsewhere
    "load_model": "bound_tuner.storage.trained",
    "score": "bound_tuner.evaluation.scoring",
    # bounds and their pieces
    "BoundReport": "bound_tuner.maths.bounds.report",
    "flat_attrs": "bound_tuner.maths.bounds.report",
    "diffusion_bound": "bound_tuner.evaluation.diffusion_bound",
    "vae_bound": "bound_tuner.evaluation.vae_bound",
    "mixture_kl": "bound_tuner.maths.bounds.mixture",
    "prior_kl": "bound_tuner.maths.sde",
    "get_schedule": "bound_tuner.maths.sde",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'bound_tuner' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
