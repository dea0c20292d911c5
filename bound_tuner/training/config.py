"""The settings of one diffusion trial (``DiffusionConfig``) and its score network's initial weights."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn

from bound_tuner.maths.averaging import DEFAULT_EMA
from bound_tuner.maths.bounds.diffusion import DEFAULT_VARIANT
from bound_tuner.maths.sde import Schedule, get_schedule
from bound_tuner.models import DEFAULT_CHANNELS, build_score_model
from bound_tuner.models.factory import build_from_factory, factory_name, vmap_error
from bound_tuner.runtime.device import DEFAULT_TF32
from bound_tuner.runtime.seeding import seed_everything
from bound_tuner.training.sampling import DIVERGED_SCALE

#: ``train_fn(points) -> trained model``: a reference model trained by the user's own loop on a
#: subset of the training points (``bound_tuner.score``, docs/own_models.md)
TrainFn = Callable[[torch.Tensor], nn.Module]


@dataclass
class DiffusionConfig:
    """Everything that defines one trained model and its bound."""

    T: float = 1.0
    schedule: str = "linear"
    schedule_params: dict[str, float] = field(default_factory=dict)
    lam: float = 0.0
    lr: float = 2e-3
    width: int = 128  # hidden units of the MLP for point data
    layers: int = 3  # hidden layers of the MLP for point data
    channels: int = DEFAULT_CHANNELS  # base channels of the UNet for images
    steps: int = 3000
    batch_size: int = 256
    t_min: float = 1e-3
    # the relative width of the average of the weights a training run returns (0: the last
    # weights; training.loop, docs/theory.md eq. 1.2b)
    ema: float = DEFAULT_EMA
    # bound settings
    variant: str = DEFAULT_VARIANT
    R: float | str | None = None  # a number, "estimate", "data", or None: the variant's default
    l_estimator: str = "path-mean"
    n_steps: int = 500
    n_paths: int = 256
    mix_draws: int = 1  # draws per point of the mixture KL C_mix (the paper's k)
    # draws per training point of the evaluation pass (NELBO or DSM); None: the bound's
    # draws_for(m) (evaluation.diffusion_bound)
    train_draws: int | None = None
    # K of the K-fold references ("elbo-kfold", docs/theory.md 2.9); None: bounds.kfold.folds_for
    folds: int | None = None
    # "elbo-kfold": keep the checkpoint with the smallest certified value and its weights
    # (certified early stopping, docs/theory.md 2.12); None: checkpoints.DEFAULT_EARLY_STOP
    early_stop: bool | None = None
    # a trial whose generated samples reach this many times the data's largest norm at N steps
    # fails: its generator diverged (docs/theory.md 2.11)
    max_sample_scale: float = DIVERGED_SCALE
    # the evaluation draws (NELBO, generator paths, folds): fixed per study, not per trial, so
    # that two trials differ only by their models (common random numbers)
    eval_seed: int = 0
    # held-out metrics (validation mode only)
    heldout_n_generated: int | None = None  # None: heldout.HELDOUT_DEFAULTS for the data's kind
    heldout_n_steps: int | None = None
    seed: int = 0
    tf32: bool = DEFAULT_TF32  # TF32 matmuls on CUDA
    compile: bool = False  # train through torch.compile (pays for the image UNet on a GPU)
    # the score network: None for the built-in MLP (points) or UNet (images); else a factory
    # ``factory(config, data_shape) -> nn.Module`` or its name "package.module:function"
    # (``bound_tuner.models.factory``; docs/own_models.md)
    model: Any = None

    def to_dict(self) -> dict:
        """The settings as plain values; a factory appears as its import name."""
        out = asdict(replace(self, model=None))
        out["model"] = None if self.model is None else factory_name(self.model)
        return out


_INIT_LOCK = threading.Lock()


def initial_model(cfg: DiffusionConfig, x: torch.Tensor) -> tuple[nn.Module, Schedule]:
    """cfg's freshly initialized score model (seeded by cfg.seed) on x's device and dtype, and its
    schedule, checked at cfg.T: the start of training alone and in a pack."""
    schedule = get_schedule(cfg.schedule, **cfg.schedule_params)
    schedule.check_T(cfg.T, t_min=cfg.t_min)
    return build_initial(cfg, tuple(x.shape[1:])).to(x.device, x.dtype), schedule


def build_initial(cfg: DiffusionConfig, data_shape: tuple[int, ...]) -> nn.Module:
    """cfg's freshly initialized score network for points of ``data_shape`` (on the CPU): the
    built-in MLP or UNet, or cfg.model's (``factory(cfg, data_shape)``), seeded by cfg.seed."""
    with _INIT_LOCK:  # the global RNG seeds the weights: one thread at a time (packs, references)
        seed_everything(cfg.seed)
        if cfg.model is not None:
            return build_from_factory(cfg.model, cfg, data_shape)
        return build_score_model(
            data_shape, width=cfg.width, layers=cfg.layers, channels=cfg.channels
        )


def pack_refusal(cfg: DiffusionConfig, data_shape: tuple[int, ...]) -> str | None:
    """Why cfg's score network cannot train in a vmapped pack (None: it can; the built-in
    networks always can). A user's module is tried once through ``torch.func``
    (``models.factory.vmap_error``)."""
    if cfg.model is None:
        return None
    return vmap_error(build_initial(cfg, data_shape), data_shape)
