"""Tune a diffusers UNet2DModel's noise schedule and learning rate by the bound, with your own loop.

    pip install "bound_tuner[diffusers]"
    python examples/diffusers_objective.py [--small]

A plain Optuna objective: each trial trains a small ``UNet2DModel`` on few-shot Fashion-MNIST with
diffusers' own training recipe (``DDPMScheduler.add_noise``, MSE against the noise) and returns
``bound_tuner.score(...).total``, the default bound ("elbo-kfold", docs/theory.md eq. 2.11). That
bound compares the model with K reference models, each trained without one fold of the points:
``train_fn`` trains them with the same loop, settings and seed. No held-out images are used.
``--small`` is the size CI runs on the CPU (a few seconds); the default size (32 images, 300
steps, 8 trials) wants a GPU or some patience.
"""

from __future__ import annotations

import argparse

import optuna
import torch
from diffusers import DDPMScheduler, UNet2DModel

import bound_tuner
from bound_tuner.evaluation.scoring import score
from bound_tuner.models.diffusers_adapter import unet_eps

SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


def make_unet(channels: int, seed: int) -> UNet2DModel:
    torch.manual_seed(seed)  # the same initialization for the model and its references
    return UNet2DModel(
        sample_size=28,
        in_channels=1,
        out_channels=1,
        block_out_channels=(channels, 2 * channels),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        add_attention=False,
    )


def train(images, scheduler, *, lr, steps, batch, channels, seed, device):
    """diffusers' training recipe on ``images`` ([n, 1, 28, 28] in [-1, 1]); the draws come
    from ``seed``, so a reference trained on a subset shares the model's noise."""
    unet = make_unet(channels, seed).to(device)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    n_train = scheduler.config.num_train_timesteps
    for _ in range(steps):
        idx = torch.randint(len(images), (min(batch, len(images)),), generator=g)
        clean = images[idx].to(device)
        noise = torch.randn(clean.shape, generator=g).to(device)
        timesteps = torch.randint(0, n_train, (len(idx),), generator=g).to(device)
        noisy = scheduler.add_noise(clean, noise, timesteps)
        loss = torch.nn.functional.mse_loss(unet(noisy, timesteps).sample, noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return unet_eps(unet.eval(), scheduler)  # eps-model of continuous time t = (k+1)/N


def objective_for(images, size: dict, device: str):
    def objective(trial: optuna.Trial) -> float:
        scheduler = DDPMScheduler(
            num_train_timesteps=trial.suggest_categorical("timesteps", [100, 1000]),
            beta_schedule=trial.suggest_categorical("beta_schedule", list(SCHEDULES)),
        )
        lr = trial.suggest_float("lr", 1e-4, 3e-3, log=True)
        settings = dict(
            lr=lr, steps=size["steps"], batch=16, channels=size["channels"], seed=trial.number
        )
        model = train(images, scheduler, device=device, **settings)
        report = score(
            model,
            images,
            schedule=scheduler,  # its betas as a VP process on [0, 1]; T = 1, the whole process
            train_fn=lambda points: train(points, scheduler, device=device, **settings),
            folds=size["folds"],
            n_steps=size["N"],
            n_paths=size["paths"],
            train_draws=size["draws"],
        )
        for key, value in report.user_attrs().items():  # every term, as the built-in objective
            trial.set_user_attr(key, value)
        return report.total

    return objective


def main(argv: list[str] | None = None) -> optuna.Study:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", action="store_true", help="CI size: seconds on a CPU")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if args.small:
        size = dict(m=10, steps=4, channels=8, folds=2, N=4, paths=4, draws=2, trials=2)
    else:
        size = dict(m=32, steps=300, channels=16, folds=None, N=100, paths=64, draws=16, trials=8)
    data = bound_tuner.load_dataset("fashion_mnist", m=size["m"], seed=0, model="diffusion")
    images = data.train  # [m, 1, 28, 28]: 8-bit pixel bin centres in [-1, 1]
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0))
    study.optimize(objective_for(images, size, args.device), n_trials=size["trials"])
    best = study.best_trial
    print(f"best bound {best.value:.1f} nats per image with {best.params}")
    print(f"  95% certificate {best.user_attrs['bound.total_upper95']:.1f}")
    return study


if __name__ == "__main__":
    main()
