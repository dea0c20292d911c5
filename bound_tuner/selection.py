"""How well a score selects models against a ground truth (docs/theory.md, section 4).

Spearman's rank correlation, the regret of the score's pick and the pick's rank; lower is better
for both the score and the truth. numpy and scipy only, so reports load fast.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats


def spearman(scores: Sequence[float], truth: Sequence[float]) -> float:
    """Spearman's rank correlation between a score and the ground truth (nan if undefined)."""
    if len(scores) < 3:
        return math.nan
    rho = stats.spearmanr(scores, truth).statistic
    return float(rho)


def regret(scores: Sequence[float], truth: Sequence[float]) -> float:
    """truth(pick) / truth(best) - 1, pick = argmin score, best = min truth (both lower is better).

    Undefined (nan) when the best truth is not positive."""
    pick = int(np.argmin(scores))
    best = float(np.min(truth))
    return float(truth[pick]) / best - 1.0 if best > 0 else math.nan


def pick_rank(scores: Sequence[float], truth: Sequence[float]) -> int:
    """The rank (1 = best) of the score's pick among the candidates by the ground truth."""
    pick = int(np.argmin(scores))
    return int(1 + sum(float(t) < float(truth[pick]) for t in truth))
