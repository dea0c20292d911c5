"""A process never fails its own running trials as stale (``accounting.LiveTrials``): the trial
loops of one pack claim trials while a sibling's trial trains, and on a busy machine Optuna's
heartbeat thread of that trial can fall behind the grace period."""

from __future__ import annotations

import threading
import time
import warnings

import optuna
from optuna.trial import TrialState

from bound_tuner.execution.accounting import LiveTrials, fail_stale
from bound_tuner.execution.loop import optimize_until
from bound_tuner.storage.database import make_storage

GRACE = 1  # seconds; the heartbeat thread writes once when the trial starts (interval below)
INTERVAL = 1000


def _retried(trial) -> int | None:
    """The number of the stale trial that ``trial`` retries (Optuna's retry callback)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(trial)


def _study(tmp_path) -> tuple[optuna.Study, optuna.storages.BaseStorage, str]:
    url = f"sqlite:///{tmp_path}/own.db"
    store = make_storage(url, heartbeat_interval=INTERVAL, grace_period=GRACE, retry_failed=3)
    return optuna.create_study(storage=store, study_name="own"), store, url


def _run_pack_of_two(study, url: str, lives: tuple[LiveTrials, LiveTrials]) -> list[str]:
    """Two trial loops of one process, as a pack runs them: the first trial trains for 4 s
    (its heartbeat goes stale after 1 s), the others take 0.2 s, and the loop of the quick
    ones claims (and, once every slot is taken, polls) meanwhile."""
    guard = threading.Lock()
    errors: list[str] = []

    def objective(trial: optuna.Trial) -> float:
        x = trial.suggest_float("x", 0.0, 1.0)
        time.sleep(4.0 if trial.number == 0 else 0.2)
        return x

    def loop(live: LiveTrials) -> None:
        try:
            optimize_until(study, objective, target=6, lock=lambda: guard, url=url, live=live)
        except BaseException as e:  # noqa: BLE001 (reported by the test)
            errors.append(repr(e))

    first = threading.Thread(target=loop, args=(lives[0],))
    first.start()
    while not study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        time.sleep(0.05)  # trial 0 is the first loop's
    second = threading.Thread(target=loop, args=(lives[1],))
    second.start()
    first.join(120)
    second.join(120)
    return errors


def test_the_loops_of_one_process_never_fail_each_others_trials_as_stale(tmp_path):
    study, store, url = _study(tmp_path)
    live = LiveTrials(store)  # one registry for the process, as run_worker makes it
    assert _run_pack_of_two(study, url, (live, live)) == []
    states = [t.state for t in study.get_trials(deepcopy=False)]
    assert states == [TrialState.COMPLETE] * 6
    assert not any(_retried(t) is not None for t in study.get_trials(deepcopy=False))


def test_without_the_registry_a_sibling_fails_the_trial_as_stale(tmp_path):
    """The fault the registry prevents: loops that do not know each other's trials (separate
    processes) fail a live trial whose heartbeat is a grace period old, and retry it."""
    study, _, url = _study(tmp_path)
    _run_pack_of_two(study, url, (LiveTrials(), LiveTrials()))
    trials = study.get_trials(deepcopy=False)
    assert trials[0].state == TrialState.FAIL
    assert any(_retried(t) == 0 for t in trials)


def test_a_heartbeat_is_recorded_for_the_live_trials_only(tmp_path):
    """``fail_stale`` with a registry: its trial stays RUNNING, a stale one of another process
    is failed and retried."""
    study, store, _ = _study(tmp_path)
    mine, theirs = study.ask(), study.ask()
    study_id = store.get_study_id_from_name("own")
    for t in (mine, theirs):  # both had a heartbeat once, as a started trial has
        store.record_heartbeat(store.get_trial_id_from_study_id_trial_number(study_id, t.number))
    live = LiveTrials(store)
    live.add(mine.number)
    time.sleep(GRACE + 1.0)
    fail_stale(study, live=live)
    by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
    assert by_number[mine.number].state == TrialState.RUNNING
    assert by_number[theirs.number].state == TrialState.FAIL
    assert any(_retried(t) == theirs.number for t in by_number.values())
    live.discard(mine.number)  # told, or its process gone: stale once its heartbeat is
    time.sleep(GRACE + 1.0)
    fail_stale(study, live=live)
    assert study.get_trials(deepcopy=False)[mine.number].state == TrialState.FAIL


def test_a_registry_without_a_heartbeat_storage_does_nothing(tmp_path):
    live = LiveTrials(None)
    live.add(0)
    study, _, _ = _study(tmp_path)
    live.refresh(study)  # no storage to write to: no error, nothing written
    assert study.get_trials(deepcopy=False) == []
