import textwrap
import uuid
from pathlib import Path

import optuna
import pytest
import torch
from worker_spec import PG_URL

torch.set_num_threads(1)

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
            optuna.delete_study(study_name=name, storage=PG_URL)
        except KeyError:
            pass
