"""The measured terms a diffusion bound variant is assembled from (docs/theory.md sections 1.3 and 2).

Containers only: ``bound_tuner.evaluation`` fills them by running the model and
``bound_tuner.maths.bounds.variants`` turns them into a bound.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class ElboEstimate:
    """Per-point negative ELBO (nats, float64, CPU) and the Monte Carlo variance of each mean."""

    per_point: torch.Tensor  # [n]
    mc_var: torch.Tensor  # [n]: variance of each per-point mean over its draws

    @property
    def mean(self) -> float:
        return float(self.per_point.mean())

    @property
    def mc_se(self) -> float:
        """Standard error of ``mean`` from the Monte Carlo draws alone (the points held fixed)."""
        return float(self.mc_var.sum().sqrt()) / self.per_point.numel()

    @property
    def se(self) -> float:
        """Standard error of ``mean`` as an estimate of the population mean (points and draws)."""
        n = self.per_point.numel()
        return float(self.per_point.std()) / math.sqrt(n) if n > 1 else math.inf


@dataclass
class BoundTerms:
    """The measured ingredients of every bound variant for one model (docs/theory.md section 2).

    ``dsm`` and ``nelbo`` are per-sample training losses (None when not measured), the rest are
    numbers: L_hat, the uniform generator information I_gen, the Girsanov one I_gir, the
    encoder terms C_mix and C_prior (None when not needed) and the split term (None without
    reference models). ``settings`` says how.
    """

    dsm: torch.Tensor | None
    nelbo: ElboEstimate | None
    l_hat: float
    i_uniform: float
    i_girsanov: float
    encoder: dict[str, float] | None
    settings: dict
    split: float | None = None  # (1/m) sum_i sqrt(KL_i) against the half-trained references
    fold: dict[str, float] | None = None  # the K-fold references' terms (``kfold.fold_terms``)
