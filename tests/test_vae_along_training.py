"""The VAE's certificate along training and certified early stopping (docs/theory.md 2.12, 5.4)."""

from __future__ import annotations

from dataclasses import replace

import optuna
import pytest
import torch

from bound_tuner.config.schema import SpecError
from bound_tuner.data.split import DataSplit
from bound_tuner.evaluation.checkpoints import CURVE_ATTR
from bound_tuner.evaluation.vae_along_training import train_vae_certified
from bound_tuner.evaluation.vae_bound import vae_kfold_bound
from bound_tuner.maths.bounds.kfold import CV_Z, checkpoint_z, fold_assignment
from bound_tuner.maths.bounds.report import flat_attrs
from bound_tuner.models.vae import MLPVAE
from bound_tuner.objectives.vae import VAEConfig, VAEObjective
from bound_tuner.training.vae import train_fold_vaes, train_vae

M, D, K, SEED = 40, 64, 4, 3
# a memorizing regime in miniature: 40 points, small batches, a high learning rate
TRAIN = dict(batch_size=8, lr=3e-2, lam=0.5, seed=SEED)


def _data(seed: int = 0, m: int = M) -> torch.Tensor:
    """Binary points: noisy copies of 4 prototypes."""
    g = torch.Generator().manual_seed(seed)
    protos = (torch.rand(4, D, generator=g) < 0.3).float()
    x = protos[torch.randint(0, 4, (m,), generator=g)]
    return (x + (torch.rand(m, D, generator=g) < 0.1).float()) % 2


def _build() -> MLPVAE:
    return MLPVAE(input_dim=D, hidden=(64,), latent=8)


def _one_after_the_other(x: torch.Tensor, folds: torch.Tensor, epochs: int):
    """The model, then its references (``train_fold_vaes``): training before lockstep."""
    torch.manual_seed(SEED)
    model = _build()
    train_vae(model, x, epochs=epochs, **TRAIN)
    return model, train_fold_vaes(_build, x, folds, epochs=epochs, **TRAIN)


def _certified(x: torch.Tensor, folds: torch.Tensor, epochs: int, **kw):
    torch.manual_seed(SEED)
    return train_vae_certified(
        _build(), _build, x, folds, epochs=epochs, eval_seed=1, **TRAIN, **kw
    )


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.allclose(sa[k], sb[k], atol=1e-12) for k in sa)


def test_lockstep_vaes_are_those_of_training_one_after_the_other():
    """Trained to the end without early stopping, the lockstep model and references are those of
    training the model, then ``train_fold_vaes`` (float64): the last value is the default's."""
    x, folds = _data().double(), fold_assignment(M, K, seed=0)
    torch.set_default_dtype(torch.float64)
    try:
        run = _certified(x, folds, 6, checkpoints=2, early_stop=False)
        model, refs = _one_after_the_other(x, folds, 6)
        alone = vae_kfold_bound(model, refs, x, folds, seed=1)
    finally:
        torch.set_default_dtype(torch.float32)
    assert [e for e, _ in run.curve] == [2, 4, 6]
    assert run.epoch == run.epochs_trained == 6 and run.z == CV_Z
    assert _same_weights(run.model, model)
    assert all(_same_weights(a, b) for a, b in zip(run.references, refs, strict=True))
    assert run.curve[-1][1] == pytest.approx(alone.total, rel=1e-9)
    assert len(run.history) == 6 and [h["epoch"] for h in run.history] == [1, 2, 3, 4, 5, 6]
    # the checkpoints saw different models
    assert len({round(v, 6) for _, v in run.curve}) == 3


def test_early_stopping_keeps_the_weights_and_value_of_the_smallest_epoch():
    """The kept epoch is the curve's argmin; its weights and value are those of training the
    model and references for that many epochs, with the margin z_C of eq. 2.12."""
    x, folds = _data(), fold_assignment(M, K, seed=0)
    run = _certified(x, folds, 16, checkpoints=7, early_stop=True)
    epochs, values = zip(*run.curve, strict=True)
    assert list(epochs) == [2, 4, 6, 8, 10, 12, 14, 16]  # C = 8 checkpoints
    assert run.z == pytest.approx(checkpoint_z(8)) and run.z > CV_Z
    best = min(range(len(values)), key=values.__getitem__)
    assert run.epoch == epochs[best] < 16  # it overfits: an earlier epoch is kept
    assert values[-1] > values[best]
    model, refs = _one_after_the_other(x, folds, epochs[best])  # independently, that long
    again = vae_kfold_bound(model, refs, x, folds, seed=1, z=checkpoint_z(8))
    assert again.total == pytest.approx(values[best], rel=1e-5)
    assert _same_weights(run.model, model)
    assert all(_same_weights(a, b) for a, b in zip(run.references, refs, strict=True))
    # the kept weights give the kept value again (the value a trial returns)
    kept = vae_kfold_bound(run.model, run.references, x, folds, seed=1, z=run.z)
    assert kept.total == pytest.approx(values[best], rel=1e-6)


def _objective(epochs: int, **base) -> VAEObjective:
    x = _data(seed=5)
    data = DataSplit(x, _data(seed=6, m=16), "toy", {})
    search = {"latent": 4, "lr": 1e-2, "epochs": epochs, "batch_size": 8, "lam": 0.0}
    cfg = VAEConfig(folds=K, **base)
    return VAEObjective(data, search=search, base=cfg, hidden=(32,), checkpoints=3, study_seed=2)


def test_a_vae_trial_reports_the_certified_value_and_keeps_its_epoch():
    study = optuna.create_study()
    study.optimize(_objective(16), n_trials=1)
    t = study.trials[0]
    attrs, curve = flat_attrs(t.user_attrs), t.user_attrs[CURVE_ATTR]
    assert [e for e, _ in curve] == [4, 8, 12, 16]  # checkpoint_every(16, 3) = 4: C = 4
    # intermediate values: the smallest value so far, not the per-epoch (5.2)
    running = [min(v for _, v in curve[: i + 1]) for i in range(len(curve))]
    assert [t.intermediate_values[e] for e, _ in curve] == pytest.approx(running)
    assert len(t.intermediate_values) == 4
    assert t.value == pytest.approx(min(v for _, v in curve), rel=1e-6)
    assert attrs["bound.step"] == min(curve, key=lambda c: c[1])[0]
    assert attrs["bound.steps_trained"] == 16
    assert attrs["bound.cv_z"] == pytest.approx(checkpoint_z(4))
    assert len(t.user_attrs["epoch_terms"]) == 16  # the per-epoch (5.2) terms are still kept


def test_without_early_stopping_a_vae_trial_is_its_last_epoch_with_z_2():
    study = optuna.create_study()
    study.optimize(_objective(8, early_stop=False), n_trials=1)
    t = study.trials[0]
    attrs, curve = flat_attrs(t.user_attrs), t.user_attrs[CURVE_ATTR]
    assert [e for e, _ in curve] == [2, 4, 6, 8]
    assert [t.intermediate_values[e] for e, _ in curve] == pytest.approx([v for _, v in curve])
    assert t.value == pytest.approx(curve[-1][1], rel=1e-6)
    assert attrs["bound.step"] == attrs["bound.steps_trained"] == 8
    assert attrs["bound.cv_z"] == CV_Z


def test_vae_early_stopping_without_references_is_refused_in_one_line():
    obj = _objective(2)
    with pytest.raises(SpecError, match='early_stop = true needs variant = "elbo-kfold"') as e:
        VAEObjective(
            obj.data, search={"lam": 0.0}, base=replace(obj.base, variant="paper", early_stop=True)
        )
    assert "\n" not in str(e.value)
