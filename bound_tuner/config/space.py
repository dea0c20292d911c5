"""Search spaces: turn the [search] entries of a spec into trial.suggest_* calls."""

from __future__ import annotations

from typing import Any

import optuna

from bound_tuner.config.schema import SCHEDULE_PARAMS, Param


def suggest(trial: optuna.Trial, p: Param) -> Any:
    """Sample one parameter (fixed values are returned as they are, not recorded as params)."""
    if p.is_fixed:
        return p.fixed
    if p.choices is not None:
        return trial.suggest_categorical(p.name, p.choices)
    if p.kind is int:
        return trial.suggest_int(p.name, int(p.low), int(p.high), step=int(p.step or 1), log=p.log)
    return trial.suggest_float(p.name, float(p.low), float(p.high), step=p.step, log=p.log)


def sample_diffusion_params(trial: optuna.Trial, search: dict[str, Param]) -> dict[str, Any]:
    """Sample the diffusion search space; schedule parameters only for the schedule chosen."""
    out: dict[str, Any] = {}
    schedule = suggest(trial, search["schedule"]) if "schedule" in search else "linear"
    out["schedule"] = schedule
    sched_params = {}
    for name, p in search.items():
        if name == "schedule":
            continue
        if name in SCHEDULE_PARAMS:
            if SCHEDULE_PARAMS[name] == schedule:
                key = "s" if name == "cosine_s" else name
                sched_params[key] = suggest(trial, p)
            continue
        out[name] = suggest(trial, p)
    out["schedule_params"] = sched_params
    return out


def grid_space(search: dict[str, Param]) -> dict[str, list]:
    """The search space of a GridSampler: every non-fixed parameter with its list of values."""
    return {name: list(p.choices) for name, p in search.items() if p.choices is not None}
