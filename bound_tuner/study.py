"""``run_study``: a StudySpec + a storage URL -> its Optuna study, created or resumed, and run by an
executor (this process, a pool of processes, or Ray).

Everything a user can get wrong (spec, data, storage) is checked before the study is created, so a
bad input leaves nothing behind in the database."""

from __future__ import annotations

import optuna

from bound_tuner.config.overrides import with_objectives
from bound_tuner.config.schema import StudySpec
from bound_tuner.data.split import DataSplit
from bound_tuner.execution.errors import WorkerConfigError
from bound_tuner.execution.loop import run_worker
from bound_tuner.execution.plan import RunOptions
from bound_tuner.execution.pool import run_workers
from bound_tuner.execution.ray_executor import run_ray


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
    outage_seconds: float | None = None,
    objectives: list[str] | tuple[str, ...] | None = None,
    constraints: dict[str, float] | None = None,
) -> optuna.Study:
    """Run (or resume) the study of ``spec`` until it has ``n_trials`` finished trials in all.

    ``objectives`` and ``constraints`` replace the spec's [study] ones: two or three of "bound",
    "fit", "generalization", "train_seconds", "parameters" make a multi-objective study (see
    ``bound_tuner.config.objective_names``; ``study.best_trials`` is its Pareto set), and
    ``{"train_seconds": 60}`` marks the trials over that budget infeasible.

    ``executor="local"`` runs the trials in this process, or with ``n_workers`` in a pool of
    that many processes (``bound_tuner.execution.pool.run_workers``). ``executor="ray"`` runs
    ``n_workers`` Ray tasks (``bound_tuner.execution.ray_executor.run_ray``: ``ray_address``,
    ``gpus_per_trial``), which load the spec's data themselves. Both need PostgreSQL for more
    than one worker. A pool runs on ``device`` ("auto" or "cpu": CPU workers; "cuda" or
    "cuda:N": every worker on that GPU).

    A trial whose objective raises (CUDA out of memory, an error in one configuration) ends as
    FAIL with its ``fail_reason`` and the run goes on; ``max_consecutive_failures`` of them in a
    row (default: [study] max_consecutive_failures, 5) stop a worker. A study created from
    another spec (its data, fixed settings, search space or bound settings differ) is refused
    unless ``allow_changed_spec``; its new trials then record the differences (``spec.changed``).
    A resumed study continues its sampler's search (``sampler_seed``). A database server that
    goes away (a restart, a failover) is waited for up to ``outage_seconds`` (default: [storage]
    outage_seconds, 180); the workers then go on.

    This is the loop of one worker (``bound_tuner.execution.loop.run_worker``): trials are counted as
    the worker pool counts them, every trial heartbeats (a trial left running by a killed
    process is failed and retried on the next resume), and Ctrl-C or SIGTERM ends the running
    trial as interrupted (retried on resume) and raises KeyboardInterrupt.

    With ``dashboard``, each trial gets a note and a samples image for optuna-dashboard, and (with
    ``dashboard_charts``, which only one process of a study may set) the study's charts are rebuilt
    after each trial; see ``bound_tuner.dashboard``.
    """

    if objectives is not None or constraints is not None:
        spec = with_objectives(spec, objectives=objectives, constraints=constraints)
    if executor not in ("local", "ray"):
        raise WorkerConfigError(f"executor {executor!r}: use 'local' or 'ray'")
    options = RunOptions(
        n_trials=n_trials,
        heartbeat_interval=heartbeat_interval,
        grace_period=grace_period,
        outage_seconds=outage_seconds,
        max_consecutive_failures=max_consecutive_failures,
        allow_changed_spec=allow_changed_spec,
        dashboard=dashboard,
        dashboard_charts=dashboard_charts,
        progress=progress,
    )
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
        return run_ray(
            spec,
            storage=storage,
            n_workers=n_workers,
            gpus_per_trial=gpus_per_trial,
            address=ray_address,
            options=options,
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
            spec, storage=storage, n_workers=n_workers, device=device, options=options
        )
    return run_worker(
        spec,
        storage=storage,
        options=options,
        device=device,
        worker_index=0,
        data=data,
        callbacks=callbacks or (),
    )
