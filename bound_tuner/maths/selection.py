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


def regret_diff(scores: Sequence[float], truth: Sequence[float]) -> float:
    """truth(pick) - truth(best), pick = argmin score: the regret on entropy-offset truths such as
    a held-out NELBO (nats) or bits per dim, where a ratio is undefined or compressed."""
    pick = int(np.argmin(scores))
    return float(truth[pick]) - float(np.min(truth))


def validity(
    scores: Sequence[float], truth: Sequence[float], truth_se: Sequence[float], *, n_se: float = 2.0
) -> dict[str, float]:
    """Does a score lie at or above the held-out quantity it bounds? The share of models with
    score >= truth - n_se * se (the held-out estimate's standard error), and the mean and worst
    (smallest) excess score - truth."""
    s, t, se = (np.asarray(v, dtype=float) for v in (scores, truth, truth_se))
    excess = s - t
    return {
        "share_above": float(np.mean(excess >= -n_se * se)),
        "mean_excess": float(np.mean(excess)),
        "worst_excess": float(np.min(excess)),
    }
