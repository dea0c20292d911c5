"""The generator G_T: Euler-Maruyama on the reverse VP SDE (docs/theory.md, section 1.2).

  dy = [beta(t) s(y, t) + 1/2 beta(t) y] dt' + sqrt(beta(t)) dW,  t from T down to t_min,

on the uniform grid t_k = T - k h, h = (T - t_min)/N, k = 0..N-1. The score is queried at the
time t_k of the state it is applied to. Along the way it records, per step and path, the score
norm ||s_theta|| (for the paper's L_hat) and ||s_theta - s_ref||^2 against each reference score
(for the Girsanov generator terms): the data-free reference -y, or reference models (trained on
other data). Both stay on the model's device until the end.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from bound_tuner.maths.draws import chunk_length, generator_for
from bound_tuner.maths.sde import Schedule, reference_score, reverse_step, time_grid
from bound_tuner.training.members import Members


@dataclass
class GeneratorRun:
    """Samples at t_min (on the model's device) and the per-step statistics of the paths (CPU,
    float64)."""

    samples: torch.Tensor  # [n, ...] at t_min
    score_norms: torch.Tensor  # [N, n]: ||s_theta(y_k, t_k)||
    ref_sq_dev: torch.Tensor  # [R, N, n]: ||s_theta(y_k, t_k) - s_ref(y_k, t_k)||^2 per reference
    grid: torch.Tensor  # [N]: t_k


@torch.no_grad()
def generate(
    model: nn.Module,
    schedule: Schedule,
    *,
    T: float,
    n: int,
    shape: tuple[int, ...],
    n_steps: int = 1000,
    t_min: float = 1e-3,
    seed: int = 0,
    batch_size: int = 4096,
    references: Sequence[nn.Module | None] = (None,),
) -> GeneratorRun:
    """Run n generator paths from pi = N(0, I) at T to t_min with N Euler-Maruyama steps.

    The paths run on the model's device and in its dtype, with their noise drawn there from
    ``seed`` (the same seed gives the same paths on the same device). ``references`` are the
    scores that ``ref_sq_dev`` compares s_theta with along the paths: None for the data-free -y,
    or eps-predicting models.
    """
    return generate_members(
        Members.single(model, schedule),
        T=[T],
        n=n,
        shape=shape,
        n_steps=n_steps,
        t_min=t_min,
        seeds=[seed],
        batch_size=batch_size,
        references=[None if r is None else Members.single(r, schedule) for r in references],
    )[0]


@torch.no_grad()
def generate_members(
    members: Members,
    *,
    T: Sequence[float],
    n: int,
    shape: tuple[int, ...],
    n_steps: int = 1000,
    t_min: float = 1e-3,
    seeds: Sequence[int],
    batch_size: int = 4096,
    references: Sequence[Members | None] = (None,),
) -> list[GeneratorRun]:
    """``generate`` for K models at once (``bound_tuner.training.members``): member j runs its n paths from
    its T[j] with its schedule and its seeds[j]; returns one GeneratorRun per member. Reference
    models (not None) need K = 1; a reference may hold several models (the K-fold references of
    docs/theory.md 2.9), each giving its own row of ``ref_sq_dev``."""
    if n_steps < 1:
        raise ValueError(f"n_steps={n_steps} must be at least 1")
    k = members.k
    if len(T) != k or len(seeds) != k:
        raise ValueError(f"give one T and one seed per member ({k}); got {len(T)} and {len(seeds)}")
    if k != 1 and any(r is not None for r in references):
        raise ValueError("reference models need a single model (K = 1)")
    device, dtype = members.device, members.dtype
    gens = [generator_for(device, s) for s in seeds]
    grids = torch.stack([time_grid(Tj, n_steps, t_min=t_min) for Tj in T])  # [K, N], CPU
    h = torch.tensor([(Tj - t_min) / n_steps for Tj in T], dtype=torch.float64)
    on_dev = grids.to(device)
    sigma = members.schedules.sigma2(on_dev).sqrt()  # [K, N]
    beta = members.schedules.beta(on_dev)
    h = h.to(device)[:, None].expand_as(beta)
    view = (k,) + (1,) * (len(shape) + 1)
    n_rows = sum(1 if r is None else r.k for r in references)
    out, norms, devs = [], [], []
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        chunk = chunk_length(b * math.prod(shape), n_steps)
        y = torch.stack(
            [torch.randn((b, *shape), generator=g, dtype=dtype, device=device) for g in gens]
        )
        path_norms = torch.empty(n_steps, k, b, dtype=torch.float64, device=device)
        path_devs = torch.empty(n_rows, n_steps, k, b, dtype=torch.float64, device=device)
        for step in range(n_steps):
            c = step % chunk
            if c == 0:  # each member draws the noise of the next steps from its own generator
                size = (min(chunk, n_steps - step), b, *shape)
                z = torch.stack(
                    [torch.randn(size, generator=g, dtype=dtype, device=device) for g in gens]
                )
            t = on_dev[:, step, None].expand(k, b)
            # the score s_theta = -eps_theta / sigma_t of each member
            s = -members.eps(y, t) / sigma[:, step].to(dtype).view(view)
            path_norms[step] = s.reshape(k, b, -1).norm(dim=2)
            row = 0
            for ref in references:
                if ref is None:
                    dev = (s - reference_score(y)).reshape(k, b, -1).pow(2).sum(dim=2)[None]
                else:  # k = 1 here: the model's paths y [1, b, ...] go to every reference model
                    kr = ref.k
                    yr, tr = y.expand(kr, *y.shape[1:]), t.expand(kr, b)
                    s_ref = -ref.eps(yr, tr) / sigma[:, step].to(dtype).view(view)
                    dev = (s - s_ref).reshape(kr, b, -1).pow(2).sum(dim=2)[:, None]
                path_devs[row : row + dev.shape[0], step] = dev
                row += dev.shape[0]
            y = reverse_step(
                y,
                s,
                beta=beta[:, step].to(dtype).view(view),
                h=h[:, step].to(dtype).view(view),
                noise=z[:, c],
            )
        out.append(y)
        norms.append(path_norms.cpu())
        devs.append(path_devs.cpu())
    samples, norms_all, devs_all = torch.cat(out, dim=1), torch.cat(norms, 2), torch.cat(devs, 3)
    return [
        GeneratorRun(samples[j], norms_all[:, j], devs_all[:, :, j], grids[j]) for j in range(k)
    ]


#: generated samples farther than this many times the training data's largest norm count as a
#: diverged generator (docs/theory.md 2.11): a model whose samples are unusable is never picked.
#: Measured: 0.84 to 1.54 for the 266 benchmark models with usable samples, 27 and 33 for two
#: few-shot image models whose samples were noise (pixel Frechet distance 69,000 and 119,000)
DIVERGED_SCALE = 10.0


def sample_scale(samples: torch.Tensor, data: torch.Tensor) -> float:
    """The largest norm of the generated samples over the largest norm of the data points
    (inf when a sample is not finite): the generator's stability at the bound's N steps."""
    s = samples.reshape(samples.shape[0], -1).double()
    if not bool(torch.isfinite(s).all()):
        return math.inf
    d = data.reshape(data.shape[0], -1).double().to(s.device)
    return float(s.norm(dim=1).max() / d.norm(dim=1).max().clamp(min=1e-12))
