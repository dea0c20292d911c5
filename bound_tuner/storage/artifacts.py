"""The artifact record of a trained model: its file's format, the trial's user attrs, the error.

Every complete trial of a study that keeps its weights uploads one file, ``model_trial<N>.pt``,
to the study's artifact store (the folder beside the database,
``bound_tuner.storage.folders.artifact_dir_for``, or one the user names). It is a dict of tensors
and plain values that ``torch.load(..., weights_only=True)`` reads: ``format`` (``FORMAT``),
``state_dict`` (the weights), ``kind`` ("diffusion" or "vae"), ``config`` (the trial's
DiffusionConfig or VAEConfig as a dict), ``build`` (what rebuilds the network: the data shape,
and for a VAE its architecture) and ``data`` (how the data were prepared). The trial's user attrs
``model.artifact_id``, ``model.sha256`` and ``model.store`` (``ATTR_ID``, ``ATTR_SHA``,
``ATTR_STORE``) say which file it is, its digest and the folder it went to.

``bound_tuner.storage.keeper`` writes these files, ``bound_tuner.storage.trained`` reads them back.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from optuna.artifacts.exceptions import ArtifactNotFound

__all__ = [
    "ATTR_ID",
    "ATTR_SHA",
    "ATTR_STORE",
    "FORMAT",
    "ArtifactError",
    "artifact_exists",
    "sha256_of",
]

FORMAT = 1
ATTR_ID = "model.artifact_id"
ATTR_SHA = "model.sha256"
ATTR_STORE = "model.store"


class ArtifactError(ValueError):
    """A trial without kept weights, or a weights file that is missing, changed or unreadable."""


def sha256_of(path: str | Path) -> str:
    """The SHA-256 digest of a file, as the trial records it (``ATTR_SHA``)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def artifact_exists(store: Any, artifact_id: str) -> bool:
    """Whether ``store`` holds ``artifact_id``. A missing file is False; an unreadable one (no
    permission, an I/O error) raises ArtifactError saying so."""
    try:
        reader = store.open_reader(artifact_id)
    except ArtifactNotFound:
        return False
    except (OSError, ValueError) as e:  # ValueError: an id that is not a file name
        where = getattr(store, "path", None) or getattr(store, "_base_path", "the store")
        raise ArtifactError(
            f"cannot read artifact {artifact_id} in {where}: {getattr(e, 'strerror', None) or e}"
        ) from None
    reader.close()
    return True
