"""Image preprocessing for diffusion: one documented choice, scaling to [-1, 1].

An 8-bit pixel k in {0..255} (stored as k/255 in [0, 1]) becomes the centre of its bin,
y = (2k + 1)/256 - 1, so the 256 bins of width 2/256 tile [-1, 1]. Likelihoods in bits per
dimension use uniform dequantization, y = 2(k + u)/256 - 1 with u ~ U(0, 1), for which
-log2 P(k) <= -log2 p(y) + d log2(128) (the bin volume is (2/256)^d).
"""

from __future__ import annotations

import math

import torch

BIN_WIDTH = 2.0 / 256.0
LOG_BIN_VOLUME_PER_DIM = math.log(BIN_WIDTH)  # ln(2/256) = -ln 128


def pixel_levels(x01: torch.Tensor) -> torch.Tensor:
    """Integer pixel levels k in {0..255} from images stored in [0, 1]."""
    return torch.round(x01.clamp(0, 1) * 255.0)


def to_symmetric(x01: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] -> bin centres in [-1, 1]."""
    return (2.0 * pixel_levels(x01) + 1.0) / 256.0 - 1.0


def dequantize(y: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """Bin centres in [-1, 1] -> a uniform draw within each bin (for likelihoods)."""
    u = torch.rand(y.shape, generator=generator, dtype=y.dtype, device=y.device) - 0.5
    return y + BIN_WIDTH * u
