"""Study runner: a StudySpec + a storage URL -> an Optuna study, created or resumed, and run.

Everything a user can get wrong (spec, data, storage) is checked before the study is created, so a
bad input leaves nothing behind in the database.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings

import optuna

from .data import DataSplit, load_dataset
from .device import DEFAULT_TF32, resolve_device, set_tf32
from .experiment import DiffusionConfig
from .objective_names import ObjectiveValues, constraints_func, directions, metric_names
from .settings import config_kwargs
from .space import grid_space
from .spec import SpecError, StudySpec, fingerprint, fingerprint_changes, with_objectives
from .storage import (
    DEFAULT_HEARTBEAT_INTERVAL,
    STUDY_ARTIFACTS_ATTR,
    default_grace_period,
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
    (``bound_tuner.objective_names.constraints_func``: each budget checked against the value
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


def load_data(spec: StudySpec) -> DataSplit:
    """The spec's data set, prepared for its model (``bound_tuner.data.prepare_for``: the same
    data a Python user gets from ``load_dataset(..., model=...)``); a problem with it becomes a
    SpecError naming [data]."""
    d = dict(spec.data)
    name = d.pop("name")
    try:
        split = load_dataset(name, **d, model=spec.model)
    except (ValueError, FileNotFoundError, OSError) as e:
        raise SpecError(f"{spec.path}: [data] {e}") from None
    if spec.validation and split.test.shape[0] == 0:
        raise SpecError(
            f"{spec.path}: [data] validation needs held-out points, but test_fraction = 0 "
            "keeps none; raise data.test_fraction or set study.validation = false"
        )
    return split


def diffusion_base_config(spec: StudySpec) -> DiffusionConfig:
    """Defaults for everything the search space leaves out, from [training] and [bound]
    (``bound_tuner.settings``: the one table of spec keys and config fields)."""
    fixed = {"training": spec.training, "bound": spec.bound}
    return DiffusionConfig(**config_kwargs("diffusion", fixed))


def check_architecture_keys(spec: StudySpec, *, images: bool) -> None:
    """Refuse the architecture keys that the data's score network does not have: ``width`` and
    ``layers`` shape the MLP of point data, ``channels`` the UNet of images (one line)."""
    for key in ("width", "layers", "channels"):
        if (key in spec.training or key in spec.search) and (key == "channels") != images:
            net, mend = ("UNet", "channels") if images else ("MLP", "width and layers")
            kind = "images" if images else "point data"
            raise SpecError(
                f"{spec.path}: {key} does not shape the {net} of {kind}; it takes {mend}"
            )


def build_objective(
    spec: StudySpec,
    data: DataSplit | None = None,
    *,
    device: str = "auto",
    on_result=None,
    artifact_store=None,
):
    """The objective of a spec's model, on its data (loaded here unless given).

    Trained weights go to ``artifact_store`` (the best ``[study] keep_models`` trials); by
    default to the store of the dashboard hook ``on_result`` when it has one. ``bound-tuner run``,
    ``worker`` and ``run_study`` always give one (the store beside the database), with or
    without the dashboard.
    """
    data = data if data is not None else load_data(spec)
    if resolve_device(device).type == "cuda":
        set_tf32(spec.training.get("tf32", DEFAULT_TF32))
    if artifact_store is None:
        artifact_store = getattr(on_result, "artifact_store", None)
    multi = len(spec.objectives) > 1
    if spec.model == "diffusion":
        from .objectives import DiffusionObjective

        if spec.factory is None:  # a [model] factory reads width, layers, channels as it likes
            check_architecture_keys(spec, images=data.train.dim() > 2)

        objective = DiffusionObjective(
            data,
            search=spec.search,
            base=diffusion_base_config(spec),
            validation=spec.validation,
            # partial bounds serve pruners, which Optuna runs for single-objective studies only
            checkpoints=0 if multi else spec.training.get("checkpoints", 3),
            study_seed=spec.seed,
            device=device,
            on_result=on_result,
            artifact_store=artifact_store,
            keep_models=spec.keep_models,
            pack=spec.training.get("pack", 1),
            model=spec.factory,
        )
    else:
        from .objectives import VAEObjective

        objective = VAEObjective.from_spec(
            spec, data, device=device, on_result=on_result, artifact_store=artifact_store
        )
    if tuple(spec.objectives) == ("bound",):
        return objective
    return ObjectiveValues(objective, spec.objectives, validation=spec.validation)


def open_study(
    spec: StudySpec,
    storage: str | None = None,
    *,
    heartbeat: bool = False,
    worker_index: int | None = 0,
    existing_trials: int | None = None,
    allow_changed_spec: bool = False,
    artifact_dir: str | None = None,
    **storage_kw,
) -> optuna.Study:
    """Create the spec's study in the storage, or load it if it exists (resuming).

    A new study records the spec's fingerprint (``bound_tuner.spec.fingerprint``: data, fixed
    settings, search space, bound settings) in its user attr ``bound_tuner.spec``. An existing
    one is refused with a SpecError naming the changed keys if the spec differs, unless
    ``allow_changed_spec`` (see ``spec_changes``). ``artifact_dir``, when given, is recorded
    as the study's artifact folder (``bound_tuner.artifacts``; export and sample look there).

    The sampler is seeded by ``sampler_seed`` from the spec's seed, ``worker_index`` and the
    trials the study already has (``existing_trials``, counted here when None).
    """
    if heartbeat:
        interval = storage_kw.setdefault(
            "heartbeat_interval",
            spec.storage.get("heartbeat_interval", DEFAULT_HEARTBEAT_INTERVAL),
        )
        storage_kw.setdefault(
            "grace_period", spec.storage.get("grace_period", default_grace_period(interval))
        )
        storage_kw.setdefault("retry_failed", 3)
    store = make_storage(storage, **storage_kw)
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


def finished_trials(study: optuna.Study) -> int:
    """Trials that count towards n_trials; the one definition is ``bound_tuner.workers.counts``."""
    from .workers import finished_count

    return finished_count(study)


def run_study(
    spec: StudySpec,
    *,
    storage: str | None = None,
    n_trials: int | None = None,
    device: str = "auto",
    progress: bool = True,
    callbacks: list | None = None,
    data: DataSplit | None = None,
    heartbeat_interval: int | None = None,
    grace_period: int | None = None,
    dashboard: bool = True,
    dashboard_charts: bool = True,
    executor: str = "local",
    n_workers: int | None = None,
    ray_address: str | None = None,
    gpus_per_trial: float = 0.0,
    max_consecutive_failures: int | None = None,
    allow_changed_spec: bool = False,
    objectives: list[str] | tuple[str, ...] | None = None,
    constraints: dict[str, float] | None = None,
) -> optuna.Study:
    """Run (or resume) the study of ``spec`` until it has ``n_trials`` finished trials in all.

    ``objectives`` and ``constraints`` replace the spec's [study] ones: two or three of "bound",
    "fit", "generalization", "train_seconds", "parameters" make a multi-objective study (see
    ``bound_tuner.objective_names``; ``study.best_trials`` is its Pareto set), and
    ``{"train_seconds": 60}`` marks the trials over that budget infeasible.

    ``executor="local"`` runs the trials in this process, or with ``n_workers`` in a pool of
    that many processes (``bound_tuner.workers.run_workers``). ``executor="ray"`` runs
    ``n_workers`` Ray tasks (``bound_tuner.ray_executor.run_ray``: ``ray_address``,
    ``gpus_per_trial``), which load the spec's data themselves. Both need PostgreSQL for more
    than one worker. A pool runs on ``device`` ("auto" or "cpu": CPU workers; "cuda" or
    "cuda:N": every worker on that GPU).

    A trial whose objective raises (CUDA out of memory, an error in one configuration) ends as
    FAIL with its ``fail_reason`` and the run goes on; ``max_consecutive_failures`` of them in a
    row (default: [study] max_consecutive_failures, 5) stop a worker. A study created from
    another spec (its data, fixed settings, search space or bound settings differ) is refused
    unless ``allow_changed_spec``; its new trials then record the differences (``spec.changed``).
    A resumed study continues its sampler's search (``sampler_seed``).

    This is the loop of one worker (``bound_tuner.workers.run_worker``): trials are counted as
    the worker pool counts them, every trial heartbeats (a trial left running by a killed
    process is failed and retried on the next resume), and Ctrl-C or SIGTERM ends the running
    trial as interrupted (retried on resume) and raises KeyboardInterrupt.

    With ``dashboard``, each trial gets a note and a samples image for optuna-dashboard, and (with
    ``dashboard_charts``, which only one process of a study may set) the study's charts are rebuilt
    after each trial; see ``bound_tuner.dashboard``.
    """
    from .workers import WorkerConfigError, run_worker, run_workers

    if objectives is not None or constraints is not None:
        spec = with_objectives(spec, objectives=objectives, constraints=constraints)
    if executor not in ("local", "ray"):
        raise WorkerConfigError(f"executor {executor!r}: use 'local' or 'ray'")
    hb = {
        "heartbeat_interval": heartbeat_interval,
        "grace_period": grace_period,
        "max_consecutive_failures": max_consecutive_failures,
        "allow_changed_spec": allow_changed_spec,
    }
    if executor == "ray":
        if data is not None or callbacks:
            raise WorkerConfigError(
                "executor='ray' runs the spec in Ray tasks that load its data themselves; "
                "leave out data and callbacks"
            )
        if device not in ("auto", "cpu") or (device == "cpu" and gpus_per_trial > 0):
            raise WorkerConfigError(
                f"device={device!r} with executor='ray': Ray trains on cuda with gpus_per_trial "
                "and on the CPU without it; leave out device"
            )
        from .ray_executor import run_ray

        return run_ray(
            spec,
            storage=storage,
            n_workers=n_workers,
            gpus_per_trial=gpus_per_trial,
            address=ray_address,
            n_trials=n_trials,
            progress=progress,
            dashboard=dashboard,
            **hb,
        )
    if ray_address is not None or gpus_per_trial:
        raise WorkerConfigError("ray_address and gpus_per_trial go with executor='ray'")
    if n_workers is not None:
        if data is not None or callbacks:
            raise WorkerConfigError(
                "a pool of n_workers loads the spec's data in each worker; leave out data "
                "and callbacks"
            )
        return run_workers(
            spec,
            storage=storage,
            n_workers=n_workers,
            n_trials=n_trials,
            progress=progress,
            dashboard=dashboard,
            device=device,
            **hb,
        )
    return run_worker(
        spec,
        storage=storage,
        device=device,
        n_trials=n_trials,
        **hb,
        worker_index=0,
        progress=progress,
        dashboard=dashboard,
        dashboard_charts=dashboard_charts,
        data=data,
        callbacks=callbacks or (),
    )


def best_trial_or_none(study: optuna.Study):
    """The best complete (and feasible) trial of a single-objective study; None if there is
    none yet, and for a multi-objective study (its Pareto set: ``study.best_trials``)."""
    if len(study.directions) > 1:
        return None
    try:
        t = study.best_trial
    except ValueError:
        return None
    return t if t.value is not None and math.isfinite(t.value) else None
