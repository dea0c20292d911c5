"""Training a trial's score network and the reference models of its bound (split halves,
K folds), alone or as one vmapped pack."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch
from torch import nn

from bound_tuner.maths.bounds.kfold import fold_assignment, fold_rows, folds_for
from bound_tuner.maths.sde import Schedule
from bound_tuner.runtime.device import DEFAULT_DEVICE, resolve_device, set_tf32
from bound_tuner.training.config import DiffusionConfig, TrainFn, initial_model, pack_refusal
from bound_tuner.training.loop import train_score_model
from bound_tuner.training.pack import train_packed


def train_model(
    train: torch.Tensor,
    cfg: DiffusionConfig,
    *,
    device: str | torch.device = DEFAULT_DEVICE,
    checkpoint: Callable[[int, nn.Module], None] | None = None,
    checkpoint_every: int = 0,
    progress: bool = False,
) -> tuple[nn.Module, Schedule, list[float]]:
    """Build and train cfg's score model on ``train``; returns (model, schedule, losses).

    ``device`` "auto" is CUDA when present, else the CPU; on CUDA, cfg.tf32 sets the float32
    matmul precision (``bound_tuner.runtime.device.set_tf32``). With cfg.compile the training steps run
    through ``torch.compile`` (the returned model is the plain module, with the trained weights)."""
    device = resolve_device(device)
    if device.type == "cuda":
        set_tf32(cfg.tf32)
    x = train.to(device)
    model, schedule = initial_model(cfg, x)
    losses = train_score_model(
        torch.compile(model) if cfg.compile else model,
        x,
        schedule,
        T=cfg.T,
        steps=cfg.steps,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        lam=cfg.lam,
        t_min=cfg.t_min,
        seed=cfg.seed,
        ema=cfg.ema,
        callback=checkpoint,
        callback_every=checkpoint_every,
        progress=progress,
    )
    return model, schedule, losses


def train_split_models(
    train: torch.Tensor,
    cfg: DiffusionConfig,
    *,
    device: str | torch.device = DEFAULT_DEVICE,
    train_fn: TrainFn | None = None,
) -> tuple[list[nn.Module], list[int]]:
    """The two reference models of the "elbo-split" bound (docs/theory.md eq. 2.8): the training
    set is split in two halves by a permutation from cfg.seed, and a model with cfg's settings is
    trained on each half (full batch stays full batch); with ``train_fn``, ``train_fn(half)``
    trains it instead. Returns the models and the half sizes, in the order (first half, second
    half)."""
    m = train.shape[0]
    if m < 4:
        raise ValueError(f'the "elbo-split" bound needs at least 4 training points, got m={m}')
    perm = torch.randperm(m, generator=torch.Generator().manual_seed(cfg.seed + 7))
    halves = (perm[: m // 2], perm[m // 2 :])
    if train_fn is not None:
        return [_user_reference(train_fn, train[idx]) for idx in halves], [len(h) for h in halves]
    models = []
    for j, idx in enumerate(halves):
        sub = replace(cfg, seed=cfg.seed + 1 + j, batch_size=min(cfg.batch_size, len(idx)))
        model, _, _ = train_model(train[idx], sub, device=device)
        models.append(model)
    return models, [len(h) for h in halves]


def train_fold_models(
    train: torch.Tensor,
    cfg: DiffusionConfig,
    *,
    device: str | torch.device = DEFAULT_DEVICE,
    train_fn: TrainFn | None = None,
) -> tuple[list[nn.Module], torch.Tensor]:
    """The K references of "elbo-kfold" (docs/theory.md 2.9): the training set is cut into
    K folds (``folds_for``) by a permutation from cfg.eval_seed (the same folds for every trial of a
    study), and reference k is trained with cfg's settings, initialization and noise draws on
    the points outside fold k. The K references train at once as one vmapped pack, or one after
    another with the same draws when cfg.model cannot be packed (``pack_refusal``). With
    ``train_fn``, ``train_fn(points outside fold k)`` trains reference k instead (the user's own
    loop, ``bound_tuner.score``). Returns the models and the fold of each point."""

    k = folds_for(train.shape[0], cfg.folds)
    folds = fold_assignment(train.shape[0], k, seed=cfg.eval_seed + 7)
    rows = fold_rows(folds, k)
    if train_fn is not None:
        return [_user_reference(train_fn, train[r]) for r in rows], folds
    if pack_refusal(cfg, tuple(train.shape[1:])) is not None:
        return [_train_on_rows(train, cfg, r, device=device) for r in rows], folds
    members = train_packed(train, [cfg] * k, device=device, rows=rows)
    for mem in members:
        if mem.error is not None:
            raise mem.error
    return [mem.model for mem in members], folds


def _train_on_rows(
    train: torch.Tensor, cfg: DiffusionConfig, rows: torch.Tensor, *, device
) -> nn.Module:
    """One K-fold reference trained alone: ``train_packed``'s member with these rows (the same
    initialization, batch size and draws), for a module that cannot be packed."""
    device = resolve_device(device)
    x = train.to(device)
    model, schedule = initial_model(cfg, x)
    train_score_model(
        model,
        x,
        schedule,
        T=cfg.T,
        steps=cfg.steps,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        lam=cfg.lam,
        t_min=cfg.t_min,
        seed=cfg.seed,
        ema=cfg.ema,
        rows=rows.to(device),
    )
    return model


def _user_reference(train_fn: TrainFn, points: torch.Tensor) -> nn.Module:
    model = train_fn(points)
    if not isinstance(model, nn.Module):
        raise ValueError(
            f"train_fn returned {type(model).__name__}; it must return the trained model (an "
            "nn.Module predicting the noise from (x_t, t))"
        )
    return model
