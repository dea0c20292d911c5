"""Several processes on one study: a pool of workers on CPUs or GPUs, and the loop each one runs.

``run_workers`` creates the study once, then starts K spawn-started processes that load it and run
trials until the study has ``n_trials`` finished trials in all (not each). With ``gpus`` each
worker sees one GPU through CUDA_VISIBLE_DEVICES, set before it imports torch; the parent never
touches CUDA. ``run_worker`` is the loop of one process; ``bound-tuner worker`` runs it on other
machines against the same PostgreSQL database, and ``bound_tuner.ray_executor`` runs it in Ray
tasks (``work`` is the entry point of both executors).

Every worker heartbeats its running trial. A trial whose worker died (killed, preempted, out of
memory) is failed once its heartbeat is older than the grace period and is re-queued
(RetryHeartbeatStaleTrialCallback); the next free worker runs it again. A failed trial that was
retried does not count towards ``n_trials``; its retry does.

Workers claim trials under a PostgreSQL advisory lock, so a study never gets more than
``n_trials`` trials however many workers race for the last ones. Through Optuna's gRPC storage
proxy (``grpc://``) there is neither the lock nor a heartbeat: the count may overshoot by up to
the number of workers minus one, and a dead worker's trial stays RUNNING.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import pickle
import signal
import socket
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import optuna
from optuna.trial import FrozenTrial, TrialState

from .storage import (
    DEFAULT_HEARTBEAT_INTERVAL,
    StorageError,
    check_storage,
    default_grace_period,
    is_grpc,
    is_sqlite,
    normalize_url,
    redact,
    resolve_url,
    scrub,
    storage_errors,
)

if TYPE_CHECKING:  # the spec and study modules import torch; workers import them after CUDA setup
    from .spec import StudySpec

__all__ = [
    "TrialCounter",
    "WorkerConfigError",
    "WorkerError",
    "finished_count",
    "parse_gpus",
    "run_worker",
    "run_workers",
]

WORKER_ATTR = "worker"  # user attr: host:pid/device of the worker that runs the trial
_POLL_S = 0.5


class WorkerConfigError(ValueError):
    """Worker options that cannot work together (bad --gpus, --workers, heartbeat); one line."""


class WorkerError(RuntimeError):
    """One or more worker processes ended with a non-zero exit status."""


class TrialError(RuntimeError):
    """A trial that could not run or be recorded (disk full, read-only database); one line."""


class TooManyFailures(TrialError):
    """A worker stopped after ``max_consecutive_failures`` trials in a row raised; one line."""


_log = logging.getLogger(__name__)


class Interrupted(KeyboardInterrupt):
    """SIGTERM (or the parent's end) stopped the run; handled like Ctrl-C."""


INTERRUPTED = "interrupted"  # fail_reason of a trial stopped by Ctrl-C or SIGTERM
STORAGE_FAILURE = "storage error: "  # fail_reason prefix of a trial the database refused


class _Abandon(BaseException):
    """Leaves a trial RUNNING when not even its failure can be written: Optuna tells only
    Exception and KeyboardInterrupt, so the trial goes stale and is retried on resume."""


def _raise_interrupted(signum: int, frame: Any) -> None:
    raise Interrupted(signal.Signals(signum).name)


def install_sigterm_handler() -> Any:
    """Make SIGTERM stop this process like Ctrl-C (its running trial ends as interrupted).

    Returns the handler it replaced (None off the main thread, where nothing changes)."""
    if threading.current_thread() is threading.main_thread():
        return signal.signal(signal.SIGTERM, _raise_interrupted)
    return None


def _ignore_signals() -> dict:
    """Ignore SIGINT and SIGTERM while an interrupted trial is written down (main thread only);
    returns the handlers to restore."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}


def _restore_signals(old: dict) -> None:
    for s, handler in old.items():
        signal.signal(s, handler)


# ---------------------------------------------------------------------------------------------
# counting trials: one definition for the single process, every worker and the progress bars


class _Tally(NamedTuple):
    finished: int  # trials that count towards n_trials (see ``counts``)
    used: int  # finished + running + waiting: slots of n_trials already taken
    waiting: int
    running: int  # running trials claimed by a worker (these heartbeat)


def _retried_numbers(trials: Sequence[FrozenTrial]) -> set[int]:
    retry_history = optuna.storages.RetryHeartbeatStaleTrialCallback.retry_history
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return {n for t in trials if t.system_attrs for n in retry_history(t)}


def is_interrupted(trial: FrozenTrial) -> bool:
    """A FAIL that says nothing about its parameters: Ctrl-C, SIGTERM, or a database that could
    not take the trial's results (disk full, read-only). Such trials are retried."""
    if trial.state != TrialState.FAIL:
        return False
    reason = str(trial.user_attrs.get("fail_reason", ""))
    return reason == INTERRUPTED or reason.startswith(STORAGE_FAILURE)


def counts(trial: FrozenTrial, retried: set[int]) -> bool:
    """Whether a trial counts towards n_trials: COMPLETE, PRUNED, or FAIL for good.

    A FAIL counts unless it was retried (its retry counts instead, once it finishes) or it was
    interrupted (Ctrl-C, SIGTERM: it is retried when the study resumes).
    """
    if trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
        return True
    return (
        trial.state == TrialState.FAIL and trial.number not in retried and not is_interrupted(trial)
    )


def _tally(trials: Sequence[FrozenTrial]) -> _Tally:
    retried = _retried_numbers(trials)
    finished = waiting = running = 0
    for t in trials:
        if counts(t, retried):
            finished += 1
        elif t.state == TrialState.WAITING:
            waiting += 1
        elif t.state == TrialState.RUNNING and WORKER_ATTR in t.user_attrs:
            running += 1
    return _Tally(finished, finished + waiting + running, waiting, running)


def finished_count(study: optuna.Study) -> int:
    """Finished trials towards ``n_trials`` (``counts``): complete, pruned, and failed for good."""
    return _tally(study.get_trials(deepcopy=False)).finished


class TrialCounter:
    """``counts`` for a loop that counts the same study again and again, at a cost that does not
    grow with the study: a finished trial never changes, so each is read once (its state, its
    fail_reason, the trials it retries) and only unfinished trials are read on every count.

    Not thread-safe: one per loop (the packed trial loops count under their shared lock).
    """

    def __init__(self) -> None:
        self._seen: set[int] = set()  # finished trials already read
        self._complete = 0  # COMPLETE or PRUNED
        self._failed: set[int] = set()  # FAIL, not interrupted: counts unless retried
        self._interrupted: dict[int, FrozenTrial] = {}  # FAIL by Ctrl-C, SIGTERM or storage
        self._retried: set[int] = set()  # trials that finished trials retry
        self._unretried: list[FrozenTrial] = []  # interrupted, no retry yet (at the last count)

    def tally(self, trials: Sequence[FrozenTrial]) -> _Tally:
        """The counts of ``trials`` (all of the study's, as ``study.get_trials`` gives them)."""
        unfinished = []
        for t in trials:
            if t.number in self._seen:
                continue
            if not t.state.is_finished():
                unfinished.append(t)
                continue
            self._seen.add(t.number)
            self._retried.update(_retried_numbers([t]))
            if t.state != TrialState.FAIL:
                self._complete += 1
            elif is_interrupted(t):
                self._interrupted[t.number] = t
            else:
                self._failed.add(t.number)
        retried = self._retried | _retried_numbers(unfinished)
        finished = self._complete + len(self._failed - retried)
        waiting = sum(t.state == TrialState.WAITING for t in unfinished)
        running = sum(
            t.state == TrialState.RUNNING and WORKER_ATTR in t.user_attrs for t in unfinished
        )
        self._unretried = [t for n, t in self._interrupted.items() if n not in retried]
        return _Tally(finished, finished + waiting + running, waiting, running)

    def count(self, study: optuna.Study) -> _Tally:
        return self.tally(study.get_trials(deepcopy=False))

    def requeue_interrupted(self, study: optuna.Study) -> bool:
        """Retry every interrupted trial that has no retry yet, as of the last count (call
        under the study lock, after counting); whether any was queued."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            for t in self._unretried:
                _retry(study, t)
        queued, self._unretried = bool(self._unretried), []
        return queued


def _retry(study: optuna.Study, trial: FrozenTrial) -> None:
    """Queue ``trial`` again with the same parameters, recorded as Optuna records retries."""
    history = [*optuna.storages.RetryHeartbeatStaleTrialCallback.retry_history(trial), trial.number]
    study.add_trial(
        optuna.trial.create_trial(
            state=TrialState.WAITING,
            params=trial.params,
            distributions=trial.distributions,
            user_attrs={"retry_of": trial.number},
            system_attrs={"failed_trial": history[0], "retry_history": history},
        )
    )


def _requeue_interrupted(study: optuna.Study) -> None:
    """Retry every interrupted trial that has no retry yet (call under the study lock)."""
    trials = study.get_trials(deepcopy=False)
    retried = _retried_numbers(trials)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        for t in trials:
            if is_interrupted(t) and t.number not in retried:
                _retry(study, t)


def _fail_stale(study: optuna.Study) -> None:
    """Fail trials whose heartbeat stopped and queue their retries (call under the study lock,
    so no process counts a failed trial before its retry exists)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def _open(spec: StudySpec, url: str, interval: int, grace: int, **kw: Any) -> optuna.Study:
    """The spec's study (created if missing) on a storage with heartbeat and retries; ``kw``
    goes to ``bound_tuner.study.open_study`` (worker_index, allow_changed_spec, ...)."""
    from .study import open_study

    with warnings.catch_warnings():  # heartbeat options are marked experimental in Optuna
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return open_study(
            spec, url, heartbeat=True, heartbeat_interval=interval, grace_period=grace, **kw
        )


def open_run_study(
    spec: StudySpec, url: str, interval: int, grace: int, *, target: int, allow_changed_spec: bool
) -> tuple[optuna.Study, str | None]:
    """The study of a pool or Ray run (created if missing, the artifact folder recorded), and
    the line that says nothing is left to run (None when trials are left)."""
    from .dashboard import artifact_dir_for

    study = _open(
        spec,
        url,
        interval,
        grace,
        allow_changed_spec=allow_changed_spec,
        artifact_dir=str(artifact_dir_for(url).resolve()),
    )
    return study, nothing_left(study, target)


def nothing_left(study: optuna.Study, target: int) -> str | None:
    """The line that says a study already has ``target`` finished trials, else None."""
    done = finished_count(study)
    if done < target:
        return None
    return (
        f"study {study.study_name!r} already has {done} finished trials of n_trials = {target}; "
        f"nothing left to run. To add trials, raise --n-trials (e.g. --n-trials {done + 5}) or "
        "[study] n_trials"
    )


class FailureStreak:
    """Trials in a row of one worker whose objective raised; ``limit`` of them stop the worker
    (TooManyFailures). Shared by the trial loops of a packed worker (thread-safe)."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise WorkerConfigError(f"max_consecutive_failures = {limit} must be at least 1")
        self.limit = limit
        self.count = 0
        self._lock = threading.Lock()

    def ok(self) -> None:
        with self._lock:
            self.count = 0

    def failed(self, number: int, reason: str) -> None:
        with self._lock:
            self.count += 1
            if self.count >= self.limit:
                raise TooManyFailures(
                    f"{self.count} trials in a row failed (the last, trial {number}: {reason}); "
                    "this worker stopped. The failed trials keep their fail_reason; fix the "
                    "cause and run the same command to resume, or raise [study] "
                    "max_consecutive_failures (--max-failures)"
                )


# ---------------------------------------------------------------------------------------------
# one worker


class _StudyLock:
    """A lock shared by every process of one study: a PostgreSQL advisory lock on the study name.

    Other backends get no lock (SQLite serves one process; elsewhere the count may overshoot by
    up to the number of workers minus one).
    """

    def __init__(self, url: str, study_name: str) -> None:
        u = normalize_url(url)
        self._engine = None
        if u.get_backend_name() == "postgresql":
            import sqlalchemy

            self._engine = sqlalchemy.create_engine(
                u, pool_size=1, max_overflow=0, pool_pre_ping=True
            )
        digest = hashlib.blake2b(f"bound_tuner:{study_name}".encode(), digest_size=8).digest()
        self._key = int.from_bytes(digest, "big", signed=True)

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        if self._engine is None:
            yield
            return
        import sqlalchemy

        with self._engine.begin() as conn:  # the lock ends with the transaction
            conn.execute(sqlalchemy.text("SELECT pg_advisory_xact_lock(:k)"), {"k": self._key})
            yield

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()


def _one_line(e: BaseException, url: str | None = None) -> str:
    for _ in range(10):  # Optuna wraps database errors: the innermost says what happened
        if not isinstance(e.__cause__, Exception):
            break
        e = e.__cause__
    orig = getattr(e, "orig", None)  # a SQLAlchemy error: the driver's own message
    text = str(orig or e).strip()
    first = text.splitlines()[0] if text else ""
    return scrub(f"{type(orig or e).__name__}: {first}" if first else type(e).__name__, url)


def _storage_failure(e: BaseException | None) -> BaseException | None:
    """The database error behind ``e`` (itself, or what it was raised from or during), else
    None. Only the storage's own errors count (``bound_tuner.storage.storage_errors``): an
    OSError of a trial's code is that trial's failure."""
    kinds = storage_errors()
    seen = 0
    while e is not None and seen < 10:
        if isinstance(e, kinds):
            return e
        e, seen = e.__cause__ or e.__context__, seen + 1
    return None


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
    lock: _StudyLock | None = None,
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
        from .spec import DEFAULT_MAX_CONSECUTIVE_FAILURES

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
                current["signals"] = _ignore_signals()  # until the retry is queued
                try:
                    trial.set_user_attr("fail_reason", INTERRUPTED)
                except storage_errors() as werr:  # retried anyway once its heartbeat stops
                    _log.warning("trial %d: not marked interrupted: %s", trial.number, werr)
                raise
            except Exception as err:
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
                except storage_errors() as werr:  # the FAIL itself is written next, or raises
                    _log.warning("trial %d: fail_reason not recorded: %s", trial.number, werr)
                raise

        try:
            if lock is not None:
                held.enter_context(lock())
            _fail_stale(study)
            tally = counter.count(study)
            if counter.requeue_interrupted(study):
                tally = counter.count(study)
            if tally.finished >= target:
                return
            if not (tally.waiting or tally.used < target):
                if not (tally.running and wait_for_running):
                    return
                held.close()
                time.sleep(_POLL_S)
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
            old = current.get("signals") or _ignore_signals()
            try:
                if "number" in current:
                    try:
                        with lock() if lock else contextlib.nullcontext():
                            _requeue_interrupted(study)
                    except storage_errors() as e:  # its heartbeat stops: retried on resume
                        _log.warning("could not queue the interrupted trial again: %s", e)
            finally:
                _restore_signals(old)
                _interrupting = False
            raise
        except TooManyFailures:
            raise
        except (Exception, _Abandon) as failure:
            held.close()
            e = _storage_failure(failure)
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


def _heartbeat_settings(
    spec: StudySpec, interval: int | None, grace: int | None
) -> tuple[int, int]:
    if interval is None:
        interval = spec.storage.get("heartbeat_interval", DEFAULT_HEARTBEAT_INTERVAL)
    if grace is None:
        grace = spec.storage.get("grace_period", default_grace_period(interval))
    if interval < 1:
        raise WorkerConfigError(f"heartbeat interval {interval} s must be at least 1 second")
    if grace <= interval:
        raise WorkerConfigError(
            f"grace period {grace} s must be longer than the heartbeat interval {interval} s "
            "(e.g. three times it), or live trials would be failed"
        )
    return interval, grace


def _as_spec(spec: StudySpec | str | Path) -> StudySpec:
    from .spec import load_spec

    return load_spec(spec) if isinstance(spec, (str, Path)) else spec


def _target(spec: StudySpec, n_trials: int | None) -> int:
    target = n_trials if n_trials is not None else spec.n_trials
    if target < 1:
        raise WorkerConfigError(f"n_trials = {target} must be at least 1")
    return target


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
    ``bound_tuner.study.sampler_seed``); leave it None for workers started by hand.
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
    from .study import build_objective, load_data

    spec = _as_spec(spec)
    target = _target(spec, n_trials)
    interval, grace = _heartbeat_settings(spec, heartbeat_interval, grace_period)
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
        from .dashboard import dashboard_hooks

        on_result, extra = dashboard_hooks(url, reference=data.train, charts=dashboard_charts)
    else:  # no notes or charts, but the trained weights are still kept beside the database
        from .dashboard import artifact_store_for

        store = artifact_store_for(url)
    objective = build_objective(
        spec, data, device=device, on_result=on_result, artifact_store=store
    )
    from .dashboard import artifact_dir_for
    from .study import SPEC_CHANGED_ATTR, spec_changes

    study = _open(
        spec,
        url,
        interval,
        grace,
        worker_index=worker_index,
        existing_trials=existing_trials,
        allow_changed_spec=allow_changed_spec,
        artifact_dir=str(artifact_dir_for(url).resolve()),
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
    from .device import resolve_device

    ident = f"{socket.gethostname()}:{os.getpid()}/{resolve_device(device)}"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        ident += f" (GPU {visible})"
    lock = _StudyLock(url, spec.name)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=target, initial=min(finished_count(study), target), unit="trial")
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
        if pack > 1:  # K trial loops in K threads, trained together (bound_tuner.packed_trials)
            from .packed_trials import ThreadLock, run_loops

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


# ---------------------------------------------------------------------------------------------
# the pool


def parse_gpus(text: str) -> list[int | str]:
    """``"0,1,3"`` -> ``[0, 1, 3]``; GPU-/MIG- UUIDs pass through as strings."""
    out: list[int | str] = []
    for tok in (t.strip() for t in text.split(",")):
        if tok.isdigit():
            out.append(int(tok))
        elif tok.startswith(("GPU-", "MIG-")):
            out.append(tok)
        else:
            raise WorkerConfigError(
                f"--gpus {text!r}: {tok!r} is not a GPU index; give indices such as 0,1,2,3"
            )
    return out


def _worker_devices(
    n_workers: int | None,
    gpus: Sequence[int | str] | None,
    trials_per_gpu: int,
    device: str = "auto",
) -> list[tuple[str | None, str]]:
    """(CUDA_VISIBLE_DEVICES, torch device) for each worker of the pool; None leaves the
    variable as this process has it.

    Without ``gpus`` the workers run on ``device``: "auto" and "cpu" give CPU workers (one torch
    thread each), a CUDA device ("cuda", "cuda:1") puts every worker on it."""
    if trials_per_gpu < 1:
        raise WorkerConfigError(f"--trials-per-gpu {trials_per_gpu} must be at least 1")
    if gpus is None:
        if trials_per_gpu != 1:
            raise WorkerConfigError("--trials-per-gpu needs --gpus, e.g. --gpus 0,1")
        n = n_workers if n_workers is not None else (os.cpu_count() or 1)
        if n < 1:
            raise WorkerConfigError(f"--workers {n} must be at least 1")
        if device in ("auto", "cpu"):
            return [("", "cpu")] * n
        if not device.startswith("cuda"):
            raise WorkerConfigError(
                f"device {device!r} for a pool of workers: use cpu, auto (CPU workers), cuda or "
                "cuda:N (every worker on that GPU), or give gpus"
            )
        return [(None, device)] * n
    if device not in ("auto", "cuda"):
        raise WorkerConfigError(
            f"device {device!r} with gpus: each worker trains on its own GPU of gpus; leave "
            "out the device"
        )
    gpus = list(gpus)
    if not gpus:
        raise WorkerConfigError("--gpus is empty; give GPU indices such as 0,1,2,3")
    seen = set()
    for g in gpus:
        if g in seen:
            raise WorkerConfigError(
                f"--gpus lists GPU {g} twice; use --trials-per-gpu 2 for two workers on one GPU"
            )
        seen.add(g)
    slots = [(str(g), "cuda") for g in gpus for _ in range(trials_per_gpu)]
    if n_workers is not None and n_workers != len(slots):
        raise WorkerConfigError(
            f"--workers {n_workers} does not match {len(gpus)} GPUs x {trials_per_gpu} trials "
            f"per GPU = {len(slots)} workers; leave out --workers"
        )
    return slots


def _watch_parent(parent: int) -> None:
    """End this worker like SIGTERM if its parent dies (no orphans running trials)."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="bound-tuner-parent-watch", daemon=True).start()


def work(
    index: int, device: str, payload: bytes, storage: str, options: dict[str, Any]
) -> str | None:
    """What every worker of an executor runs (the local pool's processes, Ray's tasks): the
    spec from ``payload`` and ``run_worker`` on ``device``. Returns None when the study is done,
    else the one line that says why this worker stopped. Ctrl-C, SIGTERM or a cancellation
    raise KeyboardInterrupt (the running trial ends as interrupted and is queued again)."""
    try:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        spec = pickle.loads(payload)  # imports torch (through bound_tuner.spec)
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
        from .spec import SpecError

        if not isinstance(e, (SpecError, StorageError, WorkerConfigError, TrialError)):
            traceback.print_exc()
        return _one_line(e, storage)
    return None


def _worker_main(
    index: int,
    visible_devices: str | None,
    device: str,
    payload: bytes,
    storage: str,
    options: dict[str, Any],
    errors: Any,
    parent: int | None = None,
) -> None:
    """Entry point of a spawned worker: CUDA visibility first, then torch and the study loop.
    A worker that fails sends its one line through ``errors`` (a pipe: no semaphore for the
    resource tracker to report as leaked when another worker is killed)."""
    if visible_devices is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = visible_devices
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops us
    install_sigterm_handler()  # the parent's SIGTERM ends our trial as interrupted
    if parent is not None:
        _watch_parent(parent)
    try:
        failure = work(index, device, payload, storage, options)
    except KeyboardInterrupt:
        sys.exit(130)
    if failure is not None:
        errors.send(failure)
        errors.close()
        sys.exit(1)


def _describe_exit(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


def run_workers(
    spec: StudySpec | str | Path,
    *,
    storage: str | None,
    n_workers: int | None = None,
    gpus: Sequence[int | str] | None = None,
    trials_per_gpu: int = 1,
    n_trials: int | None = None,
    progress: bool = True,
    heartbeat_interval: int | None = None,
    grace_period: int | None = None,
    dashboard: bool = True,
    device: str = "auto",
    max_consecutive_failures: int | None = None,
    allow_changed_spec: bool = False,
) -> optuna.Study:
    """Run the spec's study with a pool of worker processes until it has ``n_trials`` in all.

    Without ``gpus``: ``n_workers`` workers (default: one per CPU core) on ``device``: CPU
    workers with one torch thread each for "auto" or "cpu", every worker on one GPU for "cuda"
    or "cuda:N". With ``gpus``: ``trials_per_gpu`` workers per listed GPU.
    ``max_consecutive_failures`` and ``allow_changed_spec``: see ``run_worker``. SQLite serves one process,
    so more than one worker needs PostgreSQL. A worker that dies does not stop the others (its
    trial is retried); once all have ended, any non-zero exit raises WorkerError. ``dashboard``:
    trial notes and samples from every worker, the study's charts from worker 0 and, at the end,
    from the parent. Ctrl-C or SIGTERM stops every worker (their trials end as interrupted and
    are retried when the study resumes) and raises KeyboardInterrupt.
    """
    slots = _worker_devices(n_workers, gpus, trials_per_gpu, device)
    if gpus is not None:
        check_gpus(gpus)
    where = f"GPUs {','.join(map(str, gpus))}" if gpus else slots[0][1]
    return run_pool(
        spec,
        storage=storage,
        slots=slots,
        n_trials=n_trials,
        progress=progress,
        heartbeat_interval=heartbeat_interval,
        grace_period=grace_period,
        dashboard=dashboard,
        where=where,
        max_consecutive_failures=max_consecutive_failures,
        allow_changed_spec=allow_changed_spec,
    )


def run_pool(
    spec: StudySpec | str | Path,
    *,
    storage: str | None,
    slots: Sequence[tuple[str | None, str]],
    n_trials: int | None = None,
    progress: bool = True,
    heartbeat_interval: int | None = None,
    grace_period: int | None = None,
    dashboard: bool = True,
    where: str = "CPU",
    max_consecutive_failures: int | None = None,
    allow_changed_spec: bool = False,
) -> optuna.Study:
    """The pool of ``run_workers``: one spawned process per (CUDA_VISIBLE_DEVICES, device) slot."""
    import multiprocessing as mp

    from .study import build_objective, load_data

    spec = _as_spec(spec)
    target = _target(spec, n_trials)
    interval, grace = _heartbeat_settings(spec, heartbeat_interval, grace_period)
    url = resolve_url(storage)
    if len(slots) > 1 and is_sqlite(url):
        raise StorageError(
            f"storage {redact(url)} is SQLite, which serves one process, not {len(slots)} "
            "workers; use PostgreSQL (--storage postgresql://user@host:5432/dbname) or, from "
            "your own Optuna code, a journal storage (JournalFileBackend on a shared file, or "
            "JournalRedisBackend), or run one worker"
        )
    check_storage(url)
    # bad data or search settings fail here, before the study exists (never in the workers)
    build_objective(spec, load_data(spec), device="cpu")
    study, done = open_run_study(
        spec, url, interval, grace, target=target, allow_changed_spec=allow_changed_spec
    )
    if done is not None:
        _log.warning(done)
        return study
    lock = _StudyLock(url, spec.name)

    ctx = mp.get_context("spawn")
    payload = pickle.dumps(spec)
    options = {
        "n_trials": target,
        "heartbeat_interval": interval,
        "grace_period": grace,
        "dashboard": dashboard,
        "max_consecutive_failures": max_consecutive_failures,
        "allow_changed_spec": allow_changed_spec,
        # every worker seeds its sampler from the trials the study had when the pool started
        "existing_trials": len(study.get_trials(deepcopy=False)),
    }
    pipes = [ctx.Pipe(duplex=False) for _ in slots]
    procs = [
        ctx.Process(
            target=_worker_main,
            args=(i, visible, device, payload, url, options, pipes[i][1], os.getpid()),
            name=f"bound-tuner-worker-{i}",
        )
        for i, (visible, device) in enumerate(slots)
    ]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=target,
            initial=min(finished_count(study), target),
            unit="trial",
            desc=f"{spec.name}: {len(procs)} workers on {where}",
        )
    ended: dict[int, int | None] = {}
    try:
        for p in procs:
            p.start()
        last_poll = 0.0
        counter = TrialCounter()
        while len(ended) < len(procs):
            for i, p in enumerate(procs):
                if i not in ended and not p.is_alive():
                    p.join()
                    ended[i] = p.exitcode
                    if p.exitcode != 0 and bar is not None:
                        bar.write(f"worker {i} (pid {p.pid}) {_describe_exit(p.exitcode)}")
            if time.monotonic() - last_poll >= _POLL_S:
                last_poll = time.monotonic()
                with lock():  # a dead worker's trial is failed and retried promptly
                    _fail_stale(study)
                if bar is not None:
                    bar.n = min(counter.count(study).finished, target)
                    bar.refresh()
            time.sleep(0.2)
    except KeyboardInterrupt:
        old = _ignore_signals()  # a second Ctrl-C must not leave workers behind
        try:
            _stop(procs)
        finally:
            _restore_signals(old)
        raise
    finally:
        lock.close()
        if bar is not None:
            bar.n = min(finished_count(study), target)
            bar.close()

    if dashboard:
        save_final_charts(study)

    messages: dict[int, str] = {}
    for i, (reader, writer) in enumerate(pipes):
        writer.close()
        try:
            if reader.poll():
                messages[i] = reader.recv()
        except (EOFError, OSError):  # the worker died before it said why; its exit code tells
            pass
        finally:
            reader.close()
    failed = {i: code for i, code in ended.items() if code != 0}
    if failed:
        parts = []
        for i, code in sorted(failed.items()):
            what = messages.get(i) or _describe_exit(code)
            parts.append(f"worker {i} ({slots[i][1]}, pid {procs[i].pid}): {what}")
        raise WorkerError(
            f"{len(failed)} of {len(procs)} workers failed: {'; '.join(parts)}; the study has "
            f"{finished_count(study)} of {target} finished trials"
        )
    return study


def save_final_charts(study: optuna.Study) -> None:
    """The dashboard charts of a finished pool (worker 0 built the earlier ones); a failure is a
    warning, since charts are a view and the study is done."""
    from .dashboard import save_charts

    try:
        save_charts(study)
    except Exception as e:
        warnings.warn(f"could not save the dashboard charts: {e}", stacklevel=3)


def check_device(device: str) -> None:
    """Refuse a torch device this process cannot use, with one line (before any study exists);
    "auto" is always usable (``bound_tuner.device.resolve_device``)."""
    from .device import DeviceError, resolve_device

    try:
        resolve_device(device)
    except DeviceError as e:
        raise WorkerConfigError(f"--{e}") from None


def check_gpus(gpus: Sequence[int | str]) -> None:
    """Refuse --gpus on a machine without those GPUs, asking a short-lived process so that this
    one never touches CUDA."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    probe = "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)"
    try:
        out = subprocess.run(
            [sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120
        )
        count = int(out.stdout.strip().splitlines()[-1])
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        count = 0
    if count == 0:
        raise WorkerConfigError(
            f"--gpus {','.join(map(str, gpus))} but this machine shows no CUDA GPU; "
            "use --workers K for CPU workers"
        )
    missing = [g for g in gpus if isinstance(g, int) and g >= count]
    if missing:
        raise WorkerConfigError(
            f"--gpus lists GPU {missing[0]}, but this machine has {count} (0..{count - 1})"
        )


def _stop(procs: Sequence[Any], *, timeout: float = 30.0) -> None:
    """SIGTERM the workers, which end their trials as interrupted (retried on resume) and exit;
    kill any that has not ended after ``timeout`` seconds (its trial goes stale and is retried)."""
    started = [p for p in procs if p.pid is not None]
    for p in started:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + timeout
    for p in started:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join()
