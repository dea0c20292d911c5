"""Ray as an executor, on a real local Ray instance and the real PostgreSQL: exact trial counts
through the CLI, a killed Ray worker whose trial is retried with the same parameters, and the
options that are refused before anything starts.

Needs the ``ray`` extra (``pip install "bound_tuner[ray]"``; .ci/run installs it) and
BOUND_TUNER_TEST_PG_URL.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest
from optuna.storages import RetryHeartbeatStaleTrialCallback as Retry
from optuna.trial import TrialState
from worker_spec import PG_URL, needs_pg, pg_storage, write_worker_spec

from bound_tuner.cli import main
from bound_tuner.execution.accounting import WORKER_ATTR

#: a short grace period, for the tests that wait for a dead worker's trial to go stale
SHORT_GRACE = 3


def write_spec(
    path: Path, name: str, *, n_trials: int, steps: int = 20, grace: int = SHORT_GRACE
) -> Path:
    heartbeat = f"[storage]\nheartbeat_interval = 1\ngrace_period = {grace}\n"
    return write_worker_spec(path, name, n_trials=n_trials, steps=steps, lr=True, extra=heartbeat)


def pid_of(trial: optuna.trial.FrozenTrial) -> int:
    return int(trial.user_attrs[WORKER_ATTR].split(":")[1].split("/")[0])


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory):
    """One local Ray instance with 2 CPUs for this module, started as ``run_ray`` starts one
    (run_ray then uses it instead of starting its own)."""
    ray = pytest.importorskip("ray")
    from bound_tuner.execution.ray_executor import start_ray

    art = tmp_path_factory.mktemp("ray_artifacts")
    old = os.environ.get("BOUND_TUNER_ARTIFACTS")
    os.environ["BOUND_TUNER_ARTIFACTS"] = str(art)  # forwarded to the tasks
    assert start_ray(ray, None, 2)
    assert ray.cluster_resources()["CPU"] >= 2
    yield ray
    ray.shutdown()
    if old is None:
        os.environ.pop("BOUND_TUNER_ARTIFACTS")
    else:
        os.environ["BOUND_TUNER_ARTIFACTS"] = old


@needs_pg
def test_two_ray_workers_reach_exactly_n_trials(tmp_path, study_name, local_ray, capsys):
    # nothing dies here, so the grace period is one a loaded machine's heartbeats keep: with 3 s,
    # one run beside two CPU-bound benchmark processes (load 4.5 on 2 cores) made 8 trials for 6
    spec = write_spec(tmp_path / "s.toml", study_name, n_trials=6, steps=60, grace=30)
    argv = ["run", str(spec), "--storage", PG_URL, "--executor", "ray", "--workers", "2"]
    assert main([*argv, "--quiet"]) == 0
    assert f"study '{study_name}': 6 complete" in capsys.readouterr().out

    trials = optuna.load_study(study_name=study_name, storage=pg_storage()).get_trials()
    states = [(t.number, t.state.name, t.user_attrs.get("fail_reason")) for t in trials]
    assert sorted(t.number for t in trials) == list(range(6)), states
    assert all(t.state == TrialState.COMPLETE for t in trials)
    pids = {pid_of(t) for t in trials}
    assert len(pids) == 2 and os.getpid() not in pids  # two Ray worker processes shared it
    assert all(t.user_attrs[WORKER_ATTR].split("/")[1] == "cpu" for t in trials)
    assert len({(t.params["T"], t.params["lr"]) for t in trials}) == 6
    art = Path(os.environ["BOUND_TUNER_ARTIFACTS"])
    assert len(list(art.rglob("*"))) >= 6  # each trial's samples, written by the tasks


@needs_pg
@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_killed_ray_worker_is_rerun_and_its_trial_retried(tmp_path, study_name, local_ray):
    from bound_tuner.execution.ray_executor import run_ray

    spec = write_spec(tmp_path / "s.toml", study_name, n_trials=3, steps=1500)
    outcome: dict = {}

    def driver() -> None:
        try:
            outcome["study"] = run_ray(
                str(spec), storage=PG_URL, n_workers=2, progress=False, dashboard=False
            )
        except BaseException as e:  # noqa: BLE001 - reported to the test thread
            outcome["error"] = e

    thread = threading.Thread(target=driver, daemon=True)
    thread.start()
    victim = None
    deadline = time.monotonic() + 90
    while victim is None and time.monotonic() < deadline and thread.is_alive():
        try:
            running = optuna.load_study(study_name=study_name, storage=pg_storage()).get_trials()
        except KeyError:  # the study is not created yet
            running = []
        for t in running:
            if (
                t.state == TrialState.RUNNING
                and WORKER_ATTR in t.user_attrs
                and time.time() - t.datetime_start.timestamp() > 0.5
            ):
                victim = t
                break
        time.sleep(0.1)
    assert victim is not None, outcome or "no trial ran"
    os.kill(pid_of(victim), signal.SIGKILL)

    thread.join(600)  # a hang guard: the rerun and the retry take minutes on a loaded machine
    assert not thread.is_alive()
    assert "error" not in outcome, outcome  # Ray reran the lost task; the run succeeded
    trials = outcome["study"].get_trials()
    by_number = {t.number: t for t in trials}
    assert by_number[victim.number].state == TrialState.FAIL  # failed through its heartbeat
    retries = [t for t in trials if Retry.retried_trial_number(t) is not None]
    assert [Retry.retried_trial_number(t) for t in retries] == [victim.number]
    # the retry keeps every parameter the victim had drawn when it was killed (on a loaded
    # machine that may be T alone: lr is then drawn by the retry)
    victim_params = by_number[victim.number].params
    assert retries[0].state == TrialState.COMPLETE
    assert victim_params.items() <= retries[0].params.items(), (victim_params, retries[0].params)
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 3 and len(trials) == 4
    assert pid_of(retries[0]) != pid_of(victim)  # run by a live process


@pytest.mark.parametrize(
    "extra,needs",
    [
        (["--executor", "ray", "--workers", "2"], "SQLite"),
        (["--executor", "ray", "--gpus", "0"], "--gpus-per-trial"),
        (["--executor", "ray", "--device", "cuda"], "--gpus-per-trial"),
        (["--executor", "ray", "--gpus-per-trial", "-1"], "0 or more"),
        (["--ray-address", "auto"], "--executor ray"),
        (["--gpus-per-trial", "1"], "--executor ray"),
    ],
)
def test_bad_ray_options_exit_2_with_one_line(tmp_path, capsys, extra, needs):
    spec = write_spec(tmp_path / "s.toml", "refused", n_trials=2)
    db = tmp_path / "study.db"
    rc = main(["run", str(spec), "--storage", f"sqlite:///{db}", "--quiet", *extra])
    err = capsys.readouterr().err
    assert rc == 2
    assert len(err.strip().splitlines()) == 1 and needs in err, err
    assert not db.exists()  # no study was created


def test_executor_ray_without_ray_says_how_to_install_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails, as without the extra
    spec = write_spec(tmp_path / "s.toml", "noray", n_trials=2)
    url = PG_URL or "postgresql://postgres@127.0.0.1:5432/bound_tuner_test"
    rc = main(["run", str(spec), "--storage", url, "--quiet", "--executor", "ray"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err
    assert 'pip install "bound_tuner[ray]"' in err, err


@needs_pg
def test_more_gpus_per_trial_than_the_cluster_has_is_refused(
    tmp_path, study_name, local_ray, capsys
):
    spec = write_spec(tmp_path / "s.toml", study_name, n_trials=2)
    argv = ["run", str(spec), "--storage", PG_URL, "--quiet", "--executor", "ray"]
    gpus = local_ray.cluster_resources().get("GPU", 0)
    assert main([*argv, "--gpus-per-trial", str(gpus + 1)]) == 2
    err = capsys.readouterr().err.strip()
    assert f"the Ray cluster has {gpus:g} GPUs" in err and "\n" not in err, err
    with pytest.raises(KeyError):  # refused before the study was created
        optuna.load_study(study_name=study_name, storage=pg_storage())


@pytest.mark.parametrize(
    "kwargs,needs",
    [
        ({"executor": "dask"}, "use 'local' or 'ray'"),
        ({"ray_address": "auto"}, "executor='ray'"),
        ({"gpus_per_trial": 0.5}, "executor='ray'"),
        ({"executor": "ray", "callbacks": [print]}, "leave out data and callbacks"),
    ],
)
def test_run_study_refuses_executor_options_that_do_not_fit(tmp_path, kwargs, needs):
    from bound_tuner.config.spec import load_spec
    from bound_tuner.execution.errors import WorkerConfigError
    from bound_tuner.study import run_study

    spec = load_spec(write_spec(tmp_path / "s.toml", "refused", n_trials=2))
    db = tmp_path / "study.db"
    with pytest.raises(WorkerConfigError, match=needs):
        run_study(spec, storage=f"sqlite:///{db}", progress=False, **kwargs)
    assert not db.exists()


@needs_pg
def test_sigterm_to_a_ray_run_interrupts_its_trials_and_leaves_no_task(tmp_path, study_name):
    """`bound-tuner run --executor ray` in its own process: SIGTERM (what a scheduler sends;
    Ray's driver installs its own handler, which the run replaces, and Ctrl-C takes the same
    path) cancels the tasks, whose trials end as interrupted and are queued again; the local
    Ray instance is shut down."""
    import subprocess

    pytest.importorskip("ray")
    spec = write_spec(tmp_path / "s.toml", study_name, n_trials=4, steps=200_000)
    env = {**os.environ, "BOUND_TUNER_ARTIFACTS": str(tmp_path / "art")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "bound_tuner.cli", "run", str(spec), "--storage", PG_URL]
        + ["--executor", "ray", "--workers", "2", "--quiet"],
        cwd=Path(__file__).parent.parent,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    running: list = []
    deadline = (
        time.monotonic() + 300
    )  # starting Ray and two workers takes minutes on a loaded 2-core machine
    while len(running) < 2 and time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        try:
            trials = optuna.load_study(study_name=study_name, storage=pg_storage()).get_trials()
        except KeyError:
            trials = []
        running = [
            t for t in trials if t.state == TrialState.RUNNING and WORKER_ATTR in t.user_attrs
        ]
        time.sleep(0.2)
    assert len(running) == 2, "the Ray workers did not start two trials"
    pids = {pid_of(t) for t in running}
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=90)
    assert proc.returncode == 130, err
    assert "interrupted" in err.strip().splitlines()[-1], err

    trials = optuna.load_study(study_name=study_name, storage=pg_storage()).get_trials()
    failed = [t for t in trials if t.state == TrialState.FAIL]
    waiting = [t for t in trials if t.state == TrialState.WAITING]
    assert sorted(t.number for t in failed) == sorted(t.number for t in running)
    assert all(t.user_attrs["fail_reason"] == "interrupted" for t in failed)
    assert sorted(t.system_attrs["retry_history"][-1] for t in waiting) == sorted(
        t.number for t in failed
    )
    for pid in pids:  # the tasks' processes ended with the Ray instance
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
