"""Optuna's gRPC storage proxy in front of the real PostgreSQL: `bound-tuner storage-proxy` as a
real server process, a pool of two workers that reach the study only through it, what heartbeats
do through it, and the one-line refusals.

Needs grpcio (``pip install "bound_tuner[grpc]"``; .ci/run installs it) and
BOUND_TUNER_TEST_PG_URL.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest
import sqlalchemy
from optuna.trial import TrialState
from worker_spec import PG_URL, needs_pg, pg_storage, worker_spec

from bound_tuner.cli import main
from bound_tuner.execution.accounting import WORKER_ATTR, finished_count
from bound_tuner.execution.pool import run_workers
from bound_tuner.storage.database import make_storage

pytest.importorskip("grpc")
REPO = Path(__file__).parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def proxy_url():
    """`bound-tuner storage-proxy` serving the test database; its grpc:// URL."""
    if not PG_URL:
        pytest.skip("BOUND_TUNER_TEST_PG_URL is unset")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "bound_tuner.cli", "storage-proxy", "--storage", PG_URL]
        + ["--port", str(port), "--threads", "4"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline()  # printed once the checks pass, before it listens
    assert f"at grpc://127.0.0.1:{port}" in line and "***" not in line, (line, proc.stderr)
    url = f"grpc://127.0.0.1:{port}"
    make_storage(url)  # waits until it answers
    yield url
    proc.terminate()
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130 and "storage proxy stopped" in err, err


@needs_pg
def test_two_workers_through_the_proxy_reach_n_trials(tmp_path, study_name, proxy_url):
    spec = tmp_path / "s.toml"
    spec.write_text(worker_spec(study_name, n_trials=6, steps=60, lr=True))  # both workers get some
    run_workers(str(spec), storage=proxy_url, n_workers=2, progress=False, dashboard=False)
    # the workers had only the proxy's address; the database holds what they did
    trials = optuna.load_study(study_name=study_name, storage=pg_storage()).get_trials()
    numbers = sorted(t.number for t in trials)
    assert numbers == list(range(len(trials)))
    # no study lock through the proxy: the count may overshoot by up to workers - 1
    assert 6 <= len(trials) <= 7, len(trials)
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert len({t.user_attrs[WORKER_ATTR] for t in trials}) == 2
    assert len({(t.params["T"], t.params["lr"]) for t in trials}) == len(trials)


@needs_pg
@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_trials_through_the_proxy_send_no_heartbeat(study_name, proxy_url):
    """Optuna's proxy client is not a heartbeat storage: a trial run through it records no
    heartbeat in the database (and so is never failed as stale), while the same trial on the
    database directly does."""
    engine = sqlalchemy.create_engine(PG_URL)

    def heartbeats_while_running(storage) -> int:
        study = optuna.create_study(study_name=study_name, storage=storage, load_if_exists=True)
        seen: list[int] = []

        def objective(trial: optuna.Trial) -> float:
            time.sleep(2.5)  # two heartbeat intervals
            with engine.connect() as conn:
                seen.append(
                    conn.execute(
                        sqlalchemy.text(
                            "SELECT count(*) FROM trial_heartbeats h JOIN trials t "
                            "ON t.trial_id = h.trial_id JOIN studies s ON s.study_id = "
                            "t.study_id WHERE s.study_name = :n AND t.number = :k"
                        ),
                        {"n": study_name, "k": trial.number},
                    ).scalar_one()
                )
            return 0.0

        study.optimize(objective, n_trials=1)
        return seen[0]

    direct = make_storage(PG_URL, heartbeat_interval=1, grace_period=3)
    assert heartbeats_while_running(direct) == 1
    assert heartbeats_while_running(make_storage(proxy_url, heartbeat_interval=1)) == 0
    engine.dispose()


@needs_pg
def test_resume_through_the_proxy_does_not_wait_for_others_trials(tmp_path, study_name, proxy_url):
    """A RUNNING trial of a worker that is gone stays RUNNING through the proxy (no heartbeat
    fails it); a worker that finds every slot taken returns rather than wait for it forever."""
    spec = tmp_path / "s.toml"
    spec.write_text(worker_spec(study_name, n_trials=2, steps=20, lr=True))
    assert main(["worker", str(spec), "--storage", proxy_url, "--quiet", "--n-trials", "1"]) == 0
    study = optuna.load_study(study_name=study_name, storage=pg_storage())
    trial = study.ask()  # a worker that claimed a slot, then died
    trial.set_user_attr(WORKER_ATTR, "gone:1/cpu")
    done = threading.Event()

    def worker() -> None:
        main(["worker", str(spec), "--storage", proxy_url, "--quiet", "--n-trials", "2"])
        done.set()

    threading.Thread(target=worker, daemon=True).start()
    assert done.wait(60), "the worker waited for a trial that no heartbeat can fail"
    assert finished_count(study) == 1
    assert study.get_trials()[trial.number].state == TrialState.RUNNING


def test_unreachable_proxy_and_sqlite_behind_it_are_refused_with_one_line(tmp_path, capsys):
    spec = tmp_path / "s.toml"
    spec.write_text(worker_spec("refused", n_trials=2, steps=20, lr=True))
    began = time.monotonic()
    rc = main(["run", str(spec), "--storage", f"grpc://127.0.0.1:{free_port()}", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "bound-tuner storage-proxy" in err, err
    assert time.monotonic() - began < 30  # the proxy's wait (5 s), not a hang
    rc = main(["storage-proxy", "--storage", f"sqlite:///{tmp_path}/s.db"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "PostgreSQL" in err, err
    assert not (tmp_path / "s.db").exists()
