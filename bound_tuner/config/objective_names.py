"""The values a study may optimize, defined once: each name's direction, label and unit, and how
it is read from what a trial already stores.

A study optimizes the bound alone by default. ``[study] objectives = ["fit", "generalization",
"train_seconds"]`` (``run_study(..., objectives=[...])`` in Python) makes it an Optuna
multi-objective study with two or three of:

  bound           the bound's total (its ``bound.total`` user attr), nats per training point
  fit             the bound's empirical term: the training NELBO (``bound.train_nelbo``), the
                  paper variant's denoising loss L_dsm (``bound.train_loss``), or a paper-variant
                  VAE's reconstruction term REC (``bound.rec``), nats per training point
  generalization  bound − fit: the part of the value above the training fit, nats per training
                  point; for "elbo-kfold" (the default) the references' generalization gap plus
                  its margin, max(NELBO_cv − NELBO_refs + 2 se_cv, 0), for the other variants
                  the signed contributions of the information terms
  train_seconds   wall time of the trial's training and scoring (user attr ``train_seconds``)
  parameters      the trial's model size, in trainable parameters (user attr ``parameters``)
  heldout.NAME    a held-out metric of validation mode (``heldout.sample_kl``, ...): for
                  benchmarks only, never a default, and refused without validation

All of them are minimized. ``[study] constraints = { train_seconds = 60 }`` keeps trials within a
budget: a trial whose value exceeds it is infeasible (``constraint_values``; the sampler records
it and optuna-dashboard's Pareto front shows it). No torch here: ``bound-tuner --help`` reads it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

TRAIN_SECONDS_ATTR = "train_seconds"  # trial user attr: wall time of training and scoring
PARAMETERS_ATTR = "parameters"  # trial user attr: trainable parameters of the trial's model
HELDOUT_PREFIX = "heldout."
#: held-out metrics of validation mode (bound_tuner.evaluation.heldout.heldout_metrics, the VAE's test
#: terms), all lower-is-better; their standard errors are not objectives
HELDOUT_METRICS = (
    "sample_kl",
    "test_kl",
    "neg_elbo",
    "denoising_loss",
    "bits_per_dim",
    "pixel_fd",
    "heldout_loss",
    "test_neg_elbo",
    "test_rec",
    "test_kld",
)
#: the bound's empirical term, in the order looked for (ELBO variants, "paper", a paper VAE)
FIT_TERMS = ("train_nelbo", "train_loss", "rec")
DEFAULT_OBJECTIVES = ("bound",)
MAX_OBJECTIVES = 3


@dataclass(frozen=True)
class Objective:
    """One value a study may optimize."""

    name: str
    direction: str  # "minimize" or "maximize", as Optuna spells it
    label: str  # the metric name optuna-dashboard shows
    unit: str
    help: str  # its definition, as docs/tradeoffs.md's table gives it


OBJECTIVES: dict[str, Objective] = {
    o.name: o
    for o in (
        Objective(
            "bound",
            "minimize",
            "generalization bound",
            "nats per training point",
            "the bound's total, the single objective by default (`bound.total`)",
        ),
        Objective(
            "fit",
            "minimize",
            "training fit",
            "nats per training point",
            "the bound's empirical term: the training NELBO (`bound.train_nelbo`); L_dsm for "
            "the `paper` variant, REC for a `paper`-variant VAE",
        ),
        Objective(
            "generalization",
            "minimize",
            "generalization term",
            "nats per training point",
            "bound − fit, the part of the value above the training fit: for `elbo-kfold` "
            "the references' generalization gap plus its margin, max(NELBO_cv − NELBO_refs + "
            "2 se_cv, 0), the bound never being below the training NELBO (`bound.cv_z` "
            "standard errors instead of 2 where the kept step was chosen among checkpoints); "
            "for the other "
            "variants the signed contributions of the information terms (√2 R · √I_gir for "
            "`elbo`)",
        ),
        Objective(
            "train_seconds",
            "minimize",
            "train seconds",
            "seconds",
            "wall time of the trial's training and scoring, K-fold references included (user "
            "attr `train_seconds`)",
        ),
        Objective(
            "parameters",
            "minimize",
            "parameters",
            "parameters",
            "the trial's model size (user attr `parameters`)",
        ),
    )
}


def objective(name: str) -> Objective:
    """The definition of an objective name (a held-out metric included)."""
    if name in OBJECTIVES:
        return OBJECTIVES[name]
    metric = name[len(HELDOUT_PREFIX) :]
    return Objective(name, "minimize", f"held-out {metric}", "", "a held-out metric (validation)")


def problem(names: Sequence[str], *, validation: bool) -> str | None:
    """Why ``names`` cannot be a study's objectives (one line, with the mend), else None."""
    choices = ", ".join(f'"{n}"' for n in OBJECTIVES)
    if not isinstance(names, (list, tuple)) or not names:
        return f'must be a list of objective names, e.g. ["fit", "generalization"]; choose from {choices}'
    if len(names) > MAX_OBJECTIVES:
        return f"has {len(names)} names; give one, two or three of {choices}"
    for n in names:
        if not isinstance(n, str):
            return f'has {n!r}; give names such as "fit" (choose from {choices})'
        if n.startswith(HELDOUT_PREFIX):
            metric = n[len(HELDOUT_PREFIX) :]
            if metric not in HELDOUT_METRICS:
                return f"has {n!r}, an unknown held-out metric; choose from " + ", ".join(
                    HELDOUT_PREFIX + m for m in HELDOUT_METRICS
                )
            if not validation:
                return (
                    f"has {n!r}: held-out metrics exist in validation mode only (for benchmarks); "
                    "set study.validation = true (or run with --validate), or drop it"
                )
        elif n not in OBJECTIVES:
            return f"has unknown {n!r}; choose from {choices} (or heldout.NAME with validation)"
    if len(set(names)) < len(names):
        return "names an objective twice; give each once"
    return None


def constraints_problem(
    constraints: Mapping[str, Any], names: Sequence[str], *, validation: bool
) -> str | None:
    """Why ``constraints`` ({objective name: largest allowed value}) cannot be used, else None."""
    for key, limit in constraints.items():
        bad = problem([key], validation=validation)
        if bad is not None:
            return f"{key}: {bad.replace('has ', 'names ', 1)}"
        if (
            isinstance(limit, bool)
            or not isinstance(limit, (int, float))
            or not math.isfinite(limit)
        ):
            return f"{key} = {limit!r} must be a finite number (the largest allowed value)"
    return None


def directions(names: Sequence[str]) -> list[str]:
    """The Optuna directions of ``names`` (``optuna.create_study(directions=...)``)."""
    return [objective(n).direction for n in names]


def metric_names(names: Sequence[str]) -> list[str]:
    """The labels optuna-dashboard shows for ``names`` (``study.set_metric_names``)."""
    return [objective(n).label for n in names]


def fit_term(attrs: Mapping[str, Any]) -> str | None:
    """The bound's empirical term among a trial's user attrs (``FIT_TERMS``), else None."""
    return next((t for t in FIT_TERMS if f"bound.{t}" in attrs), None)


def value_of(name: str, attrs: Mapping[str, Any]) -> float | None:
    """The value of objective ``name`` from a trial's user attrs; None where it is missing."""

    def number(key: str) -> float | None:
        v = attrs.get(key)
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None

    if name == "bound":
        return number("bound.total")
    if name in ("fit", "generalization"):
        term = fit_term(attrs)
        fit = number(f"bound.{term}") if term else None
        if name == "fit" or fit is None:
            return fit
        total = number("bound.total")
        return None if total is None else total - fit
    if name == "train_seconds":
        return number(TRAIN_SECONDS_ATTR)
    if name == "parameters":
        return number(PARAMETERS_ATTR)
    return number(name)  # heldout.NAME


def values_of(names: Sequence[str], attrs: Mapping[str, Any]) -> tuple[float | None, ...]:
    return tuple(value_of(n, attrs) for n in names)


def constraint_values(constraints: Mapping[str, float], attrs: Mapping[str, Any]) -> list[float]:
    """Optuna's constraint values (feasible at or below 0): each value minus its budget; a
    missing value counts as infeasible (+inf would be refused by Optuna: 1e300 instead)."""
    out = []
    for key, limit in constraints.items():
        v = value_of(key, attrs)
        out.append(1e300 if v is None or not math.isfinite(v) else v - float(limit))
    return out


def constraints_func(constraints: Mapping[str, float]) -> Callable[[Any], list[float]]:
    """A sampler's ``constraints_func`` for ``constraints``: it reads the frozen trial's user
    attrs, so every value it checks is one the objective stored."""
    limits = dict(constraints)

    def func(trial: Any) -> list[float]:
        return constraint_values(limits, trial.user_attrs)

    return func


def is_multi(study_or_trial: Any) -> bool:
    """Whether a study (or a trial's study) has more than one objective; False for a trial
    without a study (``optuna.trial.FixedTrial``)."""
    study = study_or_trial
    if not hasattr(study, "directions"):
        study = getattr(study_or_trial, "study", None)
    return study is not None and len(study.directions) > 1


def bound_value(trial: Any) -> float | None:
    """A frozen trial's bound: its value in a single-objective study, else its ``bound.total``
    user attr (a pruned trial's value is its last partial bound)."""
    values = trial.values
    if values is not None and len(values) == 1:
        return values[0]
    return value_of("bound", trial.user_attrs)


def record_cost(trial: Any, model: Any, seconds: float) -> None:
    """Store a trial's ``train_seconds`` and ``parameters`` user attrs (the objectives call it
    once the bound is computed, before any artifact is written)."""
    trial.set_user_attr(TRAIN_SECONDS_ATTR, float(seconds))
    trial.set_user_attr(PARAMETERS_ATTR, int(sum(p.numel() for p in model.parameters())))


class ObjectiveValues:
    """An objective that returns the values of ``names`` (``value_of``) from what the wrapped
    objective stored in the trial's user attrs, for an Optuna study with
    ``directions=directions(names)``.

    ``DiffusionObjective`` and ``VAEObjective`` return the bound; wrapped, they serve a
    multi-objective study::

        objective = ObjectiveValues(DiffusionObjective(data, search=...), ["fit", "generalization"])
        study = optuna.create_study(directions=directions(objective.names))

    A trial whose objective failed (a NaN value, with its ``fail_reason``) or that lacks one of
    the values fails with a ``fail_reason``. Attributes of the wrapped objective (``pack``,
    ``packer``) are passed through.
    """

    def __init__(
        self, inner: Callable[[Any], float], names: Sequence[str], *, validation: bool = True
    ):
        bad = problem(list(names), validation=validation)
        if bad is not None:
            raise ValueError(f"objectives {bad}")
        self.inner = inner
        self.names = tuple(names)

    def __getattr__(self, attr: str) -> Any:
        if attr == "inner":  # not set yet (unpickling): no recursion
            raise AttributeError(attr)
        return getattr(self.inner, attr)

    def __call__(self, trial: Any) -> float | tuple[float, ...]:
        value = self.inner(trial)
        failed = (math.nan,) * len(self.names) if len(self.names) > 1 else math.nan
        if value is None or not math.isfinite(value):
            return failed  # the inner objective said why (fail_reason)
        values = values_of(self.names, trial.user_attrs)
        missing = [n for n, v in zip(self.names, values) if v is None or not math.isfinite(v)]
        if missing:
            trial.set_user_attr(
                "fail_reason", f"objective {missing[0]!r} has no finite value for this trial"
            )
            return failed
        return values if len(values) > 1 else values[0]
