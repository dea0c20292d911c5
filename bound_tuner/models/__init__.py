"""Score networks and VAEs."""

from __future__ import annotations

import torch

from bound_tuner.models.mlp import ScoreMLP
from bound_tuner.models.unet import SmallUNet

__all__ = ["ScoreMLP", "build_score_model", "model_device", "model_dtype"]


DEFAULT_CHANNELS = 32  # base channels of the image UNet (about 1.03M parameters)


def build_score_model(
    data_shape: tuple[int, ...],
    *,
    width: int = 128,
    layers: int = 3,
    channels: int = DEFAULT_CHANNELS,
):
    """An MLP (``width`` hidden units, ``layers`` hidden layers) for vector data [d]; a small UNet
    (``channels`` base channels) for images [C, H, W]."""
    if len(data_shape) == 1:
        return ScoreMLP(data_shape[0], hidden=width, layers=layers)

    return SmallUNet(channels=data_shape[0], base=channels)


def model_device(model) -> torch.device:
    """The device of a model's first parameter or buffer (the CPU for a model with neither)."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def model_dtype(model) -> torch.dtype:
    """The floating dtype of a model's first floating parameter (float32 for a model with none)."""
    for tensor in model.parameters():
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.float32
