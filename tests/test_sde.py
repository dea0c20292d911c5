import math

import pytest
import torch

from bound_tuner.maths.sde import get_schedule, sample_xt

REFERENCE_SIGMA2 = {0.2: 0.34164, 0.4: 0.80446, 0.6: 0.97380, 1.0: 0.99996}


@pytest.mark.parametrize("T,expected", sorted(REFERENCE_SIGMA2.items()))
def test_linear_reference_values(T, expected):
    s = get_schedule("linear")
    assert float(s.sigma2(T)) == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize(
    "name,params,T_max",
    [
        ("linear", {}, 3.0),
        ("linear", {"beta_max": 5.0}, 3.0),
        ("cosine", {}, 0.99),
        ("constant", {"beta_const": 2.0}, 3.0),
    ],
)
def test_invariants(name, params, T_max):
    s = get_schedule(name, **params)
    t = torch.linspace(0.01, T_max, 200, dtype=torch.float64, requires_grad=True)
    alpha, sigma2, B = s.alpha(t), s.sigma2(t), s.big_b(t)
    torch.testing.assert_close(alpha**2 + sigma2, torch.ones_like(alpha), atol=1e-12, rtol=0)
    torch.testing.assert_close(B, -2 * torch.log(alpha), atol=1e-10, rtol=1e-10)
    (dB,) = torch.autograd.grad(B.sum(), t)
    torch.testing.assert_close(dB, s.beta(t).detach(), atol=1e-8, rtol=1e-8)
    assert float(s.big_b(0.0)) == pytest.approx(0.0, abs=1e-12)
    assert torch.all(s.beta(t) > 0)


def test_cosine_matches_nichol_dhariwal():
    s = get_schedule("cosine")
    f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    for t in (0.1, 0.5, 0.9):
        assert float(s.alpha(t)) ** 2 == pytest.approx(f(t) / f(0.0), rel=1e-12)


@pytest.mark.parametrize(
    "name,T,match",
    [
        ("cosine", 1.0, "range"),
        ("cosine", 1.5, "range"),
        ("linear", 0.0, "t_min"),
        ("linear", -1.0, "t_min"),
        ("linear", float("nan"), "finite"),
        ("constant", float("inf"), "finite"),
    ],
)
def test_T_outside_range_is_clear_error(name, T, match):
    with pytest.raises(ValueError, match=match):
        get_schedule(name).check_T(T)


def test_unknown_schedule_and_bad_params():
    with pytest.raises(ValueError, match="unknown schedule 'sigmoid'"):
        get_schedule("sigmoid")
    with pytest.raises(ValueError, match="allowed: beta_min, beta_max"):
        get_schedule("linear", b1=3.0)
    with pytest.raises(ValueError, match="positive"):
        get_schedule("constant", beta_const=-1.0)


def test_sample_xt_moments():
    s = get_schedule("linear")
    x0 = torch.full((200_000, 1), 2.0)
    t = torch.full((200_000,), 0.3, dtype=torch.float64)
    xt, _ = sample_xt(x0, t, s)
    assert float(xt.mean()) == pytest.approx(2 * float(s.alpha(0.3)), abs=0.01)
    assert float(xt.var()) == pytest.approx(float(s.sigma2(0.3)), abs=0.01)


def test_log_snr_and_its_inverse_for_every_schedule():
    t = torch.linspace(0.002, 0.95, 200, dtype=torch.float64)
    for s in (get_schedule("linear"), get_schedule("cosine"), get_schedule("constant")):
        lam = s.log_snr(t)
        assert torch.all(lam[1:] < lam[:-1])  # log-SNR falls with t
        a2, v = s.alpha(t) ** 2, s.sigma2(t)
        assert torch.allclose(lam, torch.log(a2 / v), atol=1e-9)
        assert torch.allclose(s.time_at_log_snr(lam), t, atol=1e-10)
        assert torch.allclose(s.inverse_big_b(s.big_b(t)), t, atol=1e-10)
