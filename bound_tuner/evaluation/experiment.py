"""One diffusion experiment end to end: train (``bound_tuner.training.diffusion``), then score the
model with its bound (docs/theory.md, sections 2 and 3) and, in validation mode, held-out metrics."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from bound_tuner.evaluation.along_training import train_certified
from bound_tuner.evaluation.checkpoints import DEFAULT_EARLY_STOP, Report
from bound_tuner.evaluation.diffusion_bound import bound_terms_members, diffusion_bound, draws_for
from bound_tuner.evaluation.heldout import heldout_metrics
from bound_tuner.maths.bounds.diffusion import FOLD_VARIANTS, SPLIT_VARIANTS
from bound_tuner.maths.bounds.report import BoundReport
from bound_tuner.maths.bounds.terms import BoundTerms
from bound_tuner.maths.bounds.variants import variant_report
from bound_tuner.maths.sde import Schedule, get_schedule
from bound_tuner.models import model_device
from bound_tuner.runtime.device import DEFAULT_DEVICE
from bound_tuner.training.config import DiffusionConfig, TrainFn, pack_refusal
from bound_tuner.training.diffusion import train_fold_models, train_model, train_split_models
from bound_tuner.training.members import Members


@dataclass
class DiffusionResult:
    """A trained model with its bound: ``curve`` holds the value at every checkpoint of a model
    trained with its references in lockstep (``along_training``; (step, value) pairs), empty
    otherwise; the report's ``extras["step"]`` names the step whose weights ``model`` holds."""

    report: BoundReport
    heldout: dict[str, float]
    model: nn.Module
    losses: list[float]
    curve: list[tuple[int, float]] = field(default_factory=list)


def run_diffusion(
    train: torch.Tensor,
    cfg: DiffusionConfig,
    *,
    test: torch.Tensor | None = None,
    validation: bool = False,
    device: str | torch.device = DEFAULT_DEVICE,
    checkpoint: Callable[[int, nn.Module], None] | None = None,
    checkpoint_every: int = 0,
    checkpoints: int = 0,
    report: Report | None = None,
    progress: bool = False,
    stop: threading.Event | None = None,
    together: bool | None = None,
) -> DiffusionResult:
    """Train a score model on ``train`` at cfg.T, compute its bound and (optionally) held-out metrics.

    "elbo-kfold" with a packable model trains the model and its references in lockstep
    (``along_training.train_certified``): the value is computed at ``checkpoints`` evenly spaced
    steps and the last, each passed to ``report``, and with cfg.early_stop the step of the
    smallest value is kept; setting ``stop`` ends that training (``PackStopped``). Other variants
    train the model alone, calling ``checkpoint(step, model)`` every ``checkpoint_every`` steps,
    then score it. ``together`` is ``lockstep(cfg, train)`` where the caller has decided it
    already (it tries a user's network through ``torch.func``); None: decided here."""
    if validation and test is None:
        raise ValueError("validation mode needs a test set; give test=...")
    if lockstep(cfg, train) if together is None else together:
        return _run_certified(
            train,
            cfg,
            test=test,
            validation=validation,
            device=device,
            checkpoints=checkpoints,
            report=report,
            progress=progress,
            stop=stop,
        )
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


def lockstep(cfg: DiffusionConfig, train: torch.Tensor) -> bool:
    """Whether cfg's model trains with its references in lockstep (docs/theory.md 2.12): the
    "elbo-kfold" variant with a network that can be packed."""
    return cfg.variant in FOLD_VARIANTS and pack_refusal(cfg, tuple(train.shape[1:])) is None


def _run_certified(train, cfg, *, test, validation, device, checkpoints, report, progress, stop):
    run = train_certified(
        train,
        cfg,
        checkpoints=checkpoints,
        early_stop=DEFAULT_EARLY_STOP["diffusion"] if cfg.early_stop is None else cfg.early_stop,
        device=device,
        report=report,
        progress=progress,
        stop=stop,
    )
    x = train.to(model_device(run.model))
    bound = _diffusion_bound(
        run.model, run.schedule, x, cfg, fold_models=run.references, folds=run.folds, cv_z=run.z
    )
    bound.extras.update(step=run.step, steps_trained=run.curve[-1][0] if run.curve else cfg.steps)
    out = _with_heldout(bound, run.model, run.schedule, run.losses, cfg, test, validation)
    out.curve = run.curve
    return out


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
    return _diffusion_bound(
        model,
        schedule,
        train,
        cfg,
        split_models=split_models,
        fold_sizes=fold_sizes,
        fold_models=fold_models,
        folds=folds,
    )


def _diffusion_bound(model, schedule, train, cfg, **references) -> BoundReport:
    """``diffusion_bound`` with cfg's bound settings and evaluation seed; ``references`` are
    the reference models and folds (and ``cv_z``) the variant needs."""
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
        **references,
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
