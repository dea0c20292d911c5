"""Training of score networks by the sigma^2-weighted denoising loss (docs/theory.md sections 1.2 and 6).

  l(theta; x) = E_{t ~ U(t_min, T), eps} 1/2 || sigma_t s_theta(alpha_t x + sigma_t eps, t) + eps ||^2

With an eps-predicting network (s = -eps_theta / sigma_t) the integrand is 1/2 ||eps - eps_theta||^2,
summed over data dimensions (nats per sample).

Bound-regularized training (docs/theory.md section 6) adds lambda times a differentiable surrogate of the
generator term I_gen = L^2 int beta / (2m): the same Girsanov integral with the worst-case score
norm L^2 replaced by the mean squared score along the training marginals,

  S(theta) = (T - t_min) E_{t ~ U(t_min, T), x, eps} [ beta(t) || s_theta(x_t, t) ||^2 ] / (2 m),

estimated on each mini-batch with the draws of the denoising loss. lambda = 0 is plain training.

The weights a training run returns are the power-function average of its iterates of width
``ema`` (``maths.averaging``, docs/theory.md eq. 1.2b); ``ema`` = 0 returns the last iterate.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn
from tqdm.auto import tqdm

from bound_tuner.maths.averaging import ema_gamma, ema_keep
from bound_tuner.maths.draws import chunk_length, generator_for
from bound_tuner.maths.sde import Schedule
from bound_tuner.models import model_device

#: Adam's settings for score-model training (torch.optim.Adam's defaults, written out because
#: ``training.pack`` does the same Adam step itself, member by member)
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
#: the global gradient norm that training clips each model's gradient to (clip_grad_norm_)
GRAD_CLIP = 1.0


def ema_update(
    average: Iterable[torch.Tensor], weights: Iterable[torch.Tensor], *, step: int, gamma: float
) -> None:
    """Move the average towards the weights after update ``step`` (1-based; eq. 1.2b)."""
    keep = ema_keep(step, gamma)
    with torch.no_grad():
        for a, w in zip(average, weights, strict=True):
            a.lerp_(w.detach(), 1.0 - keep)


def load_weights(model: nn.Module, weights: Iterable[torch.Tensor]) -> None:
    """Copy ``weights`` (in ``model.parameters()`` order) into the model's parameters."""
    with torch.no_grad():
        for p, w in zip(model.parameters(), weights, strict=True):
            p.copy_(w)


@contextmanager
def averaged_weights(model: nn.Module, average: list[torch.Tensor] | None) -> Iterator[nn.Module]:
    """``model`` with the averaged weights in place of its own for the block (none: as it is)."""
    if average is None:
        yield model
        return
    own = [p.detach().clone() for p in model.parameters()]
    load_weights(model, average)
    try:
        yield model
    finally:
        load_weights(model, own)


def draw_times(
    n: int | tuple[int, ...], T: float, t_min: float, generator: torch.Generator | None
) -> torch.Tensor:
    """Times t ~ U(t_min, T) in float64 of shape n, on the generator's device."""
    dev = generator.device if generator is not None else None
    return t_min + (T - t_min) * torch.rand(n, generator=generator, dtype=torch.float64, device=dev)


Coefficients = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # alpha_t, sigma_t^2, beta(t)


def coefficients(schedule: Schedule, t: torch.Tensor, dtype: torch.dtype) -> Coefficients:
    """(alpha_t, sigma_t^2, beta(t)) at times t (computed in float64, returned in dtype)."""
    return tuple(f(t).to(dtype) for f in (schedule.alpha, schedule.sigma2, schedule.beta))


def denoising_loss(
    model: nn.Module,
    x: torch.Tensor,
    t: torch.Tensor,
    eps: torch.Tensor,
    coef: Coefficients,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample denoising loss [b] and per-sample beta(t)||s||^2 [b] for given draws (t, eps)
    and the schedule's coefficients at t (``coefficients``)."""
    alpha, sigma2, beta = coef
    shape = (-1,) + (1,) * (x.dim() - 1)
    xt = alpha.view(shape) * x + sigma2.sqrt().view(shape) * eps  # x_t ~ E_t(x), eq. 1.1
    eps_hat = model(xt, t.to(x.dtype))
    loss = 0.5 * (eps_hat - eps).pow(2).reshape(x.shape[0], -1).sum(dim=1)
    sq_score = eps_hat.pow(2).reshape(x.shape[0], -1).sum(dim=1) / sigma2
    return loss, beta * sq_score


def denoising_terms(
    model: nn.Module,
    x: torch.Tensor,
    schedule: Schedule,
    *,
    T: float,
    t_min: float = 1e-3,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``denoising_loss`` with one draw of (t, eps) per sample from ``generator`` (on x's device)."""
    t = draw_times(x.shape[0], T, t_min, generator)
    eps = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    t = t.to(x.device)
    return denoising_loss(model, x, t, eps, coefficients(schedule, t, x.dtype))


class StepDraws:
    """The random numbers of training, drawn on the generator's device in chunks of steps:
    mini-batch indices [b], times t ~ U(t_min, T) [b] (float64) and noise eps [b, ...] per step,
    with the schedule's coefficients at those times (computed per chunk, not per step).

    The chunk length depends only on (steps, batch, data shape), so a model trained alone and the
    same model trained in a pack (``bound_tuner.training.pack``) see the same numbers from the same seed.
    With ``rows`` (a K-fold reference, docs/theory.md 2.9) the indices are drawn among those rows;
    the times and the noise are the same as the full model's from the same seed.
    """

    def __init__(
        self,
        *,
        m: int,
        batch: int,
        shape: tuple[int, ...],
        steps: int,
        T: float,
        t_min: float,
        generator: torch.Generator,
        dtype: torch.dtype,
        schedule: Schedule | None = None,
        rows: torch.Tensor | None = None,
    ) -> None:
        self.chunk = chunk_length(batch * math.prod(shape), steps)
        self.rows = rows  # the rows of the data a fold reference trains on (None: all m)
        self.m, self.batch, self.shape, self.steps = m, batch, shape, steps
        self.T, self.t_min, self.g, self.dtype = T, t_min, generator, dtype
        self.schedule = schedule
        self.start = -1
        self.idx = self.t = self.eps = self.coef = None

    def draw_chunk(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The draws of the chunk that starts at ``step``: idx [c, b], t [c, b], eps [c, b, ...]."""
        c = min(self.chunk, self.steps - step)
        dev = self.g.device
        n = self.m if self.rows is None else self.rows.numel()
        idx = torch.randint(n, (c, self.batch), generator=self.g, device=dev)
        if self.rows is not None:
            idx = self.rows[idx]
        t = draw_times((c, self.batch), self.T, self.t_min, self.g)
        eps = torch.randn(
            (c, self.batch, *self.shape), generator=self.g, dtype=self.dtype, device=dev
        )
        return idx, t, eps

    def __call__(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Coefficients]:
        """(idx, t, eps, coefficients at t) of one step; steps must be asked for in order."""
        if self.start < 0 or step >= self.start + self.chunk:
            self.start = step
            self.idx, self.t, self.eps = self.draw_chunk(step)
            self.coef = coefficients(self.schedule, self.t, self.dtype)
        k = step - self.start
        return self.idx[k], self.t[k], self.eps[k], tuple(c[k] for c in self.coef)


def check_finite(history: torch.Tensor, upto: int) -> None:
    """Raise FloatingPointError naming the first step whose loss is NaN or infinite (one host
    sync: training calls it at checkpoints and at the end, not every step)."""
    bad = ~torch.isfinite(history[:upto])
    if bool(bad.any()):
        step = int(bad.nonzero()[0, 0])
        raise FloatingPointError(f"training loss became {float(history[step])} at step {step}")


def generator_surrogate(
    weighted_sq_score: torch.Tensor,
    *,
    T: float | torch.Tensor,
    m: int | torch.Tensor,
    t_min: float = 1e-3,
) -> torch.Tensor:
    """S(theta) of the module docstring from per-sample beta(t)||s||^2 values [..., b] (the mean
    over the last dimension; a pack gives [K, b] and T [K])."""
    return (T - t_min) * weighted_sq_score.mean(dim=-1) / (2 * m)


def train_score_model(
    model: nn.Module,
    x: torch.Tensor,
    schedule: Schedule,
    *,
    T: float,
    steps: int = 2000,
    batch_size: int = 256,
    lr: float = 1e-3,
    lam: float = 0.0,
    t_min: float = 1e-3,
    seed: int = 0,
    grad_clip: float | None = GRAD_CLIP,
    callback: Callable[[int, nn.Module], None] | None = None,
    callback_every: int = 0,
    progress: bool = False,
    rows: torch.Tensor | None = None,
    ema: float = 0.0,
) -> list[float]:
    """Train ``model`` on x by Adam on the denoising loss (+ lam * S(theta)); returns the losses.

    Runs on x's device (the model must be there) with random numbers drawn there from ``seed``;
    losses stay on the device and come back at checkpoints and at the end, never every step.
    ``callback(step, model)`` runs every ``callback_every`` steps (for pruning checkpoints); it may
    raise to stop training. A NaN or infinite loss raises FloatingPointError at the next
    checkpoint or at the end. ``rows`` (a K-fold reference, docs/theory.md 2.9) restricts the
    mini-batches to those rows of x, with the draws ``bound_tuner.training.pack`` gives such a member, and
    counts their number as m in the regularizer. With ``ema`` > 0 (eq. 1.2b) the callback sees,
    and the model ends with, the power-function average of the weights instead of the last ones.
    """
    schedule.check_T(T, t_min=t_min)
    if lam < 0:
        raise ValueError(f"lam={lam} must be >= 0")
    if model_device(model) != x.device:
        raise ValueError(
            f"the model is on {model_device(model)} but the data on {x.device}; move both to one"
        )
    opt = torch.optim.Adam(model.parameters(), lr=lr, betas=ADAM_BETAS, eps=ADAM_EPS)
    gamma = ema_gamma(ema) if ema else None
    average = None if gamma is None else [p.detach().clone() for p in model.parameters()]
    m = x.shape[0]
    b = min(batch_size, m)
    draws = StepDraws(
        m=m,
        batch=b,
        shape=tuple(x.shape[1:]),
        steps=steps,
        T=T,
        t_min=t_min,
        generator=generator_for(x.device, seed),
        dtype=x.dtype,
        schedule=schedule,
        rows=rows,
    )
    if rows is not None:
        m = rows.numel()
    history = torch.empty(steps, dtype=x.dtype, device=x.device)
    every_bar = max(1, steps // 20)
    # no bar object without progress (tqdm's first bar makes a process-wide semaphore)
    bar = tqdm(range(steps), desc=f"train T={T:g}", leave=False) if progress else None
    model.train()
    for step in bar if bar is not None else range(steps):
        idx, t, eps, coef = draws(step)
        loss, wsq = denoising_loss(model, x[idx], t, eps, coef)
        total = loss.mean()
        if lam > 0:
            total = total + lam * generator_surrogate(wsq, T=T, m=m, t_min=t_min)
        history[step] = total.detach()
        opt.zero_grad(set_to_none=True)
        total.backward()
        if grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        if average is not None:
            ema_update(average, model.parameters(), step=step + 1, gamma=gamma)
        if bar is not None and step % every_bar == 0:
            bar.set_postfix(loss=f"{float(history[step]):.3f}")
        if callback is not None and callback_every and (step + 1) % callback_every == 0:
            check_finite(history, step + 1)
            with averaged_weights(model, average):
                callback(step + 1, model)
            model.train()
    check_finite(history, steps)
    if average is not None:
        load_weights(model, average)
    return history.tolist()
