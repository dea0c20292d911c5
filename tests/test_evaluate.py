"""The bound variants' terms against closed forms, the held-out estimators, and selection stats."""

import math

import numpy as np
import pytest
import torch

from bound_tuner.data import swiss_roll
from bound_tuner.evaluation.diffusion_bound import bound_terms
from bound_tuner.evaluation.experiment import run_diffusion
from bound_tuner.maths.bounds import (
    VARIANTS,
    assemble_diffusion_bound,
    girsanov_info,
    path_kl,
    split_info,
)
from bound_tuner.maths.bounds.variants import variant_report
from bound_tuner.maths.metrics import frechet_distance, knn_kl
from bound_tuner.maths.sde import get_schedule
from bound_tuner.maths.selection import pick_rank, regret, spearman
from bound_tuner.models import ScoreMLP
from bound_tuner.training.config import DiffusionConfig
from bound_tuner.training.sampling import generate

LIN = get_schedule("linear")


class _OracleGaussianEps(torch.nn.Module):
    """Exact eps-prediction for X ~ N(0, s2 I): eps = sigma_t y / (alpha_t^2 s2 + sigma_t^2)."""

    def __init__(self, s2):
        super().__init__()
        self.s2 = s2

    def forward(self, y, t):
        a2 = LIN.alpha(t.double()) ** 2
        v = a2 * self.s2 + (1 - a2)
        return ((1 - a2).sqrt() / v).to(y.dtype)[:, None] * y


def test_girsanov_term_matches_its_integral_for_the_oracle_score():
    """Data N(0, s2 I), exact score, alpha_T ~ 0: the paths are N(0, v_t I), v_t = alpha^2 s2 +
    sigma^2, so E||s - s_ref||^2 = d (v_t - 1)^2 / v_t and the per-step sum is a Riemann sum of
    1/2 int beta d (v - 1)^2 / v dt."""
    s2, T, N, d, m = 0.25, 1.5, 1000, 2, 100
    run = generate(
        _OracleGaussianEps(s2),
        LIN,
        T=T,
        n=4000,
        shape=(d,),
        n_steps=N,
        seed=0,
    )
    t = torch.linspace(1e-3, T, 200_001, dtype=torch.float64)
    a2 = LIN.alpha(t) ** 2
    v = a2 * s2 + 1 - a2
    integrand = LIN.beta(t) * d * (v - 1) ** 2 / v
    exact = 0.5 * float(torch.trapezoid(integrand, t))
    assert exact > 0.5  # not a vanishing quantity
    assert path_kl(run.ref_sq_dev[0], LIN, T=T) == pytest.approx(exact, rel=0.04)
    assert girsanov_info(run.ref_sq_dev[0], LIN, T=T, m=m) == pytest.approx(exact / m, rel=0.04)


def test_path_kl_is_zero_against_the_model_itself_and_split_info_weights_the_folds():
    model = ScoreMLP(2, hidden=8)
    run = generate(
        model,
        LIN,
        T=0.5,
        n=32,
        shape=(2,),
        n_steps=20,
        references=(model, None),
        seed=1,
    )
    assert path_kl(run.ref_sq_dev[0], LIN, T=0.5) == 0.0
    assert path_kl(run.ref_sq_dev[1], LIN, T=0.5) > 0
    # points of fold 0 (3 of them) are measured against fold 1's reference, and back
    assert split_info([4.0, 9.0], [3, 1]) == pytest.approx((3 * 3.0 + 1 * 2.0) / 4)
    with pytest.raises(ValueError, match="two folds"):
        split_info([1.0], [2])


def test_variant_totals_follow_their_formulas():
    k = math.sqrt(2) * 2.0
    paper = assemble_diffusion_bound(
        variant="paper", train_loss=1.0, i_gen=0.25, R=2.0, c_mix=0.5, c_prior=0.3
    )
    assert paper.total == pytest.approx(1.0 - 0.5 + k * (0.3 + 0.5))
    elbo = assemble_diffusion_bound(variant="elbo", train_loss=3.0, i_gen=0.25, R=2.0)
    assert elbo.total == pytest.approx(3.0 + k * 0.5)
    assert set(elbo.terms) == {"train_nelbo", "generator_info"}
    split = assemble_diffusion_bound(variant="elbo-split", train_loss=3.0, i_gen=0.7, R=2.0)
    assert split.total == pytest.approx(3.0 + k * 0.7)
    enc = assemble_diffusion_bound(
        variant="elbo-encoder", train_loss=3.0, i_gen=0.25, R=2.0, c_mix=0.5, c_prior=0.3
    )
    assert enc.total == pytest.approx(3.0 - 0.5 + k * (0.3 + 0.5))
    with pytest.raises(ValueError, match="unknown bound variant"):
        assemble_diffusion_bound(variant="nope", train_loss=1.0, i_gen=0.0, R=1.0)


def test_every_variant_from_one_model_run():
    x = swiss_roll(40, seed=0)
    cfg = DiffusionConfig(T=0.5, steps=30, width=16, batch_size=40)
    from bound_tuner.training.diffusion import train_fold_models, train_model, train_split_models

    model, schedule, _ = train_model(x, cfg)
    refs, sizes = train_split_models(x, cfg)
    assert sizes == [20, 20]
    fold_models, folds = train_fold_models(x, cfg)
    assert len(fold_models) == 5 and folds.shape == (40,)  # K = 5 for 40 points
    terms = bound_terms(
        model,
        x,
        schedule,
        T=0.5,
        variants=VARIANTS,
        n_steps=20,
        n_paths=16,
        train_draws=4,
        split_models=refs,
        fold_sizes=sizes,
        fold_models=fold_models,
        folds=folds,
    )
    reports = {v: variant_report(terms, variant=v) for v in VARIANTS}
    kfold = reports["elbo-kfold"]
    assert kfold.settings["R_source"] == "cv" and kfold.settings["R"] == terms.fold["R_cv"]
    assert kfold.terms["train_nelbo"] == pytest.approx(terms.nelbo.mean)
    # eq. 2.11 from the measured terms: the cross-fitted NELBO moved by the references' gap
    # (eq. 2.10b) plus 2 se_cv, never below the training NELBO; also the 95% certificate
    shift = terms.nelbo.mean - terms.fold["refs_train_nelbo"]
    value = max(terms.fold["cv_nelbo"] + shift + 2 * terms.fold["cv_se"], terms.nelbo.mean)
    assert kfold.total == pytest.approx(value)
    assert kfold.extras["total_upper95"] == pytest.approx(value)
    assert kfold.extras["info_bound"] >= kfold.terms["train_nelbo"]
    assert reports["paper"].settings["R"] == 5.0  # the paper's R unless told otherwise
    r_data = 0.5 * (x.double() ** 2).sum(1)
    assert terms.settings["R_data"] == pytest.approx(float(r_data.max() - r_data.min()) / 2)
    for v in ("elbo", "elbo-split", "elbo-encoder"):
        assert reports[v].settings["R_source"] == "data"
        assert reports[v].settings["R"] == terms.settings["R_data"]
        assert reports[v].terms["train_nelbo"] == pytest.approx(terms.nelbo.mean)
    assert terms.split > 0 and terms.i_girsanov > 0
    assert reports["elbo-split"].total == pytest.approx(
        terms.nelbo.mean + math.sqrt(2) * reports["elbo-split"].settings["R"] * terms.split
    )
    est = variant_report(terms, variant="elbo", R="estimate").settings
    assert est["R"] == pytest.approx(
        float(terms.nelbo.per_point.max() - terms.nelbo.per_point.min()) / 2
    )
    with pytest.raises(ValueError, match="positive number"):
        variant_report(terms, variant="elbo", R="guess")
    with pytest.raises(ValueError, match="split_models"):
        bound_terms(model, x, schedule, T=0.5, variants=("elbo-split",), n_steps=5, n_paths=4)


def test_run_diffusion_with_the_split_variant():
    x = swiss_roll(24, seed=1)
    cfg = DiffusionConfig(
        T=0.4,
        steps=20,
        width=8,
        batch_size=24,
        variant="elbo-split",
        R=3.0,
        n_steps=10,
        n_paths=8,
        train_draws=2,
    )
    rep = run_diffusion(x, cfg).report
    assert rep.settings["variant"] == "elbo-split" and rep.settings["R_source"] == "user"
    assert rep.terms["split_info"] == pytest.approx(rep.settings["C_split"]) and rep.total > 0


def test_knn_kl_against_the_closed_form_for_gaussians():
    g = np.random.default_rng(0)
    mu = np.array([1.0, -0.5])
    data = torch.from_numpy(g.normal(size=(5000, 2)))
    gen = torch.from_numpy(g.normal(size=(5000, 2)) + mu)
    kl, se = knn_kl(data, gen)
    exact = 0.5 * float(mu @ mu)  # KL(N(0, I) || N(mu, I))
    assert 0 < se < 0.05
    assert kl == pytest.approx(exact, abs=4 * se + 0.03)
    same, _ = knn_kl(data, torch.from_numpy(g.normal(size=(5000, 2))))
    assert abs(same) < 0.05


def test_frechet_distance_against_the_closed_form():
    g = np.random.default_rng(1)
    a = torch.from_numpy(g.normal(size=(20000, 3)))
    b = torch.from_numpy(2.0 * g.normal(size=(20000, 3)) + 1.0)
    # ||mu||^2 + tr(I + 4I - 2 * 2I) = 3 + 3
    assert frechet_distance(a, b) == pytest.approx(6.0, rel=0.03)
    assert frechet_distance(a[:50], a[:50]) == pytest.approx(0.0, abs=1e-6)


def test_selection_statistics():
    truth = [0.5, 0.2, 0.4, 0.8]
    assert regret([3.0, 1.0, 2.0, 4.0], truth) == 0.0
    assert regret([1.0, 3.0, 2.0, 4.0], truth) == pytest.approx(0.5 / 0.2 - 1)
    assert pick_rank([1.0, 3.0, 2.0, 4.0], truth) == 3
    assert spearman([3.0, 1.0, 2.0, 4.0], truth) == pytest.approx(1.0)
    assert spearman([4.0, 1.0], [1.0, 2.0]) != spearman([4.0, 1.0], [1.0, 2.0])  # nan below 3


def test_spec_bound_variant_R_and_validation_test_size():
    from bound_tuner.config.schema import SpecError
    from bound_tuner.config.spec import parse_spec
    from bound_tuner.objectives.factory import diffusion_base_config

    raw = {
        "study": {"name": "s", "validation": True},
        "search": {"T": 0.5},
        "bound": {"variant": "elbo-split"},
    }
    spec = parse_spec(raw)
    assert spec.data["test_size"] == 10_000  # enough fresh points for the k-NN sample KL
    cfg = diffusion_base_config(spec)
    assert cfg.variant == "elbo-split" and cfg.R is None  # None: the variant's default, "data"
    assert parse_spec({**raw, "study": {"name": "s"}}).data["test_size"] == 1000
    assert diffusion_base_config(parse_spec({**raw, "bound": {"R": "data"}})).R == "data"
    assert diffusion_base_config(parse_spec({**raw, "bound": {"R": 2}})).R == 2.0
    with pytest.raises(SpecError, match="bound.variant"):
        parse_spec({**raw, "bound": {"variant": "best"}})
    with pytest.raises(SpecError, match="bound.R"):
        parse_spec({**raw, "bound": {"R": "guess"}})


def test_report_selection_lines_for_every_heldout_metric():
    from bound_tuner.dashboard.report import heldout_key, selection_lines, selection_stats

    def trial(n, value, kl, nelbo, state="COMPLETE"):
        attrs = {"heldout.sample_kl": kl, "heldout.sample_kl_se": 0.01, "heldout.neg_elbo": nelbo}
        return {"number": n, "state": state, "value": value, "user_attrs": attrs}

    trials = [
        trial(0, 3.0, 0.5, 2.0),
        trial(1, 1.0, 0.4, 3.0),
        trial(2, 2.0, 0.2, 1.0),
        trial(3, None, 9.9, 9.9, state="PRUNED"),
    ]
    assert heldout_key(trials) == "heldout.sample_kl"  # the ground truth first, no s.e. keys
    st = selection_stats(trials, "heldout.sample_kl")
    assert st["n"] == 3 and st["pick_rank"] == 2
    assert st["regret"] == pytest.approx(0.4 / 0.2 - 1)
    assert st["spearman"] == pytest.approx(0.5)
    lines = selection_lines(trials)
    assert len(lines) == 2 and lines[0].startswith("heldout.sample_kl:")
    assert "regret of the pick = 100.0%" in lines[0] and "ranks 2 of 3" in lines[0]


def test_report_does_not_import_torch_or_sklearn(tmp_path):
    import subprocess
    import sys

    import optuna

    url = f"sqlite:///{tmp_path}/r.db"
    study = optuna.create_study(study_name="r", storage=url)
    for i, (value, kl) in enumerate([(2.0, 0.3), (1.0, 0.2), (3.0, 0.5)]):
        t = study.ask()
        for key, v in {
            "bound.T": 0.1 * (i + 1),
            "bound.train_nelbo": value,
            "bound.contribution.train_nelbo": value,
            "heldout.sample_kl": kl,
        }.items():
            t.set_user_attr(key, v)
        study.tell(t, value)
    code = (
        "import sys\nfrom bound_tuner.cli import main\n"
        f"main(['report', '--study', 'r', '--storage', '{url}'])\n"
        "print('torch' in sys.modules, 'sklearn' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    lines = out.stdout.strip().splitlines()
    assert lines[-1] == "False False", out.stderr
    assert any("Spearman rho(bound, metric) = 1.000" in line for line in lines)
