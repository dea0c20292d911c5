"""The loop of one worker: claim a trial under the study lock, run it, record it, until the study has
``n_trials`` finished trials in all.

Each pass of the loop runs one trial and ends in exactly one ``Outcome``, decided in one place
(``decide``) from what the objective did (``TrialRun``, facts only) and what Optuna raised:

==============  ======================================================================
COMPLETE        a value, recorded; the failure streak starts again
PRUNED          pruned by the pruner
FAILED          the objective raised, or returned NaN (a diverged model, an unusable
                sample); its ``fail_reason`` says why; counts towards
                ``max_consecutive_failures``
INTERRUPTED     Ctrl-C, SIGTERM, a Ray cancel, or a stopped pack: the trial ends as FAIL
                with ``fail_reason = "interrupted"``, is queued again, and the worker stops
                (KeyboardInterrupt), even when another process took the trial over meanwhile
TAKEN_OVER      another process failed the trial as stale while it ran (its retry runs
                instead); the worker goes on
STORAGE_OUTAGE  the database server went away (``connection_lost``): the worker waits for
                it with backoff, up to ``[storage] outage_seconds``, then writes the
                trial's result if it still can, else fails it for a retry, and goes on
==============  ======================================================================

Signals follow ``bound_tuner.execution.signals``: they act while the objective runs and while
the worker waits, and are deferred while it writes the study.

Every worker heartbeats its running trial. A trial whose worker died (killed, preempted, out of
memory) is failed once its heartbeat is older than the grace period and is re-queued
(RetryHeartbeatStaleTrialCallback); the next free worker runs it again. A failed trial that was
retried does not count towards ``n_trials``; its retry does. Through Optuna's gRPC storage proxy
(``grpc://``) there is neither the lock nor a heartbeat: the count may overshoot by up to the number
of workers minus one, and a dead worker's trial stays RUNNING."""

from __future__ import annotations

import contextlib
import enum
import gc
import logging
import math
import os
import pickle
import socket
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from bound_tuner.config.schema import DEFAULT_MAX_CONSECUTIVE_FAILURES, SpecError
from bound_tuner.execution.accounting import (
    POLL_S,
    STORAGE_FAILURE,
    WORKER_ATTR,
    FailureStreak,
    LiveTrials,
    TrialCounter,
    fail_stale,
    fail_unclaimed,
    nothing_left,
    requeue_interrupted,
)
from bound_tuner.execution.errors import TooManyFailures, TrialError, WorkerConfigError
from bound_tuner.execution.lock import StudyLock
from bound_tuner.execution.plan import (
    RunOptions,
    as_spec,
    check_device,
    heartbeat_settings,
    open_with_heartbeat,
    outage_setting,
    progress_bar,
    thread_excepthook,
    trial_target,
)
from bound_tuner.execution.signals import (
    INTERRUPTED,
    SignalGate,
    catch_lost_interrupts,
    restore_unraisable_hook,
)
from bound_tuner.objectives.pack_stop import PackInterrupted
from bound_tuner.objectives.studies import SPEC_CHANGED_ATTR, spec_changes
from bound_tuner.storage.database import (
    DEFAULT_OUTAGE_SECONDS,
    StorageError,
    check_storage,
    connection_lost,
    is_grpc,
    resolve_url,
    scrub,
    storage_errors,
)
from bound_tuner.storage.folders import artifact_store_for

if TYPE_CHECKING:
    from bound_tuner.config.schema import StudySpec

_log = logging.getLogger(__name__)
RECORD_LOCK_S = 5.0  # longest wait for the study lock while an interrupted trial is queued again
NAN_REASON = "the objective returned NaN"


class Outcome(enum.Enum):
    """How one pass of the worker loop ended (see the module's table)."""

    COMPLETE = "complete"
    PRUNED = "pruned"
    FAILED = "failed"
    INTERRUPTED = "interrupted"
    TAKEN_OVER = "taken over"
    STORAGE_OUTAGE = "storage outage"


@dataclass(frozen=True)
class Verdict:
    """The outcome of one trial, with its number, the reason of a failure and the error behind
    an outage or a failure the worker cannot go on from."""

    outcome: Outcome
    number: int | None
    reason: str = ""
    error: BaseException | None = None


class TrialInterrupted(Exception):
    """The objective was interrupted: Optuna ends the trial as FAIL and returns (an Exception,
    so that Optuna's own code never meets a KeyboardInterrupt halfway through its tell)."""


@dataclass
class TrialRun:
    """What happened to one claimed trial, as the objective's wrapper saw it: facts only, no
    decisions (``decide`` makes those)."""

    trial: optuna.Trial | None = None
    values: Any = None  # what the objective returned
    error: BaseException | None = None  # what it raised (not an interrupt)
    interrupted: bool = False  # Ctrl-C, SIGTERM, a Ray cancel or a stopped pack
    finished_elsewhere: bool = False  # a write found the trial already finished
    told: FrozenTrial | None = None  # the trial as Optuna recorded it (the first callback)
    attrs: dict[str, Any] = field(default_factory=dict)

    @property
    def number(self) -> int | None:
        return None if self.trial is None else self.trial.number

    def record_told(self, study: optuna.Study, trial: FrozenTrial) -> None:
        """The first callback of ``study.optimize``: Optuna recorded the trial."""
        self.told = trial


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


def _non_finite(values: Any) -> bool:
    """Whether a returned value (or any of several) is NaN or infinite: Optuna records FAIL."""
    seq = values if isinstance(values, (list, tuple)) else [values]
    try:
        return any(not math.isfinite(float(v)) for v in seq)
    except (TypeError, ValueError):
        return False


def _state_of(study: optuna.Study, number: int) -> TrialState | None:
    """The trial's state in the database (None if it cannot be read)."""
    try:
        for t in study.get_trials(deepcopy=False):
            if t.number == number:
                return t.state
    except storage_errors():
        return None
    return None


def decide(
    run: TrialRun, raised: BaseException | None, study: optuna.Study, url: str | None
) -> Verdict:
    """The one place where a trial's outcome is decided, from what its objective did (``run``)
    and what ``study.optimize`` raised (``raised``, None when it returned).

    An exception that is none of these (SystemExit, an error of a user's callback, a database
    error that is not an outage) is raised again: the worker stops on it."""
    number = run.number
    if run.interrupted or isinstance(raised, KeyboardInterrupt):
        return Verdict(Outcome.INTERRUPTED, number, INTERRUPTED)
    if raised is not None and not isinstance(raised, Exception):
        raise raised  # SystemExit, GeneratorExit
    storage = _storage_failure(raised) or _storage_failure(run.error)
    if storage is not None and not _finished_elsewhere(storage):
        if connection_lost(storage):
            return Verdict(Outcome.STORAGE_OUTAGE, number, _one_line(storage, url), storage)
        what = f"trial {number}" if number is not None else "a new trial"
        raise TrialError(
            f"{what} failed: {_one_line(storage, url)}; the finished trials are kept; free disk "
            "space or make the database writable, then run the same command to resume (an "
            "unfinished trial is retried)"
        ) from None
    if number is None:  # no trial was claimed: not the trial's error
        if raised is not None:
            raise raised
        return Verdict(Outcome.COMPLETE, None)
    if run.told is None:  # Optuna did not record the trial: who ended it?
        if run.finished_elsewhere or _finished_elsewhere(raised) or _finished_elsewhere(run.error):
            return Verdict(Outcome.TAKEN_OVER, number)
        if raised is not None:
            if _state_of(study, number) in (TrialState.FAIL, TrialState.COMPLETE):
                return Verdict(Outcome.TAKEN_OVER, number)  # Optuna: "Cannot tell a FAIL trial"
            raise raised
    elif raised is not None:
        raise raised  # recorded, then a callback raised: the user's code, not the trial's
    if run.error is not None:
        if _finished_elsewhere(run.error) or run.finished_elsewhere:
            return Verdict(Outcome.TAKEN_OVER, number)
        return Verdict(Outcome.FAILED, number, _one_line(run.error, url))
    told = run.told
    if told is not None and told.state == TrialState.PRUNED:
        return Verdict(Outcome.PRUNED, number)
    if _non_finite(run.values) or (told is not None and told.state == TrialState.FAIL):
        reason = (told.user_attrs.get("fail_reason") if told is not None else None) or NAN_REASON
        return Verdict(Outcome.FAILED, number, str(reason))
    return Verdict(Outcome.COMPLETE, number)


class OutageClock:
    """How long a worker has waited for its database: backoff from 0.5 s, doubling to 8 s, until
    ``limit`` seconds have passed since the first failure of this outage; then TrialError with
    the line a failed database gets."""

    def __init__(self, limit: float, url: str | None) -> None:
        self.limit, self.url = limit, url
        self._since: float | None = None
        self._delay = 0.5

    def ok(self) -> None:
        """The database answered: the outage (if any) is over."""
        self._since, self._delay = None, 0.5

    def wait(self, error: BaseException, what: str) -> None:
        now = time.monotonic()
        if self._since is None:
            self._since = now
            _log.warning(
                "%s: the database went away (%s); waiting up to %g s for it "
                "([storage] outage_seconds)",
                what,
                _one_line(error, self.url),
                self.limit,
            )
        if now - self._since >= self.limit:
            raise TrialError(
                f"{what} failed: {_one_line(error, self.url)} (the database did not come back "
                f"within {self.limit:g} s, [storage] outage_seconds); the finished trials are "
                "kept; check the database, then run the same command to resume (an unfinished "
                "trial is retried)"
            ) from None
        time.sleep(min(self._delay, max(0.0, self.limit - (now - self._since))))
        self._delay = min(self._delay * 2, 8.0)


def _taken_over_warning(number: int | None) -> None:
    _log.warning(
        "trial %s was failed as stale by another process while this one ran it (its heartbeat "
        "came later than the grace period: a stalled or overloaded machine; raise [storage] "
        "grace_period); its retry runs instead",
        number,
    )


class QuietOutcomes(logging.Filter):
    """Optuna logs an interrupted trial, and one that another process took over, with a
    traceback and its missing value; the run says each in one line (``_taken_over_warning``,
    the interrupted message). Drops those records of this loop's current trial only (``run``)."""

    def __init__(self) -> None:
        super().__init__()
        self.run = TrialRun()

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, (KeyboardInterrupt, TrialInterrupted)) or _finished_elsewhere(exc):
            return False
        run = self.run
        said_elsewhere = run.interrupted or run.finished_elsewhere or _finished_elsewhere(run.error)
        return not (said_elsewhere and record.getMessage().startswith(f"Trial {run.number} failed"))


def _settle_outage(
    study: optuna.Study, run: TrialRun, verdict: Verdict, clock: OutageClock
) -> None:
    """Once the database is back: write the result of a trial that finished during the outage,
    else fail it with a storage fail_reason (queued again by the next claim); a trial another
    process already ended is left as it is."""
    if run.trial is None:
        return
    while True:
        try:
            state = None
            for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                if t.number == run.trial.number:
                    state = t.state
            if state is None:
                return
            if run.error is None and not run.interrupted and run.values is not None:
                if not _non_finite(run.values):
                    study.tell(run.trial, run.values)
                    return
            with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
                run.trial.set_user_attr("fail_reason", STORAGE_FAILURE + verdict.reason)
                study.tell(run.trial, state=TrialState.FAIL)
            return
        except Exception as e:
            if not connection_lost(e):
                if isinstance(e, ValueError):  # Optuna: the trial is already finished
                    return
                raise
            clock.wait(e, f"trial {run.trial.number}")


def _release(held: contextlib.ExitStack) -> None:
    """Let go of the study lock. A lock whose connection was lost is released already (an
    advisory lock ends with its session), so that error is dropped here."""
    try:
        held.close()
    except storage_errors() as e:
        if not connection_lost(e):
            raise


def _queue_interrupted(study: optuna.Study, lock: Callable[..., Any] | None) -> None:
    """Queue the interrupted trials again (under the study lock, waiting for it briefly); if the
    database refuses, the next worker's claim queues them (``TrialCounter.requeue_interrupted``)."""
    try:
        with lock(timeout=RECORD_LOCK_S) if lock else contextlib.nullcontext():
            requeue_interrupted(study)
    except storage_errors() as e:
        _log.warning("could not queue the interrupted trial again yet: %s", _one_line(e))


def optimize_until(
    study: optuna.Study,
    objective: Any,
    *,
    target: int,
    lock: Callable[..., Any] | None = None,
    ident: str | None = None,
    callbacks: Sequence[Any] = (),
    bar: Any = None,
    url: str | None = None,
    wait_for_running: bool = True,
    failures: FailureStreak | None = None,
    trial_attrs: dict[str, Any] | None = None,
    outage_seconds: float = DEFAULT_OUTAGE_SECONDS,
    live: LiveTrials | None = None,
) -> None:
    """Run trials of ``study`` until it has ``target`` trials that count (``counts``).

    Every trial is claimed under ``lock``: stale trials are failed and retried, interrupted ones
    queued again, the count taken, and the trial created, all before another process may look.
    When every slot is taken but trials still run elsewhere, it waits (``wait_for_running``):
    one of them may die and come back as a retry. Without a heartbeat (the gRPC proxy) no trial
    comes back, so it returns instead. Each trial ends in one ``Outcome`` (``decide``):
    interrupted trials are queued again and raise KeyboardInterrupt; ``failures`` (default:
    five in a row) stops it with TooManyFailures; a database that goes away is waited for up to
    ``outage_seconds``, then TrialError; a database that refuses a write (disk full, read-only)
    raises TrialError. ``trial_attrs`` are set on every trial. ``live`` holds the trials this
    process runs (shared by the loops of a pack), which its own claims never fail as stale.
    """
    ident = ident or f"{socket.gethostname()}:{os.getpid()}"
    streak = failures if failures is not None else FailureStreak(DEFAULT_MAX_CONSECUTIVE_FAILURES)
    attrs = dict(trial_attrs or {})
    counter = TrialCounter()
    clock = OutageClock(outage_seconds, url)
    gate = SignalGate()
    live = live if live is not None else LiveTrials()
    optuna_log = logging.getLogger("optuna.study._optimize")
    quiet = QuietOutcomes()
    optuna_log.addFilter(quiet)
    try:
        while True:
            quiet.run = TrialRun()
            if _one_pass(study, objective, target, lock, ident, callbacks, url, wait_for_running,
                         streak, attrs, counter, clock, gate, quiet.run, live):  # fmt: skip
                return
            if bar is not None:
                with contextlib.suppress(*storage_errors()):
                    bar.n = min(counter.count(study).finished, target)
                    bar.refresh()
    finally:
        gate.close()
        optuna_log.removeFilter(quiet)


def _one_pass(
    study: optuna.Study,
    objective: Any,
    target: int,
    lock: Callable[..., Any] | None,
    ident: str,
    callbacks: Sequence[Any],
    url: str | None,
    wait_for_running: bool,
    streak: FailureStreak,
    attrs: dict[str, Any],
    counter: TrialCounter,
    clock: OutageClock,
    gate: SignalGate,
    run: TrialRun,
    live: LiveTrials,
) -> bool:
    """Claim and run one trial (``run`` gathers what happens to it), and act on its outcome;
    True when the loop is done."""
    held = contextlib.ExitStack()

    def wrapped(trial: optuna.Trial) -> Any:
        run.trial = trial
        live.add(trial.number)
        trial.set_user_attr(WORKER_ATTR, ident)
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        _release(held)  # the slot is claimed: let the next process count
        try:
            gate.release()  # signals act while the objective runs
            run.values = objective(trial)
        except optuna.TrialPruned:
            gate.hold()
            raise
        except (KeyboardInterrupt, PackInterrupted):
            gate.hold()
            run.interrupted = True
            try:
                trial.set_user_attr("fail_reason", INTERRUPTED)
            except optuna.exceptions.UpdateFinishedTrialError:
                run.finished_elsewhere = True  # taken over; the interrupt still stops us
            except storage_errors() as werr:  # its heartbeat stops: retried anyway
                _log.warning("trial %d: not marked interrupted: %s", trial.number, werr)
            raise TrialInterrupted(INTERRUPTED) from None
        except Exception as err:
            gate.hold()
            run.error = err
            if not _finished_elsewhere(err):
                reason = _one_line(err, url)
                if _storage_failure(err):  # a FAIL that says nothing of the parameters: retried
                    reason = STORAGE_FAILURE + reason
                try:
                    trial.set_user_attr("fail_reason", reason)
                except optuna.exceptions.UpdateFinishedTrialError:
                    run.finished_elsewhere = True
                except storage_errors() as werr:  # the FAIL itself is written next, or raises
                    _log.warning("trial %d: fail_reason not recorded: %s", trial.number, werr)
            raise
        except BaseException:
            gate.hold()
            raise
        gate.hold()  # the trial is recorded next: signals wait for it
        return run.values

    raised: BaseException | None = None
    try:
        try:
            if lock is not None:
                held.enter_context(lock())
            gate.hold()  # from here until the objective starts: deferred
            fail_stale(study, live=live)
            if getattr(lock, "exclusive", False):  # a StudyLock, or the packed threads' lock
                for number in fail_unclaimed(study):
                    _log.warning("trial %d: its claim was lost to the database; retried", number)
            tally = counter.count(study)
            if counter.requeue_interrupted(study):
                tally = counter.count(study)
            clock.ok()
            if tally.finished >= target:
                return True
            if not (tally.waiting or tally.used < target):
                if not (tally.running and wait_for_running):
                    return True
                _release(held)
                gate.release()
                time.sleep(POLL_S)
                return False
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                study.optimize(
                    wrapped,
                    n_trials=1,
                    callbacks=[run.record_told, *callbacks],
                    catch=(Exception,),
                    gc_after_trial=False,
                )
        except BaseException as e:  # decided below, in one place
            raised = e
        finally:
            _release(held)
            gate.hold()
            if run.trial is not None:  # told (or failed): no longer this process's to keep
                live.discard(run.trial.number)
        verdict = decide(run, raised, study, url)
        if verdict.outcome is Outcome.INTERRUPTED:
            if run.trial is not None:
                _queue_interrupted(study, lock)
            gate.forget()  # this signal is answered here
            gate.close()
            raise KeyboardInterrupt(INTERRUPTED)
        if verdict.outcome is Outcome.STORAGE_OUTAGE:
            gate.release()  # waiting: Ctrl-C acts at once
            what = f"trial {verdict.number}" if verdict.number is not None else "a new trial"
            clock.wait(verdict.error or RuntimeError(verdict.reason), what)
            _settle_outage(study, run, verdict, clock)
            return False
        clock.ok()
        if verdict.outcome is Outcome.TAKEN_OVER:
            _taken_over_warning(verdict.number)
        elif verdict.outcome is Outcome.FAILED:
            streak.failed(verdict.number or 0, verdict.reason)
        elif verdict.number is not None:
            streak.ok()
        gate.release()  # a signal noted while recording acts now
        return False
    except TooManyFailures:
        gate.close()
        raise
    finally:
        _release(held)


def run_worker(
    spec: StudySpec | str | Path,
    *,
    storage: str | None,
    options: RunOptions | None = None,
    device: str = "auto",
    worker_index: int | None = None,
    threads: int | None = None,
    data: Any = None,
    callbacks: Sequence[Any] = (),
) -> optuna.Study:
    """Run trials of the spec's study (created if missing) until it has ``options.n_trials`` in
    all.

    This is the loop of one worker; any number of them, on any machines, may run it against one
    database. ``worker_index`` numbers the workers of one pool (with the trials the study had
    when the run started, ``options.existing_trials``, counted here when None, it seeds the
    sampler: ``bound_tuner.objectives.studies.sampler_seed``); leave it None for workers started
    by hand. ``threads`` sets torch's CPU threads. ``options.dashboard`` writes each trial's note
    and samples for optuna-dashboard; ``options.dashboard_charts`` also rebuilds the study's
    charts, which exactly one process of a study may do (see ``bound_tuner.dashboard``):
    throttled during the run (``ChartsCallback``), and once more when the loop ends unless it
    was interrupted.

    A trial whose objective raises or returns NaN ends as FAIL (its ``fail_reason`` says why)
    and the worker goes on; ``max_consecutive_failures`` such trials in a row (default: the
    spec's [study] setting, 5) stop it with TooManyFailures. A spec that differs from the one
    the study was created from is refused (SpecError) unless ``allow_changed_spec``; then every
    new trial records the differences in its user attr ``spec.changed``. A study that already
    has its ``n_trials`` logs that nothing is left to run and returns.
    """
    # torch only after a worker set CUDA_VISIBLE_DEVICES
    from bound_tuner.objectives.factory import build_objective, load_data

    opts = options if options is not None else RunOptions()
    spec = as_spec(spec)
    target = trial_target(spec, opts.n_trials)
    interval, grace = heartbeat_settings(spec, opts.heartbeat_interval, opts.grace_period)
    outage = outage_setting(spec, opts.outage_seconds)
    url = resolve_url(storage)
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    check_storage(url)
    check_device(device)
    if data is None:
        data = load_data(spec)  # bad data fails before the study exists
    on_result, extra, store = None, [], None
    if opts.dashboard:
        # scipy and plotly only with the dashboard on
        from bound_tuner.dashboard.hooks import dashboard_hooks

        on_result, extra = dashboard_hooks(url, reference=data.train, charts=opts.dashboard_charts)
    else:  # no notes or charts, but the trained weights are still kept beside the database
        store = artifact_store_for(url)
    objective = build_objective(
        spec, data, device=device, on_result=on_result, artifact_store=store
    )

    study, heartbeat_storage = open_with_heartbeat(
        spec,
        url,
        interval,
        grace,
        worker_index=worker_index,
        existing_trials=opts.existing_trials,
        allow_changed_spec=opts.allow_changed_spec,
    )
    changes = spec_changes(study, spec)
    streak = FailureStreak(
        opts.max_consecutive_failures
        if opts.max_consecutive_failures is not None
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
    bar = progress_bar(study, target) if opts.progress else None
    loop: dict[str, Any] = {
        "target": target,
        "callbacks": [*extra, *callbacks],
        "bar": bar,
        "url": url,
        "wait_for_running": not is_grpc(url),  # the proxy carries no heartbeat
        "failures": streak,
        "trial_attrs": {SPEC_CHANGED_ATTR: changes} if changes else None,
        "outage_seconds": outage,
        "live": LiveTrials(heartbeat_storage),  # the trials of this process (all K of a pack)
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


def work(index: int, device: str, payload: bytes, options: RunOptions) -> str | None:
    """What every worker of an executor runs (the local pool's processes, Ray's tasks): the
    spec from ``payload`` and ``run_worker`` on ``device``, against the storage named by
    $BOUND_TUNER_STORAGE (``bound_tuner.execution.plan.worker_env``: the URL, password
    included, never travels as an argument). Returns None when the study is done, else the one
    line that says why this worker stopped (passwords masked). Ctrl-C, SIGTERM or a
    cancellation raise KeyboardInterrupt (the running trial ends as interrupted and is queued
    again)."""
    storage = resolve_url(None)
    previous_hook = threading.excepthook
    # a heartbeat the database refused (an outage) is one line, not a thread's traceback
    threading.excepthook = thread_excepthook(previous_hook, storage)
    previous_unraisable = catch_lost_interrupts()  # a signal lost in a finalizer: sent again
    try:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        spec = pickle.loads(payload)  # a StudySpec (bound_tuner.config.schema)
        run_worker(
            spec,
            storage=storage,
            options=options.for_worker(index),
            device=device,
            worker_index=index,
            threads=1,
        )
    except Exception as e:
        if not isinstance(e, (SpecError, StorageError, WorkerConfigError, TrialError)):
            print(scrub(traceback.format_exc(), storage), file=sys.stderr, flush=True)
        return _one_line(e, storage)
    finally:
        threading.excepthook = previous_hook
        restore_unraisable_hook(previous_unraisable)
        # an Optuna storage holds its database connections until the garbage collector frees it;
        # a Ray worker process runs many tasks, so free this task's before the next one
        gc.collect()
    return None
