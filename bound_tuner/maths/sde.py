"""The forward VP SDE and everything defined by it (docs/theory.md, section 1).

  dX = -1/2 beta(t) X dt + sqrt(beta(t)) dW,   B(t) = int_0^t beta,
  alpha_t = exp(-B/2),  sigma_t^2 = 1 - alpha_t^2,  lambda(t) = ln(alpha_t^2 / sigma_t^2) (log-SNR).

Each schedule gives beta, B and the inverse of B in closed form. Schedules are functions of
absolute time, so a larger T moves the end point of the process, not its shape. Beside the
schedules: drawing x_t, the prior KL of the encoder E_T, the generator's time grid and its
Euler-Maruyama reverse step, and the reference score of the data-free model.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

TensorLike = float | torch.Tensor


def _as_tensor(t: TensorLike) -> torch.Tensor:
    return t if isinstance(t, torch.Tensor) else torch.tensor(float(t), dtype=torch.float64)


@dataclass(frozen=True)
class Schedule:
    """Base class: subclasses define beta(t) and B(t); alpha and sigma^2 follow (section 1.1).

    Parameters are numbers, or tensors that broadcast against t (a pack of models with one
    schedule family and per-model parameters, ``bound_tuner.training.pack``)."""

    name = "base"
    #: exclusive upper end of the valid diffusion times (inf when any T works)
    t_max = math.inf

    def beta(self, t: TensorLike) -> torch.Tensor:
        raise NotImplementedError

    def big_b(self, t: TensorLike) -> torch.Tensor:
        """B(t) = integral_0^t beta(s) ds."""
        raise NotImplementedError

    def alpha(self, t: TensorLike) -> torch.Tensor:
        """alpha_t = exp(-B(t)/2): the mean scale of the encoder E_t."""
        return torch.exp(-0.5 * self.big_b(t))

    def sigma2(self, t: TensorLike) -> torch.Tensor:
        """sigma_t^2 = 1 - alpha_t^2, computed as -expm1(-B) to keep precision at small t."""
        return -torch.expm1(-self.big_b(t))

    def inverse_big_b(self, b: TensorLike) -> torch.Tensor:
        """The time t with B(t) = b (B is increasing)."""
        raise NotImplementedError

    def log_snr(self, t: TensorLike) -> torch.Tensor:
        """lambda(t) = ln(alpha_t^2 / sigma_t^2) = -ln(expm1(B(t))); falls from +inf at t=0."""
        return -torch.log(torch.expm1(self.big_b(t)))

    def time_at_log_snr(self, lam: TensorLike) -> torch.Tensor:
        """The inverse of ``log_snr``: B = ln(1 + e^-lambda) = softplus(-lambda), then t = B^-1."""
        return self.inverse_big_b(torch.nn.functional.softplus(-_as_tensor(lam)))

    def params(self) -> dict[str, float]:
        return {}

    def check_T(self, T: float, *, t_min: float = 1e-3) -> float:
        """Return T as a float, or raise ValueError if it is outside (t_min, t_max)."""
        if not isinstance(T, (int, float)) or not math.isfinite(T):
            raise ValueError(f"T={T!r} is not a finite number; give a diffusion time such as 1.0")
        if T <= t_min:
            raise ValueError(
                f"T={T} must exceed t_min={t_min} for the {self.name} schedule; choose a larger T"
            )
        if T >= self.t_max:
            raise ValueError(
                f"T={T} is outside the {self.name} schedule's range (T < {self.t_max}); "
                f"choose T below {self.t_max} or another schedule"
            )
        return float(T)


@dataclass(frozen=True)
class LinearSchedule(Schedule):
    """beta(t) = b0 + (b1 - b0) t (the VP SDE of Song et al.; paper defaults b0=0.1, b1=20)."""

    beta_min: float = 0.1
    beta_max: float = 20.0
    name = "linear"

    def beta(self, t: TensorLike) -> torch.Tensor:
        t = _as_tensor(t)
        return self.beta_min + (self.beta_max - self.beta_min) * t

    def big_b(self, t: TensorLike) -> torch.Tensor:
        t = _as_tensor(t)
        return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t * t

    def inverse_big_b(self, b: TensorLike) -> torch.Tensor:
        # root of c/2 t^2 + b0 t - b = 0 in the cancellation-free form 2b / (b0 + sqrt(b0^2 + 2cb))
        b = _as_tensor(b)
        c = self.beta_max - self.beta_min
        return 2 * b / (self.beta_min + torch.sqrt(self.beta_min**2 + 2 * c * b))

    def params(self) -> dict[str, float]:
        return {"beta_min": self.beta_min, "beta_max": self.beta_max}


@dataclass(frozen=True)
class CosineSchedule(Schedule):
    """Continuous cosine schedule (Nichol and Dhariwal): abar(t) = f(t)/f(0), valid for T < 1."""

    s: float = 0.008
    name = "cosine"
    t_max = 1.0

    def _u(self, t: torch.Tensor) -> torch.Tensor:
        return (t + self.s) / (1.0 + self.s) * (math.pi / 2)

    def _cos_u0(self) -> torch.Tensor:
        # float64 whether s is a number or (in a pack, bound_tuner.training.pack) a tensor of them
        s = torch.as_tensor(self.s, dtype=torch.float64)
        return torch.cos(s / (1.0 + s) * (math.pi / 2))

    def beta(self, t: TensorLike) -> torch.Tensor:
        t = _as_tensor(t)
        return (math.pi / (1.0 + self.s)) * torch.tan(self._u(t))

    def big_b(self, t: TensorLike) -> torch.Tensor:
        t = _as_tensor(t)
        # B = -ln abar = -2 ln cos(u(t)) + 2 ln cos(u(0))
        return -2.0 * torch.log(torch.cos(self._u(t))) + 2.0 * torch.log(self._cos_u0())

    def inverse_big_b(self, b: TensorLike) -> torch.Tensor:
        # cos(u(t)) = cos(u(0)) exp(-B/2)
        b = _as_tensor(b)
        u = torch.arccos(self._cos_u0() * torch.exp(-0.5 * b))
        return u * (1.0 + self.s) / (math.pi / 2) - self.s

    def params(self) -> dict[str, float]:
        return {"s": self.s}


@dataclass(frozen=True)
class ConstantSchedule(Schedule):
    """beta(t) = b, B(t) = b t."""

    beta_const: float = 5.0
    name = "constant"

    def beta(self, t: TensorLike) -> torch.Tensor:
        t = _as_tensor(t)
        return self.beta_const * torch.ones_like(t)

    def big_b(self, t: TensorLike) -> torch.Tensor:
        return self.beta_const * _as_tensor(t)

    def inverse_big_b(self, b: TensorLike) -> torch.Tensor:
        return _as_tensor(b) / self.beta_const

    def params(self) -> dict[str, float]:
        return {"beta_const": self.beta_const}


SCHEDULES: dict[str, type[Schedule]] = {
    "linear": LinearSchedule,
    "cosine": CosineSchedule,
    "constant": ConstantSchedule,
}


def get_schedule(name: str, **params: float) -> Schedule:
    """Build a schedule by name ("linear", "cosine", "constant") with its parameters."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose one of {', '.join(sorted(SCHEDULES))}")
    cls = SCHEDULES[name]
    try:
        sched = cls(**params)
    except TypeError:
        allowed = ", ".join(f.name for f in cls.__dataclass_fields__.values())
        raise ValueError(
            f"bad parameters {sorted(params)} for the {name} schedule; allowed: {allowed}"
        ) from None
    for key, value in sched.params().items():
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"schedule parameter {key}={value} must be a positive finite number")
    return sched


@dataclass(frozen=True)
class DiscreteSchedule(Schedule):
    """The VP process of a discrete-time (DDPM) beta schedule b_0, ..., b_{N-1} on t in [0, 1].

    Step i occupies the interval [i/N, (i+1)/N) with the constant rate beta(t) = -N ln(1 - b_i),
    so B((k+1)/N) = -sum_{i<=k} ln(1 - b_i) = -ln abar_k: at t = (k+1)/N the marginal of the
    process is exactly the discrete one at step k, x_k = sqrt(abar_k) x_0 + sqrt(1 - abar_k) eps
    (diffusers' ``add_noise`` at timestep k). Between grid points B is linear, so log alpha-bar
    is interpolated linearly (docs/theory.md section 8 derives this and the error of the naive
    rate N b_i). Times run in [0, 1] (T = 1 is the whole discrete process); past 1 the last rate
    continues, but ``check_T`` refuses T > 1. Not in SCHEDULES: it is built from its betas
    (``from_betas``, or ``bound_tuner.models.diffusers_adapter.schedule_from_scheduler``), not by name.
    """

    betas: tuple[float, ...] = (0.02,)
    name = "discrete"

    @classmethod
    def from_betas(cls, betas) -> DiscreteSchedule:
        """From any sequence or tensor of betas, each in (0, 1)."""
        values = tuple(float(b) for b in torch.as_tensor(betas, dtype=torch.float64).flatten())
        if not values:
            raise ValueError("a discrete schedule needs at least one beta")
        bad = [b for b in values if not (0.0 < b < 1.0)]
        if bad:
            raise ValueError(
                f"discrete betas must lie in (0, 1), got {bad[0]!r}; a beta of 1 (zero terminal "
                "SNR) makes alpha vanish at the end, so the prior terms are infinite"
            )
        return cls(betas=values)

    @property
    def steps(self) -> int:
        """N, the number of discrete steps."""
        return len(self.betas)

    @functools.cached_property
    def _rates(self) -> torch.Tensor:
        # -ln(1 - b_i): the increase of B over step i (float64, CPU)
        return -torch.log1p(-torch.tensor(self.betas, dtype=torch.float64))

    @functools.cached_property
    def _cum(self) -> torch.Tensor:
        # B at the grid points i/N, i = 0..N: [0, -ln abar_0, ..., -ln abar_{N-1}]
        return torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(self._rates, 0)])

    def _step(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        u = t.double() * self.steps
        n = torch.floor(u).clamp(0, self.steps - 1).long()
        return u, n

    def beta(self, t: TensorLike) -> torch.Tensor:
        t = _as_tensor(t)
        _, n = self._step(t)
        return self.steps * self._rates.to(t.device)[n]

    def big_b(self, t: TensorLike) -> torch.Tensor:
        t = _as_tensor(t)
        u, n = self._step(t)
        return self._cum.to(t.device)[n] + self._rates.to(t.device)[n] * (u - n)

    def inverse_big_b(self, b: TensorLike) -> torch.Tensor:
        b = _as_tensor(b).double()
        cum = self._cum.to(b.device)
        n = (torch.searchsorted(cum, b.contiguous(), right=True) - 1).clamp(0, self.steps - 1)
        return (n + (b - cum[n]) / self._rates.to(b.device)[n]) / self.steps

    def params(self) -> dict[str, float]:
        return {
            "N": float(self.steps),
            "beta_first": self.betas[0],
            "beta_last": self.betas[-1],
            "B_end": float(self._cum[-1]),
        }

    def check_T(self, T: float, *, t_min: float = 1e-3) -> float:
        """T in (t_min, 1]: the discrete process ends at t = 1 (its step N - 1)."""
        T = super().check_T(T, t_min=t_min)
        if T > 1.0 + 1e-12:
            raise ValueError(
                f"T={T} is past the end of the {self.steps}-step discrete schedule (T <= 1, "
                "where t = (k+1)/N is step k); choose T <= 1"
            )
        return T


def sample_xt(
    x0: torch.Tensor, t: torch.Tensor, schedule: Schedule, *, noise: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw x_t ~ E_t(x0) = N(alpha_t x0, sigma_t^2 I); returns (x_t, eps). t has shape [batch]."""
    eps = torch.randn_like(x0) if noise is None else noise
    shape = (-1,) + (1,) * (x0.dim() - 1)
    alpha = schedule.alpha(t).to(x0.dtype).view(shape)
    sigma = schedule.sigma2(t).sqrt().to(x0.dtype).view(shape)
    return alpha * x0 + sigma * eps, eps


def prior_kl(x: torch.Tensor, *, alpha: TensorLike, sigma2: TensorLike) -> torch.Tensor:
    """KL(E_T(x_i) || N(0, I)) = KL(N(alpha x_i, sigma2 I) || N(0, I)) per point, float64:

      KL_i = 1/2 (alpha^2 ||x_i||^2 + d (sigma2 - 1 - ln sigma2))   (docs/theory.md, eq. 1.3).

    Shape [m] for numbers alpha and sigma2; [K, m] for [K, 1] tensors (one per pack member)."""
    x = x.reshape(x.shape[0], -1).double()
    d = x.shape[1]
    alpha = torch.as_tensor(alpha, dtype=torch.float64, device=x.device)
    sigma2 = torch.as_tensor(sigma2, dtype=torch.float64, device=x.device)
    if not bool(((sigma2 > 0) & (sigma2 <= 1)).all()):
        raise ValueError(f"sigma2={sigma2.tolist()} must lie in (0, 1]")
    return 0.5 * (alpha**2 * (x * x).sum(dim=1) + d * (sigma2 - 1.0 - torch.log(sigma2)))


def time_grid(T: float, n_steps: int, *, t_min: float = 1e-3) -> torch.Tensor:
    """The generator's grid t_k = T - k h, h = (T - t_min)/N, k = 0..N-1 (float64)."""
    h = (T - t_min) / n_steps
    return T - h * torch.arange(n_steps, dtype=torch.float64)


def reverse_step(
    y: torch.Tensor,
    score: torch.Tensor,
    *,
    beta: TensorLike,
    h: TensorLike,
    noise: torch.Tensor,
) -> torch.Tensor:
    """One Euler-Maruyama step of the reverse SDE dy = beta (s + y/2) dt' + sqrt(beta) dW.
    beta and h are numbers, or tensors that broadcast against y (one per member of a pack)."""
    return y + h * beta * (score + 0.5 * y) + (beta * h) ** 0.5 * noise


def reference_score(y: torch.Tensor) -> torch.Tensor:
    """The score of the data-free model: s_ref(y, t) = -y, exact at every t when the data are
    N(0, I) (then every marginal is N(0, I)). The Girsanov generator term measures the score
    against it (docs/theory.md, eq. 2.4)."""
    return -y
