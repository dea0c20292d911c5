"""Training of VAEs, plain or bound-regularized (docs/theory.md sections 5 and 6).

Per mini-batch B of the m training points, with one z ~ q(z|x) per point:

  loss = mean_B REC_i + beta * mean_B KLD_i + lam * S,
  S    = (1 + r) * ( sqrt(KLD_B) + sqrt(max(MI_B, 0) / m) )

where KLD_B and MI_B are the batch means of the per-point KL to the prior and of
ln p_theta(x|z) - ln p_theta0(x|z) (the same z, theta_0 the frozen decoder at initialization).
S is the bound's complexity part, (1 + r) sqrt(KLD) + (1 + r) sqrt(MI / m) of docs/theory.md section 5,
estimated on the batch: docs/theory.md section 6 asks to train directly on these terms. Each square root
is taken as sqrt(u + f) - sqrt(f) with f = 1e-6, which lowers it by at most sqrt(f) = 1e-3 and
keeps the gradient finite where u = 0 (MI is exactly 0 at initialization). MI is clamped at 0 because
a batch estimate can come out negative; the clamp then passes no gradient. ``lam = 0`` is plain
training: theta_0 is not evaluated and the random draws are the same as with ``lam > 0``.

Random draws (shuffling, dynamic binarization, z) all come from one generator on the training
device, seeded with ``seed``; the model's initial weights are the caller's. ``vae_batch_terms``
gives a batch's per-point REC, KLD and MI (the evaluation of ``bound_tuner.evaluation.vae_bound``
uses it too).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from bound_tuner.data.images import binarize_batch
from bound_tuner.maths.bounds.vae import gaussian_kl, neg_log_bernoulli
from bound_tuner.maths.draws import generator_for

__all__ = [
    "complexity_surrogate",
    "train_fold_vaes",
    "train_vae",
    "train_vaes_lockstep",
    "vae_batch_terms",
    "vae_epochs",
]

_SQRT_FLOOR = 1e-6


def _soft_sqrt(u: torch.Tensor) -> torch.Tensor:
    return torch.sqrt(u + _SQRT_FLOOR) - math.sqrt(_SQRT_FLOOR)


def complexity_surrogate(
    kld: torch.Tensor, mi: torch.Tensor, *, m: int, r: float = 1.0
) -> torch.Tensor:
    """S = (1 + r) (sqrt(mean KLD) + sqrt(max(mean MI, 0) / m)) from per-point values (module doc)."""
    return (1.0 + r) * (_soft_sqrt(kld.mean()) + _soft_sqrt(mi.mean().clamp(min=0.0) / m))


def vae_batch_terms(
    model: nn.Module,
    x: torch.Tensor,
    *,
    decoder0: nn.Module | None = None,
    mc_samples: int = 1,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-point REC, KLD and MI estimates [b] for one batch (differentiable; docs/theory.md section 5).

    ``model`` needs ``encode(x) -> (mu, logvar)`` and ``decode(z) -> logits``. The ``mc_samples``
    draws of z per point are shared by ln p_theta and ln p_theta0, so MI is exactly 0 when the
    decoder still equals ``decoder0``. MI is None when ``decoder0`` is None.
    """
    if mc_samples < 1:
        raise ValueError(f"mc_samples={mc_samples} must be >= 1")
    b = x.shape[0]
    mu, logvar = model.encode(x)
    kld = gaussian_kl(mu, logvar)
    eps = torch.randn(
        (mc_samples, *mu.shape), generator=generator, dtype=mu.dtype, device=mu.device
    )
    z = (mu + torch.exp(0.5 * logvar) * eps).reshape(mc_samples * b, -1)
    xr = x.reshape(1, b, -1).expand(mc_samples, b, -1).reshape(mc_samples * b, -1)
    nll = neg_log_bernoulli(model.decode(z), xr).reshape(mc_samples, b)
    rec = nll.mean(dim=0)
    mi = None
    if decoder0 is not None:
        nll0 = neg_log_bernoulli(decoder0(z), xr).reshape(mc_samples, b)
        mi = (nll0 - nll).mean(dim=0)  # ln p_theta - ln p_theta0
    return rec, kld, mi


def vae_epochs(
    model: nn.Module,
    train_x: torch.Tensor,
    *,
    epochs: int,
    batch_size: int = 64,
    lr: float = 1e-3,
    beta: float = 1.0,
    lam: float = 0.0,
    r: float = 1.0,
    seed: int = 0,
    dynamic_binarize: bool = False,
    device: str | torch.device | None = None,
    progress: bool = False,
    decoder0: nn.Module | None = None,
) -> Iterator[dict[str, float]]:
    """``train_vae`` one epoch at a time: each ``next`` trains one more epoch of ``model`` in
    place and yields its row (see ``train_vae``; the settings are checked at the first).

    ``device`` defaults to the device of the model's parameters (the model is not moved);
    ``train_x`` goes there. ``decoder0`` defaults to ``model.initial_decoder()`` (needed only
    when lam > 0). ``dynamic_binarize`` draws x ~ Bernoulli(x) for every batch (grey images in
    [0, 1]).
    """
    if epochs < 0 or batch_size < 1 or lr <= 0 or beta < 0 or lam < 0 or r < 0:
        raise ValueError(
            f"need epochs >= 0, batch_size >= 1, lr > 0, beta >= 0, lam >= 0, r >= 0; got "
            f"epochs={epochs}, batch_size={batch_size}, lr={lr}, beta={beta}, lam={lam}, r={r}"
        )
    m = int(train_x.shape[0])
    if device is None:  # train where the model is
        device = next(model.parameters()).device
    device = torch.device(device)
    model.to(device)
    x_all = train_x.to(device)
    if lam > 0:
        if decoder0 is None:
            if not hasattr(model, "initial_decoder"):
                raise ValueError("lam > 0 needs decoder0 (the frozen decoder at initialization)")
            decoder0 = model.initial_decoder()
        decoder0 = decoder0.to(device).eval().requires_grad_(False)
    else:
        decoder0 = None
    g = generator_for(device, seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    bar = tqdm(range(1, epochs + 1), desc="vae", unit="epoch", disable=not progress)
    for epoch in bar:
        model.train()
        perm = torch.randperm(m, generator=g, device=device)
        # accumulated on the device: no host sync per step; checked once per epoch
        sums = torch.zeros(5, dtype=torch.float64, device=device)
        bad_steps = torch.zeros((), dtype=torch.int64, device=device)
        first_bad = torch.full((), -1, dtype=torch.int64, device=device)
        first_bad_loss = torch.zeros((), dtype=torch.float64, device=device)
        n_batches = 0
        for step, start in enumerate(range(0, m, batch_size)):
            xb = x_all[perm[start : start + batch_size]]
            if dynamic_binarize:
                xb = binarize_batch(xb, g)
            rec, kld, mi = vae_batch_terms(model, xb, decoder0=decoder0, generator=g)
            loss = rec.mean() + beta * kld.mean()
            surrogate = torch.zeros((), device=device)
            if mi is not None:
                surrogate = complexity_surrogate(kld, mi, m=m, r=r)
                loss = loss + lam * surrogate
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                bad = ~torch.isfinite(loss)
                is_first = bad & (first_bad < 0)
                first_bad = torch.where(is_first, step, first_bad)
                first_bad_loss = torch.where(is_first, loss.double(), first_bad_loss)
                bad_steps += bad.long()
                mi_mean = mi.mean() if mi is not None else torch.full((), math.nan)
                vals = torch.stack(
                    [loss, rec.mean(), kld.mean(), mi_mean.to(loss.device), surrogate]
                )
                sums += vals.double()
            n_batches += 1
        if int(bad_steps) > 0:  # one host sync per epoch
            raise FloatingPointError(
                f"VAE loss is {float(first_bad_loss)} at epoch {epoch}, step {int(first_bad)} "
                f"({int(bad_steps)} of {n_batches} steps non-finite); lower lr={lr} or lam={lam}, "
                "or check the data for NaN"
            )
        means = (sums / max(n_batches, 1)).cpu().tolist()
        row = dict(zip(("loss", "rec", "kld", "mi", "surrogate"), means, strict=True))
        row["epoch"] = float(epoch)
        bar.set_postfix(loss=f"{row['loss']:.3f}")
        yield row


def train_vae(
    model: nn.Module,
    train_x: torch.Tensor,
    *,
    callback: Callable[[int, nn.Module], None] | None = None,
    **settings: Any,
) -> list[dict[str, float]]:
    """Train ``model`` in place with Adam on REC + beta KLD (+ lam S) for ``epochs``; the
    settings are the keywords of ``vae_epochs`` (see the module docstring).
    ``callback(epoch, model)`` runs after each epoch (epoch counts from 1); it may evaluate the
    bound or raise to stop (an Optuna pruner, for example), and the exception propagates.
    Returns one dict per epoch with the batch means of loss, rec, kld, mi (nan when lam = 0) and
    surrogate. Raises FloatingPointError at the end of the first epoch whose loss was not finite
    at some step (checked on the device, one host sync per epoch), naming the first such step.
    """
    history: list[dict[str, float]] = []
    for row in vae_epochs(model, train_x, **settings):
        history.append(row)
        if callback is not None:
            callback(int(row["epoch"]), model)
    return history


def train_fold_vaes(
    build: Callable[[], nn.Module],
    train_x: torch.Tensor,
    folds: torch.Tensor,
    *,
    seed: int,
    **train_kwargs,
) -> list[nn.Module]:
    """The K reference VAEs of the K-fold bound (docs/theory.md 5.4): reference k is built by
    ``build`` after seeding torch with ``seed`` (the model's initialization) and trained by
    ``train_vae`` with the model's settings and ``seed`` on every point outside fold k
    (``folds`` holds each point's fold)."""
    refs = []
    for k in range(int(folds.max()) + 1):
        torch.manual_seed(seed)
        ref = build()
        rows = torch.nonzero(folds != k).flatten()
        train_vae(ref, train_x[rows], seed=seed, **train_kwargs)
        refs.append(ref)
    return refs


def train_vaes_lockstep(
    models: list[nn.Module],
    xs: list[torch.Tensor],
    *,
    epochs: int,
    callback: Callable[[int, list[nn.Module]], None] | None = None,
    **train_kwargs,
) -> list[list[dict[str, float]]]:
    """Train ``models[j]`` on ``xs[j]`` with the same settings (``train_vae``'s keywords), one
    epoch of each in turn (docs/theory.md 2.12): each model has its own generator and optimizer,
    so every one ends as ``train_vae`` alone leaves it. ``callback(epoch, models)`` runs after
    each epoch of all of them and may raise to stop. Returns each model's rows."""
    runs = [
        vae_epochs(mod, x, epochs=epochs, **train_kwargs) for mod, x in zip(models, xs, strict=True)
    ]
    histories: list[list[dict[str, float]]] = [[] for _ in models]
    for epoch in range(1, epochs + 1):
        for run, history in zip(runs, histories, strict=True):
            history.append(next(run))
        if callback is not None:
            callback(epoch, models)
    return histories
