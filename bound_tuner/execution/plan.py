"""What every executor does before and after its workers run: check the settings, the storage and
the data before the study exists (``check_run``), open the study with heartbeats (``open_run``),
watch it while the workers run (``watch_step``), and save the final charts.

The local pool (``bound_tuner.execution.pool``) and Ray (``bound_tuner.execution.ray_executor``)
differ only in where the workers run; everything here is shared."""

from __future__ import annotations

import contextlib
import dataclasses
import pickle
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna

from bound_tuner.config.spec import load_spec
from bound_tuner.execution.accounting import TrialCounter, fail_stale, finished_count, nothing_left
from bound_tuner.execution.errors import WorkerConfigError
from bound_tuner.execution.lock import StudyLock
from bound_tuner.objectives.studies import open_study
from bound_tuner.storage.database import (
    DEFAULT_HEARTBEAT_INTERVAL,
    DEFAULT_OUTAGE_SECONDS,
    ENV_VAR,
    StorageError,
    check_storage,
    connection_lost,
    default_grace_period,
    is_sqlite,
    make_storage,
    redact,
    resolve_url,
    scrub,
    storage_errors,
)
from bound_tuner.storage.folders import artifact_dir_for

if TYPE_CHECKING:
    from bound_tuner.config.schema import StudySpec


@dataclass(frozen=True)
class RunOptions:
    """The settings of a run that every executor hands down to every worker, built once
    (``bound_tuner.study.run_study``, the command line) and passed as one object; None means
    the spec's setting, else the default.

    ``n_trials``: finished trials the study stops at. ``heartbeat_interval``, ``grace_period``,
    ``outage_seconds``: see [storage] (``docs/cluster.md``). ``max_consecutive_failures``:
    failed trials in a row that stop a worker. ``allow_changed_spec``: continue a study created
    from another spec. ``dashboard``: trial notes and samples; ``dashboard_charts``: the study's
    charts too (one process of a study). ``progress``: a progress bar. ``existing_trials``: the
    trials the study had when a pool or Ray run started (seeds each worker's sampler)."""

    n_trials: int | None = None
    heartbeat_interval: int | None = None
    grace_period: int | None = None
    outage_seconds: float | None = None
    max_consecutive_failures: int | None = None
    allow_changed_spec: bool = False
    dashboard: bool = True
    dashboard_charts: bool = False
    progress: bool = False
    existing_trials: int | None = None

    def replace(self, **changes: Any) -> RunOptions:
        """A copy with ``changes``."""
        return dataclasses.replace(self, **changes)

    def for_worker(self, index: int) -> RunOptions:
        """The options of worker ``index`` of a pool or Ray run: no bar, the charts from worker
        0 only."""
        return self.replace(progress=False, dashboard_charts=self.dashboard and index == 0)


def outage_setting(spec: StudySpec, given: float | None) -> float:
    """Seconds a worker waits for a database that went away: given, else the spec's [storage]
    outage_seconds, else the default."""
    value = (
        given if given is not None else spec.storage.get("outage_seconds", DEFAULT_OUTAGE_SECONDS)
    )
    if value < 0:
        raise WorkerConfigError(f"outage_seconds = {value:g} must be 0 or more")
    return float(value)


def worker_env(url: str) -> dict[str, str]:
    """The environment a worker process or task needs to reach the study database: the URL in
    $BOUND_TUNER_STORAGE, so that it never travels as an argument (visible in a process list or
    Ray's dashboard)."""
    return {ENV_VAR: url}


#: retries of a trial failed as stale (its worker died) before it stays FAIL
RETRY_FAILED = 3


def open_with_heartbeat(
    spec: StudySpec, url: str, interval: int, grace: int, **kw: Any
) -> tuple[optuna.Study, optuna.storages.BaseStorage]:
    """The spec's study (created if missing) on a storage with heartbeat and retries, with the
    artifact folder of ``url`` recorded, and that storage (a worker refreshes its own trials'
    heartbeats there: ``accounting.LiveTrials``); ``kw`` goes to
    ``bound_tuner.objectives.studies.open_study`` (worker_index, allow_changed_spec, ...)."""
    with warnings.catch_warnings():  # heartbeat options are marked experimental in Optuna
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        store = make_storage(
            url, heartbeat_interval=interval, grace_period=grace, retry_failed=RETRY_FAILED
        )
        study = open_study(
            spec, url, store=store, artifact_dir=str(artifact_dir_for(url).resolve()), **kw
        )
    return study, store


def heartbeat_settings(spec: StudySpec, interval: int | None, grace: int | None) -> tuple[int, int]:
    """The heartbeat interval and grace period of a run: given, else the spec's [storage], else
    the defaults."""
    if interval is None:
        interval = spec.storage.get("heartbeat_interval", DEFAULT_HEARTBEAT_INTERVAL)
    if grace is None:
        grace = spec.storage.get("grace_period", default_grace_period(interval))
    if interval < 1:
        raise WorkerConfigError(f"heartbeat interval {interval} s must be at least 1 second")
    if grace <= interval:
        raise WorkerConfigError(
            f"grace period {grace} s must be longer than the heartbeat interval {interval} s "
            "(e.g. three times it), or live trials would be failed"
        )
    return interval, grace


def as_spec(spec: StudySpec | str | Path) -> StudySpec:
    """A spec given as a path is loaded (one-line SpecError on a bad one)."""
    return load_spec(spec) if isinstance(spec, (str, Path)) else spec


def trial_target(spec: StudySpec, n_trials: int | None) -> int:
    """The finished trials a run stops at: ``n_trials`` if given, else the spec's."""
    target = n_trials if n_trials is not None else spec.n_trials
    if target < 1:
        raise WorkerConfigError(f"n_trials = {target} must be at least 1")
    return target


def save_final_charts(study: optuna.Study) -> None:
    """The dashboard charts of a finished pool (worker 0 built the earlier ones); a failure is a
    warning, since charts are a view and the study is done."""
    # scipy and plotly only with the dashboard on
    from bound_tuner.dashboard.charts import save_charts

    try:
        save_charts(study)
    except Exception as e:
        warnings.warn(f"could not save the dashboard charts: {e}", stacklevel=3)


def check_device(device: str) -> None:
    """Refuse a torch device this process cannot use, with one line (before any study exists);
    "auto" is always usable (``bound_tuner.runtime.device.resolve_device``)."""
    # torch only after a worker set CUDA_VISIBLE_DEVICES
    from bound_tuner.runtime.device import DeviceError, resolve_device

    try:
        resolve_device(device)
    except DeviceError as e:
        raise WorkerConfigError(f"--{e}") from None


@dataclass(frozen=True)
class RunPlan:
    """A run of several workers on one study, checked before the study exists."""

    spec: StudySpec
    url: str
    target: int  # finished trials the study stops at
    interval: int  # heartbeat interval, seconds
    grace: int  # grace period of a stale trial, seconds
    options: RunOptions  # with every setting resolved


def check_run(
    spec: StudySpec | str | Path,
    *,
    storage: str | None,
    options: RunOptions,
    sqlite_refusal: str | None,
) -> RunPlan:
    """Everything a user can get wrong in a multi-worker run, checked before the study exists:
    the spec, the heartbeat settings, the storage (SQLite refused with ``sqlite_refusal``, the
    line that says why and what to use, unless it is None), and the data and search settings (by
    building the objective once on the CPU, so that no worker fails on them)."""
    spec = as_spec(spec)
    target = trial_target(spec, options.n_trials)
    interval, grace = heartbeat_settings(spec, options.heartbeat_interval, options.grace_period)
    outage = outage_setting(spec, options.outage_seconds)
    url = resolve_url(storage)
    if sqlite_refusal is not None and is_sqlite(url):
        raise StorageError(f"storage {redact(url)} is SQLite, {sqlite_refusal}")
    check_storage(url)
    # torch only after a worker set CUDA_VISIBLE_DEVICES
    from bound_tuner.objectives.factory import build_objective, load_data

    build_objective(spec, load_data(spec), device="cpu")
    resolved = options.replace(
        n_trials=target, heartbeat_interval=interval, grace_period=grace, outage_seconds=outage
    )
    return RunPlan(spec, url, target, interval, grace, resolved)


def open_run(plan: RunPlan) -> tuple[optuna.Study, str | None, bytes, RunOptions]:
    """The run's study (created if missing), the line that says nothing is left to run (None
    when trials are left), and what every worker gets: the pickled spec and the options of
    ``bound_tuner.execution.loop.work``."""
    study, _ = open_with_heartbeat(
        plan.spec,
        plan.url,
        plan.interval,
        plan.grace,
        allow_changed_spec=plan.options.allow_changed_spec,
    )
    # every worker seeds its sampler from the trials the study had when the run started
    options = plan.options.replace(existing_trials=len(study.get_trials(deepcopy=False)))
    return study, nothing_left(study, plan.target), pickle.dumps(plan.spec), options


def progress_bar(study: optuna.Study, target: int, desc: str | None = None) -> Any:
    """A tqdm bar of the study's finished trials out of ``target``."""
    from tqdm.auto import tqdm

    return tqdm(total=target, initial=min(finished_count(study), target), unit="trial", desc=desc)


class StaleWatch:
    """When the executor looks for stale trials: after a worker died, and otherwise once a grace
    period (a trial can only be stale once its heartbeat is a grace period old). Every worker
    also looks before it claims a trial; looking more often from the executor only adds chances
    to fail a live trial whose heartbeat a loaded machine delayed."""

    def __init__(self, grace: float) -> None:
        self.grace = grace
        self._last = time.monotonic()
        self._until = 0.0  # after a death: look at every poll until its trial is stale

    def worker_died(self) -> None:
        self._until = time.monotonic() + self.grace + 2.0

    def due(self) -> bool:
        now = time.monotonic()
        if now < self._until or now - self._last >= self.grace:
            self._last = now
            return True
        return False


def watch_step(
    study: optuna.Study,
    lock: StudyLock,
    counter: TrialCounter,
    bar: Any,
    target: int,
    *,
    stale: bool = True,
) -> None:
    """One look at a running study from the executor: with ``stale``, a dead worker's trial is
    failed and queued again (under the study lock); the bar shows the finished trials. A
    database that went away is skipped (the workers wait for it themselves)."""
    try:
        if stale:
            with lock():
                fail_stale(study)
        if bar is not None:
            bar.n = min(counter.count(study).finished, target)
            bar.refresh()
    except storage_errors() as e:
        if not connection_lost(e):
            raise


def study_count(study: optuna.Study) -> str:
    """The study's finished trials for a closing line ("unknown" when the database cannot be
    read: a run that ends on an outage still says why in one line)."""
    try:
        return str(finished_count(study))
    except storage_errors():
        return "an unknown number (the database cannot be read)"


def close_bar(bar: Any, study: optuna.Study | None, target: int) -> None:
    """The bar's last count, then closed."""
    if bar is not None:
        if study is not None:
            with contextlib.suppress(*storage_errors()):
                bar.n = min(finished_count(study), target)
        bar.close()


HEARTBEAT_MODULE = "optuna.storages._heartbeat"  # where Optuna's heartbeat thread runs


def _in_heartbeat(tb: Any) -> bool:
    """Whether a traceback passes through Optuna's heartbeat thread."""
    while tb is not None:
        if tb.tb_frame.f_globals.get("__name__") == HEARTBEAT_MODULE:
            return True
        tb = tb.tb_next
    return False


def thread_excepthook(previous: Any, storage: str | None) -> Any:
    """A threading.excepthook that writes one line for a database error in a helper thread (a
    heartbeat the database refused; the run itself reports what it means) and for any error of
    Optuna's heartbeat thread (its trial goes stale and is retried, unless another process
    already ended it), and hands every other exception to ``previous`` (Python's traceback)."""

    kinds = storage_errors()

    def hook(args: Any) -> None:
        heartbeat = _in_heartbeat(args.exc_traceback)
        if not (isinstance(args.exc_value, kinds) or heartbeat):
            previous(args)
            return
        text = str(args.exc_value).strip().splitlines()
        what = f"{args.exc_type.__name__}: {text[0]}" if text else args.exc_type.__name__
        name = args.thread.name if args.thread is not None else "a thread"
        if heartbeat:
            what += " (this trial's heartbeat stopped)"
        print(f"bound-tuner: warning: {name}: {scrub(what, storage)}", file=sys.stderr)

    return hook
