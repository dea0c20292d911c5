"""A trial whose claim was lost to the database (created, but its worker never named: the server
went away in between) is failed and retried by the next claim under the study lock, so that no
trial stays RUNNING for ever (no heartbeat was ever written for it)."""

from __future__ import annotations

import uuid

import optuna
from optuna.trial import TrialState
from worker_spec import PG_URL, needs_pg, pg_storage

from bound_tuner.execution.accounting import WORKER_ATTR, finished_count
from bound_tuner.execution.lock import StudyLock
from bound_tuner.execution.loop import optimize_until
from bound_tuner.storage.database import make_storage


def _objective(trial: optuna.Trial) -> float:
    return trial.suggest_float("x", 0.0, 1.0) ** 2


@needs_pg
def test_a_claim_lost_to_the_database_is_failed_and_retried_by_the_next_claim():
    name = f"lost-claim-{uuid.uuid4().hex[:8]}"
    study = optuna.create_study(study_name=name, storage=pg_storage())
    lock = StudyLock(PG_URL, name)
    try:
        lost = study.ask()  # created, never named by a worker: what an outage mid-claim leaves
        assert WORKER_ATTR not in study.trials[lost.number].user_attrs
        optimize_until(study, _objective, target=3, lock=lock, url=PG_URL)
        trials = study.get_trials()
        assert not [t for t in trials if t.state == TrialState.RUNNING]
        assert trials[lost.number].state == TrialState.FAIL
        retry = [t for t in trials if t.system_attrs.get("failed_trial") == lost.number]
        assert len(retry) == 1 and retry[0].state == TrialState.COMPLETE
        assert finished_count(study) == 3 and len(trials) == 4  # the lost claim does not count
    finally:
        lock.close()
        optuna.delete_study(study_name=name, storage=pg_storage())


def test_without_an_exclusive_lock_a_trial_without_a_worker_is_left_alone(tmp_path):
    """SQLite has no study lock across processes: a RUNNING trial without a worker may be
    another process's claim in progress, so it is not failed."""
    url = f"sqlite:///{tmp_path}/s.db"
    study = optuna.create_study(study_name="s", storage=make_storage(url))
    lock = StudyLock(url, "s")
    assert not lock.exclusive
    other = study.ask()
    optimize_until(study, _objective, target=2, lock=lock, url=url)
    trials = study.get_trials()
    assert trials[other.number].state == TrialState.RUNNING
    assert finished_count(study) == 2
