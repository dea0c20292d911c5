"""Benchmark: trials per second of 1 and 2 workers, the local pool against Ray, on PostgreSQL.

Short Swiss-roll trials (m=32, 20 training steps, a small bound), the same spec for every run,
each on a fresh study, measured in one run; with ``--repeats R`` the runs alternate (pool 1, Ray
1, pool 2, Ray 2, pool 1, ...) and the medians are printed, which evens out other load on a
shared machine. Ray runs on one local instance started at the beginning (its start-up time is
printed, not counted in the rates); without the ``ray`` extra only the pool is measured. Two
rates per run:

- steady: finished trials / (last trial's end - first trial's start), from the trials' own
  timestamps; what a long study sees.
- wall: finished trials / the whole run_workers or run_ray call, including starting the
  processes (each imports torch; Ray may reuse an idle worker process of an earlier run) and
  creating the study.

    BOUND_TUNER_TEST_PG_URL=postgresql://postgres@127.0.0.1/bound_tuner_test \\
        python benchmarks/bench_workers.py
    python benchmarks/bench_workers.py --storage postgresql://user@host/db --trials 60 --steps 50
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import optuna

from bound_tuner.execution.pool import run_workers

EXECUTORS = ("pool", "ray")

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


def measure(
    storage: str, executor: str, n_workers: int, trials: int, steps: int
) -> tuple[float, float]:
    """(steady, wall) trials per second of ``n_workers`` of ``executor`` on a fresh study."""
    name = f"bench-workers-{executor}-{n_workers}-{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp) / "bench.toml"
        spec.write_text(SPEC.format(name=name, trials=trials, steps=steps))
        kwargs = {"storage": storage, "n_workers": n_workers, "progress": False}
        t0 = time.perf_counter()
        if executor == "ray":
            from bound_tuner.execution.ray_executor import run_ray

            study = run_ray(str(spec), dashboard=False, **kwargs)
        else:
            study = run_workers(str(spec), dashboard=False, **kwargs)
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
    p.add_argument("--trials", type=int, default=40, help="trials per run (default 40)")
    p.add_argument("--steps", type=int, default=20, help="training steps per trial (default 20)")
    p.add_argument(
        "--repeats", type=int, default=2, help="runs of each executor and size, alternating (2)"
    )
    args = p.parse_args()
    if not args.storage:
        p.error("give --storage postgresql://... or set BOUND_TUNER_TEST_PG_URL")
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    executors = EXECUTORS if importlib.util.find_spec("ray") else ("pool",)
    print(f"{args.trials} trials of {args.steps} steps each, {os.cpu_count()} CPU cores")
    if "ray" in executors:
        import ray

        from bound_tuner.execution.ray_executor import start_ray

        t0 = time.perf_counter()
        start_ray(ray, None, 2)  # one local instance for every Ray run
        print(
            f"Ray {ray.__version__}: local instance started in {time.perf_counter() - t0:.1f} s "
            "(not in the rates); Ray runs its workers at nice "
            f"{os.environ.get('RAY_worker_niceness', '15')}, the pool at this process's"
        )
    else:
        print('Ray is not installed (pip install "bound_tuner[ray]"): the local pool only')

    runs: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for _ in range(args.repeats):
        for n in (1, 2):
            for ex in executors:
                runs.setdefault((ex, n), []).append(
                    measure(args.storage, ex, n, args.trials, args.steps)
                )
    med = {
        key: (statistics.median(r[0] for r in rs), statistics.median(r[1] for r in rs))
        for key, rs in runs.items()
    }
    names = {"pool": "local pool", "ray": "Ray"}
    print("trials/s, median of the runs (each run's steady rate in brackets):")
    for n in (1, 2):
        cells = []
        for ex in executors:
            steady, wall = med[(ex, n)]
            each = ", ".join(f"{r[0]:.2f}" for r in runs[(ex, n)])
            cells.append(f"{names[ex]} {steady:5.2f} steady ({each}) {wall:5.2f} wall")
        print(f"{n} worker{'s' if n > 1 else ' '}: " + "  |  ".join(cells))
    for ex in executors:
        (s1, w1), (s2, w2) = med[(ex, 1)], med[(ex, 2)]
        print(f"{names[ex]}: 2 workers / 1 worker = {s2 / s1:.2f}x steady, {w2 / w1:.2f}x wall")
    if "ray" in executors:
        for n in (1, 2):
            (sp, wp), (sr, wr) = med[("pool", n)], med[("ray", n)]
            print(
                f"Ray / local pool, {n} worker{'s' if n > 1 else ''}: {sr / sp:.2f}x steady, "
                f"{wr / wp:.2f}x wall"
            )
        ray.shutdown()


if __name__ == "__main__":
    main()
