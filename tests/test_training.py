import math

import pytest
import torch

from bound_tuner.data import load_dataset, swiss_roll
from bound_tuner.evaluation.diffusion_bound import diffusion_bound
from bound_tuner.evaluation.elbo import denoising_loss_pass
from bound_tuner.evaluation.experiment import run_diffusion
from bound_tuner.maths.draws import MAX_CHUNK_STEPS, NOISE_CHUNK_ELEMS
from bound_tuner.maths.sde import get_schedule
from bound_tuner.models import ScoreMLP
from bound_tuner.runtime.seeding import derive_seed, seed_everything
from bound_tuner.training.config import DiffusionConfig
from bound_tuner.training.loop import denoising_terms, train_score_model

LIN = get_schedule("linear")


def test_training_lowers_loss_and_is_reproducible():
    x = swiss_roll(100, seed=0)
    seed_everything(0)
    model = ScoreMLP(2, hidden=32)
    before = float(denoising_loss_pass(model, x, LIN, T=0.5, draws=16).mean())
    hist = train_score_model(model, x, LIN, T=0.5, steps=300, batch_size=100, lr=3e-3, seed=1)
    after = float(denoising_loss_pass(model, x, LIN, T=0.5, draws=16).mean())
    assert after < 0.8 * before
    seed_everything(0)
    model2 = ScoreMLP(2, hidden=32)
    hist2 = train_score_model(model2, x, LIN, T=0.5, steps=300, batch_size=100, lr=3e-3, seed=1)
    assert hist == hist2


def test_evaluation_pass_is_deterministic_and_per_sample():
    x = swiss_roll(50, seed=0)
    model = ScoreMLP(2, hidden=16)
    a = denoising_loss_pass(model, x, LIN, T=0.5, draws=8, seed=3)
    b = denoising_loss_pass(model, x, LIN, T=0.5, draws=8, seed=3)
    assert a.shape == (50,)
    assert torch.equal(a, b)
    # an untrained eps-net that outputs ~0 has loss ~ E 1/2||eps||^2 = d/2 = 1
    assert float(a.mean()) == pytest.approx(1.0, abs=0.5)


def _plain_dsm_training(model, x, *, T, steps, batch_size, lr, seed):
    """An independent loop: Adam on 1/2||eps_theta(x_t, t) - eps||^2, t ~ U(1e-3, T), clipped at 1,
    with the random numbers drawn as the library draws them (chunks of steps, one generator)."""
    g = torch.Generator().manual_seed(seed)
    chunk = min(steps, MAX_CHUNK_STEPS, NOISE_CHUNK_ELEMS // (batch_size * 2))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    out = []
    for step in range(steps):
        if step % chunk == 0:
            c = min(chunk, steps - step)
            idxs = torch.randint(x.shape[0], (c, batch_size), generator=g)
            ts = 1e-3 + (T - 1e-3) * torch.rand((c, batch_size), generator=g, dtype=torch.float64)
            epss = torch.randn((c, batch_size, 2), generator=g)
        idx, t, eps = idxs[step % chunk], ts[step % chunk], epss[step % chunk]
        a = LIN.alpha(t).float()[:, None]
        xt = a * x[idx] + (1 - a * a).sqrt() * eps
        loss = (0.5 * (model(xt, t.float()) - eps).pow(2).sum(1)).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        out.append(float(loss.detach()))
    return out


def test_lambda_zero_is_plain_training_and_lambda_lowers_score_term():
    x = swiss_roll(100, seed=1)
    seed_everything(0)
    plain = _plain_dsm_training(
        ScoreMLP(2, hidden=32), x, T=0.3, steps=50, batch_size=100, lr=3e-3, seed=2
    )
    seed_everything(0)
    ours = train_score_model(
        ScoreMLP(2, hidden=32), x, LIN, T=0.3, steps=50, batch_size=100, lr=3e-3, lam=0.0, seed=2
    )
    assert ours == pytest.approx(plain, rel=1e-5)  # lambda = 0 is the plain denoising loop
    runs = {}
    for lam in (0.0, 20.0):
        seed_everything(0)
        model = ScoreMLP(2, hidden=32)
        hist = train_score_model(
            model, x, LIN, T=0.3, steps=400, batch_size=100, lr=3e-3, lam=lam, seed=2
        )
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            wsq = torch.cat(
                [denoising_terms(model, x, LIN, T=0.3, generator=g)[1] for _ in range(20)]
            )
        runs.setdefault(lam, []).append((hist, float(wsq.mean())))
    # the regularizer targets the beta-weighted squared score: it must fall
    assert runs[20.0][0][1] < 0.7 * runs[0.0][0][1]


def test_nan_loss_raises():
    x = swiss_roll(20, seed=0)
    model = ScoreMLP(2, hidden=8)
    with torch.no_grad():
        model.net[0].weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="nan at step 0"):
        train_score_model(model, x, LIN, T=0.5, steps=5)


def test_diffusion_bound_report_fields():
    x = swiss_roll(64, seed=0)
    model = ScoreMLP(2, hidden=16)
    rep = diffusion_bound(model, x, LIN, T=0.5, R="estimate", n_steps=50, n_paths=32, train_draws=4)
    assert set(rep.terms) == {"train_loss", "encoder_mixture_kl", "prior_kl_sqrt", "generator_info"}
    s = rep.settings
    assert s["R_source"] == "estimate" and s["R"] == s["R_estimate"] > 0
    assert (s["T"], s["schedule"], s["m"], s["d"], s["N"], s["k"]) == (0.5, "linear", 64, 2, 50, 1)
    assert s["L_estimator"] == "path-mean" and s["L_hat"] > 0
    assert math.isfinite(rep.total)
    assert rep.total == pytest.approx(sum(rep.contributions.values()))
    user = diffusion_bound(model, x, LIN, T=0.5, R=5.0, n_steps=50, n_paths=32, train_draws=4)
    assert user.settings["R"] == 5.0 and user.settings["R_source"] == "user"
    with pytest.raises(ValueError, match="range"):
        diffusion_bound(model, x, get_schedule("cosine"), T=1.2)


def test_run_diffusion_with_validation():
    data = load_dataset("swiss_roll", m=64, seed=0, test_size=200)
    cfg = DiffusionConfig(
        T=0.5,
        steps=50,
        width=16,
        n_steps=20,
        n_paths=16,
        train_draws=2,
        heldout_n_generated=100,
        heldout_n_steps=20,
    )
    res = run_diffusion(data.train, cfg, test=data.test, validation=True)
    assert set(res.heldout) == {
        "denoising_loss",
        "neg_elbo",
        "neg_elbo_se",
        "sample_kl",
        "sample_kl_se",
        "test_kl",
    }
    h = res.heldout
    assert math.isfinite(h["test_kl"]) and h["denoising_loss"] > 0 and 0 < h["neg_elbo_se"] < 1
    assert math.isfinite(h["sample_kl"]) and h["sample_kl_se"] > 0
    assert len(res.losses) == 50


def test_derive_seed_stable_and_distinct():
    assert derive_seed(0, 1) == derive_seed(0, 1)
    assert len({derive_seed(0, i) for i in range(100)}) == 100
