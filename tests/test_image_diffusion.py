import math
from pathlib import Path

import pytest
import torch

from bound_tuner.data.preprocess import dequantize, pixel_levels, to_symmetric
from bound_tuner.metrics import bits_per_dim, negative_elbo
from bound_tuner.sde import get_schedule
from bound_tuner.spec import parse_spec
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
    oracle = float(negative_elbo(_Oracle(), y, LIN, T=1.0, draws=16, generator=g).mean())
    zero = float(negative_elbo(_Zero(), y, LIN, T=1.0, generator=g).mean())
    assert true_nll < oracle < true_nll + 1.0  # a valid, not too loose, upper bound
    assert zero > oracle + 1.0


def test_bits_per_dim_of_an_untrained_model_is_finite():
    y = to_symmetric(torch.rand(4, 1, 28, 28))
    bpd = bits_per_dim(_Zero(), y, LIN, T=1.0, draws=2)
    assert 1.0 < bpd < 30.0


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
            "training": {"steps": 5, "batch_size": 8, "width": 32, "checkpoints": 0},
            "bound": {"N": 5, "n_paths": 4, "train_draws": 2},
            "sampler": {"type": "grid"},
            "pruner": {"type": "none"},
        }
    )
    study = run_study(spec, storage=f"sqlite:///{tmp_path}/img.db", progress=False)
    trials = study.get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    for t in trials:
        ua = t.user_attrs
        assert ua["bound.d"] == 784 and ua["bound.m"] == 8
        assert 0 <= ua["bound.encoder_mixture_kl"] <= math.log(8)
        assert math.isfinite(t.value)
        assert 0 < ua["heldout.bits_per_dim"] < 30 and ua["heldout.denoising_loss"] > 0
