"""The power-function average of the weights (docs/theory.md eq. 1.2b): its exponent, the
weights a training run returns, and the spec setting."""

import textwrap

import pytest
import torch

from bound_tuner.config.schema import SpecError
from bound_tuner.config.spec import load_spec
from bound_tuner.data import swiss_roll
from bound_tuner.maths.averaging import EMA_RANGE, ema_gamma
from bound_tuner.maths.sde import get_schedule
from bound_tuner.models import ScoreMLP
from bound_tuner.runtime.seeding import seed_everything
from bound_tuner.training.loop import train_score_model

LIN = get_schedule("linear")


@pytest.mark.parametrize("ema", [0.01, 0.05, 0.09, 0.15, 0.25, 0.28])
def test_gamma_gives_the_width_it_was_asked_for(ema):
    g = ema_gamma(ema)
    assert g > 0
    # the relative standard deviation of the ages of iterates weighted by age^gamma
    assert ((g + 1) / ((g + 2) ** 2 * (g + 3))) ** 0.5 == pytest.approx(ema, rel=1e-10)


def test_gamma_matches_the_published_pairs_and_refuses_widths_without_an_average():
    # Karras et al. 2024 (arXiv 2312.02696): sigma_rel 0.05 <-> gamma 16.97, 0.10 <-> 6.94
    assert ema_gamma(0.05) == pytest.approx(16.97, abs=0.01)
    assert ema_gamma(0.10) == pytest.approx(6.94, abs=0.01)
    for bad in (0.0, -0.1, EMA_RANGE[1], 0.5):
        with pytest.raises(ValueError, match="outside"):
            ema_gamma(bad)


def _train(ema, *, seen=None, steps=40):
    x = swiss_roll(64, seed=0).double()
    seed_everything(0)
    model = ScoreMLP(2, hidden=16).double()

    def callback(step, m):
        seen.append(torch.cat([p.detach().flatten().clone() for p in m.parameters()]))

    losses = train_score_model(
        model,
        x,
        LIN,
        T=0.8,
        steps=steps,
        batch_size=16,
        lr=1e-2,
        seed=3,
        ema=ema,
        callback=None if seen is None else callback,
        callback_every=0 if seen is None else 1,
    )
    return model, losses


def _closed_form(iterates: list[torch.Tensor], g: float) -> torch.Tensor:
    """The average after K updates unrolled: iterate j (1-based) weighs
    (j^(g+1) - (j-1)^(g+1)) / K^(g+1), weights that add up to 1."""
    K = len(iterates)
    w = [(j ** (g + 1) - (j - 1) ** (g + 1)) / K ** (g + 1) for j in range(1, K + 1)]
    w = torch.tensor(w, dtype=torch.float64)
    return (w[:, None] * torch.stack(iterates)).sum(dim=0)


def test_training_returns_the_power_average_of_its_iterates_and_trains_as_without_it():
    iterates: list[torch.Tensor] = []
    _, plain_losses = _train(0.0, seen=iterates)  # the callback sees every last iterate
    averaged, losses = _train(0.09)
    assert losses == plain_losses  # the average never feeds back into training
    expected = _closed_form(iterates, ema_gamma(0.09))
    got = torch.cat([p.detach().flatten() for p in averaged.parameters()])
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    # it is not the last iterate: the average lags behind a run whose weights still move
    assert (got - iterates[-1]).abs().max() > 1e-3


def test_checkpoints_see_the_average_so_far():
    iterates: list[torch.Tensor] = []
    _train(0.0, seen=iterates, steps=20)
    averages: list[torch.Tensor] = []
    _train(0.2, seen=averages, steps=20)
    for K in (1, 7, 20):
        expected = _closed_form(iterates[:K], ema_gamma(0.2))
        torch.testing.assert_close(averages[K - 1], expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("value", ["0.3", "-0.05", "1"])
def test_a_width_without_an_average_is_refused_in_one_line(value, tmp_path):
    path = tmp_path / "s.toml"
    path.write_text(
        textwrap.dedent(
            f"""
            [study]
            name = "s"
            [data]
            name = "swiss_roll"
            m = 50
            [training]
            ema = {value}
            [search]
            T = {{ low = 0.1, high = 1.0 }}
            """
        )
    )
    with pytest.raises(SpecError, match=r"training\.ema = .* must be 0 \(the last weights\)") as e:
        load_spec(path)
    assert "\n" not in str(e.value)
    path.write_text(path.read_text().replace(f"ema = {value}", "ema = 0"))
    assert load_spec(path).training["ema"] == 0
