"""Benchmark: trials per second of a pool of 1 worker against 2 workers, on PostgreSQL.

Short Swiss-roll trials (m=32, 20 training steps, a small bound), the same spec for both pools,
each on a fresh study, measured in one run; with ``--repeats R`` the pools alternate (1, 2, 1, 2,
...) and the medians are printed, which evens out other load on a shared machine. Two rates per
pool:

- steady: finished trials / (last trial's end - first trial's start), from the trials' own
  timestamps; what a long study sees.
- wall: finished trials / the whole run_workers call, including starting the processes (each
  imports torch) and creating the study.

    BOUND_TUNER_TEST_PG_URL=postgresql://postgres@127.0.0.1/bound_tuner_test \\
        python benchmarks/bench_workers.py
    python benchmarks/bench_workers.py --storage postgresql://user@host/db --trials 60 --steps 50
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import optuna

from bound_tuner.workers import run_workers

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
checkpoints = 0
[bound]
N = 10
n_paths = 8
train_draws = 2
[sampler]
type = "random"
[pruner]
type = "none"
"""


def measure(storage: str, n_workers: int, trials: int, steps: int) -> tuple[float, float]:
    """(steady, wall) trials per second of a pool of ``n_workers`` on a fresh study."""
    name = f"bench-workers-{n_workers}-{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp) / "bench.toml"
        spec.write_text(SPEC.format(name=name, trials=trials, steps=steps))
        t0 = time.perf_counter()
        study = run_workers(
            str(spec), storage=storage, n_workers=n_workers, progress=False, dashboard=False
        )
        wall = time.perf_counter() - t0
    done = [t for t in study.get_trials(deepcopy=False) if t.datetime_complete is not None]
    first = min(t.datetime_start for t in done)
    last = max(t.datetime_complete for t in done)
    steady = len(done) / (last - first).total_seconds()
    optuna.delete_study(study_name=name, storage=storage)
    return steady, len(done) / wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--storage",
        default=os.environ.get("BOUND_TUNER_TEST_PG_URL"),
        help="PostgreSQL URL (default: $BOUND_TUNER_TEST_PG_URL)",
    )
    p.add_argument("--trials", type=int, default=40, help="trials per pool (default 40)")
    p.add_argument("--steps", type=int, default=20, help="training steps per trial (default 20)")
    p.add_argument("--repeats", type=int, default=2, help="runs of each pool, alternating (2)")
    args = p.parse_args()
    if not args.storage:
        p.error("give --storage postgresql://... or set BOUND_TUNER_TEST_PG_URL")
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    print(f"{args.trials} trials of {args.steps} steps each, {os.cpu_count()} CPU cores")
    runs: dict[int, list[tuple[float, float]]] = {1: [], 2: []}
    for _ in range(args.repeats):
        for n in (1, 2):
            runs[n].append(measure(args.storage, n, args.trials, args.steps))
    rates = {}
    for n, rs in runs.items():
        steady = statistics.median(r[0] for r in rs)
        wall = statistics.median(r[1] for r in rs)
        rates[n] = (steady, wall)
        each = ", ".join(f"{r[0]:.2f}" for r in rs)
        print(
            f"{n} worker{'s' if n > 1 else ' '}: {steady:6.2f} trials/s steady "
            f"({each})  {wall:6.2f} wall"
        )
    (s1, w1), (s2, w2) = rates[1], rates[2]
    print(f"2 workers / 1 worker: {s2 / s1:.2f}x steady, {w2 / w1:.2f}x wall")


if __name__ == "__main__":
    main()
