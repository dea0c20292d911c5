"""The power-function average of a training run's weights (docs/theory.md eq. 1.2b).

After update k the average moves towards the weights by 1 - (1 - 1/k)^(gamma + 1), so iterate j
weighs about j^gamma and the average spans the same share of training at every length (Karras
et al. 2024, arXiv 2312.02696). The width ``ema`` is the relative standard deviation of the
averaged iterates' ages; gamma follows from it. No torch here: spec checks read the range.
"""

from __future__ import annotations

import math

#: the width of the average a training run returns by default (docs/theory.md 1.2, measured in 7.3)
DEFAULT_EMA = 0.09
#: widths whose average exists: gamma > 0 below sqrt(1/12), the width of the plain running mean
EMA_RANGE = (0.0, math.sqrt(1 / 12))


def ema_gamma(ema: float) -> float:
    """The exponent gamma of the average of width ``ema`` (eq. 1.2b): the positive root of
    (gamma + 1) / ((gamma + 2)^2 (gamma + 3)) = ema^2, a cubic in gamma."""
    if not EMA_RANGE[0] < ema < EMA_RANGE[1]:
        raise ValueError(
            f"ema={ema} is outside ({EMA_RANGE[0]:g}, {EMA_RANGE[1]:.3f}); give a width such as "
            f"{DEFAULT_EMA}, or 0 for the last weights"
        )
    inv = 1.0 / ema**2

    def cubic(g: float) -> float:  # gamma^3 + 7 gamma^2 + (16 - inv) gamma + 12 - inv
        return ((g + 7.0) * g + 16.0 - inv) * g + 12.0 - inv

    lo, hi = 0.0, inv  # cubic(0) = 12 - inv < 0 < cubic(inv); one root in between (bisection
    for _ in range(100):  # keeps this module free of numpy and scipy, which spec checks avoid)
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if cubic(mid) < 0 else (lo, mid)
    return 0.5 * (lo + hi)


def ema_keep(step: int, gamma: float) -> float:
    """The share of the average kept at update ``step`` (1-based): (1 - 1/step)^(gamma + 1)."""
    return (1.0 - 1.0 / step) ** (gamma + 1.0)
