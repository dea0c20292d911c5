"""The keep-best-N policy of trained weights: a finished trial's weights uploaded if it ranks
among the study's best ``keep_models`` by the bound, and those it pushes out deleted.

A study keeps the weights of its best ``keep_models`` trials by the bound (``[study]
keep_models``, default 5; "all" keeps every one): a new trial's weights are uploaded only if it
ranks among them, and the weights of a trial pushed out are deleted from the store. The file and
the user attrs a kept trial gets are ``bound_tuner.storage.artifacts``'s record.
"""

from __future__ import annotations

import logging
import math
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from optuna.artifacts.exceptions import ArtifactNotFound
from optuna.trial import FrozenTrial, TrialState

from bound_tuner.config.objective_names import bound_value
from bound_tuner.storage.artifacts import (
    ATTR_ID,
    ATTR_SHA,
    ATTR_STORE,
    FORMAT,
    ArtifactError,
    artifact_exists,
    sha256_of,
)

if TYPE_CHECKING:
    from torch import nn

__all__ = ["ModelKeeper"]

_log = logging.getLogger(__name__)


class ModelKeeper:
    """Uploads a finished trial's weights and keeps those of the best ``keep`` trials only.

    Called by the objectives after a trial's bound, with the trial, its model and its value.

    Args:
        artifact_store: an Optuna artifact store (``bound_tuner.storage.folders.artifact_store_for``).
        kind: "diffusion" or "vae".
        build: what rebuilds the network besides the trial's config (data shape, architecture).
        data: how the data were prepared (the split's info), kept for sampling.
        keep: how many of the best trials keep their weights (None: all; 0: none).
    """

    def __init__(
        self,
        artifact_store: Any,
        *,
        kind: str,
        build: dict[str, Any],
        data: dict[str, Any] | None = None,
        keep: int | None = 5,
    ) -> None:
        if keep is not None and keep < 0:
            raise ValueError(f"keep={keep} must be at least 0 (or None: every trial)")
        self.artifact_store = artifact_store
        self.kind = kind
        self.build = dict(build)
        self.data = {k: v for k, v in (data or {}).items() if _plain(v)}
        self.keep = keep
        # the keep-th best kept value this process last read: the study's can only have
        # improved since, so a trial no better than it is not among the best (no read needed)
        self.threshold = math.inf

    def __call__(self, trial: optuna.Trial, model: nn.Module, value: float) -> str | None:
        if self.keep == 0 or not math.isfinite(value):
            return None
        if self.keep is None:
            return self._upload(trial, model)
        if value >= self.threshold:
            return None
        # the kept trials and this one, best first (ties: the earlier trial)
        ranked = sorted(
            [(bound_value(t), t.number, t) for t in self._kept_trials(trial)]
            + [(value, trial.number, None)],
            key=lambda r: (r[0], r[1]),
        )
        if len(ranked) > self.keep:
            self.threshold = ranked[self.keep - 1][0]
        if all(r[2] is not None for r in ranked[: self.keep]):
            return None  # not among the best: nothing to upload
        artifact_id = self._upload(trial, model)
        for _, _, t in ranked[self.keep :]:
            try:
                self.artifact_store.remove(t.user_attrs[ATTR_ID])
            except ArtifactNotFound:  # already gone (another process, a manual cleanup)
                continue
            except OSError as e:  # the trial is kept; the old file stays behind
                _log.warning(
                    "trial %d: could not remove the weights of trial %d that it pushed out: %s",
                    trial.number,
                    t.number,
                    e,
                )
        return artifact_id

    def _kept_trials(self, trial: optuna.Trial) -> list[FrozenTrial]:
        """Complete trials of the study whose weights are still in the store, best first."""
        done = trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        out = [
            t
            for t in done
            if ATTR_ID in t.user_attrs
            and bound_value(t) is not None
            and math.isfinite(bound_value(t))
            and self._present(t)
        ]
        return out

    def _present(self, t: FrozenTrial) -> bool:
        """Whether trial ``t``'s weights are in the store; a file there that cannot be read
        counts as present (logged): it still takes a place, and is removed when pushed out."""
        try:
            return artifact_exists(self.artifact_store, t.user_attrs[ATTR_ID])
        except ArtifactError as e:
            _log.warning("trial %d: %s; counted as kept", t.number, e)
            return True

    def _upload(self, trial: optuna.Trial, model: nn.Module) -> str:
        import torch
        from optuna.artifacts import upload_artifact

        payload = {
            "format": FORMAT,
            "kind": self.kind,
            "config": dict(trial.user_attrs.get("config", {})),
            "build": self.build,
            "data": self.data,
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        }
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"model_trial{trial.number}.pt"
            torch.save(payload, path)
            digest = sha256_of(path)
            artifact_id = upload_artifact(
                artifact_store=self.artifact_store,
                file_path=str(path),
                study_or_trial=trial,
                mimetype="application/octet-stream",
            )
        trial.set_user_attr(ATTR_ID, artifact_id)
        trial.set_user_attr(ATTR_SHA, digest)
        base = getattr(self.artifact_store, "path", None) or getattr(
            self.artifact_store, "_base_path", None
        )
        if base is not None:
            trial.set_user_attr(ATTR_STORE, str(Path(base).resolve()))
        return artifact_id


def _plain(v: Any) -> bool:
    if v is None or isinstance(v, (bool, int, float, str)):
        return True
    if isinstance(v, (list, tuple)):
        return all(_plain(x) for x in v)
    if isinstance(v, dict):
        return all(isinstance(k, str) and _plain(x) for k, x in v.items())
    return False
