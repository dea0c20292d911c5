"""Ray as an executor: K Ray tasks, each running the worker loop of ``bound_tuner.execution.loop``.

``run_ray`` creates the study, then starts K tasks on a Ray cluster (a new local instance, or one
it joins with ``address="auto"`` or ``"ray://host:port"``). Each task runs ``workers.work``, the
same loop as the local pool and ``bound-tuner worker``, against the study's database. Ray does
what the local pool does by hand: it places tasks on nodes and GPUs (``gpus_per_trial``, which
may be fractional; Ray sets CUDA_VISIBLE_DEVICES), restarts a task whose process or node died
(``max_retries``), forwards the workers' logs, and ends the tasks when the driver ends. The
trial of a dead task is failed through its heartbeat and queued again with the same parameters,
as with the local pool.

Ray is an optional extra: ``pip install "bound_tuner[ray]"``.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna

from bound_tuner.execution.accounting import POLL_S, TrialCounter
from bound_tuner.execution.errors import WorkerConfigError, WorkerError
from bound_tuner.execution.lock import StudyLock
from bound_tuner.execution.loop import work
from bound_tuner.execution.plan import (
    RunOptions,
    StaleWatch,
    check_run,
    close_bar,
    open_run,
    progress_bar,
    save_final_charts,
    study_count,
    watch_step,
    worker_env,
)
from bound_tuner.execution.signals import signals_ignored

if TYPE_CHECKING:
    from bound_tuner.config.schema import StudySpec

__all__ = ["RAY_EXTRA", "run_ray"]

RAY_EXTRA = 'pip install "bound_tuner[ray]"'
DEFAULT_MAX_RETRIES = 3
SQLITE_REFUSAL = (
    "which serves one process on one machine; Ray runs workers in other processes and on other "
    "nodes: use PostgreSQL (--storage postgresql://user@host:5432/dbname)"
)
# variables a task needs from the driver's environment (Ray starts its workers elsewhere)
FORWARDED_ENV = ("BOUND_TUNER_ARTIFACTS",)


def import_ray() -> Any:
    """The ray module, or one line saying how to install it."""
    try:
        import ray
    except ImportError:
        raise WorkerConfigError(
            f"--executor ray needs Ray, which is not installed; {RAY_EXTRA}"
        ) from None
    return ray


def start_ray(ray: Any, address: str | None, n_workers: int | None) -> bool:
    """Connect to ``address`` (``None``/``""``: a new local instance); True if this call
    started or joined Ray (and so must shut it down), False if Ray was already initialized."""
    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": True}
    if address:
        kwargs["address"] = address
    else:  # a fresh local instance; --workers K runs K at once even on fewer cores, as the pool
        kwargs.update(address="local", include_dashboard=False)
        kwargs["num_cpus"] = max(os.cpu_count() or 1, n_workers or 0)
    handlers = _signal_handlers()
    try:
        ray.init(**kwargs)
    except (ConnectionError, RuntimeError, ValueError) as e:
        lines = str(e).strip().splitlines()
        why = lines[0] if lines else type(e).__name__
        if address:
            raise WorkerConfigError(
                f"cannot join the Ray cluster at {address}: {why}; start it with "
                "`ray start --head`, or leave out --ray-address for a local instance"
            ) from None
        raise WorkerConfigError(
            f"cannot start a local Ray instance: {why}; try `ray start --head` and "
            "--ray-address auto"
        ) from None
    finally:  # Ray installs its own; Ctrl-C and SIGTERM must still end trials as interrupted
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    return True


def _signal_handlers() -> dict:
    """This process's SIGINT and SIGTERM handlers (main thread only; elsewhere none)."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    return {sig: h for sig, h in handlers.items() if h is not None}


def _slots(ray: Any, n_workers: int | None, gpus_per_trial: float) -> int:
    """The number of tasks: ``n_workers``, else as many as the cluster holds at once."""
    resources = ray.cluster_resources()
    gpus, cpus = resources.get("GPU", 0.0), resources.get("CPU", 0.0)
    if gpus_per_trial > 0 and gpus < gpus_per_trial:
        raise WorkerConfigError(
            f"--gpus-per-trial {gpus_per_trial:g} but the Ray cluster has {gpus:g} GPUs; "
            "join a cluster with GPUs (--ray-address) or leave out --gpus-per-trial"
        )
    if n_workers is None:
        n_workers = int(gpus // gpus_per_trial) if gpus_per_trial > 0 else int(cpus)
    return max(1, n_workers)


def _describe(ray: Any, error: BaseException) -> str:
    """One line for a task that ended with a Ray error."""
    if isinstance(error, ray.exceptions.WorkerCrashedError):
        return "its process died and Ray's retries were used up"
    if isinstance(error, ray.exceptions.NodeDiedError):
        return "its node died and Ray's retries were used up"
    if isinstance(error, ray.exceptions.TaskCancelledError):
        return "cancelled"
    first = str(error).strip().splitlines()
    return f"{type(error).__name__}: {first[0] if first else ''}".strip(": ")


def ray_work(
    index: int, device: str, payload: bytes, options: RunOptions, secrets: list
) -> str | None:
    """One Ray task: the worker loop (``bound_tuner.execution.loop.work``) with the storage's
    environment taken from Ray's object store (``secrets`` holds the reference of
    ``worker_env``'s dict: neither the task's arguments nor its runtime environment, both shown
    by Ray's dashboard and state API, carry the URL or its password)."""
    import ray

    env = ray.get(secrets[0])
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return work(index, device, payload, options)
    finally:  # a Ray worker process runs other tasks after this one
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_ray(
    spec: StudySpec | str | Path,
    *,
    storage: str | None,
    n_workers: int | None = None,
    gpus_per_trial: float = 0.0,
    address: str | None = None,
    max_retries: int = DEFAULT_MAX_RETRIES,
    options: RunOptions | None = None,
    n_trials: int | None = None,
    progress: bool = True,
    dashboard: bool = True,
) -> optuna.Study:
    """Run the spec's study on Ray with ``n_workers`` tasks until it has ``n_trials`` in all.

    ``address``: None or "" starts a local Ray instance (shut down at the end), "auto" or
    "ray://host:port" joins a cluster; if this process already called ``ray.init``, that Ray is
    used. ``n_workers`` defaults to what the cluster holds at once (its CPUs, or its GPUs divided
    by ``gpus_per_trial``). With ``gpus_per_trial`` > 0 each task gets that share of a GPU and
    trains on ``cuda``. Ray reruns a task whose process or node died up to ``max_retries``
    times; a task that still fails does not stop the others and raises WorkerError at the end.
    The storage must be a database every node reaches (PostgreSQL, or a ``grpc://`` proxy);
    SQLite is refused. ``max_consecutive_failures`` and ``allow_changed_spec``: see
    ``bound_tuner.execution.loop.run_worker``. Ctrl-C cancels the tasks: their trials end as interrupted and are retried
    when the study resumes; KeyboardInterrupt is raised. ``options`` carries every other setting
    (``bound_tuner.execution.plan.RunOptions``); ``n_trials``, ``progress`` and ``dashboard``
    are shorthands that apply when ``options`` is None.
    """
    if options is None:
        options = RunOptions(n_trials=n_trials, progress=progress, dashboard=dashboard)
    if gpus_per_trial < 0:
        raise WorkerConfigError(f"--gpus-per-trial {gpus_per_trial:g} must be 0 or more")
    if n_workers is not None and n_workers < 1:
        raise WorkerConfigError(f"--workers {n_workers} must be at least 1")
    plan = check_run(spec, storage=storage, options=options, sqlite_refusal=SQLITE_REFUSAL)
    dashboard, progress = plan.options.dashboard, plan.options.progress
    spec, url, target = plan.spec, plan.url, plan.target
    ray = import_ray()
    owns_ray = start_ray(ray, address, n_workers)
    lock = StudyLock(url, spec.name)
    study, bar = None, None
    try:
        k = _slots(ray, n_workers, gpus_per_trial)  # before the study exists
        study, done, payload, worker_options = open_run(plan)
        if done is not None:
            logging.getLogger(__name__).warning(done)
            return study
        device = "cuda" if gpus_per_trial > 0 else "cpu"
        env = {v: os.environ[v] for v in FORWARDED_ENV if v in os.environ}
        remote = ray.remote(ray_work)  # each task: the worker loop of every executor
        secrets = [ray.put(worker_env(url))]  # by reference: see ray_work
        task_options = {
            "num_cpus": 1,
            "num_gpus": gpus_per_trial,
            "max_retries": max_retries,
            # a worker's own error is final; a lost process or node is retried
            "retry_exceptions": False,
        }
        if env:
            task_options["runtime_env"] = {"env_vars": env}
        if progress:
            where = f"{gpus_per_trial:g} GPU each" if gpus_per_trial else "CPU"
            bar = progress_bar(study, target, f"{spec.name}: {k} Ray workers on {where}")
        pending = {
            remote.options(name=f"bound-tuner-worker-{i}", **task_options).remote(
                i, device, payload, worker_options, secrets
            ): i
            for i in range(k)
        }
        failed = _watch(ray, study, pending, lock, bar, target, StaleWatch(plan.grace))
    finally:
        lock.close()
        close_bar(bar, study, target)
        if owns_ray:
            ray.shutdown()

    if dashboard:
        save_final_charts(study)
    if failed:
        parts = [f"worker {i} ({device}): {msg}" for i, msg in sorted(failed.items())]
        raise WorkerError(
            f"{len(failed)} of {k} Ray workers failed: {'; '.join(parts)}; the study has "
            f"{study_count(study)} of {target} finished trials"
        )
    return study


def _watch(
    ray: Any,
    study: optuna.Study,
    pending: dict,
    lock: StudyLock,
    bar: Any,
    target: int,
    stale: StaleWatch,
) -> dict[int, str]:
    """Wait for every task, failing stale trials meanwhile (``stale``: after a task failed,
    else once a grace period); {worker index: why it failed}."""
    failed: dict[int, str] = {}
    counter = TrialCounter()  # reads each finished trial once: a poll costs the same at any size
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1, timeout=POLL_S)
            for ref in done:
                i = pending.pop(ref)
                try:
                    msg = ray.get(ref)
                except ray.exceptions.RayError as e:
                    msg = _describe(ray, e)
                if msg is not None:
                    failed[i] = msg
                    stale.worker_died()
                    if bar is not None:
                        bar.write(f"worker {i}: {msg}")
            watch_step(study, lock, counter, bar, target, stale=stale.due())
    except KeyboardInterrupt:
        with signals_ignored():  # a second Ctrl-C must not leave tasks behind
            _cancel(ray, list(pending))
        raise
    return failed


def _cancel(ray: Any, refs: list, *, timeout: float = 30.0) -> None:
    """Cancel the tasks: each gets KeyboardInterrupt, ends its trial as interrupted and queues
    it again; any still running after ``timeout`` seconds is killed (its trial goes stale)."""
    deadline = time.monotonic() + timeout
    left = list(refs)
    while left and time.monotonic() < deadline:
        for ref in left:  # again each second: a task can miss a cancel request
            ray.cancel(ref)
        _, left = ray.wait(left, num_returns=len(left), timeout=min(1.0, timeout))
    for ref in left:
        ray.cancel(ref, force=True)
