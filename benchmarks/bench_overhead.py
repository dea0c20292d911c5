"""Benchmark: bound_tuner's own cost per trial, and whether it grows as a study grows.

A study of many tiny Swiss-roll trials (m = 32, a few training steps, a small "elbo" bound), run
the way ``bound-tuner run`` runs it (one process, dashboard on: trial notes, sample images, the
study's charts, the best trials' weights kept), on SQLite and on PostgreSQL, each on a fresh
study, in one run. Every trial is timed from the start of its training to the start of the
next trial's training (the last one to the end of the run, which includes the final charts),
and split into:

- training and scoring (``bound_tuner.evaluation.experiment.run_diffusion``: training and the bound),
- the trial's note (``TrialArtifacts.note``: optuna-dashboard's ``save_note``),
- its sample image (``TrialArtifacts.samples_artifact``: generating and drawing samples),
- the study's charts (``save_charts``),
- kept weights (``ModelKeeper``),
- the rest: Optuna's storage writes and sampler, trial accounting, callbacks.

The tool's overhead is everything but training and scoring. Printed per trial as the mean over
the first and the last ``--window`` trials (the first trial, which imports matplotlib and plotly,
is left out of the first window), and the ratio last / first: a study whose per-trial cost does
not grow has a ratio near 1. Means, not medians, so that a chart rebuild every few trials counts
at its share. After each study the stored charts are compared with charts built afresh from all
its trials (they must be equal: up to date when the study ends).

torch runs on ``--threads`` threads (default 1, as the worker pool runs): on a shared 2-core
machine more threads make tiny models many times slower.

The tool's SQLite files run in write-ahead-log mode with ``synchronous=NORMAL``
(``bound_tuner.storage.database.WalConnection``); ``--sqlite-sync-full`` measures SQLite's own
default (the file synced on every commit) beside it. Trials after the study's first 200 get a
note and a sample image only when they lower the best bound (``NOTE_EVERY_TRIAL_UNTIL``);
``--no-sample-images`` leaves out the samples PNG of every trial (the note is still written).

    python benchmarks/bench_overhead.py --trials 2000                      # SQLite
    BOUND_TUNER_TEST_PG_URL=postgresql+psycopg://postgres@127.0.0.1:5432/bound_tuner_test \\
        python benchmarks/bench_overhead.py --trials 2000 --storages sqlite,postgresql \\
        --json benchmarks/results/overhead_cpu_2cores.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sqlite3
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import optuna
import torch

import bound_tuner.dashboard.charts as charts_mod
import bound_tuner.dashboard.notes as notes_mod
import bound_tuner.objectives.diffusion as objectives_mod
import bound_tuner.storage.keeper as keeper_mod
from bound_tuner.storage.folders import ARTIFACTS_ENV

SPEC = """
[study]
name = "{name}"
n_trials = {trials}
seed = 0
[data]
name = "swiss_roll"
m = 32
test_size = 32
[search]
T = {{ low = 0.2, high = 0.9 }}
lr = {{ low = 1e-3, high = 5e-3, log = true }}
[training]
steps = {steps}
batch_size = 32
width = 16
checkpoints = 0
[bound]
variant = "elbo"
N = 10
n_paths = 8
train_draws = 2
[sampler]
type = "{sampler}"
[pruner]
type = "none"
"""

PARTS = ("train_score", "note", "samples", "charts", "weights")


class Clock:
    """Per-trial timings: wraps the public callables that do each part of a trial."""

    def __init__(self) -> None:
        self.starts: list[float] = []  # start of each trial's training
        self.parts: list[dict[str, float]] = []
        self.end = 0.0
        self._undo: list = []

    def _add(self, part: str, seconds: float) -> None:
        if self.parts:  # before the first trial's training: the study's set-up, not counted
            self.parts[-1][part] += seconds

    def wrap(self, owner, name: str, part: str, *, starts_trial: bool = False) -> None:
        inner = getattr(owner, name)

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            if starts_trial:
                self.starts.append(t0)
                self.parts.append(dict.fromkeys(PARTS, 0.0))
            try:
                return inner(*args, **kwargs)
            finally:
                self._add(part, time.perf_counter() - t0)

        setattr(owner, name, timed)
        self._undo.append((owner, name, inner))

    def replace(self, owner, name: str, value) -> None:
        self._undo.append((owner, name, getattr(owner, name)))
        setattr(owner, name, value)

    def restore(self) -> None:
        for owner, name, inner in reversed(self._undo):
            setattr(owner, name, inner)
        self._undo.clear()

    def per_trial(self) -> list[dict[str, float]]:
        ends = [*self.starts[1:], self.end]
        out = []
        for s, e, parts in zip(self.starts, ends, self.parts, strict=True):
            row = {"total": e - s, **parts}
            row["overhead"] = row["total"] - parts["train_score"]
            row["other"] = row["overhead"] - sum(parts[k] for k in PARTS[1:])
            out.append(row)
        return out


def window_means(rows: list[dict[str, float]], lo: int, hi: int) -> dict[str, float]:
    part = rows[lo:hi]
    return {k: 1e3 * statistics.fmean(r[k] for r in part) for k in part[0]}  # milliseconds


def stored_charts_current(study: optuna.Study) -> bool:
    """Whether the charts in the storage equal charts built now from all the study's trials."""
    from optuna_dashboard._custom_plot_data import get_plotly_graph_objects

    from bound_tuner.dashboard.charts import study_figures
    from bound_tuner.dashboard.report import trials_json

    attrs = study._storage.get_study_system_attrs(study._study_id)  # what the dashboard reads
    stored = {k: json.loads(v) for k, v in get_plotly_graph_objects(attrs).items()}
    fresh = {k: json.loads(f.to_json()) for k, f in study_figures(trials_json(study)).items()}
    return bool(fresh) and stored == fresh


def sqlite_sync_full() -> None:
    """SQLite's defaults (rollback journal, a sync on every commit) on the tool's SQLite
    connections from now on: what a study database cost before the tool switched to WAL."""
    import bound_tuner.storage.database as database

    def defaults(self, *args, **kwargs) -> None:
        sqlite3.Connection.__init__(self, *args, **kwargs)

    database.WalConnection.__init__ = defaults


def run_one(kind: str, url: str, args: argparse.Namespace, tmp: Path) -> dict:
    from bound_tuner.config.spec import load_spec
    from bound_tuner.study import run_study

    name = f"overhead_{kind}_{uuid.uuid4().hex[:8]}"
    path = tmp / f"{name}.toml"
    path.write_text(
        SPEC.format(name=name, trials=args.trials, steps=args.steps, sampler=args.sampler)
    )
    clock = Clock()
    clock.wrap(objectives_mod, "run_diffusion", "train_score", starts_trial=True)
    clock.wrap(notes_mod.TrialArtifacts, "note", "note")
    clock.wrap(charts_mod, "save_charts", "charts")
    clock.wrap(keeper_mod.ModelKeeper, "__call__", "weights")
    if args.sample_images:
        clock.wrap(notes_mod.TrialArtifacts, "samples_artifact", "samples")
    else:
        clock.replace(notes_mod.TrialArtifacts, "samples_artifact", lambda *a, **k: None)
    t0 = time.perf_counter()
    try:
        study = run_study(load_spec(path), storage=url, progress=False)
        clock.end = time.perf_counter()
    finally:
        clock.restore()
    rows = clock.per_trial()
    n, w = len(rows), min(args.window, len(rows) // 2)
    first, last = window_means(rows, 1, 1 + w), window_means(rows, n - w, n)
    out = {
        "storage": kind,
        "trials": n,
        "window": w,
        "seconds": clock.end - t0,
        "first_ms": first,
        "last_ms": last,
        "ratio_total": last["total"] / first["total"],
        "ratio_overhead": last["overhead"] / first["overhead"],
        # optuna-dashboard's save_note reads every note of the study (they are study attrs)
        "ratio_overhead_without_note": (last["overhead"] - last["note"])
        / (first["overhead"] - first["note"]),
        "median_overhead_ms": {
            "first": 1e3 * statistics.median(r["overhead"] for r in rows[1 : 1 + w]),
            "last": 1e3 * statistics.median(r["overhead"] for r in rows[n - w :]),
        },
        "charts_current": stored_charts_current(study),
        "per_trial_ms": {k: [round(1e3 * r[k], 2) for r in rows] for k in rows[0]},
    }
    if kind == "postgresql":  # the study's rows go; the test database stays small
        optuna.delete_study(study_name=name, storage=url)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=2000)
    ap.add_argument("--window", type=int, default=200, help="trials in each compared window")
    ap.add_argument("--steps", type=int, default=3, help="training steps per trial")
    ap.add_argument("--storages", default="sqlite", help="sqlite,postgresql,sqlite-sync-full")
    ap.add_argument(
        "--no-sample-images",
        dest="sample_images",
        action="store_false",
        help="leave out each trial's samples PNG",
    )
    ap.add_argument("--pg-url", default=os.environ.get("BOUND_TUNER_TEST_PG_URL"))
    ap.add_argument("--sampler", default="random", help="random or tpe")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    order = ("sqlite", "postgresql", "sqlite-sync-full")  # sync-full changes later SQLite runs
    kinds = [k.strip() for k in args.storages.split(",") if k.strip()]
    kinds.sort(key=lambda k: order.index(k) if k in order else -1)
    info = {
        "device": f"CPU ({os.cpu_count()} cores, torch on {args.threads} thread(s))",
        "load_average_at_start": os.getloadavg(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "optuna": optuna.__version__,
        "sampler": args.sampler,
        "steps": args.steps,
        "sample_images": args.sample_images,
    }
    print("; ".join(f"{k}: {v}" for k, v in info.items()))
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        os.environ[ARTIFACTS_ENV] = str(tmp_path / "artifacts")
        for kind in kinds:
            if kind in ("sqlite", "sqlite-sync-full"):
                url = f"sqlite:///{tmp_path}/{kind}.db"
                if kind == "sqlite-sync-full":
                    sqlite_sync_full()
            elif kind == "postgresql":
                if not args.pg_url:
                    raise SystemExit(
                        "--storages postgresql needs --pg-url or BOUND_TUNER_TEST_PG_URL"
                    )
                url = args.pg_url
            else:
                raise SystemExit(f"unknown storage {kind!r}: use sqlite or postgresql")
            r = run_one(kind, url, args, tmp_path)
            results.append(r)
            f, la = r["first_ms"], r["last_ms"]
            print(
                f"{kind}: {r['trials']} trials in {r['seconds']:.0f} s; per trial (ms, means of "
                f"{r['window']}): first window / last window"
            )
            for k in ("total", "train_score", "overhead", *PARTS[1:], "other"):
                print(f"  {k:<14} {f[k]:8.1f} {la[k]:8.1f}")
            print(
                f"  ratio last/first: whole trial {r['ratio_total']:.2f}, overhead "
                f"{r['ratio_overhead']:.2f} ({r['ratio_overhead_without_note']:.2f} without the "
                f"note); median overhead {r['median_overhead_ms']['first']:.1f}"
                f" / {r['median_overhead_ms']['last']:.1f} ms; charts up to date at the end: "
                f"{r['charts_current']}"
            )
    if args.json:
        Path(args.json).write_text(json.dumps({**info, "runs": results}, indent=2))


if __name__ == "__main__":
    main()
