"""A pool of spawn-started worker processes on CPUs or GPUs.

``run_workers`` creates the study once, then starts K processes that load it and run the worker loop
until the study has ``n_trials`` finished trials in all (not each). With ``gpus`` each worker sees
one GPU through CUDA_VISIBLE_DEVICES, set before it imports torch; the parent never touches CUDA."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna

from bound_tuner.execution.accounting import POLL_S, TrialCounter, fail_orphans
from bound_tuner.execution.errors import WorkerConfigError, WorkerError
from bound_tuner.execution.lock import StudyLock
from bound_tuner.execution.loop import work
from bound_tuner.execution.plan import (
    RunOptions,
    StaleWatch,
    check_run,
    close_bar,
    open_run,
    progress_bar,
    save_final_charts,
    study_count,
    watch_step,
    worker_env,
)
from bound_tuner.execution.signals import install_sigterm_handler, signals_ignored
from bound_tuner.storage.database import storage_errors

if TYPE_CHECKING:
    from bound_tuner.config.schema import StudySpec

_log = logging.getLogger(__name__)
SQLITE_REFUSAL = (
    "which serves one process, not {k} workers; use PostgreSQL (--storage "
    "postgresql://user@host:5432/dbname) or, from your own Optuna code, a journal storage "
    "(JournalFileBackend on a shared file, or JournalRedisBackend), or run one worker"
)


def parse_gpus(text: str) -> list[int | str]:
    """``"0,1,3"`` -> ``[0, 1, 3]``; GPU-/MIG- UUIDs pass through as strings."""
    out: list[int | str] = []
    for tok in (t.strip() for t in text.split(",")):
        if tok.isdigit():
            out.append(int(tok))
        elif tok.startswith(("GPU-", "MIG-")):
            out.append(tok)
        else:
            raise WorkerConfigError(
                f"--gpus {text!r}: {tok!r} is not a GPU index; give indices such as 0,1,2,3"
            )
    return out


def worker_devices(
    n_workers: int | None,
    gpus: Sequence[int | str] | None,
    trials_per_gpu: int,
    device: str = "auto",
) -> list[tuple[str | None, str]]:
    """(CUDA_VISIBLE_DEVICES, torch device) for each worker of the pool; None leaves the
    variable as this process has it.

    Without ``gpus`` the workers run on ``device``: "auto" and "cpu" give CPU workers (one torch
    thread each), a CUDA device ("cuda", "cuda:1") puts every worker on it."""
    if trials_per_gpu < 1:
        raise WorkerConfigError(f"--trials-per-gpu {trials_per_gpu} must be at least 1")
    if gpus is None:
        if trials_per_gpu != 1:
            raise WorkerConfigError("--trials-per-gpu needs --gpus, e.g. --gpus 0,1")
        n = n_workers if n_workers is not None else (os.cpu_count() or 1)
        if n < 1:
            raise WorkerConfigError(f"--workers {n} must be at least 1")
        if device in ("auto", "cpu"):
            return [("", "cpu")] * n
        if not device.startswith("cuda"):
            raise WorkerConfigError(
                f"device {device!r} for a pool of workers: use cpu, auto (CPU workers), cuda or "
                "cuda:N (every worker on that GPU), or give gpus"
            )
        return [(None, device)] * n
    if device not in ("auto", "cuda"):
        raise WorkerConfigError(
            f"device {device!r} with gpus: each worker trains on its own GPU of gpus; leave "
            "out the device"
        )
    gpus = list(gpus)
    if not gpus:
        raise WorkerConfigError("--gpus is empty; give GPU indices such as 0,1,2,3")
    seen = set()
    for g in gpus:
        if g in seen:
            raise WorkerConfigError(
                f"--gpus lists GPU {g} twice; use --trials-per-gpu 2 for two workers on one GPU"
            )
        seen.add(g)
    slots = [(str(g), "cuda") for g in gpus for _ in range(trials_per_gpu)]
    if n_workers is not None and n_workers != len(slots):
        raise WorkerConfigError(
            f"--workers {n_workers} does not match {len(gpus)} GPUs x {trials_per_gpu} trials "
            f"per GPU = {len(slots)} workers; leave out --workers"
        )
    return slots


def _watch_parent(parent: int) -> None:
    """End this worker like SIGTERM if its parent dies (no orphans running trials)."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="bound-tuner-parent-watch", daemon=True).start()


def _worker_main(
    index: int,
    visible_devices: str | None,
    device: str,
    payload: bytes,
    env: dict[str, str],
    options: RunOptions,
    errors: Any,
    parent: int | None = None,
) -> None:
    """Entry point of a spawned worker: CUDA visibility and the storage's environment first
    (``env``, sent through the spawn pipe, never on a command line), then torch and the study
    loop. A worker that fails sends its one line through ``errors`` (a pipe: no semaphore for
    the resource tracker to report as leaked when another worker is killed)."""
    os.environ.update(env)
    if visible_devices is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = visible_devices
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops us
    install_sigterm_handler()  # the parent's SIGTERM ends our trial as interrupted
    if parent is not None:
        _watch_parent(parent)
    try:
        failure = work(index, device, payload, options)
    except KeyboardInterrupt:
        sys.exit(130)
    if failure is not None:
        errors.send(failure)
        errors.close()
        sys.exit(1)


def _describe_exit(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


def run_workers(
    spec: StudySpec | str | Path,
    *,
    storage: str | None,
    n_workers: int | None = None,
    gpus: Sequence[int | str] | None = None,
    trials_per_gpu: int = 1,
    device: str = "auto",
    options: RunOptions | None = None,
    n_trials: int | None = None,
    progress: bool = True,
    dashboard: bool = True,
) -> optuna.Study:
    """Run the spec's study with a pool of worker processes until it has ``n_trials`` in all.

    Without ``gpus``: ``n_workers`` workers (default: one per CPU core) on ``device``: CPU
    workers with one torch thread each for "auto" or "cpu", every worker on one GPU for "cuda"
    or "cuda:N". With ``gpus``: ``trials_per_gpu`` workers per listed GPU.
    ``max_consecutive_failures`` and ``allow_changed_spec``: see ``run_worker``. SQLite serves one process,
    so more than one worker needs PostgreSQL. A worker that dies does not stop the others (its
    trial is retried); once all have ended, any non-zero exit raises WorkerError. ``dashboard``:
    trial notes and samples from every worker, the study's charts from worker 0 and, at the end,
    from the parent. Ctrl-C or SIGTERM stops every worker (their trials end as interrupted and
    are retried when the study resumes) and raises KeyboardInterrupt.

    ``options`` carries every other setting (``bound_tuner.execution.plan.RunOptions``);
    ``n_trials``, ``progress`` and ``dashboard`` are shorthands for the common ones and apply
    when ``options`` is None.
    """
    if options is None:
        options = RunOptions(n_trials=n_trials, progress=progress, dashboard=dashboard)
    slots = worker_devices(n_workers, gpus, trials_per_gpu, device)
    if gpus is not None:
        check_gpus(gpus)
    where = f"GPUs {','.join(map(str, gpus))}" if gpus else slots[0][1]
    return run_pool(spec, storage=storage, slots=slots, options=options, where=where)


def run_pool(
    spec: StudySpec | str | Path,
    *,
    storage: str | None,
    slots: Sequence[tuple[str | None, str]],
    options: RunOptions | None = None,
    where: str = "CPU",
) -> optuna.Study:
    """The pool of ``run_workers``: one spawned process per (CUDA_VISIBLE_DEVICES, device) slot."""
    import multiprocessing as mp

    plan = check_run(
        spec,
        storage=storage,
        options=options if options is not None else RunOptions(progress=True),
        sqlite_refusal=None if len(slots) == 1 else SQLITE_REFUSAL.format(k=len(slots)),
    )
    spec, url, target = plan.spec, plan.url, plan.target
    study, done, payload, worker_options = open_run(plan)
    dashboard, progress = plan.options.dashboard, plan.options.progress
    if done is not None:
        _log.warning(done)
        return study
    lock = StudyLock(url, spec.name)
    ctx = mp.get_context("spawn")
    pipes = [ctx.Pipe(duplex=False) for _ in slots]
    procs = [
        ctx.Process(
            target=_worker_main,
            args=(
                i,
                visible,
                device,
                payload,
                worker_env(url),
                worker_options,
                pipes[i][1],
                os.getpid(),
            ),
            name=f"bound-tuner-worker-{i}",
        )
        for i, (visible, device) in enumerate(slots)
    ]
    bar = (
        progress_bar(study, target, f"{spec.name}: {len(procs)} workers on {where}")
        if progress
        else None
    )
    ended: dict[int, int | None] = {}
    try:
        for p in procs:
            p.start()
        last_poll = 0.0
        counter = TrialCounter()
        stale = StaleWatch(plan.grace)
        while len(ended) < len(procs):
            for i, p in enumerate(procs):
                if i not in ended and not p.is_alive():
                    p.join()
                    ended[i] = p.exitcode
                    if p.exitcode != 0:
                        stale.worker_died()
                        if bar is not None:
                            bar.write(f"worker {i} (pid {p.pid}) {_describe_exit(p.exitcode)}")
            if time.monotonic() - last_poll >= POLL_S:
                last_poll = time.monotonic()
                watch_step(study, lock, counter, bar, target, stale=stale.due())
            time.sleep(0.2)
    except KeyboardInterrupt:
        with signals_ignored():  # a second Ctrl-C must not leave workers behind
            _stop(procs)
        raise
    finally:
        lock.close()
        close_bar(bar, study, target)
    if len(ended) == len(procs):  # every worker has ended: what they left RUNNING stays so
        with contextlib.suppress(*storage_errors()):
            fail_orphans(study, {p.pid for p in procs})

    if dashboard:
        save_final_charts(study)

    messages: dict[int, str] = {}
    for i, (reader, writer) in enumerate(pipes):
        writer.close()
        try:
            if reader.poll():
                messages[i] = reader.recv()
        except (EOFError, OSError):  # the worker died before it said why; its exit code tells
            pass
        finally:
            reader.close()
    failed = {i: code for i, code in ended.items() if code != 0}
    if failed:
        parts = []
        for i, code in sorted(failed.items()):
            what = messages.get(i) or _describe_exit(code)
            parts.append(f"worker {i} ({slots[i][1]}, pid {procs[i].pid}): {what}")
        raise WorkerError(
            f"{len(failed)} of {len(procs)} workers failed: {'; '.join(parts)}; the study has "
            f"{study_count(study)} of {target} finished trials"
        )
    return study


def check_gpus(gpus: Sequence[int | str]) -> None:
    """Refuse --gpus on a machine without those GPUs, asking a short-lived process so that this
    one never touches CUDA."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    probe = "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)"
    try:
        out = subprocess.run(
            [sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120
        )
        count = int(out.stdout.strip().splitlines()[-1])
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        count = 0
    if count == 0:
        raise WorkerConfigError(
            f"--gpus {','.join(map(str, gpus))} but this machine shows no CUDA GPU; "
            "use --workers K for CPU workers"
        )
    missing = [g for g in gpus if isinstance(g, int) and g >= count]
    if missing:
        raise WorkerConfigError(
            f"--gpus lists GPU {missing[0]}, but this machine has {count} (0..{count - 1})"
        )


def _stop(procs: Sequence[Any], *, timeout: float = 30.0) -> None:
    """SIGTERM the workers, which end their trials as interrupted (retried on resume) and exit;
    kill any that has not ended after ``timeout`` seconds (its trial goes stale and is retried)."""
    started = [p for p in procs if p.pid is not None]
    for p in started:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + timeout
    for p in started:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join()
