"""What an objective hands to its hooks, the check that a bound can be a trial's value, and the
reports of a trial's certified value along training."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import optuna

from bound_tuner.config.objective_names import is_multi
from bound_tuner.maths.bounds.report import BoundReport
from bound_tuner.training.sampling import DIVERGED_SCALE

TrialHook = Callable[[optuna.Trial, Any], None]


def unusable(report: BoundReport, *, max_scale: float = DIVERGED_SCALE) -> str | None:
    """Why a trial's bound cannot be its value (a term overflowed, or the generator diverges at
    the bound's N steps: its samples reach more than ``max_scale`` times the data's largest
    norm, and a likelihood pick must not hand over unusable samples), else None."""
    if not math.isfinite(report.total):
        return f"bound is {report.total} (a term overflowed)"
    scale = report.settings.get("sample_scale", 0.0)
    if not scale <= max_scale:
        return (
            f"the generator diverges at N={report.settings['N']} steps (samples reach "
            f"{scale:.3g} times the data's largest norm, over [bound] max_sample_scale = "
            f"{max_scale:g}); raise [bound] N or search a smaller T"
        )
    return None


def certified_reporter(trial: optuna.Trial) -> Callable[[int, float], None] | None:
    """``report(step, value)`` of a lockstep trial (docs/theory.md 2.12; a VAE's step is its
    epoch): the value the trial would have if it ended at this step goes to ``trial.report``, so
    the pruner and the dashboard's intermediate values follow what the study optimizes; None
    where Optuna cannot prune (several objectives)."""
    if is_multi(trial):
        return None

    def report(step: int, value: float) -> None:
        if not math.isfinite(value):
            raise FloatingPointError(f"the certified value became {value} at step {step}")
        trial.report(value, step)
        if trial.should_prune():
            raise optuna.TrialPruned(f"pruned at step {step} with value {value:.4f}")

    return report
