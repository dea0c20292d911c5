"""Packed training: K score models of one architecture trained at once as a vmapped ensemble.

Small models (the 2-D MLPs) leave a GPU idle: each training step is a handful of tiny kernels.
A pack stacks the K models' parameters (``torch.func.stack_module_state``) and runs one
``vmap``-ed forward and backward for all of them, so a step costs about as much for K models as
for one. Each member keeps everything that defines its trial: its own T, schedule and schedule
parameters, lambda, learning rate and seed (the random numbers of ``training.StepDraws``). The
architecture, the number of steps, the batch size and t_min are shared.

The update is ``training.train_score_model``'s, member by member: the same loss (docs/theory.md
eq. 6.1), the same gradient clipping (each member's own global norm) and Adam with each member's
own learning rate, so member j ends where training it alone ends, to float tolerance (tested on
the CPU). Checkpoints call back per member; a member whose callback raises (pruned) or whose loss
is not finite is dropped from the pack and the rest train on.
"""

from __future__ import annotations

import copy
import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from bound_tuner.maths.averaging import ema_gamma
from bound_tuner.maths.bounds.terms import BoundTerms
from bound_tuner.maths.draws import generator_for
from bound_tuner.maths.sde import Schedule
from bound_tuner.models.factory import factory_name
from bound_tuner.runtime.device import DEFAULT_DEVICE, resolve_device, set_tf32
from bound_tuner.training.config import DiffusionConfig, initial_model
from bound_tuner.training.loop import (
    ADAM_BETAS,
    ADAM_EPS,
    GRAD_CLIP,
    StepDraws,
    check_finite,
    ema_update,
    generator_surrogate,
)
from bound_tuner.training.members import MemberSchedules

# settings every member of a pack must share (the architecture and the training loop)
SHARED = ("model", "width", "layers", "channels", "steps", "batch_size", "t_min", "ema")

PackCallback = Callable[[int, int, nn.Module], None]  # (member, step, model); may raise
#: (step, every member's model at that step); may raise, which ends the whole pack
JointCallback = Callable[[int, list[nn.Module]], None]


class PackStopped(Exception):
    """A pack's training was stopped from outside (Ctrl-C or SIGTERM in another thread). Not a
    KeyboardInterrupt: whoever set the stop decides what it means (a worker that is stopping
    reads it as ``objectives.pack_stop.PackInterrupted``)."""


@dataclass
class PackMember:
    """One member's outcome: its trained model, schedule and losses, or the error that ended it."""

    model: nn.Module
    schedule: Schedule
    losses: list[float] | None = None
    error: BaseException | None = None
    terms: BoundTerms | None = None  # when measured with the pack (experiment.pack_terms)


def check_packable(cfgs: Sequence[DiffusionConfig]) -> None:
    """Raise ValueError (one line) when the configurations cannot train as one pack."""
    if not cfgs:
        raise ValueError("a pack needs at least one configuration")
    for name in SHARED:
        values = {getattr(c, name) for c in cfgs}
        if name == "model":  # factories by their names (None: the built-in networks)
            values = {"built-in" if v is None else factory_name(v) for v in values}
        if len(values) > 1:
            raise ValueError(
                f"a pack's members must share {name} (got {sorted(values)}); fix {name} in "
                "[training] or search it without packing"
            )


class _Pack:
    """The stacked state of the members still training: parameters, Adam moments, settings."""

    def __init__(self, models, cfgs, schedules, draws, device, dtype, sizes) -> None:
        self.members = list(range(len(models)))
        self.sizes = sizes  # each member's number of training points
        self.models, self.cfgs, self.schedules, self.draws = models, cfgs, schedules, draws
        params, self.buffers = torch.func.stack_module_state(models)
        self.params = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
        self.exp_avg = {k: torch.zeros_like(v) for k, v in self.params.items()}
        self.exp_avg_sq = {k: torch.zeros_like(v) for k, v in self.params.items()}
        # the power-function average of each member's weights (training.loop, eq. 1.2b)
        ema = cfgs[0].ema
        self.gamma = ema_gamma(ema) if ema else None
        self.average = (
            None if self.gamma is None else {k: v.detach().clone() for k, v in self.params.items()}
        )
        self.device, self.dtype = device, dtype
        self._settings()

    def _settings(self) -> None:
        cfgs = [self.cfgs[j] for j in self.members]

        def col(values):
            return torch.tensor(values, dtype=torch.float64, device=self.device)

        self.T = col([c.T for c in cfgs])
        self.lam = col([c.lam for c in cfgs]).to(self.dtype)
        self.m = col([self.sizes[j] for j in self.members]).to(self.dtype)
        self.lr = col([c.lr for c in cfgs]).to(self.dtype)
        # rows of the history
        self.rows = torch.tensor(self.members, dtype=torch.long, device=self.device)
        self.coef = MemberSchedules([self.schedules[j] for j in self.members], self.device)

    def keep(self, rows: list[int]) -> None:
        """Keep the members at these rows of the stacked tensors (in order)."""
        if len(rows) == len(self.members):
            return
        r = torch.tensor(rows, dtype=torch.long, device=self.device)
        self.members = [self.members[i] for i in rows]
        self.params = {
            k: v.detach()[r].clone().requires_grad_(True) for k, v in self.params.items()
        }
        self.buffers = {k: v[r] for k, v in self.buffers.items()}
        self.exp_avg = {k: v[r] for k, v in self.exp_avg.items()}
        self.exp_avg_sq = {k: v[r] for k, v in self.exp_avg_sq.items()}
        if self.average is not None:
            self.average = {k: v[r] for k, v in self.average.items()}
        self._settings()

    def model_of(self, row: int) -> nn.Module:
        """The member at ``row`` as a module with its current weights: the average of its
        iterates when training averages them, else the last iterate."""
        model = self.models[self.members[row]]
        weights = self.params if self.average is None else self.average
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(weights[name][row])
        return model

    def update_average(self, step: int) -> None:
        """The average after update ``step`` (1-based), every member at once."""
        if self.average is not None:  # both dicts are keyed in the order of self.params
            ema_update(self.average.values(), self.params.values(), step=step, gamma=self.gamma)


def _adam_step(pack: _Pack, step: int) -> None:
    """One Adam step per member (torch.optim.Adam's update, each member with its own lr)."""
    b1, b2 = ADAM_BETAS
    bias1 = 1 - b1**step
    bias2_sqrt = math.sqrt(1 - b2**step)
    lr = pack.lr
    with torch.no_grad():
        for k, p in pack.params.items():
            g = p.grad
            pack.exp_avg[k].lerp_(g, 1 - b1)
            pack.exp_avg_sq[k].mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = (pack.exp_avg_sq[k].sqrt() / bias2_sqrt).add_(ADAM_EPS)
            size = (lr / bias1).view((-1,) + (1,) * (p.dim() - 1))
            p.addcdiv_(pack.exp_avg[k] * size, denom, value=-1.0)
            p.grad = None


def _clip(pack: _Pack, max_norm: float) -> None:
    """Scale each member's gradient to global norm at most max_norm (clip_grad_norm_'s rule)."""
    with torch.no_grad():
        sq = sum(p.grad.pow(2).reshape(p.shape[0], -1).sum(dim=1) for p in pack.params.values())
        coef = (max_norm / (sq.sqrt() + 1e-6)).clamp(max=1.0)
        for p in pack.params.values():
            p.grad.mul_(coef.view((-1,) + (1,) * (p.dim() - 1)))


def train_packed(
    train: torch.Tensor,
    cfgs: Sequence[DiffusionConfig],
    *,
    device: str | torch.device = DEFAULT_DEVICE,
    callback: PackCallback | None = None,
    callback_every: int = 0,
    progress: bool = False,
    stop: threading.Event | None = None,
    rows: Sequence[torch.Tensor | None] | None = None,
    joint: JointCallback | None = None,
) -> list[PackMember]:
    """Train one score model per configuration on ``train``, all at once; see the module doc.

    ``callback(member, step, model)`` runs every ``callback_every`` steps for each member still
    training; an exception from it (optuna.TrialPruned, or any other) ends that member, whose
    PackMember then carries the error. A NaN or infinite loss ends a member with
    FloatingPointError at the next checkpoint or at the end. Setting ``stop`` ends training with
    PackStopped at the next step. ``rows[j]`` (K-fold references, docs/theory.md 2.9) restricts
    member j to those rows of ``train``: its batches are drawn among them and its regularizer
    counts their number as m. Returns the members in order.

    ``joint(step, models)`` makes the pack one unit (a model and its K-fold references trained
    in lockstep, docs/theory.md 2.12): every ``callback_every`` steps and at the end it gets
    every member's model as it is at that step, in order; an exception from it, or a member's
    non-finite loss (FloatingPointError), ends training and propagates.
    """
    check_packable(cfgs)
    device = resolve_device(device)
    if device.type == "cuda":
        set_tf32(cfgs[0].tf32)
    x = train.to(device)
    m = x.shape[0]
    models, schedules, draws = [], [], []
    first = cfgs[0]
    b = min(first.batch_size, m)
    rows = list(rows) if rows is not None else [None] * len(cfgs)
    if len(rows) != len(cfgs):
        raise ValueError(f"{len(rows)} row sets for {len(cfgs)} configurations")
    sizes = [m if r is None else r.numel() for r in rows]
    for c, r in zip(cfgs, rows, strict=True):
        if c.lam < 0:
            raise ValueError(f"lam={c.lam} must be >= 0")
        model, sched = initial_model(c, x)  # the initialization of training it alone
        models.append(model)
        schedules.append(sched)
        draws.append(
            StepDraws(
                m=m,
                batch=b,
                shape=tuple(x.shape[1:]),
                steps=c.steps,
                T=c.T,
                t_min=c.t_min,
                generator=generator_for(device, c.seed),
                dtype=x.dtype,
                rows=None if r is None else r.to(device),
            )
        )
    out = [PackMember(mod, s) for mod, s in zip(models, schedules, strict=True)]
    pack = _Pack(models, cfgs, schedules, draws, device, x.dtype, sizes)
    base = copy.deepcopy(models[0]).to("meta")

    def one(params, buffers, xt, t):
        return torch.func.functional_call(base, (params, buffers), (xt, t))

    forward = torch.func.vmap(one)
    steps, t_min = first.steps, first.t_min
    history = torch.empty(len(cfgs), steps, dtype=x.dtype, device=device)
    chunk = draws[0].chunk
    shape1 = (1,) * (x.dim() - 1)
    # no bar object without progress: tqdm makes a process-wide lock (a semaphore) on its first
    # bar, which a worker killed mid-trial would leave behind
    steps_iter = (
        tqdm(range(steps), desc=f"train pack of {len(cfgs)}", leave=False)
        if progress
        else range(steps)
    )
    for step in steps_iter:
        if stop is not None and stop.is_set():
            raise PackStopped("the pack was stopped")
        k = step % chunk
        if k == 0:  # each member draws its chunk from its own generator
            parts = [pack.draws[j].draw_chunk(step) for j in pack.members]
            idx_c, t_c, eps_c = (torch.stack(z) for z in zip(*parts, strict=True))
            coef_c = [c.to(x.dtype) for c in pack.coef.coefficients(t_c)]
        idx, t, eps = idx_c[:, k], t_c[:, k], eps_c[:, k]
        alpha, sigma2, beta = (c[:, k] for c in coef_c)
        xt = alpha.view(*alpha.shape, *shape1) * x[idx]
        xt = xt + sigma2.sqrt().view(*alpha.shape, *shape1) * eps
        eps_hat = forward(pack.params, pack.buffers, xt, t.to(x.dtype))
        flat = (eps_hat.shape[0], eps_hat.shape[1], -1)
        loss = 0.5 * (eps_hat - eps).pow(2).reshape(flat).sum(dim=2)
        total = loss.mean(dim=1)
        wsq = beta * eps_hat.pow(2).reshape(flat).sum(dim=2) / sigma2
        s = generator_surrogate(wsq, T=pack.T.to(x.dtype), m=pack.m, t_min=t_min)
        total = total + torch.where(pack.lam > 0, pack.lam * s, torch.zeros_like(s))
        history[pack.rows, step] = total.detach()
        total.sum().backward()
        _clip(pack, GRAD_CLIP)
        _adam_step(pack, step + 1)
        pack.update_average(step + 1)
        last = step + 1 == steps
        due = bool(callback_every) and (step + 1) % callback_every == 0
        if joint is not None and (last or due):
            if not bool(torch.isfinite(history[:, : step + 1]).all()):  # one host sync
                for j in pack.members:
                    check_finite(history[j], step + 1)
            joint(step + 1, [pack.model_of(row) for row in range(len(pack.members))])
        if last or (callback is not None and due):
            kept = _checkpoint(pack, out, history, step + 1, callback if not last else None)
            if not pack.members:
                break
            r = torch.tensor(kept, dtype=torch.long, device=device)
            idx_c, t_c, eps_c = idx_c[r], t_c[r], eps_c[r]  # the chunk's draws of those kept
            coef_c = [c[r] for c in coef_c]
    for row in range(len(pack.members)):
        j = pack.members[row]
        pack.model_of(row)
        out[j].losses = history[j].tolist()
    return out


def _checkpoint(pack: _Pack, out: list[PackMember], history, upto: int, callback) -> list[int]:
    """Drop members with a non-finite loss so far, then call back the rest (one host sync).
    Returns the rows of the stacked tensors that were kept."""
    finite = torch.isfinite(history[:, :upto]).all(dim=1).tolist()
    keep = []
    for row, j in enumerate(pack.members):
        if not finite[j]:
            bad = int((~torch.isfinite(history[j, :upto])).nonzero()[0, 0])
            out[j].error = FloatingPointError(
                f"training loss became {float(history[j, bad])} at step {bad}"
            )
            continue
        if callback is not None:
            try:
                callback(j, upto, pack.model_of(row))
            except Exception as e:  # pruned or failed: this member ends, the others go on
                out[j].error = e
                continue
        keep.append(row)
    pack.keep(keep)
    return keep
