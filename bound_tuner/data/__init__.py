"""Data sets through one registry: ``load_dataset(name, m=..., seed=...)``.

Every loader returns a ``DataSplit`` with a training set of m points and a test set. Image sets
live in ``bound_tuner.data.images`` and are imported only when asked for.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .synthetic import gaussian, ring, swiss_roll, two_moons
from .validate import validate_points

__all__ = [
    "DataSplit",
    "DATASETS",
    "IMAGE_SETS",
    "load_dataset",
    "swiss_roll",
    "gaussian",
    "two_moons",
    "ring",
    "validate_points",
]


@dataclass
class DataSplit:
    """A training set (m points) and a held-out test set, with a description of where they came from."""

    train: torch.Tensor
    test: torch.Tensor
    name: str
    info: dict


def _swiss_roll(*, m: int, seed: int, test_size: int, **kw) -> DataSplit:
    # the test set is drawn with another seed: an independent sample of the same distribution
    train = swiss_roll(m, seed=seed, **kw)
    test = swiss_roll(test_size, seed=seed + 1_000_003, **kw)
    return DataSplit(train, test, "swiss_roll", {"m": m, "seed": seed, "d": 2})


def _points(name: str, draw: Callable[..., torch.Tensor]) -> Callable[..., DataSplit]:
    def load(*, m: int, seed: int, test_size: int, **kw) -> DataSplit:
        train = draw(m, seed=seed, **kw)
        test = draw(test_size, seed=seed + 1_000_003, **kw)
        return DataSplit(train, test, name, {"m": m, "seed": seed, "d": 2})

    return load


def _gaussian(*, m: int, seed: int, test_size: int, d: int = 2, std: float = 2.0) -> DataSplit:
    train = gaussian(m, d=d, std=std, seed=seed)
    test = gaussian(test_size, d=d, std=std, seed=seed + 1_000_003)
    return DataSplit(train, test, "gaussian", {"m": m, "seed": seed, "d": d, "std": std})


def _image(name: str) -> Callable[..., DataSplit]:
    def load(**kw) -> DataSplit:
        from . import images

        return images.load_image_dataset(name, **kw)

    return load


IMAGE_SETS = ("fashion_mnist", "mnist")

DATASETS: dict[str, Callable[..., DataSplit]] = {
    "swiss_roll": _swiss_roll,
    "gaussian": _gaussian,
    "two_moons": _points("two_moons", two_moons),
    "ring": _points("ring", ring),
    "fashion_mnist": _image("fashion_mnist"),
    "mnist": _image("mnist"),
}


def load_dataset(
    name: str, *, m: int | str | None, seed: int = 0, test_size: int = 1000, **kw
) -> DataSplit:
    """Load data set ``name`` with m training points chosen by ``seed`` and a test split.

    For the image sets ``m=None`` or ``m="all"`` takes every training image.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; choose one of {', '.join(sorted(DATASETS))}")
    if m is None or m == "all":
        if name not in IMAGE_SETS:
            raise ValueError(
                f"m={m!r} (every training point) applies only to the image sets "
                f"{', '.join(IMAGE_SETS)}; give {name} an integer m of at least 2"
            )
        m = None
    elif not isinstance(m, int) or isinstance(m, bool) or m < 2:
        raise ValueError(
            f"m={m!r} must be an integer of at least 2 training points (or 'all' for image sets)"
        )
    split = DATASETS[name](m=m, seed=seed, test_size=test_size, **kw)
    split.train = validate_points(split.train, name=f"{name} training set")
    split.test = validate_points(split.test, name=f"{name} test set", min_points=1)
    return split
