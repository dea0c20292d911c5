"""Packed training (bound_tuner.training.pack) against training each configuration alone."""

import pytest
import torch

from bound_tuner.data import swiss_roll
from bound_tuner.evaluation.diffusion_bound import bound_terms
from bound_tuner.evaluation.experiment import pack_terms
from bound_tuner.maths.bounds.variants import variant_report
from bound_tuner.maths.sde import get_schedule
from bound_tuner.training.config import DiffusionConfig
from bound_tuner.training.diffusion import train_model
from bound_tuner.training.pack import check_packable, train_packed

BASE = DiffusionConfig(width=16, layers=2, steps=60, batch_size=32)
MEMBERS = [
    BASE.__class__(**{**BASE.to_dict(), **kw})
    for kw in (
        {"T": 0.5, "lr": 3e-3, "seed": 1},
        {"T": 0.9, "lr": 1e-3, "lam": 5.0, "seed": 2},
        {"T": 0.7, "schedule": "cosine", "schedule_params": {"s": 0.02}, "seed": 3},
        {"T": 1.2, "schedule": "constant", "schedule_params": {"beta_const": 3.0}, "seed": 4},
        {"T": 0.6, "schedule_params": {"beta_min": 0.5, "beta_max": 12.0}, "lam": 1.0, "seed": 5},
    )
]


def _alone(x, cfg):
    model, _, losses = train_model(x, cfg, device="cpu")
    return model, losses


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-9), (torch.float32, 2e-3)])
def test_each_member_ends_where_training_it_alone_ends(dtype, rtol):
    x = swiss_roll(100, seed=0).to(dtype)
    torch.set_default_dtype(dtype)  # the models are built in the data's precision
    try:
        packed = train_packed(x, MEMBERS, device="cpu")
        alone = [_alone(x, c) for c in MEMBERS]
    finally:
        torch.set_default_dtype(torch.float32)
    for got, (model, losses) in zip(packed, alone, strict=True):
        assert got.error is None
        assert got.losses == pytest.approx(losses, rel=rtol, abs=rtol)
        for (name, p), q in zip(got.model.named_parameters(), model.parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=rtol, atol=rtol, msg=name)
    # the members did train differently (different settings), not to one shared model
    assert packed[0].losses[-1] != pytest.approx(packed[1].losses[-1], rel=1e-3)


def test_a_member_that_raises_is_dropped_and_the_others_are_unchanged():
    x = swiss_roll(100, seed=0)
    seen = []

    def callback(member, step, model):
        seen.append((member, step))
        if member == 1:
            raise RuntimeError("pruned")

    packed = train_packed(x, MEMBERS[:3], device="cpu", callback=callback, callback_every=20)
    assert seen == [(0, 20), (1, 20), (2, 20), (0, 40), (2, 40)]
    assert str(packed[1].error) == "pruned" and packed[1].losses is None
    for j in (0, 2):
        _, losses = _alone(x, MEMBERS[j])
        assert packed[j].losses == pytest.approx(losses, rel=2e-3, abs=2e-3)


def test_a_nan_member_fails_alone():
    x = swiss_roll(50, seed=0)
    bad = MEMBERS[0].__class__(**{**MEMBERS[0].to_dict(), "lr": float("inf")})
    packed = train_packed(x, [MEMBERS[1], bad], device="cpu", callback_every=30)
    assert isinstance(packed[1].error, FloatingPointError)
    assert packed[0].error is None and len(packed[0].losses) == MEMBERS[1].steps


def test_members_must_share_the_architecture():
    other = BASE.__class__(**{**BASE.to_dict(), "width": 32})
    with pytest.raises(ValueError, match="share width"):
        check_packable([BASE, other])


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-8), (torch.float32, 1e-4)])
def test_pack_terms_equal_each_member_measured_alone(dtype, rtol):
    x = swiss_roll(80, seed=0).to(dtype)
    cfgs = [
        DiffusionConfig(
            **{**c.to_dict(), "n_steps": 30, "n_paths": 24, "train_draws": 3, "variant": "elbo"}
        )
        for c in MEMBERS[:4]
    ]
    torch.set_default_dtype(dtype)
    try:
        packed = train_packed(x, cfgs, device="cpu")
        terms = pack_terms([p.model for p in packed], cfgs, x)
        assert terms is not None and len(terms) == 4
        for p, cfg, got in zip(packed, cfgs, terms, strict=True):
            alone = bound_terms(
                p.model,
                x,
                get_schedule(cfg.schedule, **cfg.schedule_params),
                T=cfg.T,
                variants=("elbo",),
                n_steps=30,
                n_paths=24,
                train_draws=3,
                seed=cfg.eval_seed,
            )
            assert got.nelbo.mean == pytest.approx(alone.nelbo.mean, rel=rtol)
            assert got.i_girsanov == pytest.approx(alone.i_girsanov, rel=rtol)
            assert got.l_hat == pytest.approx(alone.l_hat, rel=rtol)
            assert got.settings.keys() == alone.settings.keys()
            for key, value in alone.settings.items():  # measured ones (sample_scale) to rtol
                want = pytest.approx(value, rel=rtol) if isinstance(value, float) else value
                assert got.settings[key] == want, key
            report = variant_report(got, variant="elbo")
            assert report.total == pytest.approx(
                variant_report(alone, variant="elbo").total, rel=rtol
            )
    finally:
        torch.set_default_dtype(torch.float32)
    # the paper's variant is measured one by one
    paper = [DiffusionConfig(**{**c.to_dict(), "variant": "paper"}) for c in cfgs]
    assert pack_terms([p.model for p in packed], paper, x.float()) is None


def test_every_member_dropped_at_one_checkpoint_ends_the_pack_cleanly():
    """All members pruned at the same checkpoint (a pack's trials are pruned together under
    load): each carries its error, none raises out of the pack."""
    x = swiss_roll(60, seed=0)

    def callback(member, step, model):
        raise RuntimeError(f"pruned {member}")

    packed = train_packed(x, MEMBERS[:3], device="cpu", callback=callback, callback_every=20)
    assert [str(p.error) for p in packed] == ["pruned 0", "pruned 1", "pruned 2"]
    assert all(p.losses is None for p in packed)


def test_members_with_fold_rows_dropped_mid_training_leave_the_rest_as_trained_alone():
    """Fold rows (K-fold references) and pruning together: members 0 and 2 dropped at the
    first checkpoint, member 3 at the second; members 1 and 4 end where training them alone
    on their rows ends."""
    x = swiss_roll(60, seed=0)
    cfgs = [BASE] * 5
    rows = [None] + [torch.arange(60)[torch.arange(60) % 4 != k] for k in range(4)]
    dropped = {0: 20, 2: 20, 3: 40}

    def callback(member, step, model):
        if dropped.get(member) == step:
            raise RuntimeError("pruned")

    packed = train_packed(x, cfgs, device="cpu", rows=rows, callback=callback, callback_every=20)
    assert [p.error is None for p in packed] == [False, True, False, False, True]
    for j in (1, 4):
        alone = train_packed(x, [BASE], device="cpu", rows=[rows[j]])[0]
        assert packed[j].losses == pytest.approx(alone.losses, rel=2e-3, abs=2e-3)


def test_out_of_memory_in_the_stacked_call_propagates_instead_of_looping():
    """Members.of_models falls back to one model at a time only for modules torch.func cannot
    vmap; an out-of-memory error is reported, not hidden behind a slower loop."""
    from torch import nn

    from bound_tuner.training.members import Members

    calls = []

    class Hungry(nn.Module):
        """Out of memory on its first call (the stacked one), fine after it."""

        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.zeros(2))

        def forward(self, x, t):
            calls.append(1)
            if len(calls) == 1:
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
            return x + self.w

    schedule = get_schedule("linear")
    members = Members.of_models([Hungry(), Hungry()], [schedule, schedule])
    with pytest.raises(torch.OutOfMemoryError):
        members.eps(torch.zeros(2, 3, 2), torch.full((2, 3), 0.5))
