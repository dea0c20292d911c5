"""VAE models, the VAE bound (docs/theory.md section 5) and bound-regularized training (section 6)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from bound_tuner.evaluation.vae_bound import vae_bound, vae_terms
from bound_tuner.maths.bounds.vae import (
    assemble_vae_bound,
    gaussian_kl,
    neg_log_bernoulli,
    r_to_R,
    reference_vae_R,
)
from bound_tuner.models.vae import MLPVAE, ConvVAE
from bound_tuner.training.vae import complexity_surrogate, train_vae, vae_batch_terms


def _binary_data(n: int = 300, d: int = 64, *, seed: int = 0) -> torch.Tensor:
    """n noisy copies (10% flipped bits) of 8 random binary prototypes."""
    g = torch.Generator().manual_seed(seed)
    protos = (torch.rand(8, d, generator=g) < 0.5).float()
    labels = torch.randint(0, 8, (n,), generator=g)
    flips = (torch.rand(n, d, generator=g) < 0.1).float()
    return (protos[labels] + flips) % 2


def _small_vae(seed: int = 1) -> MLPVAE:
    torch.manual_seed(seed)
    return MLPVAE(input_dim=64, hidden=(64, 32), latent=4)


def test_mlp_vae_shapes():
    vae = MLPVAE()
    assert [m.out_features for m in vae.encoder if isinstance(m, torch.nn.Linear)] == [512, 256, 32]
    assert [m.out_features for m in vae.decoder if isinstance(m, torch.nn.Linear)] == [
        256,
        512,
        784,
    ]
    x = torch.rand(5, 1, 28, 28)
    mu, logvar = vae.encode(x)
    assert mu.shape == logvar.shape == (5, 16)
    assert vae.decode(mu).shape == (5, 784)
    logits, _, _ = vae(x.reshape(5, -1))
    assert logits.shape == (5, 784)
    padded = MLPVAE(input_dim=1024)
    assert padded.decode(padded.encode(torch.rand(2, 1, 32, 32))[0]).shape == (2, 1024)
    with pytest.raises(ValueError, match="input_dim"):
        vae.encode(torch.rand(2, 1, 32, 32))


def test_conv_vae_shapes():
    vae = ConvVAE(latent=8)
    x = torch.rand(3, 1, 28, 28)
    mu, logvar = vae.encode(x)
    assert mu.shape == logvar.shape == (3, 8)
    assert vae.decode(mu).shape == (3, 1, 28, 28)
    assert vae.encode(x.reshape(3, -1))[0].shape == (3, 8)
    with pytest.raises(ValueError, match="28, 28"):
        vae.encode(torch.rand(3, 1, 32, 32))


def test_initial_decoder_is_frozen_theta0():
    vae = _small_vae()
    before = [p.detach().clone() for p in vae.decoder.parameters()]
    with torch.no_grad():
        for p in vae.decoder.parameters():
            p.add_(1.0)
    d0 = vae.initial_decoder()
    assert not d0.training and all(not p.requires_grad for p in d0.parameters())
    for p0, p in zip(d0.parameters(), before, strict=True):
        assert torch.equal(p0, p)
    vae.reset_initial_decoder()
    for p0, p in zip(vae.initial_decoder().parameters(), vae.decoder.parameters(), strict=True):
        assert torch.equal(p0, p)


def test_closed_forms():
    mu, logvar = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, math.log(4.0)]])
    # 0.5 (1 + 1 - 1 - 0) + 0.5 (0 + 4 - 1 - ln 4)
    assert gaussian_kl(mu, logvar).item() == pytest.approx(0.5 + 0.5 * (3 - math.log(4)))
    logits, x = torch.tensor([[0.0, 0.0]]), torch.tensor([[1.0, 0.0]])
    assert neg_log_bernoulli(logits, x).item() == pytest.approx(2 * math.log(2))


def test_bound_at_initialization():
    x = _binary_data(200)
    vae = _small_vae()
    rep = vae_bound(vae, x, decoder0=vae.initial_decoder(), test_x=x[:50], mc_samples=2)
    assert rep.kind == "vae"
    assert all(math.isfinite(v) for v in rep.terms.values())
    assert rep.terms["rec"] > 0 and rep.terms["kld"] >= 0
    assert rep.terms["mi"] == 0.0  # the decoder is still theta_0 and z is shared
    assert rep.total == pytest.approx(sum(rep.contributions.values()), rel=1e-12)
    assert rep.extras["encoder_only_bound"] < rep.total
    assert rep.settings == {
        "R": pytest.approx(math.sqrt(2.0)),  # the paper's r = 1: R = (1 + r)/sqrt(2)
        "R_source": "r",
        "r": 1.0,
        "m": 200,
        "d": 64,
        "mc_samples": 2,
        "latent": 4,
        "seed": 0,
    }
    assert rep.extras["test_neg_elbo"] == pytest.approx(
        rep.extras["test_rec"] + rep.extras["test_kld"]
    )
    assert rep.extras["heldout_loss"] == pytest.approx(
        rep.extras["test_rec"] + math.sqrt(rep.extras["test_kld"])
    )
    again = vae_bound(vae, x, decoder0=vae.initial_decoder(), test_x=x[:50], mc_samples=2)
    assert again.total == rep.total  # same seed, same numbers
    assert vae.training  # mode restored


def test_bound_after_training_and_clamp():
    x = _binary_data(300)
    vae = _small_vae()
    d0 = vae.initial_decoder()
    train_vae(vae, x, epochs=3, batch_size=32, lr=3e-3)
    rep = vae_bound(vae, x, decoder0=d0, r=0.5)
    assert rep.terms["mi"] > 0
    m = 300
    assert rep.contributions["mi"] == pytest.approx(1.5 * math.sqrt(rep.terms["mi"] / m))
    assert rep.contributions["kld"] == pytest.approx(1.5 * math.sqrt(rep.terms["kld"]))
    assert rep.total > rep.extras["encoder_only_bound"]
    # a "theta_0" that fits better than the decoder makes the MI estimate negative: clamped at 0
    fresh = _small_vae(seed=2)
    neg = vae_bound(fresh, x, decoder0=_trained_decoder(vae))
    assert neg.terms["mi"] < 0 and neg.contributions["mi"] == 0.0
    assert neg.total == pytest.approx(neg.terms["rec"] + 2 * math.sqrt(neg.terms["kld"]))
    with pytest.raises(ValueError, match="r="):
        vae_bound(vae, x, decoder0=d0, r=-1)


def _trained_decoder(vae: MLPVAE) -> torch.nn.Module:
    return copy.deepcopy(vae.decoder).requires_grad_(False).eval()


def test_vae_terms_without_theta0():
    x = _binary_data(50)
    t = vae_terms(_small_vae(), x, decoder0=None, batch_size=16)
    assert math.isnan(t.mi) and t.m == 50 and t.rec > 0


def test_lam_zero_is_plain_training():
    x = _binary_data(100)
    a = _small_vae()
    train_vae(a, x, epochs=2, batch_size=16, lam=0.0, seed=3)
    # the same loop written out: Adam on mean REC + mean KLD, draws from one generator
    b = _small_vae()
    g = torch.Generator().manual_seed(3)
    opt = torch.optim.Adam(b.parameters(), lr=1e-3)
    for _ in range(2):
        perm = torch.randperm(100, generator=g)
        for start in range(0, 100, 16):
            xb = x[perm[start : start + 16]]
            logits, mu, logvar = b(xb, generator=g)
            loss = neg_log_bernoulli(logits, xb).mean() + gaussian_kl(mu, logvar).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=0, atol=1e-6)


def test_lam_lowers_complexity_terms():
    x = _binary_data(300)
    reports = {}
    for lam in (0.0, 1.0):
        vae = _small_vae()
        d0 = vae.initial_decoder()
        hist = train_vae(vae, x, epochs=8, batch_size=32, lr=3e-3, lam=lam, seed=0)
        assert len(hist) == 8
        reports[lam] = vae_bound(vae, x, decoder0=d0, mc_samples=4)
    plain, reg = reports[0.0], reports[1.0]

    def complexity(rep):
        return rep.contributions["kld"] + rep.contributions["mi"]

    # measured: plain KLD 2.31, MI 10.5, complexity 3.41; lam=1 KLD 7e-5, MI 3.44, complexity 0.23
    assert plain.terms["kld"] > 1.0 and reg.terms["kld"] < 0.1 * plain.terms["kld"]
    assert reg.terms["mi"] < 0.5 * plain.terms["mi"]
    assert complexity(reg) < 0.25 * complexity(plain)


def test_surrogate_value_and_gradient_at_zero():
    kld = torch.tensor([4.0, 0.0], requires_grad=True)
    mi = torch.zeros(2, requires_grad=True)
    s = complexity_surrogate(kld, mi, m=100, r=1.0)
    assert s.item() == pytest.approx(2 * math.sqrt(2.0), abs=2 * 1e-3)
    s.backward()
    assert torch.isfinite(kld.grad).all() and torch.isfinite(mi.grad).all()


def test_callback_dynamic_binarize_and_nan():
    x = _binary_data(64) * 0.8 + 0.1  # grey values for dynamic binarization
    seen = []

    def cb(epoch, model):
        seen.append(epoch)
        if epoch == 2:
            raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        train_vae(_small_vae(), x, epochs=5, batch_size=16, dynamic_binarize=True, callback=cb)
    assert seen == [1, 2]
    bad = x.clone()
    bad[3, 5] = float("nan")
    with pytest.raises(FloatingPointError, match="epoch 1"):
        train_vae(_small_vae(), bad, epochs=1, batch_size=64, lam=1.0)


def test_R_scaled_bound_closed_form():
    # (5.2): REC + sqrt(2) R (sqrt(KLD) + sqrt(MI / m)); REC 10, KLD 4, MI 50, m 2, R 3
    total, c_kld, c_mi = assemble_vae_bound(10.0, 4.0, 50.0, m=2, R=3.0)
    assert c_kld == pytest.approx(3 * math.sqrt(2) * 2) and c_mi == pytest.approx(15 * math.sqrt(2))
    assert total == pytest.approx(10 + 21 * math.sqrt(2), rel=1e-12)
    # the paper's r: 1 + r = sqrt(2) R
    assert r_to_R(1.0) == pytest.approx(math.sqrt(2)) and r_to_R(0.0) == pytest.approx(0.5**0.5)
    paper = 10 + 2 * 2 + 2 * 5  # r = 1
    assert assemble_vae_bound(10.0, 4.0, 50.0, m=2, R=r_to_R(1.0))[0] == pytest.approx(paper)
    # a negative MI estimate contributes 0
    assert assemble_vae_bound(10.0, 4.0, -3.0, m=2, R=1.0)[2] == 0.0
    with pytest.raises(ValueError, match="R=0.0 must be a positive"):
        assemble_vae_bound(10.0, 4.0, 1.0, m=2, R=0.0)
    with pytest.raises(ValueError, match="r=-1"):
        r_to_R(-1.0)


def test_reference_vae_R_closed_form():
    x = torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0]])
    p = [3 / 5, 2 / 5]  # add-one smoothed pixel means
    nll = [
        -sum(math.log(pj if xj else 1 - pj) for xj, pj in zip(row, p, strict=True))
        for row in x.tolist()
    ]
    assert reference_vae_R(x) == pytest.approx((max(nll) - min(nll)) / 2, rel=1e-12)
    with pytest.raises(ValueError, match="pixels in \\[0, 1\\]"):
        reference_vae_R(2 * x)


def test_bound_with_R_number_data_and_estimate():
    x = _binary_data(120)
    vae = _small_vae()
    d0 = vae.initial_decoder()
    train_vae(vae, x, epochs=2, batch_size=32, lr=3e-3)
    base = vae_bound(vae, x, decoder0=d0, seed=5)
    rec, kld, mi = base.terms["rec"], base.terms["kld"], base.terms["mi"]
    m = 120

    def closed(R: float) -> float:
        return rec + math.sqrt(2) * R * (math.sqrt(kld) + math.sqrt(max(mi, 0) / m))

    assert base.total == pytest.approx(closed(math.sqrt(2)), rel=1e-12)
    seven = vae_bound(vae, x, decoder0=d0, seed=5, R=7.0)
    assert seven.settings["R"] == 7.0 and seven.settings["R_source"] == "number"
    assert "r" not in seven.settings and seven.total == pytest.approx(closed(7.0), rel=1e-12)
    data = vae_bound(vae, x, decoder0=d0, seed=5, R="data")
    assert data.settings["R"] == pytest.approx(reference_vae_R(x))
    assert data.total == pytest.approx(closed(reference_vae_R(x)), rel=1e-12)
    assert vae_bound(vae, x, decoder0=d0, seed=5, R="data", data_R=3.0).settings["R"] == 3.0
    # "estimate": half the range of the per-point REC, from the same draws of z
    est = vae_bound(vae, x, decoder0=d0, seed=5, R="estimate")
    with torch.no_grad():
        g = torch.Generator().manual_seed(5)
        rec_i, _, _ = vae_batch_terms(vae.eval(), x, decoder0=d0, generator=g)
    half = float(rec_i.max() - rec_i.min()) / 2
    assert est.settings["R"] == pytest.approx(half, rel=1e-5)
    assert est.extras["rec_half_range"] == pytest.approx(half, rel=1e-5)
    with pytest.raises(ValueError, match="R='huge'"):
        vae_bound(vae, x, decoder0=d0, R="huge")


class _NaNAfter(torch.nn.Module):
    """Wraps a VAE; its decoder returns NaN logits from the ``bad``-th call on (0-based)."""

    def __init__(self, vae: MLPVAE, bad: int) -> None:
        super().__init__()
        self.vae, self.bad, self.calls, self.latent = vae, bad, 0, vae.latent

    def encode(self, x):
        return self.vae.encode(x)

    def decode(self, z):
        out = self.vae.decode(z)
        self.calls += 1
        return out * float("nan") if self.calls > self.bad else out


def test_nan_loss_caught_once_per_epoch():
    x = _binary_data(64)
    seen = []
    # 4 steps per epoch; the 7th decoder call is epoch 2, step 2
    model = _NaNAfter(_small_vae(), bad=6)
    with pytest.raises(FloatingPointError) as err:
        train_vae(model, x, epochs=3, batch_size=16, callback=lambda e, m: seen.append(e))
    msg = str(err.value)
    assert "VAE loss is nan at epoch 2, step 2 (2 of 4 steps non-finite)" in msg
    assert "lower lr=0.001" in msg and "\n" not in msg
    assert seen == [1]  # the epoch with the NaN never reached its callback
