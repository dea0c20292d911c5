"""A spec + a storage URL -> its Optuna study (created or resumed): sampler, pruner, directions and
the spec fingerprint that guards a resumed study against a changed spec."""

from __future__ import annotations

import hashlib
import json
import warnings

import optuna

from bound_tuner.config.fingerprint import fingerprint, fingerprint_changes
from bound_tuner.config.objective_names import constraints_func, directions, metric_names
from bound_tuner.config.schema import SpecError, StudySpec
from bound_tuner.config.space import grid_space
from bound_tuner.storage.database import (
    STUDY_ARTIFACTS_ATTR,
    make_storage,
    redact,
    resolve_url,
)

METRIC_NAME = metric_names(["bound"])[0]  # "generalization bound"


SPEC_ATTR = "bound_tuner.spec"  # study user attr: the fingerprint of the spec that created it


ARTIFACTS_ATTR = STUDY_ARTIFACTS_ATTR  # study user attr: absolute artifact folder of its runs


SPEC_CHANGED_ATTR = "spec.changed"  # trial user attr: {key: [old, new]} under allow_changed_spec


_UNSET = object()


def sampler_seed(base: int | None, worker_index: int | None, existing: int = 0) -> int | None:
    """The sampler seed of one worker of a run: the spec's seed for worker 0 of a study run from
    scratch (same spec, same proposals), else a seed derived from it, the worker index and the
    number of trials the study had when the run started, so that workers do not propose alike
    and a resumed study continues its search instead of replaying its first proposals. None
    (an unnumbered worker, or no seed) draws one from the OS. (The grid sampler keeps the
    spec's seed everywhere: see ``open_study``.)"""
    if worker_index is None or base is None:
        return None
    if worker_index == 0 and existing == 0:
        return base
    tag = f"{base}:worker{worker_index}" + (f":trials{existing}" if existing else "")
    h = hashlib.blake2b(tag.encode(), digest_size=4).digest()
    return int.from_bytes(h, "little") & 0x7FFFFFFF


def make_sampler(
    spec: StudySpec, *, seed: int | None | object = _UNSET
) -> optuna.samplers.BaseSampler:
    """The spec's sampler, seeded with ``seed`` (default: [sampler] seed, else the study seed).

    TPE and NSGA-II take the spec's [study] constraints as Optuna's ``constraints_func``
    (``bound_tuner.config.objective_names.constraints_func``: each budget checked against the value
    the objective stored in a user attr). Optuna 5 marks constraints_func deprecated in favour
    of ``Trial.set_constraint``, but optuna-dashboard (0.21) draws the feasibility of a Pareto
    front only from the ``constraints`` list that constraints_func writes."""
    cfg = spec.sampler
    if seed is _UNSET:
        seed = cfg.get("seed", spec.seed)
    kind = cfg["type"]
    limits = {"constraints_func": constraints_func(spec.constraints)} if spec.constraints else {}
    if kind == "tpe":
        # packed trials run concurrently: the constant liar keeps them from all proposing alike
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            warnings.simplefilter("ignore", FutureWarning)  # constraints_func (see above)
            return optuna.samplers.TPESampler(
                seed=seed,
                n_startup_trials=cfg.get("n_startup_trials", 10),
                constant_liar=spec.training.get("pack", 1) > 1,
                **limits,
            )
    if kind == "nsga2":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # constraints_func (see above)
            return optuna.samplers.NSGAIISampler(
                seed=seed, population_size=cfg.get("population_size", 50), **limits
            )
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if kind == "grid":
        return optuna.samplers.GridSampler(grid_space(spec.search), seed=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.BruteForceSampler(seed=seed)


def make_pruner(spec: StudySpec) -> optuna.pruners.BasePruner:
    cfg = spec.pruner
    kind = cfg["type"]
    if kind == "none":
        return optuna.pruners.NopPruner()
    if kind == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=cfg.get("n_startup_trials", 4),
            n_warmup_steps=cfg.get("n_warmup_steps", 0),
        )
    if kind == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner()
    return optuna.pruners.HyperbandPruner()


def open_study(
    spec: StudySpec,
    storage: str | None = None,
    *,
    worker_index: int | None = 0,
    existing_trials: int | None = None,
    allow_changed_spec: bool = False,
    artifact_dir: str | None = None,
    store: optuna.storages.BaseStorage | None = None,
) -> optuna.Study:
    """Create the spec's study in the storage, or load it if it exists (resuming).

    A new study records the spec's fingerprint (``bound_tuner.config.fingerprint.fingerprint``:
    data, fixed settings, search space, bound settings) in its user attr ``bound_tuner.spec``. An
    existing one is refused with a SpecError naming the changed keys if the spec differs, unless
    ``allow_changed_spec`` (see ``spec_changes``). ``artifact_dir``, when given, is recorded as
    the study's artifact folder (user attr ``bound_tuner.artifacts``; export and sample look
    there). ``store``, when given, is the Optuna storage already made for ``storage`` (a run's,
    with its heartbeat: ``execution.plan.open_with_heartbeat``); else a plain one is made.

    The sampler is seeded by ``sampler_seed`` from the spec's seed, ``worker_index`` and the
    trials the study already has (``existing_trials``, counted here when None).
    """
    if store is None:
        store = make_storage(storage)
    study = optuna.create_study(
        storage=store,
        study_name=spec.name,
        directions=directions(spec.objectives),
        load_if_exists=True,
        sampler=optuna.samplers.RandomSampler(),  # replaced below, once the trials are counted
        pruner=make_pruner(spec),
    )
    _check_objectives(study, spec, storage)
    changes = spec_changes(study, spec)
    if changes and not allow_changed_spec:
        shown = "; ".join(f"{k} {_show(a)} -> {_show(b)}" for k, (a, b) in changes.items())
        raise SpecError(
            f"study {spec.name!r} in {redact(resolve_url(storage))} was created from another "
            f"spec ({shown}); give this spec its own study (--study-name NAME, or a new [study] "
            "name), or continue the old study anyway with --allow-changed-spec "
            "(run_study(allow_changed_spec=True); its new trials record what changed)"
        )
    attrs = study.user_attrs
    if SPEC_ATTR not in attrs:  # a new study (or one made before fingerprints existed)
        study.set_user_attr(SPEC_ATTR, _plain(fingerprint(spec)))
    if artifact_dir is not None and attrs.get(ARTIFACTS_ATTR) != artifact_dir:
        study.set_user_attr(ARTIFACTS_ATTR, artifact_dir)
    if study.metric_names is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(metric_names(spec.objectives))
    if existing_trials is None:
        existing_trials = len(study.get_trials(deepcopy=False))
    base = spec.sampler.get("seed", spec.seed)
    if spec.sampler["type"] == "grid":
        # GridSampler shuffles the grid by its seed and gives trial n the n-th point: every
        # worker and every resume must share that order to continue the grid, never repeat it
        seed = base
    else:
        seed = sampler_seed(base, worker_index, existing_trials)
    study.sampler = make_sampler(spec, seed=seed)
    return study


def _check_objectives(study: optuna.Study, spec: StudySpec, storage: str | None) -> None:
    """Refuse a spec whose [study] objectives differ from those the study was created with
    (Optuna fixes a study's directions; --allow-changed-spec cannot change them)."""
    wanted = metric_names(spec.objectives)
    have = study.metric_names  # None: a new study (or one made before names were recorded)
    if have == wanted or (have is None and len(study.directions) == len(wanted)):
        return
    if have is None:
        have = [f"{len(study.directions)} unnamed objective(s)"]
    raise SpecError(
        f"study {spec.name!r} in {redact(resolve_url(storage))} optimizes "
        f"{', '.join(str(n) for n in have)}, but this spec asks for {', '.join(wanted)} "
        "([study] objectives); give this spec its own study (--study-name NAME, or a new "
        "[study] name)"
    )


def _plain(value):
    """``value`` as it comes back from a study's user attrs (JSON: tuples become lists)."""
    return json.loads(json.dumps(value))


def _show(value) -> str:
    return "(unset)" if value is None else json.dumps(value)


def spec_changes(study: optuna.Study, spec: StudySpec) -> dict[str, list]:
    """``{key: [recorded, now]}`` for each fingerprint key where ``spec`` differs from the spec
    the study was created from; empty if they agree or the study recorded none."""
    recorded = study.user_attrs.get(SPEC_ATTR)
    if not isinstance(recorded, dict):
        return {}
    return fingerprint_changes(recorded, _plain(fingerprint(spec)))
