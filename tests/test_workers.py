"""The worker pool on a real PostgreSQL: exact trial counts, killed workers, SQLite refusal.

The PostgreSQL tests need BOUND_TUNER_TEST_PG_URL (.ci/run sets it) and skip without it.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from pathlib import Path

import optuna
import pytest
from optuna.storages import RetryHeartbeatStaleTrialCallback as Retry
from optuna.trial import TrialState
from worker_spec import PG_URL, needs_pg, pg_storage, write_worker_spec

from bound_tuner.cli import main
from bound_tuner.execution.accounting import WORKER_ATTR, finished_count
from bound_tuner.execution.errors import WorkerError
from bound_tuner.execution.pool import parse_gpus, run_workers, worker_devices


def write_spec(
    path: Path, name: str, *, steps: int = 20, storage: str = "", n_trials: int = 9
) -> Path:
    return write_worker_spec(
        path, name, n_trials=n_trials, steps=steps, lr=True, width=None, extra=storage + "\n"
    )


def pg_trials(name: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=name, storage=pg_storage()).get_trials(deepcopy=False)


@needs_pg
def test_three_workers_finish_exactly_n_trials(tmp_path, study_name, monkeypatch):
    monkeypatch.setenv("BOUND_TUNER_ARTIFACTS", str(tmp_path / "artifacts"))
    spec = write_spec(tmp_path / "s.toml", study_name)
    study = run_workers(str(spec), storage=PG_URL, n_workers=3, n_trials=9, progress=False)
    trials = study.get_trials(deepcopy=False)
    assert sorted(t.number for t in trials) == list(range(9))
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert len({t.user_attrs[WORKER_ATTR] for t in trials}) >= 2  # the work was shared
    assert len({(t.params["T"], t.params["lr"]) for t in trials}) == 9  # workers differ
    assert len(list((tmp_path / "artifacts").rglob("*"))) >= 9  # a samples image per trial


@needs_pg
@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_killed_worker_trial_fails_and_is_retried(tmp_path, study_name):
    interval, grace = 1, 3
    storage = f"[storage]\nheartbeat_interval = {interval}\ngrace_period = {grace}"
    spec = write_spec(tmp_path / "s.toml", study_name, steps=1000, storage=storage, n_trials=3)
    outcome: dict = {}

    def pool() -> None:
        try:
            outcome["study"] = run_workers(
                str(spec), storage=PG_URL, n_workers=2, progress=False, dashboard=False
            )
        except BaseException as e:  # noqa: BLE001 - reported to the test thread
            outcome["error"] = e

    thread = threading.Thread(target=pool, daemon=True)
    thread.start()

    # kill the worker of the first running trial about a second into the trial
    victim = None
    deadline = time.monotonic() + 40
    while victim is None and time.monotonic() < deadline and thread.is_alive():
        try:
            running = [t for t in pg_trials(study_name) if t.state == TrialState.RUNNING]
        except KeyError:  # the study is not created yet
            running = []
        for t in running:
            if WORKER_ATTR in t.user_attrs and time.time() - t.datetime_start.timestamp() > 1:
                victim = t
                break
        time.sleep(0.1)
    assert victim is not None, "no trial ran"
    pid = int(victim.user_attrs[WORKER_ATTR].split(":")[1].split("/")[0])
    assert pid in {p.pid for p in multiprocessing.active_children()}
    completed_before = {t.number for t in pg_trials(study_name) if t.state == TrialState.COMPLETE}
    os.kill(pid, signal.SIGKILL)
    killed_at = time.monotonic()

    # the parent fails the trial once its heartbeat is older than the grace period
    state = TrialState.RUNNING
    while state == TrialState.RUNNING and time.monotonic() - killed_at < grace + 30:
        state = next(t.state for t in pg_trials(study_name) if t.number == victim.number)
        time.sleep(0.1)
    failed_after = time.monotonic() - killed_at
    assert state == TrialState.FAIL
    # never before the grace period; after it, as soon as the parent's next look (a few seconds,
    # more on a loaded machine)
    assert grace - interval - 0.5 <= failed_after <= grace + 20

    thread.join(600)  # a hang guard: the remaining trials take minutes on a loaded machine
    assert not thread.is_alive()
    err = outcome.get("error")
    assert isinstance(err, WorkerError), outcome
    assert "SIGKILL" in str(err) and "3 of 3 finished" in str(err)

    trials = pg_trials(study_name)
    by_number = {t.number: t for t in trials}
    assert by_number[victim.number].state == TrialState.FAIL
    retries = [t for t in trials if Retry.retried_trial_number(t) is not None]
    assert len(retries) == 1
    retry = retries[0]
    assert Retry.retried_trial_number(retry) == victim.number
    assert retry.state == TrialState.COMPLETE and retry.params == victim.params
    assert all(by_number[n].state == TrialState.COMPLETE for n in completed_before)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 3 and len(trials) == 4


@pytest.mark.parametrize(
    "extra",
    [
        ["--workers", "2"],
        ["--gpus", "0,x"],
        ["--gpus", "0,0"],
        ["--trials-per-gpu", "2"],
        ["--heartbeat-interval", "5", "--grace-period", "3"],
    ],
)
def test_bad_worker_options_exit_2_with_one_line(tmp_path, capsys, extra):
    spec = write_spec(tmp_path / "s.toml", "refused")
    db = tmp_path / "study.db"
    rc = main(["run", str(spec), "--storage", f"sqlite:///{db}", "--quiet", *extra])
    err = capsys.readouterr().err
    assert rc == 2
    assert len(err.strip().splitlines()) == 1, err
    assert not db.exists()  # no study was created
    if extra == ["--workers", "2"]:
        assert "SQLite" in err and "PostgreSQL" in err and "JournalFileBackend" in err


def test_retried_failures_do_not_count():
    study = optuna.create_study()
    fail = optuna.trial.create_trial(state=TrialState.FAIL)
    study.add_trial(fail)  # trial 0: its worker died, and it was retried as trial 1
    study.add_trial(
        optuna.trial.create_trial(
            state=TrialState.WAITING, system_attrs={"failed_trial": 0, "retry_history": [0]}
        )
    )
    study.add_trial(optuna.trial.create_trial(state=TrialState.COMPLETE, value=1.0))
    study.add_trial(fail)  # a failure that was not retried counts
    assert finished_count(study) == 2


def test_worker_slots_per_gpu():
    # real processes and the devices they see: tests/test_reliability_runs.py
    assert parse_gpus("0, 2") == [0, 2]
    assert worker_devices(None, [0, 2], 2) == [("0", "cuda")] * 2 + [("2", "cuda")] * 2
    assert worker_devices(3, None, 1) == [("", "cpu")] * 3
