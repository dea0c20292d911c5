"""The certificate along training and certified early stopping (docs/theory.md 2.12)."""

import math
from dataclasses import replace

import optuna
import pytest
import torch

from bound_tuner import DiffusionObjective
from bound_tuner.config.schema import SpecError
from bound_tuner.data import load_dataset, swiss_roll
from bound_tuner.evaluation.along_training import train_certified, value_at
from bound_tuner.evaluation.checkpoints import CURVE_ATTR, checkpoint_count, checkpoint_every
from bound_tuner.evaluation.experiment import bound_report, run_diffusion
from bound_tuner.maths.bounds.kfold import CV_Z, checkpoint_z
from bound_tuner.maths.bounds.report import flat_attrs
from bound_tuner.training.config import DiffusionConfig
from bound_tuner.training.diffusion import train_model

# a memorizing regime in miniature: 24 points, full batch, a high learning rate
SMALL = DiffusionConfig(
    T=0.5,
    width=32,
    layers=2,
    steps=120,
    batch_size=24,
    lr=5e-3,
    n_steps=40,
    n_paths=16,
    train_draws=16,
    folds=3,
    max_sample_scale=1000.0,
    eval_seed=5,
    seed=2,
)


def test_bonferroni_margin_matches_the_normal_quantiles():
    assert checkpoint_z(1) == CV_Z == 2.0  # one step: the margin of eq. 2.11
    assert checkpoint_z(4) == pytest.approx(2.4977, abs=1e-4)
    assert checkpoint_z(8) == pytest.approx(2.7344, abs=1e-4)
    assert checkpoint_z(16) == pytest.approx(2.9552, abs=1e-4)
    with pytest.raises(ValueError, match="at least one step"):
        checkpoint_z(0)


@pytest.mark.parametrize("steps,checkpoints,count", [(1500, 3, 4), (1001, 3, 5), (100, 0, 1)])
def test_checkpoint_steps_are_counted_with_the_last(steps, checkpoints, count):
    every = checkpoint_every(steps, checkpoints)
    assert checkpoint_count(steps, every) == count


def test_lockstep_training_gives_the_value_of_training_one_after_the_other():
    """Trained to the end without early stopping, the model and references of the lockstep pack
    are those of training the model, then its references: the same value (float64)."""
    x = swiss_roll(24, seed=1).double()
    cfg = replace(SMALL, early_stop=False)
    torch.set_default_dtype(torch.float64)
    try:
        run = train_certified(x, cfg, checkpoints=3, early_stop=False, device="cpu")
        model, schedule, _ = train_model(x, cfg, device="cpu")
        alone = bound_report(model, schedule, x, cfg, device="cpu")
    finally:
        torch.set_default_dtype(torch.float32)
    assert [s for s, _ in run.curve] == [30, 60, 90, 120]
    assert run.step == 120 and run.z == CV_Z
    assert run.curve[-1][1] == pytest.approx(alone.total, rel=1e-6)
    # the value along training is not constant: the checkpoints saw different models
    assert len({round(v, 6) for _, v in run.curve}) == 4


def test_early_stopping_keeps_the_weights_of_the_smallest_value():
    x = swiss_roll(24, seed=1)
    cfg = replace(SMALL, steps=400, lr=1e-2, early_stop=True)
    res = run_diffusion(x, cfg, device="cpu", checkpoints=7)
    values = [v for _, v in res.curve]
    best = min(range(len(values)), key=values.__getitem__)
    z = checkpoint_z(8)
    assert res.report.extras["cv_z"] == pytest.approx(z)
    assert res.report.extras["step"] == res.curve[best][0]
    # the report is recomputed from the kept weights: it is the kept step's value, not the last
    assert res.report.total == pytest.approx(values[best], rel=1e-5)
    run = train_certified(x, cfg, checkpoints=7, early_stop=True, device="cpu")
    again = value_at(run.model, run.references, x, run.schedule, run.folds, cfg, z=z)
    assert again == pytest.approx(values[best], rel=1e-5)
    if best != len(values) - 1:  # the last weights were replaced by the kept step's
        assert values[-1] > values[best]


def test_a_trial_reports_the_certified_value_and_keeps_its_step():
    split = load_dataset("swiss_roll", m=24, seed=0, test_size=200)
    base = replace(SMALL, steps=200, early_stop=True)
    obj = DiffusionObjective(split, search={"T": 0.5}, base=base, checkpoints=3)
    study = optuna.create_study()
    study.optimize(obj, n_trials=1)
    t = study.trials[0]
    attrs = flat_attrs(t.user_attrs)
    curve = t.user_attrs[CURVE_ATTR]
    assert [s for s, _ in curve] == [50, 100, 150, 200]
    # intermediate values: the smallest value so far (what the trial would be worth if it ended)
    running = [min(v for _, v in curve[: i + 1]) for i in range(len(curve))]
    assert [t.intermediate_values[s] for s, _ in curve] == pytest.approx(running)
    assert t.value == pytest.approx(min(v for _, v in curve), rel=1e-5)
    assert attrs["bound.step"] == min(curve, key=lambda c: c[1])[0]
    assert attrs["bound.cv_z"] == pytest.approx(checkpoint_z(4))
    assert math.isfinite(attrs["bound.info_bound"])


def test_the_pruner_sees_the_certified_value():
    """A trial whose certificate is worse than the others' at a checkpoint is pruned there."""
    split = load_dataset("swiss_roll", m=24, seed=0, test_size=200)
    base = replace(SMALL, steps=90)
    obj = DiffusionObjective(split, search={"T": 0.5, "lr": [5e-3, 1e-7]}, base=base, checkpoints=2)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=0)
    study = optuna.create_study(pruner=pruner)
    study.enqueue_trial({"lr": 5e-3})
    study.enqueue_trial({"lr": 1e-7})  # learns nothing: its certificate is worse at every step
    study.optimize(obj, n_trials=2)
    first, second = study.trials
    assert first.state == optuna.trial.TrialState.COMPLETE
    assert second.state == optuna.trial.TrialState.PRUNED
    assert min(second.intermediate_values.values()) > max(first.intermediate_values.values())


def test_early_stopping_without_references_is_refused_in_one_line():
    split = load_dataset("swiss_roll", m=24, seed=0, test_size=50)
    base = replace(SMALL, variant="elbo", early_stop=True)
    with pytest.raises(SpecError, match='early_stop = true needs variant = "elbo-kfold"'):
        DiffusionObjective(split, search={"T": 0.5}, base=base)


def test_a_stop_ends_lockstep_training_at_the_next_step():
    """A packed worker that is stopping sets its coordinator's stop: a trial training its own
    lockstep pack in another thread ends too instead of training on."""
    import threading

    from bound_tuner.training.pack import PackStopped

    stop = threading.Event()
    stop.set()
    with pytest.raises(PackStopped):
        train_certified(
            swiss_roll(24, seed=1), SMALL, checkpoints=3, early_stop=True, device="cpu", stop=stop
        )
