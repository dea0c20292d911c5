"""The dashboard hooks of one process of a run: the per-trial notes and, in one process, the charts."""

from __future__ import annotations

from typing import TYPE_CHECKING

from bound_tuner.dashboard.charts import ChartsCallback
from bound_tuner.dashboard.notes import TrialArtifacts
from bound_tuner.storage.folders import artifact_store_for

if TYPE_CHECKING:
    import torch


def dashboard_hooks(
    storage_url: str | None = None,
    *,
    reference: torch.Tensor | None = None,
    charts: bool = True,
) -> tuple[TrialArtifacts, list[ChartsCallback]]:
    """The ``on_result`` hook and study callbacks of one process of a study.

    ``charts`` must be true in exactly one process of a study (the single process, or worker 0).
    """
    hook = TrialArtifacts(artifact_store_for(storage_url), reference=reference)
    return hook, [ChartsCallback()] if charts else []
