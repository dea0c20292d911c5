"""What diffusion and VAE training share for the certificate along training (docs/theory.md
2.12): the defaults, the checkpoint spacing, the best checkpoint kept, the report hook and the
trial attr of the curve. Light (torch only), so that an objective's module loads without the
evaluation passes."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

#: whether a lockstep trial keeps its best checkpoint when its configuration does not say
#: (``early_stop`` None), per model (docs/theory.md 7.3): a diffusion model's averaged weights
#: (eq. 1.2b) at the last step were picked better than its certified best checkpoint in every
#: case measured; a VAE's earlier epochs won where it overfits
DEFAULT_EARLY_STOP: dict[str, bool] = {"diffusion": False, "vae": True}
#: checkpoints before the last step (VAEs: epoch) when a study does not say
#: (``[training] checkpoints``): C = 8 values along training; 4 lost to 8 with 32 points
#: trained long (docs/theory.md 7.3)
DEFAULT_CHECKPOINTS = 7

#: the trial user attr of the value along training: [[step, value], ...] (docs/theory.md 2.12)
CURVE_ATTR = "bound.along_training"

#: ``report(step, value)``: called at every checkpoint with the value the trial would have if it
#: ended there (the smallest so far with early stopping); it may raise (optuna.TrialPruned)
Report = Callable[[int, float], None]


def early_stop_refusal(variant: str) -> str:
    """The one-line refusal of ``[bound] early_stop = true`` with a variant other than
    "elbo-kfold": only K-fold references certify each checkpoint (eq. 2.12)."""
    return (
        f'[bound] early_stop = true needs variant = "elbo-kfold" (its references certify each '
        f"checkpoint), not {variant!r}; remove early_stop or the variant"
    )


def checkpoint_every(steps: int, checkpoints: int) -> int:
    """Steps between two checkpoints: ``checkpoints`` evenly spaced before the last step
    (0: none; the last step is always evaluated)."""
    return max(1, steps // (checkpoints + 1)) if checkpoints > 0 else 0


def checkpoint_count(steps: int, every: int) -> int:
    """C, the number of steps whose value is computed: the multiples of ``every`` up to
    ``steps``, and ``steps`` itself."""
    if every <= 0:
        return 1
    return steps // every + (1 if steps % every else 0)


class BestCheckpoint:
    """The step (VAEs: epoch) of the smallest value so far and every model's weights there
    (eq. 2.12's argmin, with ``early_stop``); ``report`` gets each checkpoint's value as the
    trial would have it if it ended there."""

    def __init__(self, *, early_stop: bool, report: Report | None) -> None:
        self.early_stop = early_stop
        self.report = report
        self.value = float("inf")
        self.step: int | None = None
        self.weights: list[dict[str, torch.Tensor]] | None = None

    def see(self, step: int, value: float, models: list[nn.Module]) -> None:
        """One checkpoint's value; with early stopping a smaller one keeps a copy of ``models``."""
        if self.early_stop and value < self.value:
            self.value, self.step = value, step
            self.weights = [state_copy(mod) for mod in models]
        if self.report is not None:
            self.report(step, self.value if self.early_stop else value)

    def restore(self, models: list[nn.Module]) -> int | None:
        """Load the kept weights into ``models``; the kept step (None: nothing kept, the models
        stay at their last step)."""
        if self.weights is None:
            return None
        for mod, weights in zip(models, self.weights, strict=True):
            mod.load_state_dict(weights)
        return self.step


def state_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the model's state (on its device) to come back to."""
    return {name: t.detach().clone() for name, t in model.state_dict().items()}
