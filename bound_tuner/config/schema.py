"""The study spec's schema: its sections and keys with their types, the names and defaults
they take, ``Param`` (one [search] entry), ``StudySpec`` (a checked spec) and ``SpecError``.

The schema (every section optional except [study].name):

  [study]    name, model ("diffusion" | "vae"), n_trials, validation, seed, keep_models (the
             best trials whose trained weights are kept: a number, default 5, or "all"),
             max_consecutive_failures (trials in a row whose objective raised before a worker
             stops; default 5), objectives (["bound"] by default, or two or three of "bound",
             "fit", "generalization", "train_seconds", "parameters" and, with validation,
             "heldout.NAME": a multi-objective study, bound_tuner.config.objective_names), constraints
             ({ train_seconds = 60 }: the largest allowed value of each; tpe and nsga2 samplers)
  [data]     name, m (an integer; "all" for every image of an image set), seed, test_size
             (+ binarize, pad_to_32 for image sets), or for a user's own data path (a .npy,
             .npz, .csv or .pt file or a folder of images, relative to the spec file), m
             (default "all"), seed, test_fraction (default 0.2), image_size, fit, binarize
  [search]   parameter = fixed value | {low, high, log?, step?} | {choices=[...]} | {grid=[...]}
  [training] fixed training settings (steps, batch_size, checkpoints, t_min, epochs, ...;
             tf32 = false keeps float32 matmuls exact on CUDA; compile = true trains through
             torch.compile; pack = K trains K diffusion trials at once as one ensemble,
             bound_tuner.training.pack)
  [bound]    variant, R (a number, "estimate" or "data"), L_estimator, N, k, n_paths, train_draws,
             max_sample_scale (a trial whose samples reach that many times the data's largest
             norm fails),
             heldout_samples, heldout_steps (generator samples and steps of validation mode)
             (VAE: R or the paper's r, mc_samples, bound_subset)
  [sampler]  type ("tpe" | "random" | "grid" | "bruteforce" | "nsga2"), seed, n_startup_trials,
             population_size (nsga2)
  [pruner]   type ("median" | "none" | "successive_halving" | "hyperband"), n_startup_trials,
             n_warmup_steps (a multi-objective study is not pruned: type "none", its default)
  [storage]  heartbeat_interval, grace_period, outage_seconds (seconds; used with PostgreSQL or
             several workers; outage_seconds: how long a worker waits for a database server
             that went away)
  [model]    factory ("package.module:function": your own score network for a diffusion study,
             factory(config, data_shape) -> nn.Module; docs/own_models.md)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from bound_tuner.config.objective_names import DEFAULT_OBJECTIVES
from bound_tuner.config.settings import schema


class SpecError(ValueError):
    """A user error in a study spec; its message is one line naming the field and the mend."""


# parameters each model's objective understands, with their kind
DIFFUSION_PARAMS: dict[str, type] = {
    "T": float,
    "schedule": str,
    "beta_min": float,
    "beta_max": float,
    "beta_const": float,
    "cosine_s": float,
    "lam": float,
    "lr": float,
    "width": int,
    "layers": int,
    "channels": int,
    "steps": int,
    "batch_size": int,
}
VAE_PARAMS: dict[str, type] = {
    "beta": float,
    "lam": float,
    "latent": int,
    "lr": float,
    "epochs": int,
    "batch_size": int,
    "arch": str,
}
SECTIONS = {
    "study": {
        "name": str,
        "model": str,
        "n_trials": int,
        "validation": bool,
        "seed": int,
        "keep_models": (int, str),
        "max_consecutive_failures": int,
        "objectives": list,
        "constraints": dict,
    },
    "data": {
        "name": str,
        "path": str,
        "m": (int, str),
        "seed": int,
        "test_size": int,
        "test_fraction": float,
        "image_size": (int, list),
        "fit": str,
        "binarize": str,
        "pad_to_32": bool,
    },
    "training": schema("training"),  # bound_tuner.config.settings: every key and the field it sets
    "bound": schema("bound"),
    "sampler": {"type": str, "seed": int, "n_startup_trials": int, "population_size": int},
    "pruner": {"type": str, "n_startup_trials": int, "n_warmup_steps": int},
    "storage": {"heartbeat_interval": int, "grace_period": int, "outage_seconds": float},
    "model": {"factory": str},  # a user's own score network (bound_tuner.models.factory)
}
SAMPLERS = ("tpe", "random", "grid", "bruteforce", "nsga2")
CONSTRAINED_SAMPLERS = ("tpe", "nsga2")  # samplers that take Optuna's constraints_func
PRUNERS = ("median", "none", "successive_halving", "hyperband")
MODELS = ("diffusion", "vae")
SCHEDULE_PARAMS = {
    "beta_min": "linear",
    "beta_max": "linear",
    "beta_const": "constant",
    "cosine_s": "cosine",
}


# complete trials whose trained weights are kept as artifacts (the best ones by the bound)
DEFAULT_KEEP_MODELS = 5
# trials in a row whose objective raised (out of memory, a bug) before a worker stops
DEFAULT_MAX_CONSECUTIVE_FAILURES = 5


@dataclass
class Param:
    """One search-space entry: fixed, a numeric range, or a list of choices (grid)."""

    name: str
    kind: type
    fixed: Any = None
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: list | None = None

    @property
    def is_fixed(self) -> bool:
        return self.choices is None and self.low is None

    def values(self) -> list:
        """Every value this parameter may take where that is a finite list (fixed or choices)."""
        if self.choices is not None:
            return list(self.choices)
        if self.is_fixed:
            return [self.fixed]
        return [self.low, self.high]


@dataclass
class StudySpec:
    """A checked study spec (``bound_tuner.config.spec.parse_spec``, ``load_spec``)."""

    name: str
    model: str = "diffusion"
    n_trials: int = 20
    validation: bool = False
    seed: int = 0
    keep_models: int | None = DEFAULT_KEEP_MODELS  # None: every complete trial keeps its model
    max_consecutive_failures: int = DEFAULT_MAX_CONSECUTIVE_FAILURES
    objectives: tuple[str, ...] = DEFAULT_OBJECTIVES  # bound_tuner.config.objective_names
    constraints: dict[str, float] = field(default_factory=dict)  # {objective: largest value}
    data: dict[str, Any] = field(default_factory=dict)
    search: dict[str, Param] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    bound: dict[str, Any] = field(default_factory=dict)
    sampler: dict[str, Any] = field(default_factory=lambda: {"type": "tpe"})
    pruner: dict[str, Any] = field(default_factory=lambda: {"type": "median"})
    storage: dict[str, Any] = field(default_factory=dict)
    path: str | None = None
    factory: str | None = None  # [model] factory: "package.module:function" (None: built-in)
