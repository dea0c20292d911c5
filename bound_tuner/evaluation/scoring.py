"""The bound of a model trained elsewhere: ``bound_tuner.score`` (docs/own_models.md).

A trial trains its model and then computes its bound (docs/theory.md section 2) with
``experiment.bound_report``; ``score`` runs the same function on a model you trained with your
own loop, so it returns the report a trial would record for those weights (every term, their
contributions, the settings and, where the variant has one, the 95% certificate
``extras["total_upper95"]``). No Optuna here: call it from your own objective and return
``score(...).total``.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import nn

from bound_tuner.data import prepare_for
from bound_tuner.data.split import DataSplit
from bound_tuner.evaluation.experiment import bound_report
from bound_tuner.maths.bounds.diffusion import (
    DEFAULT_VARIANT,
    FOLD_VARIANTS,
    SPLIT_VARIANTS,
    check_variant,
)
from bound_tuner.maths.bounds.report import BoundReport
from bound_tuner.maths.sde import DiscreteSchedule, Schedule, get_schedule
from bound_tuner.models import model_device
from bound_tuner.models.diffusers_adapter import schedule_from_scheduler
from bound_tuner.training.config import DiffusionConfig, TrainFn

__all__ = ["score", "as_schedule"]


def as_schedule(schedule: Any, **params: float) -> Schedule:
    """A project schedule from ``schedule``: a ``Schedule`` (returned as it is), a schedule name
    with its parameters (``get_schedule``), or a diffusers scheduler with betas (a
    ``DDPMScheduler``; ``diffusers_adapter.schedule_from_scheduler``)."""
    if isinstance(schedule, Schedule):
        return schedule
    if isinstance(schedule, str):
        return get_schedule(schedule, **params)
    if hasattr(schedule, "betas") and hasattr(schedule, "config"):
        return schedule_from_scheduler(schedule)
    raise TypeError(
        f"schedule={type(schedule).__name__}: give a bound_tuner.maths.sde.Schedule, a schedule name "
        "(linear, cosine, constant) or a diffusers scheduler"
    )


def _train_points(train_data: Any) -> torch.Tensor:
    """The training points as the model saw them: a DataSplit's training set prepared for
    diffusion (as the objectives prepare it), or a tensor or array taken as it is."""

    if isinstance(train_data, DataSplit):
        return prepare_for(train_data, "diffusion").train
    x = torch.as_tensor(train_data)
    if x.dim() < 2 or x.shape[0] < 2:
        raise ValueError(
            f"train_data has shape {tuple(x.shape)}; give the m >= 2 training points as [m, d] "
            "or images [m, C, H, W]"
        )
    if not x.is_floating_point():
        x = x.float()
    if not bool(torch.isfinite(x).all()):
        raise ValueError("train_data has NaN or infinite values")
    return x


def score(
    model: nn.Module,
    train_data: Any,
    *,
    schedule: Any,
    T: float | None = None,
    variant: str = DEFAULT_VARIANT,
    train_fn: TrainFn | None = None,
    R: float | str | None = None,
    l_estimator: str | None = None,
    n_steps: int | None = None,
    n_paths: int | None = None,
    mix_draws: int | None = None,
    train_draws: int | None = None,
    folds: int | None = None,
    t_min: float | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
) -> BoundReport:
    """The bound of ``variant`` (docs/theory.md section 2) for a model trained elsewhere.

    Args:
        model: an eps-predicting module, ``model(x_t [b, ...], t [b]) -> eps`` with t the absolute
            time of ``schedule`` (a diffusers ``UNet2DModel``: wrap it with
            ``bound_tuner.models.diffusers_adapter.unet_eps``).
        train_data: the m training points the model was trained on, as it saw them (a tensor or
            array; images as bin centres in [-1, 1], docs/theory.md 1.3), or a ``DataSplit``
            (its training set, prepared for diffusion as the objectives do).
        schedule: the forward process it was trained with (``as_schedule``: a Schedule, a
            name, or a diffusers scheduler, whose discrete betas become a VP process on [0, 1],
            docs/theory.md section 8).
        T: the diffusion time it was trained up to; None takes 1 for a discrete schedule (its
            whole process) and is an error otherwise.
        variant: the bound (default "elbo-kfold", eq. 2.11). "elbo-kfold" and "elbo-split"
            compare the model with reference models trained without some of the points: they
            need ``train_fn``.
        train_fn: ``train_fn(points) -> model`` trains one reference on a subset of the
            training points with your own loop, the same settings and the same seed as the model
            (eq. 2.9's references share its initialization and noise); called K times for
            "elbo-kfold" (the points outside each fold), twice for "elbo-split".
        R, l_estimator, n_steps, n_paths, mix_draws, train_draws, folds, t_min: the bound's
            settings, named as the fields of ``experiment.DiffusionConfig`` (None: a trial's
            default; t_min: 1/N for a discrete schedule of N steps, else 1e-3).
        seed: the evaluation seed (a study's seed: the draws, generator paths and folds).
        device: where to run (None: the model's device).

    Returns the ``BoundReport`` a trial records: ``total``, ``terms``, ``contributions``,
    ``settings`` and ``extras`` (``total_upper95``, the 95% certificate, where the variant has
    one).
    """
    check_variant(variant)
    sched = as_schedule(schedule)
    needs_refs = variant in FOLD_VARIANTS or variant in SPLIT_VARIANTS
    if needs_refs and train_fn is None:
        raise ValueError(
            f"variant {variant!r} compares the model with reference models trained on subsets "
            'of the data; give train_fn=... (your loop on a subset), or variant="elbo"'
        )
    discrete = isinstance(sched, DiscreteSchedule)
    if T is None:
        if not discrete:
            raise ValueError(
                f"give T, the diffusion time the model was trained up to ({sched.name} schedule)"
            )
        T = 1.0
    if t_min is None:
        t_min = 1.0 / sched.steps if discrete else DiffusionConfig.t_min
    given = {
        "R": R,
        "l_estimator": l_estimator,
        "n_steps": n_steps,
        "n_paths": n_paths,
        "mix_draws": mix_draws,
        "train_draws": train_draws,
        "folds": folds,
    }
    cfg = replace(
        DiffusionConfig(),
        T=float(T),
        t_min=float(t_min),
        variant=variant,
        schedule=sched.name,
        schedule_params=dict(sched.params()),
        seed=seed,
        eval_seed=seed,
        **{k: v for k, v in given.items() if v is not None},
    )
    sched.check_T(cfg.T, t_min=cfg.t_min)
    dev = torch.device(device) if device is not None else model_device(model)
    model = model.to(dev)
    x = _train_points(train_data).to(dev)
    return bound_report(model, sched, x, cfg, device=dev, train_fn=train_fn)
