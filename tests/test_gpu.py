"""End to end on CUDA (skipped without a GPU): a diffusion study with validation, a VAE study,
packed training against training alone, and the generator's device."""

import math

import pytest
import torch

from bound_tuner.config.spec import load_spec
from bound_tuner.data import swiss_roll
from bound_tuner.maths.sde import get_schedule
from bound_tuner.models import ScoreMLP
from bound_tuner.study import run_study
from bound_tuner.training.config import DiffusionConfig
from bound_tuner.training.diffusion import train_model
from bound_tuner.training.pack import train_packed
from bound_tuner.training.sampling import generate

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

VAE_SPEC = """
[study]
name = "tiny_vae"
model = "vae"
n_trials = 2
validation = true

[data]
name = "fashion_mnist"
m = 128
test_size = 64
binarize = "fixed"

[search]
latent = {{ grid = [4, 8] }}
beta = 1.0

[training]
epochs = 2
batch_size = 32

[sampler]
type = "grid"
"""


def test_diffusion_study_with_validation_runs_on_cuda(tiny_spec, tmp_path):
    spec = load_spec(tiny_spec(validation="true", n_trials=2, T="{ grid = [0.4, 0.8] }"))
    study = run_study(spec, storage=f"sqlite:///{tmp_path}/g.db", device="auto", progress=False)
    trials = study.get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    for t in trials:
        assert "cuda" in t.user_attrs["worker"]
        assert math.isfinite(t.value) and math.isfinite(t.user_attrs["heldout.sample_kl"])


def test_vae_study_runs_on_cuda(tmp_path):
    path = tmp_path / "vae.toml"
    path.write_text(VAE_SPEC.format())
    study = run_study(load_spec(path), storage=f"sqlite:///{tmp_path}/v.db", progress=False)
    trials = study.get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    assert all("cuda" in t.user_attrs["worker"] and math.isfinite(t.value) for t in trials)


def test_packed_members_match_training_alone_on_cuda():
    x = swiss_roll(200, seed=0)
    cfgs = [
        DiffusionConfig(T=0.5 + 0.2 * j, lam=float(j), lr=1e-3 * (j + 1), steps=80, seed=j)
        for j in range(4)
    ]
    cfgs[3] = DiffusionConfig(T=0.7, schedule="cosine", steps=80, seed=9)
    packed = train_packed(x, cfgs, device="cuda")
    for mem, cfg in zip(packed, cfgs, strict=True):
        model, _, losses = train_model(x, cfg, device="cuda")
        assert next(mem.model.parameters()).device.type == "cuda"
        assert mem.losses == pytest.approx(losses, rel=5e-3, abs=5e-3)


def test_generator_paths_stay_on_the_model_device():
    model = ScoreMLP(2, hidden=16).cuda()
    run = generate(model, get_schedule("linear"), T=0.5, n=64, shape=(2,), n_steps=20, seed=3)
    again = generate(model, get_schedule("linear"), T=0.5, n=64, shape=(2,), n_steps=20, seed=3)
    assert run.samples.device.type == "cuda" and run.score_norms.device.type == "cpu"
    assert torch.equal(run.samples, again.samples)  # a seed repeats on the same device


def test_compiled_training_matches_eager_on_cuda():
    x = swiss_roll(200, seed=0)
    cfg = DiffusionConfig(T=0.6, steps=60, seed=1)
    _, _, eager = train_model(x, cfg, device="cuda")
    _, _, compiled = train_model(
        x, DiffusionConfig(**{**cfg.to_dict(), "compile": True}), device="cuda"
    )
    assert compiled == pytest.approx(eager, rel=1e-2, abs=1e-2)
