"""K-fold references (docs/theory.md 2.9-2.11): folds, the fold information term against known
answers, packed references, common random numbers and the default bound's assembly."""

from __future__ import annotations

import dataclasses
import math

import optuna
import pytest
import torch
from torch import nn

from bound_tuner.evaluation.diffusion_bound import bound_terms
from bound_tuner.evaluation.experiment import score_model
from bound_tuner.maths.bounds.diffusion import DEFAULT_VARIANT, assemble_kfold_bound
from bound_tuner.maths.bounds.kfold import (
    cross_fitted,
    cv_summary,
    fold_assignment,
    fold_info,
    fold_rows,
    fold_sizes,
    fold_terms,
)
from bound_tuner.maths.bounds.report import flat_attrs
from bound_tuner.maths.bounds.variants import variant_report
from bound_tuner.maths.metrics import memorized_share
from bound_tuner.maths.sde import get_schedule
from bound_tuner.training.config import DiffusionConfig
from bound_tuner.training.diffusion import train_model
from bound_tuner.training.pack import train_packed


class GaussianOracle(nn.Module):
    """The exact eps-prediction for data N(0, s^2 I): it depends on no training point."""

    def __init__(self, schedule, s: float) -> None:
        super().__init__()
        self.schedule, self.s2 = schedule, s * s
        self.dummy = nn.Parameter(torch.zeros(1, dtype=torch.float64))

    def forward(self, y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a2 = self.schedule.alpha(t.double()) ** 2
        v2 = self.schedule.sigma2(t.double())
        return (y * (v2.sqrt() / (a2 * self.s2 + v2))[:, None]).to(y.dtype)


class Memorizer(nn.Module):
    """The exact eps-prediction for the empirical distribution of ``points``: a model that has
    memorized its training set."""

    def __init__(self, schedule, points: torch.Tensor) -> None:
        super().__init__()
        self.schedule = schedule
        self.register_buffer("points", points.double())
        self.dummy = nn.Parameter(torch.zeros(1, dtype=torch.float64))

    def forward(self, y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = self.schedule.alpha(t.double())[:, None]
        v2 = self.schedule.sigma2(t.double())[:, None]
        d2 = (
            y.double().pow(2).sum(1, keepdim=True)
            - 2 * a * y.double() @ self.points.T
            + a**2 * self.points.pow(2).sum(1)[None]
        )
        w = torch.softmax(-d2 / (2 * v2), dim=1)
        mean = w @ self.points
        return ((y.double() - a * mean) / v2.sqrt()).to(y.dtype)


def test_folds_partition_the_points_and_no_point_trains_its_own_reference():
    folds = fold_assignment(23, 5, seed=3)
    assert sorted(fold_sizes(folds, 5)) == [4, 4, 5, 5, 5]
    rows = fold_rows(folds, 5)
    for k, r in enumerate(rows):
        assert not bool((folds[r] == k).any())  # no point of fold k in reference k's rows
        assert r.numel() == 23 - int((folds == k).sum())  # and every other point is there
    assert torch.equal(folds, fold_assignment(23, 5, seed=3))
    assert not torch.equal(folds, fold_assignment(23, 5, seed=4))
    with pytest.raises(ValueError, match="at least 10 training points"):
        fold_assignment(9, 5, seed=0)
    from bound_tuner.maths.bounds.kfold import folds_for

    assert [folds_for(m) for m in (4, 8, 9, 10, 200)] == [2, 4, 4, 5, 5]
    assert folds_for(200, 8) == 8


def test_fold_info_and_cross_fitting_by_hand():
    # (1/m) sum_k sqrt(n_k KL_k) with m = 10: (sqrt(4 * 1) + sqrt(6 * 6)) / 10
    assert fold_info([1.0, 6.0], [4, 6]) == pytest.approx((2 + 6) / 10)
    per_ref = torch.tensor([[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0, 40.0]])
    folds = torch.tensor([1, 0, 1, 0])
    assert cross_fitted(per_ref, folds).tolist() == [10.0, 2.0, 30.0, 4.0]
    s = cv_summary(torch.tensor([10.0, 2.0, 30.0, 4.0]))
    assert s["cv_nelbo"] == pytest.approx(11.5)
    assert s["R_cv_std"] == pytest.approx(float(torch.tensor([10.0, 2.0, 30.0, 4.0]).std()))
    assert s["cv_se"] == pytest.approx(s["R_cv_std"] / 2)
    assert s["R_cv"] >= s["R_cv_std"]  # the sub-Gaussian scale of a long upper tail
    assert s["R_cv_half_range"] == pytest.approx(14.0)
    # each reference's NELBO on the points it trained on (reference 0 saw fold 1, reference 1
    # fold 0), averaged over the references; reference 0 on fold 0 is the 80/20 split's model
    t = fold_terms(per_ref, torch.zeros_like(per_ref), folds)
    assert t["refs_train_nelbo"] == pytest.approx(((1.0 + 3.0) / 2 + (20.0 + 40.0) / 2) / 2)
    assert t["holdout_nelbo"] == pytest.approx(3.0) and t["cv_nelbo"] == pytest.approx(11.5)


def _terms(model, refs, x, folds, schedule, T):
    return bound_terms(
        model,
        x,
        schedule,
        T=T,
        variants=("elbo-kfold",),
        n_steps=100,
        n_paths=128,
        train_draws=32,
        seed=0,
        fold_models=refs,
        folds=folds,
    )


def test_fold_information_is_zero_for_a_model_that_ignores_its_data_and_large_for_a_memorizer():
    torch.manual_seed(0)
    schedule, T, K = get_schedule("linear"), 0.3, 4
    x = (2.0 * torch.randn(40, 2)).double()
    folds = fold_assignment(40, K, seed=1)
    rows = fold_rows(folds, K)

    oracle = GaussianOracle(schedule, 2.0)
    blind = _terms(oracle, [GaussianOracle(schedule, 2.0) for _ in range(K)], x, folds, schedule, T)
    assert blind.fold["C_fold"] == 0.0
    # a model that ignores its data generalizes: cross-fitted and training NELBO agree
    assert abs(blind.fold["cv_nelbo"] - blind.nelbo.mean) < 1e-9

    mem = _terms(
        Memorizer(schedule, x), [Memorizer(schedule, x[r]) for r in rows], x, folds, schedule, T
    )
    assert mem.fold["C_fold"] > 0.5  # nats: the references disagree where the model memorized
    # memorization shows in cross-fitting: far worse on the points the reference did not see
    assert mem.fold["cv_nelbo"] > mem.nelbo.mean + 5.0
    assert mem.fold["memorized_share"] > 0.5  # its samples copy training points
    assert blind.fold["memorized_share"] < 0.1
    rep = variant_report(mem, variant="elbo-kfold")
    assert rep.settings["R_source"] == "cv" and rep.settings["R"] == mem.fold["R_cv"]
    # eq. 2.11 from the measured terms: the cross-fitted NELBO moved by the references' gap
    # (eq. 2.10b) plus 2 se_cv, never below the training NELBO; it is also the certificate
    train = mem.nelbo.mean
    shift = train - mem.fold["refs_train_nelbo"]
    value = max(mem.fold["cv_nelbo"] + shift + 2 * mem.fold["cv_se"], train)
    assert rep.total == pytest.approx(value)
    assert rep.extras["total_upper95"] == pytest.approx(value)
    assert sum(rep.contributions.values()) == pytest.approx(value)
    # the information form (eq. 2.11c) is recorded beside it
    info = (
        train + math.sqrt(2) * mem.fold["R_cv"] * mem.fold["C_fold"] + 1.6448536 * mem.nelbo.mc_se
    )
    assert rep.extras["info_bound"] == pytest.approx(info)


def test_a_packed_reference_trains_like_a_model_trained_alone_on_its_rows():
    torch.manual_seed(0)
    x = torch.randn(30, 2)
    rows = torch.arange(30)[torch.arange(30) % 3 != 0]
    cfg = DiffusionConfig(T=0.6, steps=40, batch_size=8, width=16, layers=2, seed=5, lam=0.5)
    alone, _, losses = train_model(x[rows], cfg, device="cpu")
    (member,) = train_packed(x, [cfg], device="cpu", rows=[rows])
    assert member.losses == pytest.approx(losses, rel=1e-5, abs=1e-6)
    for (name, p), q in zip(alone.named_parameters(), member.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def test_evaluation_draws_are_the_studys_not_the_trials():
    torch.manual_seed(0)
    x = torch.randn(40, 2)
    cfg = DiffusionConfig(
        T=0.5, steps=30, batch_size=20, width=16, layers=2, n_steps=50, n_paths=32, folds=4
    )
    model, schedule, losses = train_model(x, cfg, device="cpu")
    # the same model scored in two trials of a study (two training seeds, one eval seed)
    a = score_model(
        model,
        schedule,
        losses,
        x,
        DiffusionConfig(**{**cfg.to_dict(), "seed": 1, "variant": "elbo"}),
    )
    b = score_model(
        model,
        schedule,
        losses,
        x,
        DiffusionConfig(**{**cfg.to_dict(), "seed": 2, "variant": "elbo"}),
    )
    assert a.report.total == b.report.total
    c = score_model(
        model,
        schedule,
        losses,
        x,
        DiffusionConfig(**{**cfg.to_dict(), "eval_seed": 9, "variant": "elbo"}),
    )
    assert c.report.total != a.report.total


def test_the_objective_gives_every_trial_the_studys_evaluation_seed():
    from bound_tuner.data import load_dataset
    from bound_tuner.objectives.diffusion import DiffusionObjective

    split = load_dataset("swiss_roll", m=20, seed=0, test_size=10)
    obj = DiffusionObjective(
        split, search={"T": {"low": 0.3, "high": 1.0}}, study_seed=17, checkpoints=0
    )
    study = optuna.create_study()
    cfgs = [obj.config_for(study.ask()) for _ in range(3)]
    assert {c.eval_seed for c in cfgs} == {17}
    assert len({c.seed for c in cfgs}) == 3  # training seeds stay per trial


def test_the_references_own_fit_averages_each_one_over_the_points_it_saw():
    from bound_tuner.maths.bounds.kfold import refs_own_fit

    folds = torch.tensor([0, 1, 2, 0, 1, 2])
    per_ref = torch.tensor(
        [
            [9.0, 1.0, 2.0, 9.0, 3.0, 4.0],  # reference 0 saw points 1, 2, 4, 5: mean 2.5
            [1.0, 9.0, 1.0, 1.0, 9.0, 1.0],  # reference 1 saw points 0, 2, 3, 5: mean 1.0
            [2.0, 4.0, 9.0, 6.0, 8.0, 9.0],  # reference 2 saw points 0, 1, 3, 4: mean 5.0
        ]
    )
    assert refs_own_fit(per_ref, folds) == pytest.approx((2.5 + 1.0 + 5.0) / 3)


def test_kfold_is_the_default_and_its_value_is_the_cross_fitted_bound():
    assert DEFAULT_VARIANT == "elbo-kfold"
    rep = assemble_kfold_bound(train_nelbo=2.0, c_fold=0.1, R=1.0, cv_nelbo=3.0, cv_se=0.1, m=200)
    assert rep.total == pytest.approx(3.0 + 2 * 0.1)
    assert set(rep.contributions) == {"cv_nelbo", "cv_shift", "cv_margin"}
    assert rep.contributions["cv_shift"] == 0.0  # no references' training NELBO given: no shift
    # the 2 se_cv already make it the 95% certificate (eq. 2.11b)
    assert rep.extras["total_upper95"] == pytest.approx(3.0 + 2 * 0.1)
    assert rep.extras["cv_bound"] == pytest.approx(3.0 + 2 * 0.1)
    # the information form is recorded beside it, not used, even where it is the smaller: with
    # 1.645 Monte Carlo errors of the training NELBO estimate, and its own certificate adds the
    # sample term sqrt(2) R sqrt(ln(20)/m), the Chernoff deviation of a mean of m points
    noisy = assemble_kfold_bound(
        train_nelbo=2.0, c_fold=0.1, R=1.0, cv_nelbo=3.0, cv_se=0.1, m=200, train_mc_se=0.05
    )
    info = 2.0 + math.sqrt(2) * 0.1 + 1.6448536 * 0.05
    assert noisy.extras["info_bound"] == pytest.approx(info) and info < noisy.total
    assert noisy.terms["mc_margin"] == pytest.approx(1.6448536 * 0.05)
    assert noisy.total == pytest.approx(rep.total)  # the training NELBO's error is not in it
    sample = math.sqrt(2) * math.sqrt(math.log(20) / 200)
    assert noisy.extras["info_upper95"] == pytest.approx(info + sample)
    # a memorizing model: a large information form does not raise the value either
    cv = assemble_kfold_bound(train_nelbo=2.0, c_fold=5.0, R=3.0, cv_nelbo=4.0, cv_se=0.5, m=50)
    assert cv.total == pytest.approx(5.0) and cv.extras["info_bound"] > 20.0
    # a model that fits its own points 0.5 worse than the references fit theirs is taken to be
    # 0.5 worse out of sample too (eq. 2.10b); one that fits them 0.5 better, 0.5 better
    worse = assemble_kfold_bound(
        train_nelbo=2.0, c_fold=5.0, R=3.0, cv_nelbo=4.0, cv_se=0.5, m=50, refs_train_nelbo=1.5
    )
    assert worse.total == pytest.approx(4.0 + 0.5 + 1.0) and worse.terms["cv_shift"] == 0.5
    assert worse.contributions["cv_shift"] == pytest.approx(0.5)
    better = assemble_kfold_bound(
        train_nelbo=2.0, c_fold=5.0, R=3.0, cv_nelbo=4.0, cv_se=0.5, m=50, refs_train_nelbo=2.5
    )
    assert better.total == pytest.approx(4.0 - 0.5 + 1.0) and better.terms["cv_shift"] == -0.5
    assert better.contributions["cv_shift"] == pytest.approx(-0.5)
    # down to the model's own training NELBO and no further: a references' gap below zero
    # (their unseen points fit better than their own) does not take the value under it
    under = assemble_kfold_bound(
        train_nelbo=2.0, c_fold=0.1, R=1.0, cv_nelbo=2.5, cv_se=0.1, m=50, refs_train_nelbo=3.0
    )
    assert under.total == pytest.approx(2.0) and under.extras["cv_floor"] == 1.0
    # references better on unseen points than the model on its own: the value is floored at
    # the model's training NELBO (a bound is never below what the model shows)
    floor = assemble_kfold_bound(train_nelbo=5.0, c_fold=1.0, R=3.0, cv_nelbo=4.0, cv_se=0.2, m=50)
    assert floor.total == pytest.approx(5.0) and floor.extras["cv_floor"] == 1.0
    assert cv.extras["cv_floor"] == 0.0
    # each value as worked out above, by eq. 2.11: the contributions add up to it and the
    # certificate is the value itself (eq. 2.11b)
    values = ((rep, 3.2), (noisy, 3.2), (cv, 5.0), (worse, 5.5), (better, 4.5), (under, 2.0))
    for r, value in (*values, (floor, 5.0)):
        assert sum(r.contributions.values()) == pytest.approx(value)
        assert r.extras["total_upper95"] == pytest.approx(value)


def test_memorized_share_counts_copies_of_training_points():
    train = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    copies = train + 0.01
    assert memorized_share(copies, train) == 1.0
    between = torch.tensor([[5.0, 0.0], [0.0, 5.0]])  # equidistant: not copies
    assert memorized_share(between, train) == 0.0


def test_evaluation_draws_follow_the_number_of_points_unless_given():
    from bound_tuner.evaluation.diffusion_bound import draws_for

    assert draws_for(200) == 256  # 51,200 draws in all
    assert draws_for(32) == 1024  # at most 1,024 per point
    assert draws_for(60_000) == 64  # at least 64
    assert draws_for(200, 7) == 7


def test_a_study_scores_a_trial_as_the_benchmark_scores_its_configuration():
    """The benchmark's rows and a study's trials come from the same function on the same draws:
    a trial's value equals run_diffusion on the configuration it recorded."""
    from bound_tuner.data import load_dataset
    from bound_tuner.evaluation.experiment import run_diffusion
    from bound_tuner.objectives.diffusion import DiffusionObjective

    split = load_dataset("swiss_roll", m=20, seed=0, test_size=10)
    base = DiffusionConfig(
        steps=20, batch_size=20, width=16, layers=2, n_steps=200, n_paths=16, folds=4
    )
    obj = DiffusionObjective(
        split, search={"T": {"low": 0.3, "high": 0.8}}, base=base, study_seed=3, checkpoints=0
    )  # at N = 200 the generator of this tiny model diverges near T = 1 (the trial fails)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(obj, n_trials=2)
    for t in study.trials:
        cfg = DiffusionConfig(**t.user_attrs["config"])
        assert cfg.eval_seed == 3 and flat_attrs(t.user_attrs)["bound.variant"] == "elbo-kfold"
        again = run_diffusion(obj.data.train, cfg, device="cpu")
        assert again.report.total == pytest.approx(t.value, rel=1e-9)
        # the value and its certificate are eq. 2.11 of the terms the trial recorded
        ua = flat_attrs(t.user_attrs)
        train = ua["bound.train_nelbo"]
        shift = train - ua["bound.refs_train_nelbo"]
        value = max(ua["bound.cv_nelbo"] + shift + 2 * ua["bound.cv_se"], train)
        assert t.value == pytest.approx(value) and ua["bound.total_upper95"] == pytest.approx(value)


def test_a_trial_whose_generator_diverges_fails_with_the_reason():
    from bound_tuner.data import load_dataset
    from bound_tuner.objectives.diffusion import DiffusionObjective
    from bound_tuner.training.sampling import DIVERGED_SCALE, sample_scale

    data = torch.tensor([[3.0, 4.0], [0.0, 1.0]])
    assert sample_scale(torch.tensor([[30.0, 40.0]]), data) == pytest.approx(10.0)
    assert sample_scale(torch.tensor([[math.nan, 0.0]]), data) == math.inf
    assert DiffusionConfig().max_sample_scale == DIVERGED_SCALE == 10.0

    split = load_dataset("swiss_roll", m=20, seed=0, test_size=10)
    base = DiffusionConfig(
        steps=10, batch_size=20, width=16, layers=2, n_steps=50, n_paths=16, variant="elbo"
    )
    study = optuna.create_study()
    for limit in (1e-3, 1e6):  # every generator "diverges"; none does
        cfg = dataclasses.replace(base, max_sample_scale=limit)
        obj = DiffusionObjective(split, search={"T": 0.5}, base=cfg, checkpoints=0)
        study.optimize(obj, n_trials=1)
    failed, kept = study.trials
    assert failed.state == optuna.trial.TrialState.FAIL
    reason = failed.user_attrs["fail_reason"]
    assert "generator diverges at N=50" in reason and "max_sample_scale = 0.001" in reason
    scale = flat_attrs(failed.user_attrs)["bound.sample_scale"]
    assert 1e-3 < scale < 1e6
    assert kept.state == optuna.trial.TrialState.COMPLETE


def test_the_subgaussian_scale_is_the_std_of_a_gaussian_and_larger_for_a_long_upper_tail():
    from bound_tuner.maths.bounds.kfold import subgaussian_scale

    g = torch.Generator().manual_seed(0)
    gauss = 2 * torch.randn(100_000, generator=g, dtype=torch.float64)
    assert subgaussian_scale(gauss) == pytest.approx(float(gauss.std()), rel=0.01)
    tail = torch.empty(2000, dtype=torch.float64).exponential_(generator=g)
    assert subgaussian_scale(tail) > 1.4 * float(tail.std())
    assert subgaussian_scale(-tail) < 1.05 * float(tail.std())  # a long lower tail does not count


def test_reports_call_only_measured_bounds_bounds_and_show_the_certificate():
    from bound_tuner.dashboard.notes import bound_note
    from bound_tuner.dashboard.report import trials_table

    def trial(variant):
        ua = {"bound.variant": variant, "bound.train_nelbo": 2.0, "bound.total_upper95": 2.6}
        return {
            "number": 0,
            "state": "COMPLETE",
            "params": {"T": 0.5},
            "value": 2.4,
            "user_attrs": ua,
        }

    head = trials_table([trial("elbo-kfold")]).splitlines()[0].split()
    assert head[:6] == ["#", "state", "T", "schedule", "bound", "upper95"]
    assert trials_table([trial("elbo")]).splitlines()[0].split()[4] == "score"
    rep = assemble_kfold_bound(train_nelbo=2.0, c_fold=0.1, R=1.0, cv_nelbo=3.0, cv_se=0.1, m=200)
    rep.settings["variant"] = "elbo-kfold"
    note = bound_note(3, rep)
    assert "generalization bound" in note and "95% certificate" in note
    rep.settings["variant"] = "elbo"
    assert "generalization score" in bound_note(3, rep)
