"""Which trials count towards ``n_trials``, retries of interrupted and stale trials, and the
consecutive-failure limit."""

from __future__ import annotations

import socket
import threading
import warnings
from collections.abc import Sequence
from typing import NamedTuple

import optuna
from optuna.trial import FrozenTrial, TrialState

from bound_tuner.execution.errors import TooManyFailures, WorkerConfigError
from bound_tuner.execution.signals import INTERRUPTED

WORKER_ATTR = "worker"  # user attr: host:pid/device of the worker that runs the trial
STORAGE_FAILURE = "storage error: "  # fail_reason prefix of a trial the database refused
POLL_S = 0.5


class Tally(NamedTuple):
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


def tally_trials(trials: Sequence[FrozenTrial]) -> Tally:
    retried = _retried_numbers(trials)
    finished = waiting = running = 0
    for t in trials:
        if counts(t, retried):
            finished += 1
        elif t.state == TrialState.WAITING:
            waiting += 1
        elif t.state == TrialState.RUNNING and WORKER_ATTR in t.user_attrs:
            running += 1
    return Tally(finished, finished + waiting + running, waiting, running)


def finished_count(study: optuna.Study) -> int:
    """Finished trials towards ``n_trials`` (``counts``): complete, pruned, and failed for good."""
    return tally_trials(study.get_trials(deepcopy=False)).finished


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

    def tally(self, trials: Sequence[FrozenTrial]) -> Tally:
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
        return Tally(finished, finished + waiting + running, waiting, running)

    def count(self, study: optuna.Study) -> Tally:
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


def requeue_interrupted(study: optuna.Study) -> None:
    """Retry every interrupted trial that has no retry yet (call under the study lock)."""
    trials = study.get_trials(deepcopy=False)
    retried = _retried_numbers(trials)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        for t in trials:
            if is_interrupted(t) and t.number not in retried:
                _retry(study, t)


class LiveTrials:
    """The trials this process is running (a worker's one, or the K of a pack), kept from being
    failed as stale by this process's own claims: ``fail_stale`` first records a heartbeat for
    each. Optuna's heartbeat thread of a trial can fall behind the grace period on a busy
    machine, and in a pack the next claim of a sibling thread would then fail a trial that is
    still training. Trials of other processes are still failed once their heartbeat is stale.
    Thread-safe; without a heartbeat storage (``store`` None, the gRPC proxy) it does nothing."""

    def __init__(self, store: optuna.storages.BaseStorage | None = None) -> None:
        heartbeat = isinstance(store, optuna.storages.RDBStorage) and store.get_heartbeat_interval()
        self._store = store if heartbeat else None
        self._numbers: set[int] = set()
        self._guard = threading.Lock()

    def add(self, number: int) -> None:
        with self._guard:
            self._numbers.add(number)

    def discard(self, number: int) -> None:
        with self._guard:
            self._numbers.discard(number)

    def refresh(self, study: optuna.Study) -> None:
        """Record a heartbeat for every trial this process runs."""
        with self._guard:
            numbers = sorted(self._numbers)
        if self._store is None or not numbers:
            return
        study_id = self._store.get_study_id_from_name(study.study_name)
        for number in numbers:
            trial_id = self._store.get_trial_id_from_study_id_trial_number(study_id, number)
            self._store.record_heartbeat(trial_id)


def fail_stale(study: optuna.Study, *, live: LiveTrials | None = None) -> None:
    """Fail trials whose heartbeat stopped and queue their retries (call under the study lock,
    so no process counts a failed trial before its retry exists); the trials of ``live`` (this
    process's own) first get a heartbeat, so they are never among them."""
    if live is not None:
        live.refresh(study)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def fail_unclaimed(study: optuna.Study) -> list[int]:
    """Fail the RUNNING trials that name no worker, each with a retry queued; their numbers.

    Call only under an exclusive study lock (``StudyLock.exclusive``): a worker writes its name
    on a trial before it lets go of the lock, so a trial without one is a claim whose writes were
    lost (the database went away between creating the trial and naming its worker). No heartbeat
    was ever written for it and nothing else would end it. Its retry takes its place in the
    count, as a stale trial's does."""
    lost = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if WORKER_ATTR not in t.user_attrs:
            study.tell(t.number, state=TrialState.FAIL)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                _retry(study, t)
            lost.append(t.number)
    return lost


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


def fail_orphans(study: optuna.Study, pids: set[int]) -> list[int]:
    """Fail the trials still RUNNING under a worker of this machine whose process is one of
    ``pids``, once every one of those processes has ended: nothing will write them any more (a
    trial whose final write was lost to a database outage, its retry already counted). Returns
    their numbers. Trials of other machines and processes are left alone."""
    host = socket.gethostname()
    orphans = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = str(t.user_attrs.get(WORKER_ATTR, ""))
        where, _, rest = worker.partition(":")
        pid = rest.split("/")[0]
        if where == host and pid.isdigit() and int(pid) in pids:
            study.tell(t.number, state=TrialState.FAIL)
            orphans.append(t.number)
    return orphans
