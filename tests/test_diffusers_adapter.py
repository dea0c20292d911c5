"""The diffusers adapters against diffusers itself (docs/theory.md section 8, docs/own_models.md).

Skipped only where the optional extra is not installed (pip install "bound_tuner[diffusers]");
CI installs it.
"""

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch

pytest.importorskip(
    "diffusers", reason='the diffusers extra is not installed: pip install "bound_tuner[diffusers]"'
)
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel  # noqa: E402

from bound_tuner.cli import main  # noqa: E402
from bound_tuner.maths.bounds.report import flat_attrs
from bound_tuner.maths.sde import sample_xt  # noqa: E402
from bound_tuner.models.diffusers_adapter import (
    UNetEps,
    load_pipeline,
    schedule_from_scheduler,
    unet_eps,
)
from bound_tuner.training.loop import coefficients, denoising_loss  # noqa: E402

CASES = [
    ("linear", 1000),
    ("linear", 10),
    ("scaled_linear", 1000),
    ("scaled_linear", 37),
    ("squaredcos_cap_v2", 1000),
    ("squaredcos_cap_v2", 8),
]


def tiny_unet(size: int = 8) -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=size,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    )


@pytest.mark.parametrize("kind,n", CASES)
def test_forward_marginals_match_add_noise(kind, n):
    """At t = (k+1)/N the VP process of the adapted betas is diffusers' step k: the same
    x_k = sqrt(abar_k) x_0 + sqrt(1 - abar_k) eps for the same (x_0, eps, k)."""
    scheduler = DDPMScheduler(num_train_timesteps=n, beta_schedule=kind)
    schedule = schedule_from_scheduler(scheduler)
    assert schedule.steps == n
    k = torch.arange(n)
    t = (k + 1).double() / n
    abar = scheduler.alphas_cumprod.double()
    torch.testing.assert_close(schedule.alpha(t) ** 2, abar, rtol=2e-5, atol=1e-7)
    torch.testing.assert_close(schedule.sigma2(t), 1 - abar, rtol=2e-5, atol=1e-7)
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(n, 1, 4, 4, generator=g) * 2 - 1
    eps = torch.randn(x0.shape, generator=g)
    ours, _ = sample_xt(x0, t, schedule, noise=eps)
    theirs = scheduler.add_noise(x0, eps, k)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    # the whole process is T = 1; the schedule refuses more
    assert schedule.check_T(1.0) == 1.0
    with pytest.raises(ValueError, match="T <= 1"):
        schedule.check_T(1.5)


@pytest.mark.parametrize("kind", ["linear", "squaredcos_cap_v2"])
def test_denoising_loss_equals_diffusers_training_recipe(kind):
    """The adapter's denoising loss of a UNet2DModel, 1/2 ||eps_theta(x_t, t) - eps||^2 at
    t = (k+1)/N, is d/2 times the MSE of diffusers' own recipe (add_noise, unet(x_k, k),
    F.mse_loss against the noise) on the same draws."""
    n = 1000
    scheduler = DDPMScheduler(num_train_timesteps=n, beta_schedule=kind)
    unet = tiny_unet().eval()
    model = unet_eps(unet, scheduler)
    g = torch.Generator().manual_seed(2)
    x0 = torch.rand(6, 1, 8, 8, generator=g) * 2 - 1
    noise = torch.randn(x0.shape, generator=g)
    steps = torch.randint(0, n, (6,), generator=g)
    with torch.no_grad():
        # diffusers' training recipe (examples/unconditional_image_generation)
        noisy = scheduler.add_noise(x0, noise, steps)
        pred = unet(noisy, steps).sample
        mse = torch.nn.functional.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))
        # the project's loss on the same draws, through the adapters
        t = (steps + 1).double() / n
        schedule = schedule_from_scheduler(scheduler)
        ours, _ = denoising_loss(model, x0, t, noise, coefficients(schedule, t, x0.dtype))
    torch.testing.assert_close(ours, 0.5 * x0[0].numel() * mse, rtol=1e-4, atol=1e-5)


def test_v_and_sample_prediction_become_eps():
    """eps = alpha v + sigma x_t and eps = (x_t - alpha x0) / sigma, for a network that predicts
    v or x0 exactly."""
    scheduler = DDPMScheduler(num_train_timesteps=50)
    schedule = schedule_from_scheduler(scheduler)
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(5, 1, 4, 4, generator=g)
    eps = torch.randn(x0.shape, generator=g)
    t = torch.tensor([0.02, 0.2, 0.5, 0.8, 1.0], dtype=torch.float64)
    xt, _ = sample_xt(x0, t, schedule, noise=eps)
    a = schedule.alpha(t).float().view(-1, 1, 1, 1)
    s = schedule.sigma2(t).sqrt().float().view(-1, 1, 1, 1)

    class Oracle(torch.nn.Module):
        def __init__(self, out):
            super().__init__()
            self.out = out

        def forward(self, x, tau, return_dict=False):
            return (self.out,)

    v = Oracle(a * eps - s * x0)
    got = UNetEps(v, steps=50, prediction_type="v_prediction", schedule=schedule)(xt, t.float())
    torch.testing.assert_close(got, eps, rtol=1e-4, atol=1e-4)
    x = Oracle(x0)
    got = UNetEps(x, steps=50, prediction_type="sample", schedule=schedule)(xt, t.float())
    torch.testing.assert_close(got, eps, rtol=1e-4, atol=1e-4)
    # the UNet's timestep of t = (k+1)/N is k
    assert torch.allclose(
        UNetEps(v, steps=50).timesteps(torch.tensor([0.02, 1.0])), torch.tensor([0.0, 49.0])
    )


def test_cli_scores_a_saved_pipeline(tmp_path, capsys):
    """bound-tuner score --diffusers DIR --data FILE: the report of bound_tuner.score on the
    pipeline's UNet and scheduler; reference variants and a folder that is no pipeline are
    refused in one line with status 2."""
    from bound_tuner.data import load_dataset
    from bound_tuner.evaluation.scoring import score

    pipe = DDPMPipeline(unet=tiny_unet(), scheduler=DDPMScheduler(num_train_timesteps=20))
    pipe.save_pretrained(tmp_path / "pipe")
    images = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    images = (images * 255).round() / 255  # 8-bit pixels in [0, 1]
    np.save(tmp_path / "x.npy", images.numpy())
    args = ["score", "--diffusers", str(tmp_path / "pipe"), "--data", str(tmp_path / "x.npy")]
    small = ["--N", "6", "--paths", "4", "--draws", "2"]
    out_json = tmp_path / "r.json"
    assert main(args + small + ["--json", str(out_json)]) == 0
    printed = capsys.readouterr().out
    report = json.loads(out_json.read_text())
    assert "bound" in printed and report["settings"]["variant"] == "elbo"
    assert report["settings"]["schedule"] == "discrete" and report["settings"]["T"] == 1.0

    model, schedule = load_pipeline(tmp_path / "pipe")
    train = load_dataset("tensors", train=images, test_fraction=0.0, model="diffusion").train
    again = score(
        model, train, schedule=schedule, variant="elbo", n_steps=6, n_paths=4, train_draws=2
    )
    assert again.total == pytest.approx(report["total"], rel=1e-9)
    assert "total_upper95" in again.extras

    assert main(args + ["--variant", "elbo-kfold"]) == 2
    assert "train_fn" in capsys.readouterr().err
    assert main(["score", "--diffusers", str(tmp_path), "--data", str(tmp_path / "x.npy")]) == 2
    err = capsys.readouterr().err
    assert "model_index.json" in err and len(err.strip().splitlines()) == 1


def test_small_unet2d_factory_in_the_objective():
    """The adapter's UNet2DModel as the built-in objective's network ([model] factory =
    "bound_tuner.models.diffusers_adapter:small_unet2d"): it packs, trains and is scored."""
    from bound_tuner.data import load_dataset
    from bound_tuner.objectives.diffusion import DiffusionObjective
    from bound_tuner.training.config import DiffusionConfig

    images = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    data = load_dataset("tensors", train=(images * 255).round() / 255, test_fraction=0.25)
    base = DiffusionConfig(
        steps=2, batch_size=4, channels=8, variant="elbo", n_steps=4, n_paths=4, train_draws=2
    )
    name = "bound_tuner.models.diffusers_adapter:small_unet2d"
    DiffusionObjective(data, search={"T": 0.5}, base=base, model=name, pack=2)  # packable
    obj = DiffusionObjective(data, search={"T": 0.5}, base=base, model=name, checkpoints=0)
    study = optuna.create_study()
    study.optimize(obj, n_trials=1)
    trial = study.best_trial
    assert trial.user_attrs["config"]["model"] == name
    assert math.isfinite(trial.value)


def test_example_runs_at_ci_size():
    """examples/diffusers_objective.py --small: two trials of a user-written objective that
    trains UNet2DModels by diffusers' recipe and returns the default bound."""
    path = Path(__file__).resolve().parents[1] / "examples" / "diffusers_objective.py"
    spec = importlib.util.spec_from_file_location("diffusers_objective", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    study = module.main(["--small", "--device", "cpu"])
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 2
    best = study.best_trial
    assert flat_attrs(best.user_attrs)["bound.variant"] == "elbo-kfold" and math.isfinite(
        best.value
    )
    assert flat_attrs(best.user_attrs)["bound.schedule"] == "discrete"
