"""The certificate along training and certified early stopping (docs/theory.md 2.12).

The model and its K fold references train in lockstep, as one pack of K + 1 with the same seed
and steps (the model on every point, reference k on the points outside fold k;
``bound_tuner.training.pack``). At each checkpoint the value of eq. 2.11 therefore exists for
the model as it is at that step: its training NELBO plus its references' generalization gap at
the same step, plus a margin of standard errors, on the study's evaluation draws. Trained to the
end, the model and references are those of training them one after the other, so the final
step's value is the default's.

With early stopping the trial keeps the step of the smallest value and its weights. Choosing the
smallest of C values is paid for in the margin: z = ``kfold.checkpoint_z(C)`` instead of 2 at
every step (Bonferroni, eq. 2.12), so the kept value is a certificate of the kept step.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch
from torch import nn

from bound_tuner.evaluation.checkpoints import (
    BestCheckpoint,
    Report,
    checkpoint_count,
    checkpoint_every,
)
from bound_tuner.evaluation.diffusion_bound import draws_for, nelbo_terms
from bound_tuner.maths.bounds.diffusion import certified_value
from bound_tuner.maths.bounds.kfold import (
    CV_Z,
    checkpoint_z,
    fold_assignment,
    fold_rows,
    folds_for,
)
from bound_tuner.maths.sde import Schedule, get_schedule
from bound_tuner.runtime.device import DEFAULT_DEVICE, resolve_device, set_tf32
from bound_tuner.training.config import DiffusionConfig
from bound_tuner.training.members import Members
from bound_tuner.training.pack import train_packed


@dataclass
class CertifiedTraining:
    """A model trained with its references in lockstep, at the step it keeps.

    ``model`` and ``references`` hold the weights of ``step`` (the last step without early
    stopping), ``curve`` the value (eq. 2.11 with margin ``z``) at every checkpoint evaluated,
    ``losses`` the model's training loss at every step trained."""

    model: nn.Module
    references: list[nn.Module]
    folds: torch.Tensor
    schedule: Schedule
    losses: list[float]
    step: int
    z: float
    curve: list[tuple[int, float]] = field(default_factory=list)


def value_parts(
    model: nn.Module,
    references: list[nn.Module],
    x: torch.Tensor,
    schedule: Schedule,
    folds: torch.Tensor,
    cfg: DiffusionConfig,
) -> dict[str, float]:
    """The parts of eq. 2.11 for a model and its references as they are (``train_nelbo``,
    ``cv_nelbo``, ``cv_se``, ``refs_train_nelbo``): the evaluation passes of the final bound
    (``diffusion_bound.nelbo_terms``, the same draws), without the generator paths, which only the
    recorded information form needs."""
    nelbo, fold = nelbo_terms(
        Members.single(model, schedule),
        x,
        T=[cfg.T],
        seeds=[cfg.eval_seed],
        draws=draws_for(x.shape[0], cfg.train_draws),
        t_min=cfg.t_min,
        fold_refs=Members.of_models(references, [schedule] * len(references)),
        folds=folds,
    )
    return {
        "train_nelbo": nelbo[0].mean,
        "cv_nelbo": fold["cv_nelbo"],
        "cv_se": fold["cv_se"],
        "refs_train_nelbo": fold["refs_train_nelbo"],
    }


def value_at(
    model: nn.Module,
    references: list[nn.Module],
    x: torch.Tensor,
    schedule: Schedule,
    folds: torch.Tensor,
    cfg: DiffusionConfig,
    *,
    z: float = CV_Z,
) -> float:
    """The value of eq. 2.11 (margin z se_cv) for a model and its references as they are."""
    return certified_value(**value_parts(model, references, x, schedule, folds, cfg), z=z)


def train_certified(
    train: torch.Tensor,
    cfg: DiffusionConfig,
    *,
    checkpoints: int,
    early_stop: bool,
    device: str | torch.device = DEFAULT_DEVICE,
    report: Report | None = None,
    progress: bool = False,
    stop: threading.Event | None = None,
) -> CertifiedTraining:
    """Train cfg's model and its K-fold references (docs/theory.md 2.9) as one lockstep pack and
    compute the value of eq. 2.11 at ``checkpoints`` evenly spaced steps and the last one;
    ``report`` gets each (the smallest so far with ``early_stop``). With ``early_stop`` the
    weights of the step with the smallest value are kept and every value carries the margin of
    eq. 2.12; without it, the last step's, with the margin of one step. The folds are the
    study's (cfg.eval_seed), as for references trained after the model. Setting ``stop`` ends
    training with ``training.pack.PackStopped`` at the next step (a worker that is stopping)."""
    device = resolve_device(device)
    if device.type == "cuda":
        set_tf32(cfg.tf32)
    x = train.to(device)
    m = x.shape[0]
    k = folds_for(m, cfg.folds)
    folds = fold_assignment(m, k, seed=cfg.eval_seed + 7)
    schedule = get_schedule(cfg.schedule, **cfg.schedule_params)
    every = checkpoint_every(cfg.steps, checkpoints)
    z = checkpoint_z(checkpoint_count(cfg.steps, every)) if early_stop else CV_Z
    curve: list[tuple[int, float]] = []
    kept = BestCheckpoint(early_stop=early_stop, report=report)

    def at_checkpoint(step: int, models: list[nn.Module]) -> None:
        value = value_at(models[0], models[1:], x, schedule, folds, cfg, z=z)
        curve.append((step, value))
        kept.see(step, value, models)
        for mod in models:
            mod.train()

    members = train_packed(
        x,
        [cfg] * (k + 1),
        device=device,
        rows=[None, *fold_rows(folds, k)],
        joint=at_checkpoint,
        callback_every=every,
        progress=progress,
        stop=stop,
    )
    models = [mem.model for mem in members]
    step = kept.restore(models)
    if step is None:  # no early stopping: the last step's weights
        step = cfg.steps
    for mod in models:
        mod.eval()
    return CertifiedTraining(
        model=models[0],
        references=models[1:],
        folds=folds,
        schedule=schedule,
        losses=members[0].losses,
        step=step,
        z=z,
        curve=curve,
    )
