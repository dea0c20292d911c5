import numpy as np
import pytest
import torch

from bound_tuner.data import gaussian, load_dataset, swiss_roll, validate_points


def test_swiss_roll_matches_papers_recipe():
    from sklearn.datasets import make_swiss_roll

    x = swiss_roll(500, seed=3)
    ref, _ = make_swiss_roll(n_samples=500, noise=0.5, random_state=3)
    np.testing.assert_allclose(x.numpy(), ref[:, [0, 2]] / 5.0, rtol=1e-6)
    assert x.dtype == torch.float32 and x.shape == (500, 2)


def test_gaussian_moments():
    x = gaussian(20_000, d=3, mean=1.0, std=2.0, seed=0)
    assert float(x.mean()) == pytest.approx(1.0, abs=0.03)
    assert float(x.std()) == pytest.approx(2.0, abs=0.03)


def test_load_dataset_split_and_seed():
    a = load_dataset("swiss_roll", m=100, seed=1, test_size=50)
    b = load_dataset("swiss_roll", m=100, seed=1, test_size=50)
    c = load_dataset("swiss_roll", m=100, seed=2, test_size=50)
    assert torch.equal(a.train, b.train) and not torch.equal(a.train, c.train)
    assert a.test.shape == (50, 2)


def _shared_points(train: torch.Tensor, test: torch.Tensor) -> int:
    """How many test points are also training points (exactly equal rows)."""
    return int((test[:, None, :] == train[None, :, :]).all(-1).any(-1).sum())


@pytest.mark.parametrize("name", ["swiss_roll", "gaussian", "two_moons", "ring"])
def test_no_test_point_is_a_training_point(name):
    split = load_dataset(name, m=300, seed=4, test_size=500)
    assert split.train.shape[0] == 300 and split.test.shape[0] == 500
    assert _shared_points(split.train, split.test) == 0
    # the check itself finds a shared point
    assert _shared_points(split.train, torch.cat([split.test, split.train[7:8]])) == 1


def test_a_split_of_the_users_points_keeps_test_points_out_of_training():
    x = torch.arange(200, dtype=torch.float32).reshape(100, 2)  # 100 distinct points
    split = load_dataset("tensors", train=x, test_fraction=0.25, seed=3)
    assert split.train.shape[0] + split.test.shape[0] == 100 and split.test.shape[0] == 25
    assert _shared_points(split.train, split.test) == 0
    both = torch.cat([split.train, split.test])
    assert torch.equal(both[both[:, 0].argsort()], x)  # every point on exactly one side


@pytest.mark.parametrize(
    "bad,match",
    [
        (torch.tensor([[1.0, float("nan")], [0.0, 0.0]]), "NaN or infinite"),
        (torch.tensor([[1.0, float("inf")], [0.0, 0.0], [1.0, 1.0]]), r"first rows \[0\]"),
        (torch.zeros(0, 2), "0 point"),
        (torch.zeros(1, 2), "1 point"),
        (torch.zeros(5), "expected \\[m, d\\]"),
        ([[1.0, 2.0]], "torch.Tensor or numpy"),
    ],
)
def test_validation_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        validate_points(bad)


def test_unknown_dataset_and_bad_m():
    with pytest.raises(ValueError, match="unknown data set 'cifar'"):
        load_dataset("cifar", m=10)
    with pytest.raises(ValueError, match="at least 2"):
        load_dataset("swiss_roll", m=1)
