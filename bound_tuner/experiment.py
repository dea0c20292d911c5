"""One diffusion experiment: train a score model at a given T and compute its bound.

This is the unit of work of every study: the Optuna objective, the T sweep and the examples call
``run_diffusion`` with a ``DiffusionConfig``. No Optuna here.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn

from .bounds.diffusion import DEFAULT_VARIANT, FOLD_VARIANTS, SPLIT_VARIANTS
from .bounds.kfold import fold_assignment, fold_rows, folds_for
from .bounds.report import BoundReport
from .device import DEFAULT_DEVICE, DEFAULT_TF32, resolve_device, set_tf32
from .evaluate import (
    BoundTerms,
    bound_terms_members,
    diffusion_bound,
    draws_for,
    heldout_metrics,
    variant_report,
)
from .members import Members
from .models import DEFAULT_CHANNELS, build_score_model, model_device
from .models.factory import build_from_factory, factory_name, vmap_error
from .sde import Schedule, get_schedule
from .seeding import seed_everything
from .training import train_score_model

#: ``train_fn(points) -> trained model``: a reference model trained by the user's own loop on a
#: subset of the training points (``bound_tuner.score``, docs/own_models.md)
TrainFn = Callable[[torch.Tensor], nn.Module]


@dataclass
class DiffusionConfig:
    """Everything that defines one trained model and its bound."""

    T: float = 1.0
    schedule: str = "linear"
    schedule_params: dict[str, float] = field(default_factory=dict)
    lam: float = 0.0
    lr: float = 2e-3
    width: int = 128  # hidden units of the MLP for point data
    layers: int = 3  # hidden layers of the MLP for point data
    channels: int = DEFAULT_CHANNELS  # base channels of the UNet for images
    steps: int = 3000
    batch_size: int = 256
    t_min: float = 1e-3
    # bound settings
    variant: str = DEFAULT_VARIANT
    R: float | str | None = None  # a number, "estimate", "data", or None: the variant's default
    l_estimator: str = "path-mean"
    n_steps: int = 500
    n_paths: int = 256
    mix_draws: int = 1  # draws per point of the mixture KL C_mix (the paper's k)
    # draws per training point of the evaluation pass (NELBO or DSM); None: evaluate.draws_for(m)
    train_draws: int | None = None
    # K of the K-fold references ("elbo-kfold", docs/theory.md 2.9); None: bounds.kfold.folds_for
    folds: int | None = None
    # the evaluation draws (NELBO, generator paths, folds): fixed per study, not per trial, so
    # that two trials differ only by their models (common random numbers)
    eval_seed: int = 0
    # held-out metrics (validation mode only)
    heldout_n_generated: int | None = None  # None: evaluate.HELDOUT_DEFAULTS for the data's kind
    heldout_n_steps: int | None = None
    seed: int = 0
    tf32: bool = DEFAULT_TF32  # TF32 matmuls on CUDA
    compile: bool = False  # train through torch.compile (pays for the image UNet on a GPU)
    # the score network: None for the built-in MLP (points) or UNet (images); else a factory
    # ``factory(config, data_shape) -> nn.Module`` or its name "package.module:function"
    # (``bound_tuner.models.factory``; docs/own_models.md)
    model: Any = None

    def to_dict(self) -> dict:
        """The settings as plain values; a factory appears as its import name."""
        out = asdict(replace(self, model=None))
        out["model"] = None if self.model is None else factory_name(self.model)
        return out


_INIT_LOCK = threading.Lock()


@dataclass
class DiffusionResult:
    report: BoundReport
    heldout: dict[str, float]
    model: nn.Module
    losses: list[float]


def initial_model(cfg: DiffusionConfig, x: torch.Tensor) -> tuple[nn.Module, Schedule]:
    """cfg's freshly initialized score model (seeded by cfg.seed) on x's device and dtype, and its
    schedule, checked at cfg.T: the start of training alone and in a pack."""
    schedule = get_schedule(cfg.schedule, **cfg.schedule_params)
    schedule.check_T(cfg.T, t_min=cfg.t_min)
    return build_initial(cfg, tuple(x.shape[1:])).to(x.device, x.dtype), schedule


def build_initial(cfg: DiffusionConfig, data_shape: tuple[int, ...]) -> nn.Module:
    """cfg's freshly initialized score network for points of ``data_shape`` (on the CPU): the
    built-in MLP or UNet, or cfg.model's (``factory(cfg, data_shape)``), seeded by cfg.seed."""
    with _INIT_LOCK:  # the global RNG seeds the weights: one thread at a time (packs, references)
        seed_everything(cfg.seed)
        if cfg.model is not None:
            return build_from_factory(cfg.model, cfg, data_shape)
        return build_score_model(
            data_shape, width=cfg.width, layers=cfg.layers, channels=cfg.channels
        )


def pack_refusal(cfg: DiffusionConfig, data_shape: tuple[int, ...]) -> str | None:
    """Why cfg's score network cannot train in a vmapped pack (None: it can; the built-in
    networks always can). A user's module is tried once through ``torch.func``
    (``models.factory.vmap_error``)."""
    if cfg.model is None:
        return None
    return vmap_error(build_initial(cfg, data_shape), data_shape)


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
    matmul precision (``bound_tuner.device.set_tf32``). With cfg.compile the training steps run
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
    from .pack import train_packed  # pack imports this module (DiffusionConfig, initial_model)

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
    (``bound_tuner.members``); None when their variants or settings need them one by one."""
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
