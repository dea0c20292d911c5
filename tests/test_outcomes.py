"""Each trial of the worker loop ends in one outcome (``bound_tuner.execution.loop.decide``), and
signals follow one protocol (``bound_tuner.execution.signals``): the faults a long study meets,
each in a real SQLite study."""

from __future__ import annotations

import logging
import math
import os
import signal
import sys
import time

import optuna
import pytest
import sqlalchemy
from optuna.trial import TrialState

from bound_tuner.execution.accounting import FailureStreak, finished_count
from bound_tuner.execution.errors import TooManyFailures
from bound_tuner.execution.loop import optimize_until
from bound_tuner.execution.signals import (
    INTERRUPTED,
    Interrupted,
    SignalGate,
    catch_lost_interrupts,
    install_sigterm_handler,
    restore_unraisable_hook,
)
from bound_tuner.storage.database import make_storage


def _study(tmp_path, name: str = "o") -> tuple[optuna.Study, str]:
    url = f"sqlite:///{tmp_path}/{name}.db"
    return optuna.create_study(storage=make_storage(url), study_name=name), url


def _handlers() -> tuple:
    return signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)


@pytest.fixture
def handlers():
    """The process's SIGINT and SIGTERM handlers as a run finds them (Python's, and the
    command's SIGTERM handler); put back after the test whatever happened."""
    old = _handlers()
    install_sigterm_handler()
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield _handlers()
    finally:
        signal.signal(signal.SIGINT, old[0])
        signal.signal(signal.SIGTERM, old[1])


def test_an_interrupt_of_a_trial_taken_over_meanwhile_still_stops_the_worker(tmp_path, handlers):
    """Ctrl-C reaches a trial that another process has just failed as stale (its heartbeat came
    late on a loaded machine): the worker stops (KeyboardInterrupt) instead of claiming the next
    trial, and the signal handlers are the ones it started with."""
    study, url = _study(tmp_path)
    other = optuna.load_study(study_name="o", storage=make_storage(url))

    def objective(trial: optuna.Trial) -> float:
        trial.suggest_float("x", 0.0, 1.0)
        other.tell(trial.number, state=TrialState.FAIL)  # as fail_stale_trials does
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        optimize_until(study, objective, target=5, url=url)
    assert _handlers() == handlers
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL]  # no other trial was claimed
    assert "fail_reason" not in trials[0].user_attrs  # the other process's FAIL stands


def test_ctrl_c_while_optuna_records_a_trial_waits_for_the_record(tmp_path, handlers):
    """SIGINT that lands inside Optuna's tell (the database write of a finished trial): the trial
    is recorded with its value, then the worker stops with KeyboardInterrupt, not an
    UnboundLocalError from Optuna's half-run tell."""
    study, url = _study(tmp_path)
    armed = {"on": False, "sent": 0}

    def send_sigint(conn, cursor, statement, *args) -> None:
        if armed["on"] and statement.lstrip().upper().startswith("UPDATE TRIALS"):
            armed["on"] = False
            armed["sent"] += 1
            os.kill(os.getpid(), signal.SIGINT)

    def objective(trial: optuna.Trial) -> float:
        x = trial.suggest_float("x", 0.0, 1.0)
        armed["on"] = True  # the next UPDATE of the trials table is the tell
        return x

    sqlalchemy.event.listen(sqlalchemy.engine.Engine, "after_cursor_execute", send_sigint)
    try:
        with pytest.raises(KeyboardInterrupt):
            optimize_until(study, objective, target=5, url=url)
    finally:
        sqlalchemy.event.remove(sqlalchemy.engine.Engine, "after_cursor_execute", send_sigint)
    assert armed["sent"] == 1
    assert _handlers() == handlers
    (trial,) = study.get_trials()
    assert trial.state == TrialState.COMPLETE and trial.value == trial.params["x"]


def test_trials_that_all_return_nan_stop_at_max_consecutive_failures(tmp_path):
    """Objectives return NaN for a non-finite loss or an unusable sample (and say why in
    fail_reason): those trials count as failures, so a study whose trials all diverge stops."""
    study, url = _study(tmp_path)

    def diverges(trial: optuna.Trial) -> float:
        trial.suggest_float("x", 0.0, 1.0)
        trial.set_user_attr("fail_reason", "non-finite loss: nan at step 3")
        return math.nan

    with pytest.raises(TooManyFailures) as e:
        optimize_until(study, diverges, target=20, url=url, failures=FailureStreak(3))
    assert "3 trials in a row failed" in str(e.value)
    assert "non-finite loss: nan at step 3" in str(e.value)
    trials = study.get_trials()
    assert len(trials) == 3 and all(t.state == TrialState.FAIL for t in trials)


def test_a_nan_without_a_reason_is_a_failure_that_says_so(tmp_path):
    study, url = _study(tmp_path)
    outcomes = iter([math.nan, math.nan, 0.5, math.nan, math.nan, 0.25])

    def objective(trial: optuna.Trial) -> float:
        trial.suggest_float("x", 0.0, 1.0)
        return next(outcomes)

    optimize_until(study, objective, target=6, url=url, failures=FailureStreak(3))
    states = [t.state for t in study.get_trials()]
    assert states.count(TrialState.FAIL) == 4 and finished_count(study) == 6


def test_a_callback_that_raises_after_a_nan_trial_is_its_own_error(tmp_path, caplog):
    """A user's callback that raises (here after a NaN trial, which Optuna records as FAIL) stops
    the worker with that error; it is not read as a trial failed as stale elsewhere."""
    study, url = _study(tmp_path)

    def objective(trial: optuna.Trial) -> float:
        trial.suggest_float("x", 0.0, 1.0)
        return math.nan

    def callback(study: optuna.Study, trial) -> None:
        raise RuntimeError("the user's callback broke")

    with caplog.at_level(logging.WARNING, logger="bound_tuner.execution.loop"):
        with pytest.raises(RuntimeError, match="the user's callback broke"):
            optimize_until(study, objective, target=5, url=url, callbacks=[callback])
    assert not [r for r in caplog.records if "failed as stale" in r.getMessage()]
    assert len(study.get_trials()) == 1


def test_signals_are_restored_on_every_path(tmp_path, handlers):
    """A normal end, a failure streak, an interrupt and SystemExit each leave the handlers the
    loop found."""
    study, url = _study(tmp_path)
    optimize_until(study, lambda t: t.suggest_float("x", 0.0, 1.0), target=2, url=url)
    assert _handlers() == handlers

    def fails(trial: optuna.Trial) -> float:
        raise ValueError("no")

    with pytest.raises(TooManyFailures):
        optimize_until(study, fails, target=9, url=url, failures=FailureStreak(2))
    assert _handlers() == handlers

    def interrupted(trial: optuna.Trial) -> float:
        os.kill(os.getpid(), signal.SIGTERM)  # the command's handler: Interrupted
        return 0.0

    with pytest.raises(KeyboardInterrupt):
        optimize_until(study, interrupted, target=9, url=url)
    assert _handlers() == handlers
    last = study.get_trials()[-2]
    assert last.state == TrialState.FAIL and last.user_attrs["fail_reason"] == INTERRUPTED
    assert study.get_trials()[-1].state == TrialState.WAITING  # queued again

    def exits(trial: optuna.Trial) -> float:
        raise SystemExit(3)

    with pytest.raises(SystemExit):
        optimize_until(study, exits, target=20, url=url)
    assert _handlers() == handlers


def test_the_gate_defers_a_signal_and_hands_it_to_the_handler_it_found(handlers):
    gate = SignalGate()
    gate.hold()
    os.kill(os.getpid(), signal.SIGINT)  # noted, not acted on
    assert gate.pending == signal.SIGINT
    with pytest.raises(KeyboardInterrupt):
        gate.release()
    assert _handlers() == handlers and gate.pending is None
    gate.hold()
    os.kill(os.getpid(), signal.SIGTERM)
    gate.forget()
    gate.release()  # forgotten: nothing happens
    assert _handlers() == handlers


class _Finalized:
    """An object whose finalizer is running when SIGTERM arrives (as a database connection's
    is when the garbage collector frees it during a poll)."""

    def __del__(self) -> None:
        signal.raise_signal(signal.SIGTERM)


def test_an_interrupt_raised_inside_a_finalizer_is_sent_again(handlers, capfd):
    """Python cannot pass an exception out of a finalizer: SIGTERM's Interrupted would be
    printed as "Exception ignored" and lost while a trial trains on. The signal is sent again
    a moment later and stops the code that runs then."""
    previous = catch_lost_interrupts()
    try:
        began = time.monotonic()
        with pytest.raises(Interrupted):
            obj = _Finalized()
            del obj  # the handler raises Interrupted inside __del__
            while time.monotonic() - began < 60:  # training goes on (bounded for the test)
                sum(range(1000))
    finally:
        restore_unraisable_hook(previous)
    assert "Exception ignored" not in capfd.readouterr().err


def test_an_unraisable_error_that_is_not_an_interrupt_still_reaches_the_hook(handlers):
    seen = []
    old = sys.unraisablehook
    sys.unraisablehook = seen.append
    previous = catch_lost_interrupts()
    try:

        class Broken:
            def __del__(self) -> None:
                raise ValueError("broken finalizer")

        obj = Broken()
        del obj
    finally:
        restore_unraisable_hook(previous)
        sys.unraisablehook = old
    assert [u.exc_type for u in seen] == [ValueError]


def test_a_trial_taken_over_while_it_reports_says_so_in_one_line_without_a_traceback(
    tmp_path, capfd, caplog
):
    """Another process fails the trial as stale (a late heartbeat on a loaded machine); the
    trial's next ``trial.report`` raises UpdateFinishedTrialError. The worker says so in one
    warning and goes on with the retry; Optuna's traceback of that error is not shown."""
    study, url = _study(tmp_path)
    other = optuna.load_study(study_name="o", storage=make_storage(url))
    taken = []

    def objective(trial: optuna.Trial) -> float:
        x = trial.suggest_float("x", 0.0, 1.0)
        if not taken:
            taken.append(trial.number)
            other.tell(trial.number, state=TrialState.FAIL)  # as fail_stale_trials does
        trial.report(x, 1)
        return x

    optuna_logger = logging.getLogger("optuna")
    optuna_logger.addHandler(caplog.handler)  # optuna's logs do not propagate to the root
    try:
        with caplog.at_level(logging.WARNING):
            optimize_until(study, objective, target=2, url=url)
    finally:
        optuna_logger.removeHandler(caplog.handler)
    shown = caplog.text + capfd.readouterr().err
    assert "Traceback" not in shown and "UpdateFinishedTrialError" not in shown, shown
    assert f"trial {taken[0]} was failed as stale by another process" in shown
    assert finished_count(study) == 2
