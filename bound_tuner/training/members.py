"""K score models evaluated together: one trained model (K = 1) or the members of a pack.

The generator (``sampling.generate_members``) and the negative ELBO
(``elbo.negative_elbo_members``) are written once, for tensors with a leading member
dimension [K, n, ...]; a single model is the case K = 1, so a packed member's bound is computed by
the same code as a model's alone. Each member has its own schedule (one vectorized schedule per
family, its parameters a [k, 1] tensor, evaluated on the rows of that family's members).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch import nn

from bound_tuner.maths.sde import SCHEDULES, Schedule
from bound_tuner.models import model_device, model_dtype

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class MemberSchedules:
    """alpha_t, sigma_t^2, beta(t) and the time at a log-SNR for times [K, ...], row j with
    member j's schedule."""

    def __init__(self, schedules: Sequence[Schedule], device: torch.device) -> None:
        self.schedules = list(schedules)
        self.groups: list[tuple[torch.Tensor, dict[str, torch.Tensor], type[Schedule]]] = []
        for name, cls in SCHEDULES.items():
            idx = [j for j, s in enumerate(self.schedules) if s.name == name]
            if not idx:
                continue
            params = {
                f: torch.tensor(
                    [getattr(self.schedules[j], f) for j in idx], dtype=torch.float64, device=device
                )
                for f in cls.__dataclass_fields__
            }
            self.groups.append((torch.tensor(idx, device=device), params, cls))
        # schedules of no named family (a discrete schedule built from its betas,
        # sde.DiscreteSchedule): evaluated member by member
        self.singles = [(j, s) for j, s in enumerate(self.schedules) if s.name not in SCHEDULES]

    def _apply(self, what: str, t: torch.Tensor) -> torch.Tensor:
        extra = (1,) * (t.dim() - 1)
        if len(self.groups) == 1 and not self.singles:
            _, params, cls = self.groups[0]
            return getattr(cls(**{k: v.view(-1, *extra) for k, v in params.items()}), what)(t)
        out = torch.empty_like(t)
        for idx, params, cls in self.groups:
            sched = cls(**{k: v.view(-1, *extra) for k, v in params.items()})
            out[idx] = getattr(sched, what)(t[idx])
        for j, sched in self.singles:
            out[j] = getattr(sched, what)(t[j])
        return out

    def coefficients(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(alpha_t, sigma_t^2, beta(t)) for times t [K, ...] (float64)."""
        return self._apply("alpha", t), self._apply("sigma2", t), self._apply("beta", t)

    def sigma2(self, t: torch.Tensor) -> torch.Tensor:
        return self._apply("sigma2", t)

    def beta(self, t: torch.Tensor) -> torch.Tensor:
        return self._apply("beta", t)

    def log_snr(self, t: torch.Tensor) -> torch.Tensor:
        return self._apply("log_snr", t)

    def time_at_log_snr(self, lam: torch.Tensor) -> torch.Tensor:
        return self._apply("time_at_log_snr", lam)


class Members:
    """K eps-predicting models on one device and dtype: ``eps(y [K, n, ...], t [K, n])``."""

    def __init__(
        self,
        eps: EpsFn,
        schedules: Sequence[Schedule],
        *,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.eps, self.device, self.dtype = eps, device, dtype
        self.k = len(schedules)
        self.schedules = MemberSchedules(schedules, device)

    @classmethod
    def single(cls, model: nn.Module, schedule: Schedule) -> Members:
        """One model (K = 1), called on its own batch."""
        model.eval()

        def eps(y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return model(y[0], t[0].to(y.dtype))[None]

        return cls(eps, [schedule], device=model_device(model), dtype=model_dtype(model))

    @classmethod
    def stacked(
        cls,
        model: nn.Module,
        params: dict[str, torch.Tensor],
        buffers: dict[str, torch.Tensor],
        schedules: Sequence[Schedule],
    ) -> Members:
        """K models of ``model``'s architecture with stacked parameters [K, ...], one vmap call."""
        base = copy.deepcopy(model).to("meta")

        def one(p, b, y, t):
            return torch.func.functional_call(base, (p, b), (y, t))

        batched = torch.func.vmap(one)
        params = {k: v.detach() for k, v in params.items()}

        def eps(y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return batched(params, buffers, y, t.to(y.dtype))

        first = next(iter(params.values()))
        return cls(eps, schedules, device=first.device, dtype=first.dtype)

    @classmethod
    def of_models(cls, models: Sequence[nn.Module], schedules: Sequence[Schedule]) -> Members:
        """Trained models of one architecture, stacked (``stack_module_state``) into one vmap.

        A module that ``torch.func`` cannot vmap (a user's own network, docs/own_models.md) is
        called member by member instead: the first call tries the vmap and, if it raises, the
        members run one after another from then on (same values, no speed-up). Running out of
        memory is not such a failure: it propagates."""
        models = list(models)
        for mod in models:
            mod.eval()
        first = models[0]

        def looped(y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return torch.stack([mod(y[j], t[j].to(y.dtype)) for j, mod in enumerate(models)])

        try:
            params, buffers = torch.func.stack_module_state(models)
            batched = cls.stacked(first, params, buffers, schedules).eps
        except torch.OutOfMemoryError:  # a fault to report, not a module to call one by one
            raise
        except Exception:  # a module that cannot be stacked: one by one
            batched = None
        state = {"vmap": batched is not None, "tried": False}

        def eps(y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            if state["vmap"]:
                if state["tried"]:
                    return batched(y, t)
                state["tried"] = True
                try:
                    return batched(y, t)
                except torch.OutOfMemoryError:  # not a module torch.func cannot vmap
                    raise
                except Exception:  # torch.func cannot vmap this module: fall back
                    state["vmap"] = False
            return looped(y, t)

        return cls(eps, schedules, device=model_device(first), dtype=model_dtype(first))
