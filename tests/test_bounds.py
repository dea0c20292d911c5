import math

import pytest
import torch

from bound_tuner.data import gaussian, swiss_roll
from bound_tuner.maths.bounds import (
    assemble_diffusion_bound,
    beta_integral,
    generator_info,
    l_hat_from_norms,
    mixture_kl,
    mixture_kl_broadcast,
    prior_kl,
    prior_kl_sqrt,
)
from bound_tuner.maths.bounds.report import flat_attrs
from bound_tuner.maths.sde import get_schedule
from bound_tuner.training.sampling import generate

LIN = get_schedule("linear")


def _terms(x, T, schedule=LIN, **kw):
    a, v = float(schedule.alpha(T)), float(schedule.sigma2(T))
    return mixture_kl(a * x, v, **kw), prior_kl_sqrt(x, alpha=a, sigma2=v)


def test_prior_kl_closed_form_against_torch_distributions():
    x = torch.randn(5, 3)
    a, v = 0.7, 1 - 0.49
    got = prior_kl(x, alpha=a, sigma2=v)
    assert got.shape == (5,)
    for i in range(5):
        p = torch.distributions.MultivariateNormal(
            a * x[i].double(), v * torch.eye(3, dtype=torch.float64)
        )
        q = torch.distributions.MultivariateNormal(
            torch.zeros(3, dtype=torch.float64), torch.eye(3, dtype=torch.float64)
        )
        assert float(got[i]) == pytest.approx(
            float(torch.distributions.kl_divergence(p, q)), rel=1e-10
        )


def test_mixture_kl_m1_is_zero_and_range():
    assert mixture_kl(torch.randn(1, 4), 0.3) == 0.0
    x = swiss_roll(300, seed=1)
    for T in (0.05, 0.3, 0.6, 1.5):
        c, _ = _terms(x, T)
        assert 0.0 <= c <= math.log(300) + 1e-12


def test_mixture_kl_each_sample_at_most_log_m():
    x = swiss_roll(100, seed=2)
    per = mixture_kl(x, 1e-4, per_point=True, mc_samples=3)
    assert float(per.max()) <= math.log(100) + 1e-12


def test_limits_in_T():
    x = swiss_roll(200, seed=3)
    m, d = x.shape
    c_small, p_small = _terms(x, 1e-5)
    c_large, p_large = _terms(x, 4.0)
    assert c_small == pytest.approx(math.log(m), abs=0.02)  # distinct points: ln m
    assert c_large < 1e-3
    assert p_large < 1e-3
    # C_prior blows up like sqrt(-(d/2) ln sigma^2) as T -> 0
    for T in (1e-3 * 3, 1e-4 * 3):
        s2 = float(LIN.sigma2(T))
        _, p = _terms(x, T)
        assert p / math.sqrt(-(d / 2) * math.log(s2)) == pytest.approx(1.0, abs=0.15)
    # and falls monotonically in between
    ps = [_terms(x, T)[1] for T in (0.05, 0.1, 0.2, 0.4, 0.8, 1.6)]
    assert all(a > b for a, b in zip(ps, ps[1:]))


def test_identity_prior_minus_mixture_is_kl_of_mixture_to_prior():
    """(1/m) sum KL(E(x_i)||pi) - C_mix' = KL(E#P_S || pi), the latter by direct Monte Carlo."""
    x = swiss_roll(150, seed=4)
    T = 0.3
    a, v = float(LIN.alpha(T)), float(LIN.sigma2(T))
    mu = (a * x).double()
    lhs = float(prior_kl(x, alpha=a, sigma2=v).mean()) - mixture_kl(mu, v, mc_samples=64, seed=5)
    g = torch.Generator().manual_seed(6)
    n = 200_000
    z = mu[torch.randint(150, (n,), generator=g)] + math.sqrt(v) * torch.randn(
        n, 2, generator=g, dtype=torch.float64
    )
    log_q = (
        torch.logsumexp(-torch.cdist(z, mu).pow(2) / (2 * v), dim=1)
        - math.log(150)
        - math.log(2 * math.pi * v)
    )
    log_pi = -0.5 * (z * z).sum(1) - math.log(2 * math.pi)
    rhs = float((log_q - log_pi).mean())
    se = float((log_q - log_pi).std()) / math.sqrt(n)
    assert rhs > 0 and lhs > 0
    assert lhs == pytest.approx(rhs, abs=4 * se + 0.01)


@pytest.mark.parametrize("T,I_ref", [(0.2, 2.1643), (0.6, 0.1022)])
def test_gaussian_cmix_approaches_mutual_information(T, I_ref):
    a, v = float(LIN.alpha(T)), float(LIN.sigma2(T))
    I = 0.5 * 2 * math.log(1 + a * a * 4 / v)
    assert I == pytest.approx(I_ref, abs=1e-4)
    m = 4000
    x = gaussian(m, d=2, std=2.0, seed=1)
    per = mixture_kl(a * x, v, mc_samples=4, seed=2, per_point=True)
    se = float(per.std()) / math.sqrt(m)
    assert float(per.mean()) == pytest.approx(I, abs=4 * se)
    # and the prior term has its closed form: E KL = 1/2 (a^2 d s^2 + d (v - 1 - ln v))
    expect = 0.5 * (a * a * 2 * 4 + 2 * (v - 1 - math.log(v)))
    assert float(prior_kl(x, alpha=a, sigma2=v).mean()) == pytest.approx(expect, rel=0.05)


def test_fast_estimator_agrees_with_broadcast():
    torch.manual_seed(0)
    centers = torch.randn(10, 64)
    x = centers[torch.randint(10, (300,))] + 0.5 * torch.randn(300, 64)
    for v in (0.05, 0.5, 5.0):
        fast = mixture_kl(x, v, seed=3, mc_samples=2)
        ref = mixture_kl_broadcast(x, v, seed=3, mc_samples=2, row_chunk=64)
        assert fast == pytest.approx(ref, abs=1e-3)
    # chunking does not change the result
    assert mixture_kl(x, 0.5, seed=3, chunk_size=7) == pytest.approx(
        mixture_kl(x, 0.5, seed=3), abs=1e-9
    )


def test_terms_depend_on_schedule_only_through_alpha():
    x = swiss_roll(200, seed=7)
    T_lin = 0.4
    a = float(LIN.alpha(T_lin))
    cos = get_schedule("cosine")
    # solve alpha_cos(T) = a by bisection
    lo, hi = 1e-3, 0.999
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if float(cos.alpha(mid)) > a else (lo, mid)
    T_cos = (lo + hi) / 2
    assert float(cos.alpha(T_cos)) == pytest.approx(a, rel=1e-9)
    c1, p1 = _terms(x, T_lin, LIN, seed=9)
    c2, p2 = _terms(x, T_cos, cos, seed=9)
    assert c1 == pytest.approx(c2, abs=1e-5)
    assert p1 == pytest.approx(p2, rel=1e-9)
    # the generator term through int beta = B(T) - B(t_min) = -2 ln alpha_T - B(t_min)
    i1 = generator_info(10.0, LIN, T=T_lin, m=200, n_steps=20_000)
    i2 = generator_info(10.0, cos, T=T_cos, m=200, n_steps=20_000)
    assert i1 == pytest.approx(i2, rel=2e-3)


def test_generator_info_limits_and_independence_of_N():
    T, m = 0.8, 100
    B = float(LIN.big_b(T) - LIN.big_b(1e-3))
    vals = [beta_integral(LIN, T=T, n_steps=n) for n in (1000, 10_000, 100_000)]
    assert abs(vals[-1] - B) < abs(vals[0] - B) < 0.02 * B
    assert vals[-1] == pytest.approx(B, rel=1e-4)
    i1 = generator_info(3.0, LIN, T=T, m=m, n_steps=1000)
    i2 = generator_info(3.0, LIN, T=T, m=m, n_steps=4000)
    assert i1 == pytest.approx(i2, rel=0.01)
    # sqrt(I_gen) grows like sqrt(B(T)) and falls like m^(-1/2)
    assert i1 == pytest.approx(9.0 * vals[0] / (2 * m), rel=1e-12)
    assert math.sqrt(generator_info(3.0, LIN, T=T, m=4 * m, n_steps=1000)) == pytest.approx(
        math.sqrt(i1) / 2, rel=1e-12
    )
    ratio = [
        generator_info(1.0, LIN, T=t, m=m, n_steps=5000) / float(LIN.big_b(t))
        for t in (0.5, 1.0, 2.0)
    ]
    assert max(ratio) / min(ratio) == pytest.approx(1.0, abs=0.01)


def test_bound_is_u_shaped_in_T():
    x = swiss_roll(200, seed=8)
    Ts = [0.002, 0.01, 0.05, 0.2, 0.6, 1.5, 5.0, 20.0]
    totals = []
    for T in Ts:
        c, p = _terms(x, T)
        i_gen = generator_info(5.0, LIN, T=T, m=200, n_steps=1000)
        rep = assemble_diffusion_bound(
            train_loss=0.5, c_mix=c, c_prior=p, i_gen=i_gen, R=5.0, settings={}
        )
        totals.append(rep.total)
    k = totals.index(min(totals))
    assert 0 < k < len(Ts) - 1
    assert all(a > b for a, b in zip(totals[:k], totals[1 : k + 1]))
    assert all(a < b for a, b in zip(totals[k:], totals[k + 1 :]))
    assert totals[0] > totals[k] + 10 and totals[-1] > totals[k] + 50


class _OracleGaussianEps(torch.nn.Module):
    """The exact eps-prediction for X ~ N(0, s^2 I): eps = sigma_t y / (alpha_t^2 s^2 + sigma_t^2)."""

    def __init__(self, schedule, s2):
        super().__init__()
        self.schedule, self.s2 = schedule, s2

    def forward(self, y, t):
        a2 = self.schedule.alpha(t.double()) ** 2
        v = a2 * self.s2 + (1 - a2)
        sig = (1 - a2).sqrt()
        return (sig / v).to(y.dtype)[:, None] * y


def test_l_hat_exact_for_linear_score():
    """With the exact (linear) score and alpha_T ~ 0, paths stay N(0, v_t I): ||s|| = ||y|| / v_t.

    For s^2 < 1, v_t falls along the path, so the largest mean norm is at the last step.
    """
    s2, T, N = 0.25, 1.5, 1000
    model = _OracleGaussianEps(LIN, s2)
    run = generate(
        model,
        LIN,
        T=T,
        n=5000,
        shape=(2,),
        n_steps=N,
        seed=0,
    )
    h = (T - 1e-3) / N
    t_last = T - (N - 1) * h
    a2 = float(LIN.alpha(t_last)) ** 2
    v = a2 * s2 + 1 - a2
    expect_mean = math.sqrt(math.pi / 2) / math.sqrt(v)  # E||y|| / v for y ~ N(0, v I_2)
    assert expect_mean == pytest.approx(2.506, abs=0.01)
    assert l_hat_from_norms(run.score_norms, estimator="path-mean") == pytest.approx(
        expect_mean, rel=0.03
    )
    assert l_hat_from_norms(run.score_norms, estimator="path-max") > expect_mean * 1.5
    assert float(run.samples.var()) == pytest.approx(s2, rel=0.05)
    with pytest.raises(ValueError, match="unknown L estimator"):
        l_hat_from_norms(run.score_norms, estimator="mean")


def test_report_contributions_sum_to_total():
    rep = assemble_diffusion_bound(
        train_loss=1.0, c_mix=2.0, c_prior=0.5, i_gen=0.25, R=2.0, settings={"T": 1.0}
    )
    k = math.sqrt(2) * 2.0
    assert rep.total == pytest.approx(1.0 - 2.0 + k * (0.5 + 0.5))
    rep.extras.update(total_upper95=9.0, L_hat=3.0)
    attrs = rep.user_attrs()
    assert attrs["bound.total"] == rep.total and attrs["bound.total_upper95"] == 9.0
    # settings and the other extras are one user attr each (one database write per attr)
    assert attrs["bound.settings"] == {"T": 1.0} and attrs["bound.extras"] == {"L_hat": 3.0}
    assert "bound.T" not in attrs and len(attrs) == 1 + 4 + 4 + 1 + 2
    flat = flat_attrs(attrs)
    assert flat["bound.encoder_mixture_kl"] == 2.0 and flat["bound.T"] == 1.0
    assert flat["bound.L_hat"] == 3.0 and "bound.settings" not in flat
    # a trial stored with flat keys reads back as it is
    assert flat_attrs(flat) == flat


def test_mixture_kl_rejects_bad_input():
    with pytest.raises(ValueError, match="NaN"):
        mixture_kl(torch.tensor([[0.0, float("nan")], [1.0, 1.0]]), 0.5)
    with pytest.raises(ValueError, match="var"):
        mixture_kl(torch.randn(3, 2), 0.0)
    with pytest.raises(ValueError, match="shape"):
        mixture_kl(torch.randn(3), 0.5)
