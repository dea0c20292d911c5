"""A data set split into the training points and the held-out points."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass
class DataSplit:
    """A training set (m points) and a held-out test set, with a description of where they came from."""

    train: torch.Tensor
    test: torch.Tensor
    name: str
    info: dict
