"""A checked spec with settings replaced from outside its file: ``run_study``'s objectives and
constraints, the --pack option; the result is checked like a spec."""

from __future__ import annotations

import dataclasses
from typing import Any

from bound_tuner.config.schema import DEFAULT_KEEP_MODELS, StudySpec
from bound_tuner.config.validate import check_objectives, check_values


def with_objectives(
    spec: StudySpec,
    *,
    objectives: list[str] | tuple[str, ...] | None = None,
    constraints: dict[str, float] | None = None,
) -> StudySpec:
    """The spec with [study] objectives and constraints replaced (``run_study``'s
    ``objectives=`` and ``constraints=``), checked like a spec. A spec made multi-objective this
    way is not pruned and keeps every complete trial's weights unless it set keep_models."""
    names = list(objectives if objectives is not None else spec.objectives)
    study: dict[str, Any] = {
        "objectives": names,
        "constraints": dict(constraints if constraints is not None else spec.constraints),
    }
    if not (len(names) > 1 and spec.keep_models == DEFAULT_KEEP_MODELS):
        study["keep_models"] = spec.keep_models  # kept as it is
    new = dataclasses.replace(spec, pruner=dict(spec.pruner))
    check_objectives(new, study, pruner_given=False, where=spec.path or "spec")
    return new


def with_pack(spec: StudySpec, pack: int) -> StudySpec:
    """The spec with [training] pack set to ``pack`` (the --pack option), checked like a spec."""
    new = dataclasses.replace(spec, training={**spec.training, "pack": pack})
    check_values(new, "--pack")
    return new
