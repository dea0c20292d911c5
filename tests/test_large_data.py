"""The bound's passes over the training points in blocks give what one pass over all of them
gives, so a training set of a million points is scored in bounded memory."""

from __future__ import annotations

import math

import pytest
import torch

from bound_tuner.evaluation.elbo import negative_elbo
from bound_tuner.maths.metrics import memorized_share
from bound_tuner.maths.sde import get_schedule
from bound_tuner.models import build_score_model


@pytest.mark.parametrize("block", [2, 7, 64, 1000])
def test_memorized_share_in_blocks_equals_all_at_once(block):
    g = torch.Generator().manual_seed(0)
    train = torch.randn(301, 2, generator=g)
    copies = train[:40] + 1e-3 * torch.randn(40, 2, generator=g)  # memorized
    fresh = 3 * torch.randn(60, 2, generator=g)  # mostly not
    samples = torch.cat([copies, fresh])
    whole = memorized_share(samples, train, block=None)
    assert 0.3 < whole < 1.0
    # ``block`` training points at a time: from two (the least) to more than there are
    assert memorized_share(samples, train, block=block * samples.shape[0]) == whole
    assert memorized_share(samples, train[:2], block=1) == memorized_share(
        samples, train[:2], block=None
    )
    assert math.isnan(memorized_share(samples, train[:1]))


def test_negative_elbo_in_small_batches_equals_one_batch():
    torch.manual_seed(0)
    model = build_score_model((2,), width=16)
    y = torch.randn(300, 2)
    schedule = get_schedule("linear")
    one = negative_elbo(model, y, schedule, T=0.8, draws=5, seed=3, batch_size=4096)
    small = negative_elbo(model, y, schedule, T=0.8, draws=5, seed=3, batch_size=7)
    torch.testing.assert_close(small.per_point, one.per_point, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(small.mc_var, one.mc_var, rtol=1e-5, atol=1e-9)


def test_subgaussian_scale_over_blocks_of_the_grid_equals_the_whole_grid(monkeypatch):
    import bound_tuner.maths.bounds.kfold as kfold

    g = torch.Generator().manual_seed(1)
    values = torch.cat([torch.randn(500, generator=g), 8 + torch.rand(5, generator=g)])  # a tail
    monkeypatch.setattr(kfold, "LAMBDA_BLOCK", 10**12)  # the whole grid at once
    whole = kfold.subgaussian_scale(values)
    for block in (1, 505 * 7, 505 * 399):  # a grid point at a time, 7, all but one
        monkeypatch.setattr(kfold, "LAMBDA_BLOCK", block)
        assert kfold.subgaussian_scale(values) == pytest.approx(whole, rel=1e-12)
    assert whole > float(values.std())  # the long upper tail
