"""The VAE's certificate along training and certified early stopping (docs/theory.md 2.12, 5.4).

The VAE and its K fold references train in lockstep, one epoch of each in turn
(``training.vae.train_vaes_lockstep``): the model on every point, reference k on the points
outside fold k, each with the trial's seed, initialization and settings. At each checkpoint
epoch the "elbo-kfold" value of eq. 5.4 (the assembly of eq. 2.11) therefore exists for the
model as it is at that epoch. Trained to the end, the model and references are those of
training the model, then ``train_fold_vaes``: the last epoch's value is the default's.

With early stopping the trial keeps the epoch of the smallest value and its weights, and every
value carries the margin z = ``kfold.checkpoint_z(C)`` of eq. 2.12 instead of 2, so the kept
value is a certificate of the kept epoch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from bound_tuner.evaluation.checkpoints import (
    BestCheckpoint,
    Report,
    checkpoint_count,
    checkpoint_every,
)
from bound_tuner.evaluation.vae_bound import vae_kfold_bound
from bound_tuner.maths.bounds.kfold import CV_Z, checkpoint_z, fold_rows
from bound_tuner.maths.bounds.report import BoundReport
from bound_tuner.training.vae import train_vaes_lockstep


@dataclass
class CertifiedVAE:
    """A VAE trained with its references in lockstep, at the epoch it keeps.

    ``model`` and ``references`` hold the weights of ``epoch`` (the last without early
    stopping), ``curve`` the value (eq. 5.4 with margin ``z``) at every checkpoint evaluated and
    ``reports`` its full bound there, ``history`` the model's rows of ``train_vae``."""

    model: nn.Module
    references: list[nn.Module]
    folds: torch.Tensor
    history: list[dict[str, float]]
    epoch: int
    epochs_trained: int
    z: float
    curve: list[tuple[int, float]] = field(default_factory=list)
    reports: list[BoundReport] = field(default_factory=list)


def train_vae_certified(
    model: nn.Module,
    build: Callable[[], nn.Module],
    train_x: torch.Tensor,
    folds: torch.Tensor,
    *,
    epochs: int,
    seed: int,
    checkpoints: int,
    early_stop: bool,
    eval_seed: int = 0,
    eval_batch_size: int = 1024,
    test_x: torch.Tensor | None = None,
    report: Report | None = None,
    callback: Callable[[int, nn.Module], None] | None = None,
    **train_kwargs,
) -> CertifiedVAE:
    """Train ``model`` on ``train_x`` and its K references (reference k built by ``build``
    after seeding torch with ``seed``, on the points outside fold k of ``folds``) in lockstep
    for ``epochs`` with ``train_vae``'s other keywords, and compute the value of eq. 5.4 at
    ``checkpoints`` evenly spaced epochs and the last (``vae_kfold_bound`` with ``eval_seed``'s
    draws, and the test extras with ``test_x``); ``report(epoch, value)`` gets each (the
    smallest so far with ``early_stop``). With ``early_stop`` the weights of the epoch with the
    smallest value are restored at the end and every value carries the margin of eq. 2.12;
    without it, the last epoch's, with the margin of one epoch. ``callback(epoch, model)`` runs
    after every epoch, before the checkpoint (``train_vae``'s callback)."""
    k = int(folds.max()) + 1
    references = []
    for _ in range(k):  # each from the model's initialization, as train_fold_vaes builds them
        torch.manual_seed(seed)
        references.append(build())
    every = checkpoint_every(epochs, checkpoints)
    z = checkpoint_z(checkpoint_count(epochs, every)) if early_stop else CV_Z
    run = CertifiedVAE(model, references, folds, [], epochs, epochs, z)
    kept = BestCheckpoint(early_stop=early_stop, report=report)

    def at_epoch(epoch: int, models: list[nn.Module]) -> None:
        if callback is not None:
            callback(epoch, models[0])
        if not (epoch == epochs or (every > 0 and epoch % every == 0)):
            return
        rep = vae_kfold_bound(
            models[0],
            models[1:],
            train_x,
            folds,
            test_x=test_x,
            seed=eval_seed,
            batch_size=eval_batch_size,
            z=z,
        )
        run.curve.append((epoch, rep.total))
        run.reports.append(rep)
        kept.see(epoch, rep.total, models)

    histories = train_vaes_lockstep(
        [model, *references],
        [train_x, *(train_x[rows] for rows in fold_rows(folds, k))],
        epochs=epochs,
        seed=seed,
        callback=at_epoch,
        **train_kwargs,
    )
    run.history = histories[0]
    epoch = kept.restore([model, *references])
    run.epoch = epochs if epoch is None else epoch
    return run
