"""Input validation for training sets: one clear error per problem."""

from __future__ import annotations

import numpy as np
import torch


def validate_points(x, *, name: str = "data", min_points: int = 2) -> torch.Tensor:
    """Return ``x`` as a float32 tensor [m, ...] after checking shape, size and finiteness.

    Raises ValueError naming the problem and the mend: wrong type or shape, fewer than
    ``min_points`` points, NaN or infinite values.
    """
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor or numpy array, got {type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(
            f"{name} has shape {tuple(x.shape)}; expected [m, d] or [m, C, H, W] "
            "(reshape a single vector with x.reshape(1, -1), a 1-D data set with x[:, None])"
        )
    if x.shape[0] < min_points:
        raise ValueError(
            f"{name} has {x.shape[0]} point(s); at least {min_points} are needed for a bound"
        )
    if x[0].numel() == 0:
        raise ValueError(f"{name} has shape {tuple(x.shape)}: each point has no dimensions")
    if not x.is_floating_point():
        x = x.float()
    bad = ~torch.isfinite(x.reshape(x.shape[0], -1)).all(dim=1)
    if bad.any():
        idx = bad.nonzero().flatten()[:5].tolist()
        raise ValueError(
            f"{name} has NaN or infinite values in {int(bad.sum())} point(s) (first rows {idx}); "
            "drop or repair them"
        )
    return x.float()
