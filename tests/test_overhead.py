"""A study's per-trial cost that does not grow with the study: the charts rebuilt on a throttle
and current when a run ends, and trial counts that read each finished trial once."""

from __future__ import annotations

import json
import random

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial
from optuna_dashboard._custom_plot_data import get_plotly_graph_objects
from worker_spec import write_worker_spec

import bound_tuner.dashboard.charts as charts
from bound_tuner.config.spec import load_spec
from bound_tuner.dashboard.report import trials_json
from bound_tuner.execution.accounting import TrialCounter, tally_trials
from bound_tuner.execution.signals import INTERRUPTED
from bound_tuner.storage.folders import ARTIFACTS_ENV
from bound_tuner.study import run_study


def _stored_charts(study: optuna.Study) -> dict[str, dict]:
    attrs = study._storage.get_study_system_attrs(study._study_id)
    return {k: json.loads(v) for k, v in get_plotly_graph_objects(attrs).items()}


def _fresh_charts(study: optuna.Study) -> dict[str, dict]:
    figures = charts.study_figures(trials_json(study))
    return {k: json.loads(f.to_json()) for k, f in figures.items()}


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_charts_rebuild_on_a_throttle_and_flush_brings_them_up_to_date(monkeypatch):
    clock = FakeClock()
    built = []

    def save_charts(study):  # each rebuild takes 0.5 s of the clock
        built.append(clock.now)
        clock.now += 0.5

    monkeypatch.setattr(charts, "save_charts", save_charts)
    cb = charts.ChartsCallback(min_interval=2.0, share=0.2, clock=clock)
    cb.flush(None)  # nothing finished yet: nothing to rebuild
    assert built == []
    for _ in range(12):  # a trial every 0.25 s
        cb(None, None)
        clock.now += 0.25
    # the first trial rebuilds; the next waits max(2 s, 4 x 0.5 s) after the last rebuild's end
    assert built == [0.0, 2.5]
    assert cb.pending
    cb.flush(None)
    assert len(built) == 3 and not cb.pending
    cb.flush(None)  # already current
    assert len(built) == 3
    # slow rebuilds (a large study) are spaced out to keep their share of the time
    clock.now += 100.0
    cb(None, None)
    start = clock.now

    def slow(study):
        built.append(clock.now)
        clock.now += 10.0

    monkeypatch.setattr(charts, "save_charts", slow)
    cb(None, None)  # within min_interval of the last rebuild: waits
    clock.now = start + 3.0
    cb(None, None)
    assert built[-1] == start + 3.0
    clock.now += 30.0  # 30 s after that rebuild's end; it waits 4 x 10 s
    cb(None, None)
    assert built[-1] == start + 3.0
    clock.now += 10.0
    due = clock.now
    cb(None, None)
    assert built[-1] == due


def test_charts_callback_settings_are_checked():
    with pytest.raises(ValueError):
        charts.ChartsCallback(share=0.0)
    with pytest.raises(ValueError):
        charts.ChartsCallback(min_interval=-1.0)


def test_charts_are_current_when_a_throttled_run_ends(tmp_path, monkeypatch):
    """With a throttle that lets only the first trial rebuild the charts during the run, the
    charts in the storage still show every trial once the run returns."""
    monkeypatch.setattr(charts, "CHARTS_MIN_INTERVAL", 1e9)
    monkeypatch.setenv(ARTIFACTS_ENV, str(tmp_path / "artifacts"))
    rebuilds = []
    save = charts.save_charts
    monkeypatch.setattr(charts, "save_charts", lambda study: rebuilds.append(1) or save(study))
    path = write_worker_spec(tmp_path / "s.toml", "thr", n_trials=4, steps=3)
    study = run_study(load_spec(path), storage=f"sqlite:///{tmp_path}/s.db", progress=False)
    assert len(study.trials) == 4
    assert len(rebuilds) == 2  # the first trial, and the end of the run
    stored = _stored_charts(study)
    assert stored and stored == _fresh_charts(study)
    line = stored[charts.CHART_TERMS_VS_T]["data"][-1]
    assert sorted(line["customdata"]) == [0, 1, 2, 3]  # four distinct T: each trial shown


def _trial(state: TrialState, *, attrs=None, system=None, value=None) -> optuna.trial.FrozenTrial:
    return create_trial(
        state=state,
        value=value if state == TrialState.COMPLETE else None,
        params={"x": 0.5},
        distributions={"x": FloatDistribution(0.0, 1.0)},
        user_attrs=attrs or {},
        system_attrs=system or {},
    )


def test_trial_counter_counts_as_the_full_tally_at_every_step(tmp_path):
    """Complete, pruned, failed, interrupted and retried trials added one by one: the counter,
    reading only new and unfinished trials, agrees with counting all of them afresh."""
    study = optuna.create_study(storage=f"sqlite:///{tmp_path}/c.db", study_name="c")
    rng = random.Random(0)
    counter = TrialCounter()
    kinds = ["complete", "pruned", "fail", "interrupted", "waiting", "running", "retry"]
    for i in range(60):
        kind = rng.choice(kinds)
        numbers = [t.number for t in study.trials]
        if kind == "complete":
            study.add_trial(_trial(TrialState.COMPLETE, value=float(i)))
        elif kind == "pruned":
            study.add_trial(_trial(TrialState.PRUNED))
        elif kind == "fail":
            study.add_trial(_trial(TrialState.FAIL, attrs={"fail_reason": "ValueError: x"}))
        elif kind == "interrupted":
            study.add_trial(_trial(TrialState.FAIL, attrs={"fail_reason": INTERRUPTED}))
        elif kind == "waiting":
            study.add_trial(_trial(TrialState.WAITING))
        elif kind == "running":
            t = study.ask()
            if rng.random() < 0.5:
                t.set_user_attr("worker", "host:1")
            if rng.random() < 0.5:  # some finish later, after the counter saw them running
                study.tell(t, 1.0)
        elif numbers:  # a retry of an earlier trial, finished or still waiting
            n = rng.choice(numbers)
            state = rng.choice([TrialState.WAITING, TrialState.COMPLETE, TrialState.FAIL])
            study.add_trial(
                _trial(
                    state,
                    value=1.0,
                    system={"failed_trial": n, "retry_history": [n]},
                    attrs={"retry_of": n},
                )
            )
        trials = study.get_trials(deepcopy=False)
        assert counter.tally(trials) == tally_trials(trials), i
    # requeueing: every interrupted trial without a retry gets one, and only once
    trials = study.get_trials(deepcopy=False)
    retried = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    expected = [
        t.number
        for t in trials
        if t.state == TrialState.FAIL
        and t.user_attrs.get("fail_reason") == INTERRUPTED
        and t.number not in retried
    ]
    counter.count(study)
    assert counter.requeue_interrupted(study) == bool(expected)
    new = study.get_trials(deepcopy=False)[len(trials) :]
    assert sorted(t.user_attrs["retry_of"] for t in new) == expected
    assert all(t.state == TrialState.WAITING for t in new)
    counter.count(study)
    assert not counter.requeue_interrupted(study)  # they all have their retry now
    trials = study.get_trials(deepcopy=False)
    assert counter.tally(trials) == tally_trials(trials)


def test_sqlite_storages_write_ahead_without_syncing_each_commit(tmp_path):
    """A study's SQLite file is in WAL mode with synchronous=NORMAL (one sync per checkpoint,
    not per commit), and what a trial committed is there for a new connection to read."""
    import sqlite3

    from bound_tuner.storage.database import make_storage

    url = f"sqlite:///{tmp_path}/s.db"
    storage = make_storage(url)
    study = optuna.create_study(storage=storage, study_name="wal")
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=3)
    with storage.engine.connect() as con:
        assert con.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL
    raw = sqlite3.connect(tmp_path / "s.db")
    assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert raw.execute("SELECT COUNT(*) FROM trials").fetchone()[0] == 3
    raw.close()
    again = optuna.load_study(study_name="wal", storage=make_storage(url))
    assert len(again.trials) == 3


def test_notes_for_the_first_trials_then_only_for_a_new_lowest_bound():
    """After the first ``every_trial_until`` trials, a trial gets a note only when its bound is
    the lowest the hook has seen, so the number of notes stays small in a long study."""
    from types import SimpleNamespace

    from bound_tuner.dashboard.notes import TrialArtifacts
    from bound_tuner.maths.bounds.report import BoundReport

    noted = []

    class Recording(TrialArtifacts):
        def note(self, trial, result):
            noted.append(trial.number)
            super().note(trial, result)

    hook = Recording(None, every_trial_until=3)
    bounds = [5.0, 7.0, 6.0, 8.0, 4.0, 4.5, 3.0, 9.0]

    def objective(trial):
        total = bounds[trial.number]
        report = BoundReport(
            kind="diffusion",
            total=total,
            terms={"train_nelbo": total},
            contributions={"train_nelbo": total},
            settings={},
        )
        hook(trial, SimpleNamespace(report=report))
        return total

    study = optuna.create_study()
    study.optimize(objective, n_trials=len(bounds))
    assert noted == [0, 1, 2, 4, 6]


def test_the_weights_keeper_reads_the_study_only_for_a_trial_that_may_be_kept(tmp_path):
    """Once ``keep`` trials hold weights, a trial no better than the keep-th best is turned away
    without reading the study's trials, and the best ``keep`` still end up kept."""
    import torch

    from bound_tuner.storage.artifacts import ATTR_ID
    from bound_tuner.storage.folders import artifact_store_for
    from bound_tuner.storage.keeper import ModelKeeper

    reads = []

    class Counting(ModelKeeper):
        def _kept_trials(self, trial):
            reads.append(trial.number)
            return super()._kept_trials(trial)

    url = f"sqlite:///{tmp_path}/k.db"
    study = optuna.create_study(storage=url, study_name="k")
    keeper = Counting(artifact_store_for(url), kind="diffusion", build={"shape": [2]}, keep=2)
    model = torch.nn.Linear(2, 2)
    for value in [5.0, 4.0, 3.0, 6.0, 7.0, 4.5, 2.0]:
        trial = study.ask()
        keeper(trial, model, value)
        study.tell(trial, value)
    folder = tmp_path / "k_artifacts"
    present = sorted(
        t.number
        for t in study.trials
        if ATTR_ID in t.user_attrs and (folder / t.user_attrs[ATTR_ID]).is_file()
    )
    assert present == [2, 6]  # the two best (3.0 and 2.0); the others were pushed out
    assert reads == [0, 1, 2, 6]  # 6.0, 7.0 and 4.5 were no better than the 2nd best, 4.0


def test_a_fresh_trial_finds_its_seed_without_reading_the_study(monkeypatch):
    """Before it samples, a trial without parameters is no retry: its seed comes from its own
    number with no read of the study; a queued retry still finds the trial it replaces."""
    from bound_tuner.runtime.seeding import RETRY_ATTR, derive_seed, trial_seed

    study = optuna.create_study()
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=3)
    study.add_trial(
        create_trial(
            state=TrialState.WAITING,
            params={"x": 0.5},
            distributions={"x": FloatDistribution(0, 1)},
            system_attrs={RETRY_ATTR: 1},
        )
    )
    retry = study.ask()  # the queued retry, number 3, with its parameters
    assert retry.params == {"x": 0.5} and trial_seed(retry, 7) == derive_seed(7, 1)
    study.tell(retry, 0.5)

    def no_reads(*args, **kwargs):
        raise AssertionError("the study's trials were read")

    fresh = study.ask()
    monkeypatch.setattr(study, "get_trials", no_reads)
    assert trial_seed(fresh, 7) == derive_seed(7, fresh.number)
