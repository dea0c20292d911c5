"""Hugging Face diffusers in bound_tuner: schedulers, UNets and saved pipelines (docs/own_models.md).

Needs the optional extra: ``pip install "bound_tuner[diffusers]"``.

- ``schedule_from_scheduler``: a ``DDPMScheduler`` (any ``beta_schedule``: linear, scaled_linear,
  squaredcos_cap_v2, ...; any ``num_train_timesteps``) as the project's continuous VP schedule,
  ``sde.DiscreteSchedule``: step k of N is time t = (k+1)/N, where the marginals agree with
  ``scheduler.add_noise`` exactly (docs/theory.md section 8 gives the derivation and the error
  between grid points).
- ``unet_eps``: a ``UNet2DModel`` as an eps-predicting module of continuous time, ``model(x, t)``,
  calling the UNet at the fractional timestep t N - 1 (v- and sample-prediction are converted to
  eps with the schedule).
- ``load_pipeline``: the UNet and scheduler of a pipeline folder written by ``save_pretrained``
  (``bound-tuner score --diffusers DIR``).
- ``small_unet2d``: a factory for ``DiffusionObjective(model=...)`` or a spec's
  ``[model] factory = "bound_tuner.models.diffusers_adapter:small_unet2d"``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bound_tuner.maths.sde import DiscreteSchedule, Schedule

__all__ = [
    "PREDICTION_TYPES",
    "UNetEps",
    "load_pipeline",
    "require_diffusers",
    "schedule_from_scheduler",
    "small_unet2d",
    "unet_eps",
]

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
INSTALL = 'pip install "bound_tuner[diffusers]"'


def require_diffusers() -> Any:
    """The diffusers module, or ImportError saying how to install it."""
    try:
        import diffusers
    except ImportError:
        raise ImportError(f"this needs Hugging Face diffusers: {INSTALL}") from None
    return diffusers


def schedule_from_scheduler(scheduler: Any) -> DiscreteSchedule:
    """The discrete betas of a diffusers scheduler (``scheduler.betas``, the values its
    ``alphas_cumprod`` come from) as a VP process on [0, 1] (``sde.DiscreteSchedule``): at
    t = (k+1)/N its marginal is ``scheduler.add_noise`` at timestep k."""
    betas = getattr(scheduler, "betas", None)
    if betas is None:
        raise ValueError(
            f"{type(scheduler).__name__} has no betas; give a DDPM-type scheduler "
            "(DDPMScheduler, DDIMScheduler)"
        )
    try:
        return DiscreteSchedule.from_betas(betas)
    except ValueError as e:
        raise ValueError(f"{type(scheduler).__name__}: {e}") from None


class UNetEps(nn.Module):
    """eps_theta(x, t) of a diffusers UNet at continuous time t (docs/theory.md section 8).

    The UNet is called at the timestep tau = t N - 1, so t = (k+1)/N gives its timestep k
    exactly and other times the smooth interpolation of its timestep embedding. With a
    scheduler's ``prediction_type`` "v_prediction" or "sample" the output is converted to the
    noise: eps = alpha_t v + sigma_t x_t, or eps = (x_t - alpha_t x0) / sigma_t.
    """

    def __init__(
        self,
        unet: nn.Module,
        *,
        steps: int = 1000,
        prediction_type: str = "epsilon",
        schedule: Schedule | None = None,
    ) -> None:
        super().__init__()
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"prediction_type={prediction_type!r}; choose one of {', '.join(PREDICTION_TYPES)}"
            )
        if prediction_type != "epsilon" and schedule is None:
            raise ValueError(f"prediction_type={prediction_type!r} needs the schedule")
        self.unet = unet
        self.steps = int(steps)
        self.prediction_type = prediction_type
        self.schedule = schedule

    def timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """The UNet's (fractional) timestep tau = t N - 1 of each time t."""
        return t.float() * self.steps - 1.0

    def forward(self, x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        t = torch.as_tensor(t, device=x.device)
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        out = self.unet(x, self.timesteps(t), return_dict=False)[0]
        if self.prediction_type == "epsilon":
            return out
        shape = (-1,) + (1,) * (x.dim() - 1)
        t64 = t.double()
        alpha = self.schedule.alpha(t64).to(x.dtype).view(shape)
        sigma = self.schedule.sigma2(t64).sqrt().to(x.dtype).view(shape)
        if self.prediction_type == "v_prediction":
            return alpha * out + sigma * x
        return (x - alpha * out) / sigma


def unet_eps(unet: nn.Module, scheduler: Any | None = None, *, steps: int = 1000) -> UNetEps:
    """``UNetEps`` of a diffusers UNet trained with ``scheduler`` (its number of train
    timesteps and prediction type); without one, eps-prediction on ``steps`` timesteps."""
    if scheduler is None:
        return UNetEps(unet, steps=steps)
    cfg = scheduler.config
    return UNetEps(
        unet,
        steps=int(cfg.num_train_timesteps),
        prediction_type=str(getattr(cfg, "prediction_type", "epsilon")),
        schedule=schedule_from_scheduler(scheduler),
    )


def load_pipeline(
    folder: str | Path, *, device: str | torch.device = "cpu"
) -> tuple[UNetEps, DiscreteSchedule]:
    """The eps-model and schedule of a diffusers pipeline folder saved with ``save_pretrained``
    (``model_index.json`` naming a ``unet`` and a ``scheduler``). Raises ValueError (one line)
    for a folder that is not one."""
    diffusers = require_diffusers()
    folder = Path(folder).expanduser()
    index = folder / "model_index.json"
    if not index.is_file():
        raise ValueError(
            f"{folder} is not a diffusers pipeline folder (no model_index.json); save the "
            "pipeline with pipeline.save_pretrained(folder)"
        )
    try:
        parts = json.loads(index.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{index} cannot be read: {e}") from None
    classes = {}
    for part in ("unet", "scheduler"):
        entry = parts.get(part)
        if not (isinstance(entry, list) and len(entry) == 2 and hasattr(diffusers, entry[1])):
            raise ValueError(
                f"{index} names no diffusers {part} (got {entry!r}); score a pipeline with a "
                "UNet and a DDPM-type scheduler"
            )
        classes[part] = getattr(diffusers, entry[1])
    try:
        unet = classes["unet"].from_pretrained(folder, subfolder="unet")
        scheduler = classes["scheduler"].from_pretrained(folder, subfolder="scheduler")
    except (OSError, ValueError) as e:
        first = " ".join(str(e).split())[:200]
        raise ValueError(f"cannot load the pipeline in {folder}: {first}") from None
    return unet_eps(unet.to(device).eval(), scheduler), schedule_from_scheduler(scheduler)


def _groups(channels: int) -> int:
    for g in (8, 4, 2, 1):
        if channels % g == 0:
            return g
    return 1


def small_unet2d(config: Any, data_shape: tuple[int, ...]) -> UNetEps:
    """A model factory (docs/own_models.md): a two-level diffusers ``UNet2DModel`` with
    ``config.channels`` and twice as many channels, one ResNet layer per block and no attention,
    for images ``data_shape`` = (C, H, W) with even H and W, called at timestep t * 1000 - 1."""
    diffusers = require_diffusers()
    if len(data_shape) != 3:
        raise ValueError(f"small_unet2d makes images [C, H, W], not points of shape {data_shape}")
    c, h, w = data_shape
    base = int(config.channels)
    unet = diffusers.UNet2DModel(
        sample_size=(h, w),
        in_channels=c,
        out_channels=c,
        block_out_channels=(base, 2 * base),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=_groups(base),
        add_attention=False,
    )
    return UNetEps(unet, steps=1000)
