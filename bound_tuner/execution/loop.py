"""The loop of one worker: claim a trial under the study lock, run it, record it, until the study has
``n_trials`` finished trials in all.

Every worker heartbeats its running trial. A trial whose worker died (killed, preempted, out of
memory) is failed once its heartbeat is older than the grace period and is re-queued
(RetryHeartbeatStaleTrialCallback); the next free worker runs it again. A failed trial that was
retried does not count towards ``n_trials``; its retry does. Through Optuna's gRPC storage proxy
(``grpc://``) there is neither the lock nor a heartbeat: the count may overshoot by up to the number
of workers minus one, and a dead worker's trial stays RUNNING."""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import pickle
import socket
import time
import traceback
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna

from bound_tuner.config.spec import DEFAULT_MAX_CONSECUTIVE_FAILURES, SpecError
from bound_tuner.execution.accounting import (
    POLL_S,
    STORAGE_FAILURE,
    WORKER_ATTR,
    FailureStreak,
    TrialCounter,
    fail_stale,
    nothing_left,
    requeue_interrupted,
)
from bound_tuner.execution.errors import TooManyFailures, TrialError, WorkerConfigError
from bound_tuner.execution.lock import StudyLock
from bound_tuner.execution.plan import (
    as_spec,
    check_device,
    heartbeat_settings,
    open_with_heartbeat,
    progress_bar,
    trial_target,
)
from bound_tuner.execution.signals import INTERRUPTED, ignore_signals, restore_signals
from bound_tuner.objectives.studies import SPEC_CHANGED_ATTR, spec_changes
from bound_tuner.storage.database import (
    StorageError,
    check_storage,
    is_grpc,
    resolve_url,
    scrub,
    storage_errors,
)
from bound_tuner.storage.folders import artifact_store_for

if TYPE_CHECKING:
    from bound_tuner.config.spec import StudySpec

_log = logging.getLogger(__name__)


class _Abandon(BaseException):
    """Leaves a trial RUNNING when not even its failure can be written: Optuna tells only
    Exception and KeyboardInterrupt, so the trial goes stale and is retried on resume."""


class _TakenOver(BaseException):
    """Another process finished this worker's trial while it ran (failed it as stale: the
    heartbeat came later than the grace period, on a stalled or overloaded machine). Its retry
    is queued; this worker drops the trial and goes on (BaseException: Optuna must not try to
    tell a trial that is already finished)."""


def _taken_over_warning(number: int) -> None:
    _log.warning(
        "trial %d was failed as stale by another process while this one ran it (its heartbeat "
        "came later than the grace period: a stalled or overloaded machine; raise [storage] "
        "grace_period); its retry runs instead",
        number,
    )


def _one_line(e: BaseException, url: str | None = None) -> str:
    for _ in range(10):  # Optuna wraps database errors: the innermost says what happened
        if not isinstance(e.__cause__, Exception):
            break
        e = e.__cause__
    orig = getattr(e, "orig", None)  # a SQLAlchemy error: the driver's own message
    text = str(orig or e).strip()
    first = text.splitlines()[0] if text else ""
    return scrub(f"{type(orig or e).__name__}: {first}" if first else type(e).__name__, url)


def _behind(
    e: BaseException | None, kinds: tuple[type[BaseException], ...]
) -> BaseException | None:
    """The first exception of ``kinds`` in ``e``'s chain (itself, or what it was raised from or
    during, ten links at most), else None."""
    seen = 0
    while e is not None and seen < 10:
        if isinstance(e, kinds):
            return e
        e, seen = e.__cause__ or e.__context__, seen + 1
    return None


def _storage_failure(e: BaseException | None) -> BaseException | None:
    """The database error behind ``e``, else None. Only the storage's own errors count
    (``bound_tuner.storage.database.storage_errors``): an OSError of a trial's code is that
    trial's failure."""
    return _behind(e, storage_errors())


def _finished_elsewhere(e: BaseException | None) -> bool:
    """Whether ``e``'s chain says the trial had already finished (another process ended it)."""
    return _behind(e, (optuna.exceptions.UpdateFinishedTrialError,)) is not None


def _told_elsewhere(study: optuna.Study, current: dict[str, Any]) -> bool:
    """Whether the trial this worker ran to its end (a value or a prune, not a failure of its
    own) is FAIL in the study: another process failed it while it ran, and Optuna's tell
    refused it. Read on an error path only."""
    if "number" not in current or "failed" in current:
        return False
    try:
        states = [
            t.state for t in study.get_trials(deepcopy=False) if t.number == current["number"]
        ]
    except storage_errors():
        return False
    return states == [optuna.trial.TrialState.FAIL]


def _not_an_interrupt(record: logging.LogRecord) -> bool:
    """Optuna logs a trial stopped by Ctrl-C with its traceback; the run says it in one line."""
    exc = record.exc_info[0] if record.exc_info else None
    if exc is not None and issubclass(exc, KeyboardInterrupt):
        return False
    return not (_interrupting and record.getMessage().startswith("Trial "))


_interrupting = False  # a trial is being written down as interrupted


def optimize_until(
    study: optuna.Study,
    objective: Any,
    *,
    target: int,
    lock: StudyLock | None = None,
    ident: str | None = None,
    callbacks: Sequence[Any] = (),
    bar: Any = None,
    url: str | None = None,
    wait_for_running: bool = True,
    failures: FailureStreak | None = None,
    trial_attrs: dict[str, Any] | None = None,
) -> None:
    """Run trials of ``study`` until it has ``target`` trials that count (``counts``).

    Every trial is claimed under ``lock``: stale trials are failed and retried, interrupted ones
    queued again, the count taken, and the trial created, all before another process may look.
    When every slot is taken but trials still run elsewhere, it waits (``wait_for_running``):
    one of them may die and come back as a retry. Without a heartbeat (the gRPC proxy) no trial
    comes back, so it returns instead. Ctrl-C or SIGTERM ends the running trial as FAIL with
    ``fail_reason = "interrupted"``, queues its retry and raises KeyboardInterrupt. A trial
    that cannot be written (disk full, read-only database) raises TrialError.

    Any other exception of the objective (CUDA out of memory, an error in one configuration)
    ends its trial as FAIL with its ``fail_reason`` and the loop goes on; ``failures`` (default:
    five in a row) stops it with TooManyFailures. ``trial_attrs`` are set on every trial.
    """
    global _interrupting
    ident = ident or f"{socket.gethostname()}:{os.getpid()}"
    if failures is None:
        failures = FailureStreak(DEFAULT_MAX_CONSECUTIVE_FAILURES)
    streak = failures
    trial_attrs = dict(trial_attrs or {})
    counter = TrialCounter()
    logging.getLogger("optuna.study._optimize").addFilter(_not_an_interrupt)
    while True:
        held = contextlib.ExitStack()
        current: dict[str, Any] = {}

        def run(trial: optuna.Trial, current: dict = current, held=held) -> float:
            current["number"] = trial.number
            trial.set_user_attr(WORKER_ATTR, ident)
            for key, value in trial_attrs.items():
                trial.set_user_attr(key, value)
            held.close()  # the slot is claimed: let the next process count
            try:
                return objective(trial)
            except optuna.TrialPruned:
                raise
            except KeyboardInterrupt:
                global _interrupting
                _interrupting = True
                current["signals"] = ignore_signals()  # until the retry is queued
                try:
                    trial.set_user_attr("fail_reason", INTERRUPTED)
                except storage_errors() as werr:  # retried anyway once its heartbeat stops
                    _log.warning("trial %d: not marked interrupted: %s", trial.number, werr)
                raise
            except Exception as err:
                if _finished_elsewhere(err):
                    raise _TakenOver from err
                current["reason"] = _one_line(err, url)
                if _storage_failure(err):
                    current["storage_failure"] = err
                    try:
                        trial.set_user_attr("fail_reason", STORAGE_FAILURE + current["reason"])
                    except storage_errors():
                        raise _Abandon from err
                    raise
                current["failed"] = True
                try:
                    if "fail_reason" not in trial.user_attrs:
                        trial.set_user_attr("fail_reason", current["reason"])
                except optuna.exceptions.UpdateFinishedTrialError:
                    raise _TakenOver from err
                except storage_errors() as werr:  # the FAIL itself is written next, or raises
                    _log.warning("trial %d: fail_reason not recorded: %s", trial.number, werr)
                raise

        try:
            if lock is not None:
                held.enter_context(lock())
            fail_stale(study)
            tally = counter.count(study)
            if counter.requeue_interrupted(study):
                tally = counter.count(study)
            if tally.finished >= target:
                return
            if not (tally.waiting or tally.used < target):
                if not (tally.running and wait_for_running):
                    return
                held.close()
                time.sleep(POLL_S)
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                # an exception of the objective fails its trial, not the worker (``run`` keeps
                # its reason); KeyboardInterrupt, SystemExit and storage failures still stop it
                study.optimize(run, n_trials=1, callbacks=list(callbacks), catch=(Exception,))
            if "storage_failure" in current:
                raise current["storage_failure"]
            if "failed" in current:
                streak.failed(current["number"], current["reason"])
            elif "number" in current:
                streak.ok()
        except KeyboardInterrupt:
            held.close()
            old = current.get("signals") or ignore_signals()
            try:
                if "number" in current:
                    try:
                        with lock() if lock else contextlib.nullcontext():
                            requeue_interrupted(study)
                    except storage_errors() as e:  # its heartbeat stops: retried on resume
                        _log.warning("could not queue the interrupted trial again: %s", e)
            finally:
                restore_signals(old)
                _interrupting = False
            raise
        except TooManyFailures:
            raise
        except _TakenOver:
            _taken_over_warning(current["number"])
        except (Exception, _Abandon) as failure:
            held.close()
            e = _storage_failure(failure)
            if e is None and _told_elsewhere(study, current):
                _taken_over_warning(current["number"])  # it ended; Optuna could not tell it
                continue
            if e is None:
                raise
            if isinstance(failure, _Abandon):
                e = failure.__cause__ or e
            what = f"trial {current['number']}" if "number" in current else "a new trial"
            raise TrialError(
                f"{what} failed: {current.get('reason') or _one_line(e, url)}; the finished "
                "trials are kept; free disk space or make the database writable, then run the "
                "same command to resume (an unfinished trial is retried)"
            ) from None
        finally:
            held.close()
        if bar is not None:
            bar.n = min(counter.count(study).finished, target)
            bar.refresh()


def run_worker(
    spec: StudySpec | str | Path,
    *,
    storage: str | None,
    device: str = "auto",
    n_trials: int | None = None,
    heartbeat_interval: int | None = None,
    grace_period: int | None = None,
    worker_index: int | None = None,
    threads: int | None = None,
    progress: bool = False,
    dashboard: bool = True,
    dashboard_charts: bool = False,
    data: Any = None,
    callbacks: Sequence[Any] = (),
    max_consecutive_failures: int | None = None,
    allow_changed_spec: bool = False,
    existing_trials: int | None = None,
) -> optuna.Study:
    """Run trials of the spec's study (created if missing) until it has ``n_trials`` in all.

    This is the loop of one worker; any number of them, on any machines, may run it against one
    database. ``worker_index`` numbers the workers of one pool (with the trials the study had
    when the run started, ``existing_trials``, counted here when None, it seeds the sampler:
    ``bound_tuner.objectives.studies.sampler_seed``); leave it None for workers started by hand.
    ``threads`` sets torch's CPU threads. ``dashboard`` writes each trial's note and samples
    for optuna-dashboard; ``dashboard_charts`` also rebuilds the study's charts, which exactly
    one process of a study may do (see ``bound_tuner.dashboard``): throttled during the run
    (``ChartsCallback``), and once more when the loop ends unless it was interrupted.

    A trial whose objective raises ends as FAIL (its ``fail_reason`` says why) and the worker
    goes on; ``max_consecutive_failures`` such trials in a row (default: the spec's [study]
    setting, 5) stop it with TooManyFailures. A spec that differs from the one the study was
    created from is refused (SpecError) unless ``allow_changed_spec``; then every new trial
    records the differences in its user attr ``spec.changed``. A study that already has its
    ``n_trials`` logs that nothing is left to run and returns.
    """
    # torch only after a worker set CUDA_VISIBLE_DEVICES
    from bound_tuner.objectives.factory import build_objective, load_data

    spec = as_spec(spec)
    target = trial_target(spec, n_trials)
    interval, grace = heartbeat_settings(spec, heartbeat_interval, grace_period)
    url = resolve_url(storage)
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    check_storage(url)
    check_device(device)
    if data is None:
        data = load_data(spec)  # bad data fails before the study exists
    on_result, extra, store = None, [], None
    if dashboard:
        # scipy and plotly only with the dashboard on
        from bound_tuner.dashboard.hooks import dashboard_hooks

        on_result, extra = dashboard_hooks(url, reference=data.train, charts=dashboard_charts)
    else:  # no notes or charts, but the trained weights are still kept beside the database
        store = artifact_store_for(url)
    objective = build_objective(
        spec, data, device=device, on_result=on_result, artifact_store=store
    )

    study = open_with_heartbeat(
        spec,
        url,
        interval,
        grace,
        worker_index=worker_index,
        existing_trials=existing_trials,
        allow_changed_spec=allow_changed_spec,
    )
    changes = spec_changes(study, spec)
    streak = FailureStreak(
        max_consecutive_failures
        if max_consecutive_failures is not None
        else spec.max_consecutive_failures
    )
    done = nothing_left(study, target)
    if done is not None:
        _log.warning(done)
        return study
    # torch only after a worker set CUDA_VISIBLE_DEVICES
    from bound_tuner.runtime.device import resolve_device

    ident = f"{socket.gethostname()}:{os.getpid()}/{resolve_device(device)}"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        ident += f" (GPU {visible})"
    lock = StudyLock(url, spec.name)
    bar = progress_bar(study, target) if progress else None
    loop = {
        "target": target,
        "callbacks": [*extra, *callbacks],
        "bar": bar,
        "url": url,
        "wait_for_running": not is_grpc(url),  # the proxy carries no heartbeat
        "failures": streak,
        "trial_attrs": {SPEC_CHANGED_ATTR: changes} if changes else None,
    }
    pack = getattr(objective, "pack", 1)
    interrupted = False
    try:
        if pack > 1:  # K trial loops in K threads, trained together (bound_tuner.objectives.packed)
            from bound_tuner.objectives.packed import ThreadLock, run_loops

            shared = ThreadLock(lock)
            run_loops(
                pack,
                lambda i: optimize_until(
                    study, objective, lock=shared, ident=f"{ident} [{i + 1}/{pack}]", **loop
                ),
                abort=objective.packer.abort,
            )
        else:
            optimize_until(study, objective, lock=lock, ident=ident, **loop)
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:
        lock.close()
        if not interrupted:  # the charts skip trials to keep up (ChartsCallback): now all
            for callback in extra:
                callback.flush(study)
        if bar is not None:
            bar.close()
    return study


def work(
    index: int, device: str, payload: bytes, storage: str, options: dict[str, Any]
) -> str | None:
    """What every worker of an executor runs (the local pool's processes, Ray's tasks): the
    spec from ``payload`` and ``run_worker`` on ``device``. Returns None when the study is done,
    else the one line that says why this worker stopped. Ctrl-C, SIGTERM or a cancellation
    raise KeyboardInterrupt (the running trial ends as interrupted and is queued again)."""
    try:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        spec = pickle.loads(payload)  # imports torch (through bound_tuner.config.spec)
        options = dict(options)
        dashboard = options.pop("dashboard")
        run_worker(
            spec,
            storage=storage,
            device=device,
            worker_index=index,
            threads=1,
            dashboard=dashboard,
            dashboard_charts=dashboard and index == 0,
            **options,
        )
    except Exception as e:
        if not isinstance(e, (SpecError, StorageError, WorkerConfigError, TrialError)):
            traceback.print_exc()
        return _one_line(e, storage)
    finally:
        # an Optuna storage holds its database connections until the garbage collector frees it;
        # a Ray worker process runs many tasks, so free this task's before the next one
        gc.collect()
    return None
