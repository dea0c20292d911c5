"""Faults of one trial and of the commands around a study: a failing trial fails alone, only the
database's errors are storage errors, read-only commands change nothing, errors are named or
logged, and a storage URL shows everything but its password."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading

import optuna
import pytest
import sqlalchemy.exc
import torch
from optuna.trial import TrialState
from worker_spec import PG_URL, needs_pg, pg_storage, write_worker_spec

from bound_tuner.cli import main
from bound_tuner.config.spec import load_spec
from bound_tuner.execution.accounting import FailureStreak, finished_count
from bound_tuner.execution.errors import TooManyFailures
from bound_tuner.execution.loop import optimize_until
from bound_tuner.execution.plan import HEARTBEAT_MODULE, thread_excepthook
from bound_tuner.execution.signals import INTERRUPTED
from bound_tuner.objectives.diffusion import DiffusionObjective
from bound_tuner.storage.database import make_storage, redact, scrub
from bound_tuner.study import run_study


def _study(tmp_path, name: str = "f") -> tuple[optuna.Study, str]:
    url = f"sqlite:///{tmp_path}/{name}.db"
    return optuna.create_study(storage=make_storage(url), study_name=name), url


# ----------------------------------------------------------------------------- one trial fails


def test_an_exception_fails_its_trial_with_its_reason_and_the_worker_goes_on(tmp_path):
    study, url = _study(tmp_path)

    def objective(trial: optuna.Trial) -> float:
        x = trial.suggest_float("x", 0.0, 1.0)
        if trial.number == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if trial.number == 3:  # an OSError of the trial's own code is not a database failure
            (tmp_path / "missing" / "data.npy").read_bytes()
        return x

    optimize_until(study, objective, target=5, url=url)
    trials = study.get_trials()
    assert [t.state for t in trials] == [
        TrialState.COMPLETE,
        TrialState.FAIL,
        TrialState.COMPLETE,
        TrialState.FAIL,
        TrialState.COMPLETE,
    ]
    assert trials[1].user_attrs["fail_reason"] == (
        "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
    )
    reason = trials[3].user_attrs["fail_reason"]
    assert reason.startswith("FileNotFoundError: ") and "data.npy" in reason
    assert "storage error" not in reason
    assert finished_count(study) == 5  # failed trials count; none is retried
    assert not any("failed_trial" in t.system_attrs for t in trials)


def test_failures_in_a_row_stop_the_worker_with_one_line(tmp_path):
    study, url = _study(tmp_path)

    def objective(trial: optuna.Trial) -> float:
        trial.suggest_float("x", 0.0, 1.0)
        raise ValueError("this configuration cannot train")

    with pytest.raises(TooManyFailures) as e:
        optimize_until(study, objective, target=20, url=url, failures=FailureStreak(3))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("3 trials in a row failed (the last, trial 2: ")
    assert "ValueError: this configuration cannot train" in msg and "--max-failures" in msg
    trials = study.get_trials()
    assert len(trials) == 3 and all(t.state == TrialState.FAIL for t in trials)


def test_only_failures_in_a_row_count(tmp_path):
    study, url = _study(tmp_path)

    def objective(trial: optuna.Trial) -> float:
        x = trial.suggest_float("x", 0.0, 1.0)
        if trial.number % 3 != 2:  # two failures, then a success, again and again
            raise RuntimeError("flaky")
        return x

    optimize_until(study, objective, target=9, url=url, failures=FailureStreak(3))
    states = [t.state for t in study.get_trials()]
    assert len(states) == 9 and states.count(TrialState.FAIL) == 6


def test_a_trial_failed_as_stale_while_it_ran_is_dropped_and_the_worker_goes_on(tmp_path, caplog):
    """A worker whose heartbeat came late (a stalled or overloaded machine) finds that another
    process failed its trial: whether the trial then writes an attribute, raises or returns, the
    worker drops it with one warning and goes on, and the trial stays as the other process left
    it."""
    study, url = _study(tmp_path)
    other = optuna.load_study(study_name="f", storage=make_storage(url))

    def objective(trial: optuna.Trial) -> float:
        x = trial.suggest_float("x", 0.0, 1.0)
        if trial.number < 3:
            other.tell(trial.number, state=TrialState.FAIL)  # as fail_stale_trials does
        if trial.number == 0:
            trial.set_user_attr("late", 1.0)  # the write finds its trial finished
        if trial.number == 1:
            raise RuntimeError("and then it fails")  # its fail_reason finds it finished
        return x  # trial 2 returns: Optuna cannot tell a finished trial

    with caplog.at_level(logging.WARNING, logger="bound_tuner.execution.loop"):
        optimize_until(study, objective, target=5, url=url)
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL] * 3 + [TrialState.COMPLETE] * 2
    assert not any("fail_reason" in t.user_attrs or "late" in t.user_attrs for t in trials)
    stale = [r.getMessage() for r in caplog.records if "failed as stale" in r.getMessage()]
    assert [m.split()[1] for m in stale] == ["0", "1", "2"]
    assert all("grace_period" in m for m in stale)


def test_keyboard_interrupt_and_system_exit_still_stop(tmp_path):
    study, url = _study(tmp_path)

    def interrupted(trial: optuna.Trial) -> float:
        trial.suggest_float("x", 0.0, 1.0)
        if trial.number == 1:
            raise KeyboardInterrupt
        return 0.5

    with pytest.raises(KeyboardInterrupt):
        optimize_until(study, interrupted, target=5, url=url)
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.WAITING]
    assert trials[1].user_attrs["fail_reason"] == INTERRUPTED  # and queued again (trial 2)
    assert trials[2].params == trials[1].params

    study, url = _study(tmp_path, "exit")

    def exits(trial: optuna.Trial) -> float:
        trial.suggest_float("x", 0.0, 1.0)
        raise SystemExit(3)

    with pytest.raises(SystemExit) as e:
        optimize_until(study, exits, target=5, url=url)
    assert e.value.code == 3 and len(study.get_trials()) == 1


def test_a_study_whose_trials_all_raise_stops_after_max_consecutive_failures(
    tmp_path, monkeypatch, capsys
):
    """Through run_study and the command: [study] max_consecutive_failures and --max-failures."""

    def broken(self, trial):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(DiffusionObjective, "config_for", broken)
    path = write_worker_spec(tmp_path / "b.toml", "broken", n_trials=10, steps=5)
    text = path.read_text().replace("seed = 0\n", "seed = 0\nmax_consecutive_failures = 2\n", 1)
    path.write_text(text)
    spec = load_spec(path)
    assert spec.max_consecutive_failures == 2
    url = f"sqlite:///{tmp_path}/b.db"
    with pytest.raises(TooManyFailures, match="2 trials in a row failed"):
        run_study(spec, storage=url, progress=False, dashboard=False)
    trials = optuna.load_study(study_name="broken", storage=url).get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL] * 2
    assert trials[0].user_attrs["fail_reason"].startswith("RuntimeError: CUDA error")

    capsys.readouterr()
    argv = ["run", str(path), "--storage", url, "--quiet", "--device", "cpu"]
    assert main([*argv, "--max-failures", "4"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("bound-tuner: error: 4 trials in a row failed"), err
    assert len(optuna.load_study(study_name="broken", storage=url).get_trials()) == 6
    assert main([*argv, "--max-failures", "0"]) == 2


# ----------------------------------------------------------------------------- read-only commands


def test_report_export_and_sample_on_a_missing_database_create_nothing(tmp_path, capsys):
    db = tmp_path / "none.db"
    url = f"sqlite:///{db}"
    out = str(tmp_path / "m.pt")
    for argv in (
        ["report", "--study", "x", "--storage", url],
        ["export", "--study", "x", "--storage", url, "--out", out],
        ["sample", "--study", "x", "--storage", url, "--n", "4", "--out", str(tmp_path / "s.npy")],
    ):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "no study database at" in err, err
        assert not db.exists()


def test_report_into_a_closed_pipe_ends_quietly(tmp_path):
    url = f"sqlite:///{tmp_path}/p.db"
    study = optuna.create_study(storage=url, study_name="many")
    dist = {"T": optuna.distributions.FloatDistribution(0.1, 1.0)}
    for i in range(400):
        study.add_trial(
            optuna.trial.create_trial(
                params={"T": 0.1 + i / 500},
                distributions=dist,
                value=float(i),
                user_attrs={"bound.total": float(i), "note": "x" * 200},
            )
        )
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bound_tuner.cli",
            "report",
            "--study",
            "many",
            "--storage",
            url,
            "--format",
            "json",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout.read(100).startswith(b"[")
    proc.stdout.close()  # as `| head -c 100` does
    err = proc.stderr.read().decode()
    proc.wait(timeout=60)
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
    assert proc.returncode == 141


def test_spec_paths_that_are_folders_or_not_text(tmp_path, capsys):
    assert main(["run", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "is a folder" in err and "not found" not in err and len(err.splitlines()) == 1
    bad = tmp_path / "latin1.toml"
    bad.write_bytes('[study]\nname = "caf\xe9"\n'.encode("latin-1"))
    assert main(["run", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not UTF-8" in err and "Traceback" not in err
    assert main(["run", str(tmp_path / "absent.toml")]) == 2
    assert "not found" in capsys.readouterr().err


# ----------------------------------------------------------------------------- errors not swallowed


def test_thread_hook_tells_database_errors_in_one_line_and_passes_on_the_rest(capsys):
    seen = []
    hook = thread_excepthook(seen.append, "postgresql://u:pw@h/db")

    def args_of(exc: BaseException):
        return threading.ExceptHookArgs((type(exc), exc, None, threading.current_thread()))

    db_error = sqlalchemy.exc.OperationalError("UPDATE trial_heartbeats", {}, Exception("gone"))
    hook(args_of(db_error))
    err = capsys.readouterr().err
    assert err.startswith("bound-tuner: warning: MainThread: OperationalError") and not seen
    bug = ValueError("a bug in a helper thread")
    hook(args_of(bug))
    assert len(seen) == 1 and seen[0].exc_value is bug  # Python's own hook: a traceback


def test_thread_hook_tells_an_error_of_optunas_heartbeat_thread_in_one_line(capsys):
    """Optuna's heartbeat of a trial another process failed as stale can end in an
    AssertionError (its heartbeat row is gone): one warning line, no traceback."""
    seen = []
    hook = thread_excepthook(seen.append, None)
    scope = {"__name__": HEARTBEAT_MODULE}  # a function of Optuna's heartbeat module
    exec("def record_heartbeat():\n    assert None is not None\n", scope)
    try:
        scope["record_heartbeat"]()
    except AssertionError as e:
        exc = e
    thread = threading.current_thread()
    hook(threading.ExceptHookArgs((AssertionError, exc, exc.__traceback__, thread)))
    err = capsys.readouterr().err
    assert not seen and len(err.strip().splitlines()) == 1, err
    assert err.startswith("bound-tuner: warning: MainThread: AssertionError") and "heartbeat" in err


def test_unreadable_weights_are_an_error_not_a_missing_model(tmp_path, capsys):
    url = f"sqlite:///{tmp_path}/w.db"
    spec = load_spec(write_worker_spec(tmp_path / "w.toml", "w", n_trials=1, steps=5))
    study = run_study(spec, storage=url, progress=False, dashboard=False)
    t = study.get_trials()[0]
    weights = tmp_path / "w_artifacts" / t.user_attrs["model.artifact_id"]
    weights.unlink()
    weights.mkdir()  # not a file any more: reading it is an OSError, not "not found"
    argv = ["export", "--study", "w", "--storage", url, "--out", str(tmp_path / "o.pt")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "cannot read artifact" in err and "has no model" not in err


def test_weights_that_cannot_be_removed_are_logged_and_the_trial_kept(tmp_path, caplog):
    from bound_tuner.storage.artifacts import ATTR_ID
    from bound_tuner.storage.folders import artifact_store_for
    from bound_tuner.storage.keeper import ModelKeeper

    url = f"sqlite:///{tmp_path}/k.db"
    study = optuna.create_study(storage=url, study_name="k")
    keeper = ModelKeeper(artifact_store_for(url), kind="diffusion", build={"shape": [2]}, keep=1)
    model = torch.nn.Linear(2, 2)
    t0 = study.ask()
    keeper(t0, model, 2.0)
    study.tell(t0, 2.0)
    old = tmp_path / "k_artifacts" / study.get_trials()[0].user_attrs[ATTR_ID]
    old.unlink()
    old.mkdir()  # a folder in its place: neither readable nor removable as a file
    (old / "x").write_text("x")
    t1 = study.ask()
    with caplog.at_level(logging.WARNING, logger="bound_tuner.storage.keeper"):
        new_id = keeper(t1, model, 1.0)  # better: pushes trial 0 out
    study.tell(t1, 1.0)
    assert new_id is not None and (tmp_path / "k_artifacts" / new_id).is_file()
    text = caplog.text
    assert "trial 0: cannot read artifact" in text and "counted as kept" in text
    assert "could not remove the weights of trial 0" in text
    assert old.exists()


# ----------------------------------------------------------------------------- masking


@pytest.mark.parametrize(
    "url,shown",
    [
        ("postgresql+psycopg://postgres@127.0.0.1:5432/db", None),
        ("postgresql://u@h/db", None),
        ("sqlite:///bound_tuner.db", None),
        ("grpc://127.0.0.1:13000", None),
        (
            "postgresql+psycopg://user:s3cret@host:5432/db",
            "postgresql+psycopg://user:***@host:5432/db",
        ),
        ("postgresql://user:p%40ss@host/db", "postgresql://user:***@host/db"),
        ("postgresql://user:p@ss@host/db", "postgresql://user:***@host/db"),
    ],
)
def test_only_the_password_of_a_storage_url_is_masked(url, shown):
    shown = shown or url  # no password: the URL stays as it is
    assert redact(url) == shown
    assert scrub(f"cannot reach {url}: timeout", url) == f"cannot reach {shown}: timeout"


@needs_pg
def test_a_killed_pool_worker_leaves_one_report_and_no_leaked_semaphore(tmp_path, study_name):
    import os
    import signal
    import time

    from bound_tuner.execution.accounting import WORKER_ATTR

    spec = write_worker_spec(tmp_path / "k.toml", study_name, n_trials=3, steps=3000)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bound_tuner.cli",
            "run",
            str(spec),
            "--storage",
            PG_URL,
            "--workers",
            "2",
            "--quiet",
            "--grace-period",
            "4",
            "--heartbeat-interval",
            "1",
        ],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    victim = None
    deadline = time.monotonic() + 120
    while victim is None and time.monotonic() < deadline and proc.poll() is None:
        try:
            trials = optuna.load_study(study_name=study_name, storage=pg_storage()).get_trials()
        except KeyError:
            trials = []
        running = [t for t in trials if t.state == TrialState.RUNNING]
        victim = next((t for t in running if WORKER_ATTR in t.user_attrs), None)
        time.sleep(0.2)
    assert victim is not None, proc.communicate()
    os.kill(int(victim.user_attrs[WORKER_ATTR].split(":")[1].split("/")[0]), signal.SIGKILL)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 1, err
    assert "was killed by SIGKILL" in err and "leaked" not in err, err
    assert "Traceback" not in err, err
