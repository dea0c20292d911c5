"""The VAE's K-fold bound (docs/theory.md 5.4): its terms, fold masks and known answers."""

from __future__ import annotations

import math

import pytest
import torch

from bound_tuner.evaluation.vae_bound import decoder_kl, point_nelbo, vae_kfold_bound
from bound_tuner.maths.bounds.kfold import fold_assignment
from bound_tuner.maths.bounds.vae import bernoulli_kl
from bound_tuner.models.vae import MLPVAE
from bound_tuner.training.vae import train_fold_vaes, train_vae, vae_batch_terms

M, D = 40, 64


def _data(seed: int = 0, m: int = M) -> torch.Tensor:
    """Binary points: noisy copies of 4 prototypes."""
    g = torch.Generator().manual_seed(seed)
    protos = (torch.rand(4, D, generator=g) < 0.3).float()
    x = protos[torch.randint(0, 4, (m,), generator=g)]
    flips = (torch.rand(m, D, generator=g) < 0.05).float()
    return (x + flips) % 2


def _build() -> MLPVAE:
    return MLPVAE(input_dim=D, hidden=(32,), latent=4)


def _trained(x: torch.Tensor, folds: torch.Tensor, *, epochs: int, seed: int = 3):
    torch.manual_seed(seed)
    model = _build()
    kw = dict(epochs=epochs, batch_size=8, lr=3e-3)
    train_vae(model, x, seed=seed, **kw)
    refs = train_fold_vaes(_build, x, folds, seed=seed, **kw)
    return model, refs


def test_bernoulli_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 7, generator=g) * 3, torch.randn(5, 7, generator=g) * 3
    P = torch.distributions.Bernoulli(logits=a)
    Q = torch.distributions.Bernoulli(logits=b)
    expect = torch.distributions.kl_divergence(P, Q).sum(dim=1)
    assert torch.allclose(bernoulli_kl(a, b), expect, atol=1e-5)
    assert torch.all(bernoulli_kl(a, a).abs() < 1e-6)


def test_point_nelbo_is_rec_plus_kld_on_the_same_draws():
    torch.manual_seed(0)
    model, x = _build(), _data()
    nelbo, var, kld = point_nelbo(
        model, x, mc_samples=4, generator=torch.Generator().manual_seed(1)
    )
    model.eval()
    with torch.no_grad():
        rec, kld2, _ = vae_batch_terms(
            model, x, mc_samples=4, generator=torch.Generator().manual_seed(1)
        )
    assert torch.allclose(nelbo, (rec + kld2).double(), atol=1e-4)
    assert torch.allclose(kld, kld2.double(), atol=1e-5)
    assert var.shape == (M,) and bool((var >= 0).all()) and float(var.sum()) > 0
    with pytest.raises(ValueError, match="at least 2 draws"):
        point_nelbo(model, x, mc_samples=1)


def test_references_never_see_their_own_fold():
    """Fold 0's points are NaN: reference 0 trains on the rest without a non-finite loss, and
    reference 1, the first that sees fold 0, is the one that fails."""
    x = _data()
    folds = fold_assignment(M, 2, seed=0)
    x[folds == 0] = math.nan
    built = []

    def build():
        built.append(1)
        return _build()

    with pytest.raises(FloatingPointError):
        train_fold_vaes(build, x, folds, seed=0, epochs=1, batch_size=8)
    assert len(built) == 2  # reference 0 finished; reference 1 hit the NaN points


def test_a_model_that_ignores_its_data_has_no_fold_information():
    """No training (0 epochs): the model and its references are the same network, so the
    decoders' KL is exactly 0, C_fold = 0 and the cross-fitted NELBO equals the training NELBO
    (the same weights on the same draws)."""
    x = _data()
    folds = fold_assignment(M, 4, seed=0)
    model, refs = _trained(x, folds, epochs=0)
    rep = vae_kfold_bound(model, refs, x, folds, seed=5)
    assert rep.terms["fold_info"] == 0.0
    assert rep.terms["cv_nelbo"] == pytest.approx(rep.terms["train_nelbo"], abs=1e-9)
    # the information form is the training NELBO plus its Monte Carlo margin alone
    margin = rep.terms["mc_margin"]
    assert margin == pytest.approx(1.6448536 * rep.extras["train_mc_se"]) and margin > 0
    assert rep.extras["info_bound"] == pytest.approx(rep.terms["train_nelbo"] + margin, abs=1e-9)
    # the value is the cross-fitted form: the same NELBO plus its 2 se_cv, moved by the shift
    # of eq. 2.10b (the references' own fit is the same network's NELBO on their points)
    shift = rep.terms["train_nelbo"] - rep.extras["refs_train_nelbo"]
    assert rep.terms["cv_shift"] == pytest.approx(shift) and abs(shift) < 0.5 * rep.extras["cv_se"]
    cv = rep.terms["train_nelbo"] + shift + 2 * rep.extras["cv_se"]
    assert rep.total == pytest.approx(cv, abs=1e-9)


def test_a_memorizing_vae_has_a_cross_fitting_gap_and_fold_information():
    """Trained long on 40 points, the model explains its own points far better than references
    that did not see them: the cross-fitted NELBO is well above the training NELBO, C_fold > 0,
    and the bound is the cross-fitted form, with the information form recorded beside it."""
    x = _data(m=M)
    folds = fold_assignment(M, 4, seed=0)
    model, refs = _trained(x, folds, epochs=150)
    rep = vae_kfold_bound(model, refs, x, folds, test_x=_data(seed=9, m=200), seed=5)
    t, e = rep.terms, rep.extras
    assert t["cv_nelbo"] > t["train_nelbo"] + 1.0
    assert t["fold_info"] > 0.0 and e["decoder_kl_max"] > 0.0
    R = rep.settings["R"]
    info = t["train_nelbo"] + math.sqrt(2) * R * t["fold_info"] + t["mc_margin"]
    assert e["info_bound"] == pytest.approx(info)
    shift = t["train_nelbo"] - e["refs_train_nelbo"]  # eq. 2.10b
    assert t["cv_shift"] == pytest.approx(shift)
    assert e["cv_bound"] == pytest.approx(t["cv_nelbo"] + shift + 2 * e["cv_se"])
    # eq. 5.4: that form, never below the training NELBO, and also the certificate
    value = max(t["cv_nelbo"] + shift + 2 * e["cv_se"], t["train_nelbo"])
    assert rep.total == pytest.approx(value) and e["info_bound"] > value
    assert e["total_upper95"] == pytest.approx(value)
    assert sum(rep.contributions.values()) == pytest.approx(value)
    assert rep.kind == "vae" and rep.settings["folds"] == 4 and rep.settings["R_source"] == "cv"
    # held-out extras, and the training NELBO below the held-out one under memorization
    assert e["test_neg_elbo"] > t["train_nelbo"] and e["test_neg_elbo_se"] > 0


def test_decoder_kl_is_zero_for_the_same_decoder_and_positive_otherwise():
    torch.manual_seed(0)
    a = _build()
    torch.manual_seed(1)
    b = _build()
    z = torch.randn(64, 4)
    assert decoder_kl(a, a, z) == 0.0
    assert decoder_kl(a, b, z) > 0.0
