"""C_mix: the mean KL from each encoded point to the encoded training set (docs/theory.md section 2).

  C_mix = (1/m) sum_i KL( N(mu_i, v I) || (1/m) sum_j N(mu_j, v I) )

estimated by Monte Carlo with z = mu_i + sqrt(v) eps:

  KL_i ~ mean over samples of [ -||eps||^2/2 - logsumexp_l(-||z - mu_l||^2 / (2v)) + ln m ].

Squared distances come from one matrix product per chunk of rows, so memory is O(chunk * m) and
the cost is GEMM-bound (2 k m^2 d flops). Arithmetic is float32 (the input dtype when it is
float64); per-row results are accumulated in float64.
"""

from __future__ import annotations

import math

import torch

from bound_tuner.maths.draws import generator_for

_CPU_CHUNK_ELEMS = 1 << 24  # rows * m per chunk: 64 MiB of float32 logits
_CUDA_CHUNK_ELEMS = 1 << 28
_EXP_FLOOR = -80.0


def _check_means(means: torch.Tensor, var: float) -> tuple[torch.Tensor, float]:
    if not isinstance(means, torch.Tensor):
        means = torch.as_tensor(means)
    if means.dim() < 2:
        raise ValueError(f"means must have shape [m, d] (or [m, ...]), got {tuple(means.shape)}")
    if means.shape[0] == 0:
        raise ValueError("means is empty: give at least one point")
    means = means.reshape(means.shape[0], -1)
    if not torch.isfinite(means).all():
        raise ValueError("means contain NaN or infinite values; clean the data first")
    var = float(var)
    if not (math.isfinite(var) and var > 0):
        raise ValueError(f"var={var} must be a positive finite number (sigma_T^2)")
    return means, var


def _draw_noise(
    shape: tuple[int, ...], *, generator: torch.Generator | None, device: torch.device, dtype
) -> torch.Tensor:
    # drawn where they are used: a generator on another device is a caller's mistake
    if generator is not None and generator.device.type != device.type:
        raise ValueError(
            f"the generator is on {generator.device} but the means on {device}; "
            "give a seed, or a generator on the means' device"
        )
    # float32 draws for every dtype, so that a seed gives both estimators the same eps
    return torch.randn(shape, generator=generator, dtype=torch.float32, device=device).to(dtype)


def mixture_kl(
    means: torch.Tensor,
    var: float,
    *,
    mc_samples: int = 1,
    chunk_size: int | None = None,
    generator: torch.Generator | None = None,
    seed: int | None = 0,
    per_point: bool = False,
) -> float | torch.Tensor:
    """Return C_mix (a float) for the mixture of N(means_i, var I); docs/theory.md section 2.

    ``means`` is [m, d] (alpha_T x), ``var`` is sigma_T^2. ``generator`` (or ``seed``) fixes the
    Monte Carlo draws; the noise is drawn on the means' device (a seed gives the same numbers on
    the same device).
    With ``per_point=True`` the [m] float64 tensor of KL_i estimates is returned instead.
    Each sample's value is at most ln m; the mean is floored at 0 (a negative mean can only be
    Monte Carlo noise), so the result lies in [0, ln m]; it is 0 for m = 1.
    """
    means, var = _check_means(means, var)
    if mc_samples < 1:
        raise ValueError(f"mc_samples={mc_samples} must be at least 1")
    m, d = means.shape
    device = means.device
    if generator is None and seed is not None:
        generator = generator_for(device, seed)
    dtype = torch.float64 if means.dtype == torch.float64 else torch.float32
    # distances are translation invariant: centring shrinks the norms and the cancellation error
    mu = means.to(dtype)
    mu = mu - mu.mean(dim=0, keepdim=True)
    mu_sq = (mu * mu).sum(dim=1)  # [m]
    if chunk_size is None:
        budget = _CUDA_CHUNK_ELEMS if device.type == "cuda" else _CPU_CHUNK_ELEMS
        chunk_size = max(1, min(m, budget // m))
    sd = math.sqrt(var)
    inv2v = 1.0 / (2.0 * var)
    log_m = math.log(m)
    kl = torch.zeros(m, dtype=torch.float64, device=device)
    for _ in range(mc_samples):
        eps = _draw_noise((m, d), generator=generator, device=device, dtype=dtype)
        for start in range(0, m, chunk_size):
            stop = min(m, start + chunk_size)
            rows = torch.arange(start, stop, device=device)
            e = eps[start:stop]
            z = mu[start:stop] + sd * e
            e_sq = (e * e).sum(dim=1)  # [c]
            z_sq = (z * z).sum(dim=1)
            # logits_l = -(||z||^2 + ||mu_l||^2 - 2 z.mu_l) / (2v), built in place
            logits = torch.mm(z, mu.t())
            logits.mul_(2.0 * inv2v).sub_(mu_sq * inv2v).sub_((z_sq * inv2v).unsqueeze(1))
            logits.clamp_(max=0.0)  # a squared distance is never negative
            # the own component exactly: ||z - mu_i||^2 / (2v) = ||eps||^2 / 2
            logits[rows - start, rows] = -0.5 * e_sq
            # logsumexp by hand: shifting by the row max and flooring at -80 keeps exp() away
            # from float32 denormals (slow on CPUs); a term below e^-80 of the largest changes
            # the sum by less than m * e^-80, far below float32 resolution
            row_max = logits.amax(dim=1)
            logits.sub_(row_max.unsqueeze(1)).clamp_(min=_EXP_FLOOR).exp_()
            lse = logits.sum(dim=1).log_().add_(row_max)
            val = (-0.5 * e_sq - lse).double() + log_m
            kl[start:stop] += val.clamp(max=log_m)
    kl /= mc_samples
    if per_point:
        return kl
    # each KL_i >= 0, so a negative mean is Monte Carlo noise: report the nearest valid value
    return max(0.0, float(kl.mean()))


def mixture_kl_broadcast(
    means: torch.Tensor,
    var: float,
    *,
    mc_samples: int = 1,
    row_chunk: int = 8,
    generator: torch.Generator | None = None,
    seed: int | None = 0,
) -> float:
    """Reference estimator that forms a (rows, m, d) difference tensor, as the paper's code did.

    Same estimator and the same noise draws as ``mixture_kl`` (same seed gives the same eps), in
    float64. Slow, for tests and benchmarks only.
    """
    means, var = _check_means(means, var)
    m, d = means.shape
    if generator is None and seed is not None:
        generator = generator_for(means.device, seed)
    mu = means.double()
    sd = math.sqrt(var)
    total = 0.0
    for _ in range(mc_samples):
        eps = _draw_noise((m, d), generator=generator, device=mu.device, dtype=torch.float64)
        for start in range(0, m, row_chunk):
            z = mu[start : start + row_chunk] + sd * eps[start : start + row_chunk]
            diff = z[:, None, :] - mu[None, :, :]  # (rows, m, d)
            logits = -(diff * diff).sum(dim=2) / (2 * var)
            e_sq = (eps[start : start + row_chunk] ** 2).sum(dim=1)
            total += float((-0.5 * e_sq - torch.logsumexp(logits, dim=1) + math.log(m)).sum())
    return total / (m * mc_samples)
