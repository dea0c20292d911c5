"""Studies over time: a resume continues the search, a changed spec is refused (or recorded),
a finished study says so, and a retried trial repeats the trial it replaces."""

from __future__ import annotations

import optuna
import pytest
from optuna.trial import TrialState
from worker_spec import write_worker_spec

from bound_tuner.cli import main
from bound_tuner.config.schema import SAMPLERS, SpecError
from bound_tuner.config.spec import load_spec
from bound_tuner.objectives.studies import SPEC_ATTR, sampler_seed
from bound_tuner.runtime.seeding import derive_seed
from bound_tuner.study import run_study

# the search space of each shipped sampler: ranges for the samplers that draw, lists for the
# ones that enumerate (six T values x two lr values: twelve points)
SPACES = {
    "tpe": "T = { low = 0.2, high = 0.9 }\nlr = { low = 1e-3, high = 5e-3, log = true }",
    "random": "T = { low = 0.2, high = 0.9 }\nlr = { low = 1e-3, high = 5e-3, log = true }",
    "nsga2": "T = { low = 0.2, high = 0.9 }\nlr = { low = 1e-3, high = 5e-3, log = true }",
    "grid": "T = { grid = [0.2, 0.3, 0.4, 0.5, 0.6, 0.7] }\nlr = { grid = [1e-3, 3e-3] }",
    "bruteforce": "T = { grid = [0.2, 0.3, 0.4, 0.5, 0.6, 0.7] }\nlr = { grid = [1e-3, 3e-3] }",
}


def _spec(tmp_path, name: str, sampler: str, **kw):
    path = write_worker_spec(tmp_path / f"{name}.toml", name, n_trials=3, steps=5, **kw)
    text = path.read_text()
    text = text.replace("T = { low = 0.2, high = 0.9 }\n", SPACES[sampler] + "\n")
    text = text.replace('type = "random"', f'type = "{sampler}"')
    path.write_text(text)
    return load_spec(path)


def _params(study: optuna.Study) -> list[tuple]:
    return [(t.params["T"], t.params["lr"]) for t in study.get_trials()]


def test_every_shipped_sampler_is_tested():
    assert set(SPACES) == set(SAMPLERS)


@pytest.mark.parametrize("sampler", sorted(SPACES))
def test_a_resumed_study_continues_its_search_and_a_fresh_one_repeats(tmp_path, sampler):
    spec = _spec(tmp_path, f"res-{sampler}", sampler)
    url = f"sqlite:///{tmp_path}/a.db"
    run_study(spec, storage=url, n_trials=3, progress=False, dashboard=False)
    study = run_study(spec, storage=url, n_trials=6, progress=False, dashboard=False)
    first, resumed = _params(study)[:3], _params(study)[3:]
    assert len(resumed) == 3
    # the resume proposes new points: none of the first run's proposals comes again
    assert not set(resumed) & set(first), (first, resumed)
    # one more trial at a time (a "+1" rerun) keeps proposing new points
    study = run_study(spec, storage=url, n_trials=7, progress=False, dashboard=False)
    assert _params(study)[6] not in _params(study)[:6]

    # the same spec and seed from scratch, in another database: the same first proposals
    fresh = run_study(
        spec, storage=f"sqlite:///{tmp_path}/b.db", n_trials=3, progress=False, dashboard=False
    )
    assert _params(fresh) == first


def test_sampler_seeds_of_workers_and_resumes():
    assert sampler_seed(7, 0, 0) == 7  # worker 0 of a run from scratch: the spec's seed
    seeds = {sampler_seed(7, w, n) for w in range(3) for n in (0, 3, 6)}
    assert len(seeds) == 9  # every worker and every resume point its own seed
    assert sampler_seed(7, 2, 3) == sampler_seed(7, 2, 3)
    assert sampler_seed(7, None, 3) is None and sampler_seed(None, 0, 0) is None


def test_a_changed_spec_is_refused_in_one_line_and_nothing_is_written(tmp_path, capsys):
    url = f"sqlite:///{tmp_path}/c.db"
    path = write_worker_spec(tmp_path / "c.toml", "chg", n_trials=2, steps=5)
    assert main(["run", str(path), "--storage", url, "--quiet", "--device", "cpu"]) == 0
    recorded = optuna.load_study(study_name="chg", storage=url).user_attrs[SPEC_ATTR]
    assert recorded["training.steps"] == 5 and recorded["search.T"] == {"low": 0.2, "high": 0.9}
    assert "study.n_trials" not in recorded and "sampler.type" not in recorded
    capsys.readouterr()

    write_worker_spec(path, "chg", n_trials=4, steps=7, lr=True)  # steps and lr changed
    argv = ["run", str(path), "--storage", url, "--quiet", "--device", "cpu"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "training.steps 5 -> 7" in err and "search.lr (unset) -> " in err
    assert "--study-name" in err and "--allow-changed-spec" in err
    study = optuna.load_study(study_name="chg", storage=url)
    assert len(study.get_trials()) == 2  # the refused run wrote nothing
    assert study.user_attrs[SPEC_ATTR] == recorded

    # way out 1: a new study of its own
    assert main([*argv, "--study-name", "chg-2"]) == 0
    assert len(optuna.load_study(study_name="chg-2", storage=url).get_trials()) == 4
    # way out 2: continue the old study, the new trials saying what changed
    assert main([*argv, "--allow-changed-spec"]) == 0
    trials = optuna.load_study(study_name="chg", storage=url).get_trials()
    assert len(trials) == 4
    assert all("spec.changed" not in t.user_attrs for t in trials[:2])
    for t in trials[2:]:
        changed = t.user_attrs["spec.changed"]
        assert set(changed) == {"training.steps", "search.lr"}
        assert changed["training.steps"] == [5, 7]
    # the study keeps the spec it was created from
    assert optuna.load_study(study_name="chg", storage=url).user_attrs[SPEC_ATTR] == recorded


def test_run_settings_are_not_part_of_the_study(tmp_path):
    """n_trials, the sampler, the pruner, the storage settings and keep_models may change."""
    url = f"sqlite:///{tmp_path}/d.db"
    path = write_worker_spec(tmp_path / "d.toml", "same", n_trials=1, steps=5)
    run_study(load_spec(path), storage=url, progress=False, dashboard=False)
    text = path.read_text().replace('type = "random"', 'type = "tpe"', 1)
    text = text.replace("n_trials = 1", "n_trials = 2\nkeep_models = 0")
    path.write_text(text + "[storage]\nheartbeat_interval = 5\n")
    study = run_study(load_spec(path), storage=url, progress=False, dashboard=False)
    assert len(study.get_trials()) == 2
    assert "spec.changed" not in study.get_trials()[1].user_attrs


def test_allow_changed_spec_from_python(tmp_path):
    url = f"sqlite:///{tmp_path}/e.db"
    path = write_worker_spec(tmp_path / "e.toml", "py", n_trials=1, steps=5)
    run_study(load_spec(path), storage=url, progress=False, dashboard=False)
    write_worker_spec(path, "py", n_trials=2, steps=5, width=8)
    with pytest.raises(SpecError, match=r"training\.width 16 -> 8"):
        run_study(load_spec(path), storage=url, progress=False, dashboard=False)
    study = run_study(
        load_spec(path), storage=url, progress=False, dashboard=False, allow_changed_spec=True
    )
    assert study.get_trials()[1].user_attrs["spec.changed"] == {"training.width": [16, 8]}


def test_a_finished_study_says_nothing_is_left_and_how_to_add_trials(tmp_path, capsys):
    url = f"sqlite:///{tmp_path}/f.db"
    path = write_worker_spec(tmp_path / "f.toml", "done", n_trials=2, steps=5)
    argv = ["run", str(path), "--storage", url, "--quiet", "--device", "cpu"]
    assert main(argv) == 0
    capsys.readouterr()
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "already has 2 finished trials" in err and "nothing left to run" in err
    assert "--n-trials" in err
    assert len(optuna.load_study(study_name="done", storage=url).get_trials()) == 2
    assert main([*argv, "--n-trials", "3"]) == 0  # the way to add trials
    assert len(optuna.load_study(study_name="done", storage=url).get_trials()) == 3


def test_a_retried_trial_repeats_the_trial_it_replaces(tmp_path):
    """A retry (as Optuna's RetryHeartbeatStaleTrialCallback queues it after a worker died)
    trains with the seed of the trial it replaces, so it gives that trial's bound exactly."""
    url = f"sqlite:///{tmp_path}/g.db"
    spec = load_spec(write_worker_spec(tmp_path / "g.toml", "retry", n_trials=2, steps=20))
    study = run_study(spec, storage=url, n_trials=1, progress=False, dashboard=False)
    (first,) = study.get_trials()
    optuna.storages.RetryHeartbeatStaleTrialCallback()(study, first)  # queue its retry
    study = run_study(spec, storage=url, n_trials=2, progress=False, dashboard=False)
    first, retry = study.get_trials()
    assert retry.system_attrs["failed_trial"] == 0 and retry.state == TrialState.COMPLETE
    assert retry.params == first.params
    assert (
        retry.user_attrs["config"]["seed"]
        == derive_seed(0, 0)
        == first.user_attrs["config"]["seed"]
    )
    assert retry.value == first.value  # the same model, trained and scored again

    # a new trial (not a retry) gets its own seed
    study = run_study(spec, storage=url, n_trials=3, progress=False, dashboard=False)
    assert study.get_trials()[2].user_attrs["config"]["seed"] == derive_seed(0, 2)
