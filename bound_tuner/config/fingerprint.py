"""The fingerprint of a study's definition: what defines its trials, as flat ``section.key``
entries, and the changes between two fingerprints (a resumed study's guard against a changed
spec, ``bound_tuner.objectives.studies``)."""

from __future__ import annotations

from typing import Any

from bound_tuner.config.schema import Param, StudySpec

# settings that change how a study runs, not what its trials are: left out of the fingerprint
_RUN_SETTINGS = frozenset(
    {
        "data.test_size",  # held-out points only; the training points do not depend on it
        "training.pack",
        "training.compile",
        "training.tf32",
        "bound.heldout_samples",  # validation mode's held-out metrics, never the objective
        "bound.heldout_steps",
    }
)


def _param_record(p: Param) -> Any:
    if p.choices is not None:
        return {"choices": list(p.choices)}
    if p.is_fixed:
        return p.fixed
    out: dict[str, Any] = {"low": p.low, "high": p.high}
    if p.log:
        out["log"] = True
    if p.step is not None:
        out["step"] = p.step
    return out


def fingerprint(spec: StudySpec) -> dict[str, Any]:
    """What defines a study's trials, as flat ``section.key`` entries of plain values: the
    model, the study seed, the data, the search space and the fixed [training] and [bound]
    settings. Not in it: n_trials, the sampler and pruner, keep_models, the storage, heartbeat,
    device, workers and packing, validation's held-out settings (``_RUN_SETTINGS``). Two specs
    with the same fingerprint train and score the same trials."""
    out: dict[str, Any] = {"study.model": spec.model, "study.seed": spec.seed}
    for section in ("data", "training", "bound"):
        for key, value in getattr(spec, section).items():
            out[f"{section}.{key}"] = list(value) if isinstance(value, tuple) else value
    for name, p in spec.search.items():
        out[f"search.{name}"] = _param_record(p)
    if spec.factory is not None:
        out["model.factory"] = spec.factory
    return {k: out[k] for k in sorted(out) if k not in _RUN_SETTINGS}


def fingerprint_changes(old: dict[str, Any], new: dict[str, Any]) -> dict[str, list]:
    """``{key: [old value, new value]}`` for every key whose value differs (None: absent)."""
    return {
        k: [old.get(k), new.get(k)] for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)
    }
