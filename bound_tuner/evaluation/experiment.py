"""One diffusion experiment end to end: train (``bound_tuner.training.diffusion``), then score the
model with its bound (docs/theory.md, sections 2 and 3) and, in validation mode, held-out metrics."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from bound_tuner.evaluation.evaluate import (
    BoundTerms,
    bound_terms_members,
    diffusion_bound,
    draws_for,
    heldout_metrics,
    variant_report,
)
from bound_tuner.maths.bounds.diffusion import FOLD_VARIANTS, SPLIT_VARIANTS
from bound_tuner.maths.bounds.report import BoundReport
from bound_tuner.maths.sde import Schedule, get_schedule
from bound_tuner.models import model_device
from bound_tuner.runtime.device import DEFAULT_DEVICE
from bound_tuner.training.config import DiffusionConfig, TrainFn
from bound_tuner.training.diffusion import train_fold_models, train_model, train_split_models
from bound_tuner.training.members import Members


@dataclass
class DiffusionResult:
    report: BoundReport
    heldout: dict[str, float]
    model: nn.Module
    losses: list[float]


def run_diffusion(
    train: torch.Tensor,
    cfg: DiffusionConfig,
    *,
    test: torch.Tensor | None = None,
    validation: bool = False,
    device: str | torch.device = DEFAULT_DEVICE,
    checkpoint: Callable[[int, nn.Module], None] | None = None,
    checkpoint_every: int = 0,
    progress: bool = False,
) -> DiffusionResult:
    """Train a score model on ``train`` at cfg.T, compute its bound and (optionally) held-out metrics."""
    if validation and test is None:
        raise ValueError("validation mode needs a test set; give test=...")
    model, schedule, losses = train_model(
        train,
        cfg,
        device=device,
        checkpoint=checkpoint,
        checkpoint_every=checkpoint_every,
        progress=progress,
    )
    return score_model(
        model, schedule, losses, train, cfg, test=test, validation=validation, device=device
    )


def score_model(
    model: nn.Module,
    schedule: Schedule,
    losses: list[float],
    train: torch.Tensor,
    cfg: DiffusionConfig,
    *,
    test: torch.Tensor | None = None,
    validation: bool = False,
    device: str | torch.device = DEFAULT_DEVICE,
    terms: BoundTerms | None = None,
) -> DiffusionResult:
    """The bound (and, in validation mode, the held-out metrics) of a model trained with cfg on
    ``train``: the second half of ``run_diffusion``, also used for the members of a pack, whose
    bound terms may come measured (``pack_terms``)."""
    if terms is not None:
        report = variant_report(terms, variant=cfg.variant, R=cfg.R)
    else:
        report = bound_report(model, schedule, train, cfg, device=device)
    return _with_heldout(report, model, schedule, losses, cfg, test, validation)


def bound_report(
    model: nn.Module,
    schedule: Schedule,
    train: torch.Tensor,
    cfg: DiffusionConfig,
    *,
    device: str | torch.device = DEFAULT_DEVICE,
    train_fn: TrainFn | None = None,
) -> BoundReport:
    """The bound of cfg.variant (docs/theory.md section 2) for a model trained on ``train``, with
    cfg's bound settings and evaluation seed: trains the reference models the variant needs
    (eq. 2.8's halves, 2.9's K folds; with ``train_fn`` by the user's loop) and calls
    ``diffusion_bound``. A trial and ``bound_tuner.score`` both come here, so a model scored
    from outside gets the report its trial would."""
    split_models, fold_sizes, fold_models, folds = [], [], [], None
    if cfg.variant in SPLIT_VARIANTS:
        split_models, fold_sizes = train_split_models(train, cfg, device=device, train_fn=train_fn)
    if cfg.variant in FOLD_VARIANTS:
        fold_models, folds = train_fold_models(train, cfg, device=device, train_fn=train_fn)
    if train_fn is not None:  # the user's references on the model's device
        dev = model_device(model)
        split_models = [r.to(dev) for r in split_models]
        fold_models = [r.to(dev) for r in fold_models]
    return diffusion_bound(
        model,
        train,
        schedule,
        T=cfg.T,
        variant=cfg.variant,
        R=cfg.R,
        l_estimator=cfg.l_estimator,
        n_steps=cfg.n_steps,
        n_paths=cfg.n_paths,
        mc_samples=cfg.mix_draws,
        train_draws=draws_for(train.shape[0], cfg.train_draws),
        t_min=cfg.t_min,
        seed=cfg.eval_seed,
        split_models=split_models,
        fold_sizes=fold_sizes,
        fold_models=fold_models,
        folds=folds,
    )


def _with_heldout(report, model, schedule, losses, cfg, test, validation) -> DiffusionResult:
    heldout: dict[str, float] = {}
    if validation:
        heldout = heldout_metrics(
            model,
            schedule,
            T=cfg.T,
            test=test,
            n_generated=cfg.heldout_n_generated,
            n_steps=cfg.heldout_n_steps,
            t_min=cfg.t_min,
            seed=cfg.seed,
        )
    return DiffusionResult(report, heldout, model, losses)


# variants whose terms a pack measures for all its members at once (``pack_terms``)
PACKED_VARIANTS = ("elbo", "elbo-encoder")


# bound settings the members of a pack must share to be measured at once
_MEASURE = ("variant", "l_estimator", "n_steps", "n_paths", "mix_draws", "train_draws", "t_min")


def pack_terms(
    models: Sequence[nn.Module], cfgs: Sequence[DiffusionConfig], train: torch.Tensor
) -> list[BoundTerms] | None:
    """The bound terms of trained pack members (one architecture), measured for all at once
    (``bound_tuner.training.members``); None when their variants or settings need them one by one."""
    if not models:
        return None
    first = cfgs[0]
    if first.variant not in PACKED_VARIANTS or any(
        getattr(c, k) != getattr(first, k) for c in cfgs for k in _MEASURE
    ):
        return None
    schedules = [get_schedule(c.schedule, **c.schedule_params) for c in cfgs]
    members = Members.of_models(models, schedules)
    return bound_terms_members(
        members,
        train,
        T=[c.T for c in cfgs],
        seeds=[c.eval_seed for c in cfgs],
        variants=(first.variant,),
        l_estimator=first.l_estimator,
        n_steps=first.n_steps,
        n_paths=first.n_paths,
        mc_samples=first.mix_draws,
        train_draws=draws_for(train.shape[0], first.train_draws),
        t_min=first.t_min,
    )
