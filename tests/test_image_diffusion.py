import math
from pathlib import Path

import pytest
import torch

from bound_tuner.config.spec import parse_spec
from bound_tuner.data.preprocess import dequantize, pixel_levels, to_symmetric
from bound_tuner.evaluation.elbo import bits_per_dim, negative_elbo
from bound_tuner.maths.bounds.report import flat_attrs
from bound_tuner.maths.sde import get_schedule
from bound_tuner.study import run_study

FASHION = Path("/usr/share/datasets/fashion-mnist")
LIN = get_schedule("linear")


def test_symmetric_scaling_and_dequantization():
    x = torch.tensor([0.0, 1 / 255, 0.5, 1.0])
    y = to_symmetric(x)
    assert torch.allclose(y, (2 * torch.tensor([0.0, 1.0, 128.0, 255.0]) + 1) / 256 - 1)
    assert float(y.min()) > -1 and float(y.max()) < 1
    yd = dequantize(y.repeat(1000), generator=torch.Generator().manual_seed(0))
    # every dequantized value stays in its own bin
    assert torch.equal(torch.floor((yd + 1) * 128), pixel_levels(x).repeat(1000))


class _Zero(torch.nn.Module):
    def forward(self, y, t):
        return torch.zeros_like(y)


class _Oracle(torch.nn.Module):
    """Exact eps-prediction for y ~ N(0, s2 I)."""

    def forward(self, y, t):
        a2 = LIN.alpha(t.double()) ** 2
        v = a2 * 0.25 + (1 - a2)
        return ((1 - a2).sqrt() / v).to(y.dtype)[:, None] * y


def test_negative_elbo_bounds_the_true_nll():
    g = torch.Generator().manual_seed(0)
    y = 0.5 * torch.randn(4000, 2, generator=g)
    true_nll = float((0.5 * (y**2).sum(1) / 0.25 + math.log(2 * math.pi * 0.25)).mean())
    oracle = negative_elbo(_Oracle(), y, LIN, T=1.0, draws=16, seed=1)
    again = negative_elbo(_Oracle(), y, LIN, T=1.0, draws=16, seed=2)
    zero = negative_elbo(_Zero(), y, LIN, T=1.0, draws=16, seed=1).mean
    # an upper bound, tight for the exact score (prior and decoder gaps are < 0.01 nats here)
    assert true_nll - 4 * oracle.mc_se < oracle.mean < true_nll + 0.05 + 4 * oracle.mc_se
    assert zero > oracle.mean + 1.0
    # importance sampling in log-SNR: a small Monte Carlo error, and two seeds agree within it
    assert oracle.mc_se < 0.08
    assert abs(oracle.mean - again.mean) < 4 * math.hypot(oracle.mc_se, again.mc_se)


def _zero_model_nelbo(y, T):
    """Closed form for eps_theta = 0: 1/2 d (lambda_tmin - lambda_T) + prior KL + decoder."""
    d = y[0].numel()
    lam = float(LIN.log_snr(1e-3) - LIN.log_snr(T))
    a0, s0 = float(LIN.alpha(1e-3)), float(LIN.sigma2(1e-3))
    a, v = float(LIN.alpha(T)), float(LIN.sigma2(T))
    yy = y.reshape(y.shape[0], -1).double()
    prior = 0.5 * (a * a * (yy * yy).sum(1) + d * (v - 1 - math.log(v)))
    return (
        0.5 * d * lam + prior.mean().item() + 0.5 * d * math.log(2 * math.pi * math.e * s0 / a0**2)
    )


def test_negative_elbo_of_the_zero_model_matches_its_closed_form():
    y = torch.randn(500, 3, generator=torch.Generator().manual_seed(3))
    est = negative_elbo(_Zero(), y, LIN, T=0.7, draws=32, seed=0)
    assert est.mean == pytest.approx(_zero_model_nelbo(y, 0.7), abs=4 * est.mc_se)
    assert 0 < est.mc_se < 0.2


def test_bits_per_dim_of_the_zero_model_matches_its_closed_form():
    y = to_symmetric(torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(0)))
    bpd, se = bits_per_dim(_Zero(), y, LIN, T=1.0, draws=8)
    d = 784
    # dequantization moves each pixel by at most 1/256: the prior term changes by < 0.01 bit/dim
    expect = (_zero_model_nelbo(y, 1.0) + d * math.log(128)) / (d * math.log(2))
    assert bpd == pytest.approx(expect, abs=4 * se + 0.01)
    assert 0 < se < 0.1


@pytest.mark.skipif(
    not FASHION.is_dir(),
    reason="needs Debian's dataset-fashion-mnist "
    "(apt-get install dataset-fashion-mnist); .ci/run installs it",
)
def test_tiny_image_study_on_real_fashion_mnist(tmp_path):
    spec = parse_spec(
        {
            "study": {"name": "img", "n_trials": 2, "validation": True},
            "data": {"name": "fashion_mnist", "m": 8, "test_size": 8},
            "search": {"T": {"grid": [0.5, 1.0]}},
            "training": {"steps": 5, "batch_size": 8, "channels": 8, "checkpoints": 0},
            "bound": {
                "N": 5,
                "max_sample_scale": 1000.0,  # a 5-step model sampled in 5 steps
                "n_paths": 4,
                "train_draws": 2,
                "heldout_samples": 16,
                "heldout_steps": 5,
            },
            "sampler": {"type": "grid"},
            "pruner": {"type": "none"},
        }
    )
    study = run_study(spec, storage=f"sqlite:///{tmp_path}/img.db", progress=False)
    trials = study.get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    for t in trials:
        ua = flat_attrs(t.user_attrs)
        assert ua["bound.d"] == 784 and ua["bound.m"] == 8
        # the default: the K-fold cross-fitted form (K = 4 for 8 images), in the discrete
        # data's nats per image, the information form recorded beside it
        assert ua["bound.variant"] == "elbo-kfold" and ua["bound.folds"] == 4
        assert ua["bound.fold_info"] >= 0
        train = ua["bound.train_nelbo"]
        shift = train - ua["bound.refs_train_nelbo"]
        value = max(ua["bound.cv_nelbo"] + shift + 2 * ua["bound.cv_se"], train)  # eq. 2.11
        assert t.value == pytest.approx(value) and ua["bound.info_bound"] > 0
        contributions = [v for k, v in ua.items() if k.startswith("bound.contribution.")]
        assert sum(contributions) == pytest.approx(value)
        assert ua["bound.total_upper95"] == pytest.approx(value)
        assert math.isfinite(t.value)
        assert 0 < ua["heldout.bits_per_dim"] < 30 and ua["heldout.denoising_loss"] > 0
        assert ua["heldout.pixel_fd"] > 0 and 0 < ua["heldout.bits_per_dim_se"] < 1
