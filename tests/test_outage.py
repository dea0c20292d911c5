"""A database server that goes away mid-study (a restart, a failover): the workers wait for it and
go on; past ``[storage] outage_seconds`` the run ends with one line. Against a throwaway
PostgreSQL cluster of the test's own (``pg_cluster``), stopped and started mid-study."""

from __future__ import annotations

import subprocess
import tempfile
import time
from pathlib import Path

import optuna
import pytest
import sqlalchemy
from optuna.trial import TrialState
from pg_cluster import Cluster, available
from worker_spec import start_cli, write_worker_spec

from bound_tuner.execution.accounting import finished_count

needs_initdb = pytest.mark.skipif(
    not available(), reason="initdb and pg_ctl (PostgreSQL's server programs) are not installed"
)


@pytest.fixture
def cluster():
    # a folder of its own under the system's temporary folder: the server may run as another
    # user (postgres, when the tests run as root), who cannot enter pytest's private folders
    c = Cluster(Path(tempfile.mkdtemp(prefix="bound-tuner-pg-"))).init()
    try:
        yield c
    finally:
        c.destroy()


def _trials(url: str, name: str) -> list:
    storage = optuna.storages.RDBStorage(url, engine_kwargs={"poolclass": sqlalchemy.pool.NullPool})
    try:
        return optuna.load_study(study_name=name, storage=storage).get_trials()
    finally:
        storage.engine.dispose()


def _wait_complete(url: str, name: str, n: int, proc: subprocess.Popen, timeout: float) -> list:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        try:
            done = [t for t in _trials(url, name) if t.state == TrialState.COMPLETE]
        except KeyError:  # not created yet
            done = []
        if len(done) >= n:
            return done
        time.sleep(0.3)
    raise AssertionError(f"{n} trials did not complete within {timeout:g} s")


def _spec(tmp_path: Path, name: str, *, n_trials: int, outage: float | None = None) -> Path:
    extra = "[storage]\nheartbeat_interval = 1\ngrace_period = 5\n"
    if outage is not None:
        extra += f"outage_seconds = {outage}\n"
    return write_worker_spec(tmp_path / "s.toml", name, n_trials=n_trials, steps=400, extra=extra)


@needs_initdb
def test_two_workers_ride_out_a_database_restart(tmp_path, cluster):
    """The server stops (fast shutdown: every connection cut) once two trials have finished and
    comes back 4 s later: the run finishes all 8 trials with exit 0, no rerun; the trials
    finished before keep their values, and none is left RUNNING."""
    name = "outage"
    spec = _spec(tmp_path, name, n_trials=8)
    proc = start_cli(["run", str(spec), "--storage", cluster.url, "--workers", "2"], tmp_path)
    before = {t.number: t.value for t in _wait_complete(cluster.url, name, 2, proc, 240)}
    cluster.restart_after(4.0)
    out, err = proc.communicate(timeout=400)
    assert proc.returncode == 0, err
    assert "Traceback" not in err, err
    trials = _trials(cluster.url, name)
    storage = optuna.storages.RDBStorage(cluster.url)
    try:
        assert finished_count(optuna.load_study(study_name=name, storage=storage)) == 8
    finally:
        storage.engine.dispose()
    assert not [t.number for t in trials if t.state == TrialState.RUNNING]
    by_number = {t.number: t for t in trials}
    for number, value in before.items():
        assert by_number[number].state == TrialState.COMPLETE
        assert by_number[number].value == value


@needs_initdb
def test_an_outage_past_outage_seconds_ends_the_run_with_one_line(tmp_path, cluster):
    """[storage] outage_seconds = 3 and a server that stays away for longer: one worker, and the
    run ends with exit 1 and one line that names the bound and says how to resume."""
    name = "gone"
    spec = _spec(tmp_path, name, n_trials=50, outage=3)
    proc = start_cli(["run", str(spec), "--storage", cluster.url], tmp_path)
    _wait_complete(cluster.url, name, 1, proc, 240)
    cluster.stop()
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        cluster.start()
    assert proc.returncode == 1, err
    lines = err.strip().splitlines()
    assert "Traceback" not in err, err
    last = lines[-1]
    assert last.startswith("bound-tuner: error: "), last
    assert "within 3 s" in last and "outage_seconds" in last and "resume" in last, last


def test_trials_left_running_by_ended_workers_of_this_machine_are_failed():
    """After every worker of a run has ended, a trial one of them left RUNNING (its final write
    lost to an outage) is failed; a RUNNING trial of another machine or process is not."""
    import socket

    from bound_tuner.execution.accounting import WORKER_ATTR, fail_orphans

    study = optuna.create_study()
    host = socket.gethostname()
    mine, other_host, other_pid = study.ask(), study.ask(), study.ask()
    mine.set_user_attr(WORKER_ATTR, f"{host}:4242/cpu")
    other_host.set_user_attr(WORKER_ATTR, "elsewhere:4242/cpu")
    other_pid.set_user_attr(WORKER_ATTR, f"{host}:4343/cpu")
    assert fail_orphans(study, {4242}) == [mine.number]
    states = [t.state for t in study.get_trials()]
    assert states == [TrialState.FAIL, TrialState.RUNNING, TrialState.RUNNING]
