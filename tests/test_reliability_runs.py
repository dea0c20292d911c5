"""Runs that are interrupted or killed, and what worker processes see: real processes, real
signals, real databases (SQLite for one process, PostgreSQL for pools)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from worker_spec import PG_URL, needs_pg, pg_storage, start_cli, write_worker_spec

from bound_tuner.execution.accounting import WORKER_ATTR, finished_count
from bound_tuner.execution.plan import RunOptions
from bound_tuner.execution.pool import run_pool
from bound_tuner.execution.signals import INTERRUPTED

REPO = Path(__file__).parent.parent

HEARTBEAT = "[storage]\nheartbeat_interval = 1\ngrace_period = 2\n"


def write_spec(path: Path, name: str, *, n_trials: int = 2, steps: int = 10) -> Path:
    return write_worker_spec(path, name, n_trials=n_trials, steps=steps, extra=HEARTBEAT)


def wait_running(name: str, url: str, n: int, proc: subprocess.Popen, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        try:
            trials = optuna.load_study(study_name=name, storage=url).get_trials()
        except KeyError:
            trials = []
        running = [
            t for t in trials if t.state == TrialState.RUNNING and WORKER_ATTR in t.user_attrs
        ]
        if len(running) >= n:
            time.sleep(0.5)  # into the trial's training
            return running
        time.sleep(0.2)
    raise AssertionError("no trial started")


def answer(proc: subprocess.Popen, timeout: float) -> tuple[str, str]:
    """The process's output once it ends; if it has not ended within ``timeout`` seconds, fail
    with the stack of each of its threads (SIGABRT with PYTHONFAULTHANDLER set by ``start``)."""
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)
        _, err = proc.communicate(timeout=30)
        raise AssertionError(f"no end within {timeout:g} s; its threads:\n{err[-8000:]}") from None


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize(
    "command,sig",
    [("run", signal.SIGINT), ("worker", signal.SIGTERM)],
)
def test_interrupted_trial_fails_as_interrupted_and_is_retried(tmp_path, command, sig):
    url = f"sqlite:///{tmp_path}/i.db"
    spec = write_spec(tmp_path / "s.toml", "intr", n_trials=2, steps=200_000)
    proc = start_cli([command, str(spec), "--storage", url], tmp_path)
    (victim,) = wait_running("intr", url, 1, proc)
    proc.send_signal(sig)
    out, err = answer(proc, 60)
    assert proc.returncode == 130, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "interrupted" in lines[0] and "Traceback" not in err, err

    trials = optuna.load_study(study_name="intr", storage=url).get_trials()
    assert len(trials) == 2
    failed, retry = trials
    assert failed.number == victim.number and failed.state == TrialState.FAIL
    assert failed.user_attrs["fail_reason"] == INTERRUPTED
    assert retry.state == TrialState.WAITING and retry.params == failed.params
    assert retry.system_attrs["retry_history"] == [failed.number]

    # resume (short trials now, so the spec changed and must be allowed): the retry runs
    # first with the same parameters, then one more; both record what changed
    write_spec(spec, "intr", n_trials=2, steps=10)
    proc = start_cli(["run", str(spec), "--storage", url, "--allow-changed-spec"], tmp_path)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    study = optuna.load_study(study_name="intr", storage=url)
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    assert trials[1].params == failed.params
    assert finished_count(study) == 2
    assert "spec.changed" not in trials[0].user_attrs
    for t in trials[1:]:
        assert t.user_attrs["spec.changed"] == {"training.steps": [200_000, 10]}


def test_killed_single_process_trial_is_failed_and_retried_on_resume(tmp_path):
    url = f"sqlite:///{tmp_path}/k.db"
    spec = write_spec(tmp_path / "s.toml", "kill", n_trials=2, steps=200_000)
    proc = start_cli(["run", str(spec), "--storage", url], tmp_path)
    (victim,) = wait_running("kill", url, 1, proc)
    proc.kill()
    proc.communicate()
    t = optuna.load_study(study_name="kill", storage=url).get_trials()[0]
    assert t.state == TrialState.RUNNING  # left behind by the killed process

    write_spec(spec, "kill", n_trials=2, steps=10)
    began = time.monotonic()
    proc = start_cli(["run", str(spec), "--storage", url, "--allow-changed-spec"], tmp_path)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    study = optuna.load_study(study_name="kill", storage=url)
    trials = study.get_trials()
    assert trials[0].state == TrialState.FAIL  # failed once its heartbeat was stale (2 s)
    retry = next(t for t in trials if t.system_attrs.get("failed_trial") == victim.number)
    assert retry.state == TrialState.COMPLETE and retry.params == victim.params
    assert finished_count(study) == 2 and len(trials) == 3
    assert time.monotonic() - began < 60


@needs_pg
def test_sigterm_to_the_pool_interrupts_every_worker_and_leaves_no_process(tmp_path):
    name = f"rel-pool-{uuid.uuid4().hex[:8]}"
    spec = write_spec(tmp_path / "s.toml", name, n_trials=4, steps=200_000)
    try:
        proc = start_cli(["run", str(spec), "--storage", PG_URL, "--workers", "2"], tmp_path)
        running = wait_running(name, PG_URL, 2, proc, timeout=120)
        pids = {int(t.user_attrs[WORKER_ATTR].split(":")[1].split("/")[0]) for t in running}
        assert len(pids) == 2 and all(alive(p) for p in pids)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 130, err
        assert "Traceback" not in err and "interrupted" in err.strip().splitlines()[-1], err
        assert not any(alive(p) for p in pids)  # no orphans
        study = optuna.load_study(study_name=name, storage=pg_storage())
        trials = study.get_trials()
        failed = [t for t in trials if t.state == TrialState.FAIL]
        waiting = [t for t in trials if t.state == TrialState.WAITING]
        assert len(failed) == 2 and all(t.user_attrs["fail_reason"] == INTERRUPTED for t in failed)
        assert sorted(t.system_attrs["retry_history"][-1] for t in waiting) == sorted(
            t.number for t in failed
        )
        assert finished_count(study) == 0
    finally:
        optuna.delete_study(study_name=name, storage=pg_storage())


@needs_pg
def test_gpu_slot_workers_each_see_their_own_cuda_visible_devices(tmp_path, monkeypatch):
    """Real worker processes started with the pool's GPU slots: each one records the
    CUDA_VISIBLE_DEVICES it saw (here the trials run on the CPU, so no GPU is needed)."""
    monkeypatch.setenv("BOUND_TUNER_ARTIFACTS", str(tmp_path / "art"))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    name = f"rel-gpus-{uuid.uuid4().hex[:8]}"
    spec = write_spec(tmp_path / "s.toml", name, n_trials=6, steps=200)
    try:
        study = run_pool(
            str(spec),
            storage=PG_URL,
            slots=[("0", "cpu"), ("2", "cpu")],
            options=RunOptions(progress=False),
        )
        seen: dict[int, set[str]] = {}
        for t in study.get_trials():
            ident = t.user_attrs[WORKER_ATTR]
            pid = int(ident.split(":")[1].split("/")[0])
            seen.setdefault(pid, set()).add(ident.rsplit("(GPU ", 1)[1].rstrip(")"))
        assert os.getpid() not in seen
        assert sorted(v for s in seen.values() for v in s) == ["0", "2"]  # one GPU each
        assert all(len(s) == 1 for s in seen.values()) and len(seen) == 2
    finally:
        optuna.delete_study(study_name=name, storage=pg_storage())


@needs_pg
def test_pool_parent_never_initializes_cuda(tmp_path):
    """The parent of a pool runs with torch's CUDA entry points trapped: none may be called."""
    name = f"rel-cuda-{uuid.uuid4().hex[:8]}"
    spec = write_spec(tmp_path / "s.toml", name, n_trials=2, steps=10)
    script = textwrap.dedent(
        f"""
        import torch, torch.cuda
        calls = []
        def trap(name):
            def f(*a, **k):
                calls.append(name)
                raise RuntimeError("the pool parent touched CUDA: " + name)
            return f
        for fn in ("_lazy_init", "init", "is_available", "device_count", "current_device",
                   "set_device", "synchronize", "mem_get_info"):
            setattr(torch.cuda, fn, trap(fn))
        torch._C._cuda_getDeviceCount = trap("_cuda_getDeviceCount")
        from bound_tuner.execution.pool import run_workers
        study = run_workers({str(spec)!r}, storage={PG_URL!r}, n_workers=2, progress=False,
                            dashboard=False)
        assert len(study.get_trials()) == 2, study.get_trials()
        print("CALLS", calls, torch.cuda.is_initialized())
        """
    )
    try:
        out = subprocess.run(
            [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300
        )
        assert out.returncode == 0, out.stderr
        assert "CALLS [] False" in out.stdout, out.stdout
    finally:
        optuna.delete_study(study_name=name, storage=pg_storage())


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


@needs_pg
@pytest.mark.skipif(not _cuda_available(), reason="needs a CUDA GPU")
def test_gpu_workers_train_on_the_gpu_they_see(tmp_path, monkeypatch):
    from bound_tuner.execution.pool import run_workers

    monkeypatch.setenv("BOUND_TUNER_ARTIFACTS", str(tmp_path / "art"))
    name = f"rel-cuda-run-{uuid.uuid4().hex[:8]}"
    spec = write_spec(tmp_path / "s.toml", name, n_trials=4, steps=50)
    try:
        study = run_workers(str(spec), storage=PG_URL, gpus=[0], trials_per_gpu=2, progress=False)
        trials = study.get_trials()
        assert sum(t.state == TrialState.COMPLETE for t in trials) == 4
        idents = {t.user_attrs[WORKER_ATTR] for t in trials}
        assert all(i.endswith("/cuda (GPU 0)") for i in idents), idents
        import torch

        assert not torch.cuda.is_initialized()
    finally:
        optuna.delete_study(study_name=name, storage=pg_storage())


def test_a_run_started_with_sigint_ignored_still_answers_it(tmp_path):
    """A process started with SIGINT ignored (a shell script's background job; a test runner
    that ignored it) passes that on to what it execs: the run puts Ctrl-C's handler back, so
    its trial still ends as interrupted."""
    url = f"sqlite:///{tmp_path}/g.db"
    spec = write_spec(tmp_path / "s.toml", "ign", n_trials=2, steps=200_000)
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # inherited by the child
    try:
        proc = start_cli(["run", str(spec), "--storage", url], tmp_path)
    finally:
        signal.signal(signal.SIGINT, previous)
    (victim,) = wait_running("ign", url, 1, proc)
    proc.send_signal(signal.SIGINT)
    out, err = answer(proc, 60)
    assert proc.returncode == 130, err
    trial = optuna.load_study(study_name="ign", storage=url).trials[victim.number]
    assert trial.state == optuna.trial.TrialState.FAIL
    assert trial.user_attrs["fail_reason"] == "interrupted"
