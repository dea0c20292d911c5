"""A small UNet for 28x28 images: the epsilon-predicting score network of docs/theory.md section 1.2.

Resolutions 28 -> 14 -> 7 and back, one residual block per level on the way down and up and
one in the middle, GroupNorm + SiLU, and a sinusoidal embedding of the absolute diffusion time t
(a float in (0, ~2]; schedules are functions of absolute time, docs/theory.md section 1.1). With
``base=32`` it has about 1.03M parameters. The score is s_theta(y, t) = -eps_theta(y, t) / sigma_t.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["SmallUNet", "time_embedding"]


def time_embedding(t: torch.Tensor, dim: int, *, scale: float = 1000.0) -> torch.Tensor:
    """Sinusoidal features [b, dim] of times t [b]; t is multiplied by ``scale`` first.

    Times of order 1e-3..2 times 1000 cover the usual 1..2000 range of sinusoidal position codes.
    """
    half = dim // 2
    freqs = torch.exp(
        -math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half
    )
    args = (scale * t.float())[:, None] * freqs[None]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if dim % 2:
        emb = nn.functional.pad(emb, (0, 1))
    return emb


def _groups(ch: int) -> int:
    for g in (8, 4, 2, 1):
        if ch % g == 0:
            return g
    return 1


class _ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, time_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(c_in), c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.time = nn.Linear(time_dim, c_out)
        self.norm2 = nn.GroupNorm(_groups(c_out), c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.act(self.norm1(x)))
        h = h + self.time(emb)[:, :, None, None]
        h = self.conv2(self.act(self.norm2(h)))
        return h + self.skip(x)


class SmallUNet(nn.Module):
    """eps_theta(x, t) for images [b, channels, 28, 28] and times t [b] (or a scalar).

    Channel widths base, 2*base, 4*base at 28, 14 and 7 pixels; a middle block at 7x7; the up path
    concatenates the skip of each level. Any H, W divisible by 4 works (28 and 32 do).
    """

    def __init__(self, *, channels: int = 1, base: int = 32, time_dim: int = 128) -> None:
        super().__init__()
        if channels < 1 or base < 1 or time_dim < 2:
            raise ValueError(f"channels={channels}, base={base}, time_dim={time_dim} must be >= 1")
        self.channels, self.base, self.time_dim = channels, base, time_dim
        c1, c2, c3 = base, 2 * base, 4 * base
        self.time_mlp = nn.Sequential(
            nn.Linear(time_dim, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim)
        )
        self.inp = nn.Conv2d(channels, c1, 3, padding=1)
        self.down1 = _ResBlock(c1, c1, time_dim)  # 28
        self.pool1 = nn.Conv2d(c1, c1, 3, stride=2, padding=1)  # 28 -> 14
        self.down2 = _ResBlock(c1, c2, time_dim)  # 14
        self.pool2 = nn.Conv2d(c2, c2, 3, stride=2, padding=1)  # 14 -> 7
        self.down3 = _ResBlock(c2, c3, time_dim)  # 7
        self.mid = _ResBlock(c3, c3, time_dim)
        self.up3 = _ResBlock(c3 + c3, c2, time_dim)  # 7
        self.unpool2 = nn.Upsample(scale_factor=2, mode="nearest")  # 7 -> 14
        self.up2 = _ResBlock(c2 + c2, c1, time_dim)  # 14
        self.unpool1 = nn.Upsample(scale_factor=2, mode="nearest")  # 14 -> 28
        self.up1 = _ResBlock(c1 + c1, c1, time_dim)  # 28
        self.out_norm = nn.GroupNorm(_groups(c1), c1)
        self.out = nn.Conv2d(c1, channels, 3, padding=1)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.channels or x.shape[2] % 4 or x.shape[3] % 4:
            raise ValueError(
                f"SmallUNet expects [b, {self.channels}, H, W] with H, W divisible by 4, "
                f"got {tuple(x.shape)}"
            )
        t = torch.as_tensor(t, device=x.device)
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        emb = self.time_mlp(time_embedding(t.reshape(-1), self.time_dim).to(x.dtype))
        h1 = self.down1(self.inp(x), emb)
        h2 = self.down2(self.pool1(h1), emb)
        h3 = self.down3(self.pool2(h2), emb)
        h = self.mid(h3, emb)
        h = self.up3(torch.cat([h, h3], dim=1), emb)
        h = self.up2(torch.cat([self.unpool2(h), h2], dim=1), emb)
        h = self.up1(torch.cat([self.unpool1(h), h1], dim=1), emb)
        return self.out(self.act(self.out_norm(h)))
