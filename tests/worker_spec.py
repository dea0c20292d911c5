"""What the worker, reliability, Ray and proxy tests share: the PostgreSQL marker and the small
Swiss-roll study they run (fractions of a second a trial at the default steps)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

PG_URL = os.environ.get("BOUND_TUNER_TEST_PG_URL")
REPO = Path(__file__).parent.parent


def start_cli(argv: list[str], tmp_path: Path) -> subprocess.Popen:
    """``bound-tuner ARGV --quiet`` in a process of its own, its output piped: artifacts under
    tmp_path, the storage only from ARGV, every thread's stack on SIGABRT
    (PYTHONFAULTHANDLER; the reliability tests' ``answer``)."""
    env = {
        **os.environ,
        "BOUND_TUNER_ARTIFACTS": str(tmp_path / "art"),
        "PYTHONUNBUFFERED": "1",
        "PYTHONFAULTHANDLER": "1",
    }
    env.pop("BOUND_TUNER_STORAGE", None)
    return subprocess.Popen(
        [sys.executable, "-m", "bound_tuner.cli", *argv, "--quiet"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


_PG_STORAGE = []


def pg_storage():
    """One shared storage of PG_URL for the tests' own reads: ``load_study(storage=PG_URL)`` in
    a polling loop opens a new connection pool on every call, which stays open until garbage
    collection (dozens of connections against the server's limit of 100)."""
    import optuna

    if not _PG_STORAGE:
        _PG_STORAGE.append(
            optuna.storages.RDBStorage(PG_URL, engine_kwargs={"pool_size": 2, "max_overflow": 2})
        )
    return _PG_STORAGE[0]


needs_pg = pytest.mark.skipif(
    not PG_URL,
    reason="BOUND_TUNER_TEST_PG_URL is unset (PostgreSQL URL of a test database; .ci/run sets it)",
)


def worker_spec(
    name: str,
    *,
    n_trials: int,
    steps: int,
    lr: bool = False,
    width: int | None = 16,
    extra: str = "",
) -> str:
    """The study's TOML: T searched (and lr with ``lr``), random sampler, no pruner; ``width``
    None keeps the MLP's default; ``extra`` is appended (a [storage] table, say)."""
    lr_line = "lr = { low = 1e-3, high = 5e-3, log = true }\n" if lr else ""
    width_line = f"width = {width}\n" if width is not None else ""
    return f"""
[study]
name = "{name}"
n_trials = {n_trials}
seed = 0
[data]
name = "swiss_roll"
m = 32
test_size = 32
[search]
T = {{ low = 0.2, high = 0.9 }}
{lr_line}[training]
steps = {steps}
batch_size = 32
{width_line}checkpoints = 0
[bound]
N = 10
max_sample_scale = 1000.0  # tiny models sampled in a few steps spread their samples
n_paths = 8
train_draws = 2
[sampler]
type = "random"
[pruner]
type = "none"
{extra}"""


def write_worker_spec(path: Path, name: str, **kw) -> Path:
    """``worker_spec(name, **kw)`` written to ``path``; returns the path."""
    path.write_text(worker_spec(name, **kw))
    return path
