"""Files out of a trained model: its weights and config exported, its samples written as .npy
or a .png grid, each file written whole or not at all."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from bound_tuner.storage.artifacts import ArtifactError

if TYPE_CHECKING:
    import torch

    from bound_tuner.storage.trained import TrainedModel

__all__ = ["export_model", "save_samples"]


def _atomic(out: Path, write) -> None:
    """Write ``out`` through a temporary file in its folder: all of it or nothing."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=out.suffix)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def export_model(tm: TrainedModel, out: str | Path, *, study_name: str | None = None) -> Path:
    """Write the state dict to ``out`` (.pt) and the config beside it (``out`` with .json)."""
    import json

    import torch

    out = Path(out)
    if out.suffix != ".pt":
        raise ArtifactError(f"--out {out}: the weights file must end in .pt")
    sd = {k: v.detach().cpu() for k, v in tm.model.state_dict().items()}
    meta = {
        "study": study_name,
        "trial": tm.trial,
        "bound": tm.value,
        "kind": tm.kind,
        "config": tm.config,
        "shape": list(tm.shape),
        "data": tm.data,
        "weights": out.name,
    }
    _atomic(out, lambda p: torch.save(sd, p))
    _atomic(out.with_suffix(".json"), lambda p: p.write_text(json.dumps(meta, indent=2) + "\n"))
    return out.with_suffix(".json")


def save_samples(x: torch.Tensor, out: str | Path, *, image: bool) -> None:
    """Samples to ``out``: .npy for any data, .png (an 8-wide grid) for images in [0, 1]."""
    import numpy as np

    out = Path(out)
    suffix = out.suffix.lower()
    if suffix == ".npy":
        _atomic(out, lambda p: np.save(p, x.numpy()))
    elif suffix == ".png":
        if not image:
            raise ArtifactError(
                f"--out {out}: a .png grid needs image data, and this model makes points; "
                "write .npy instead"
            )
        from torchvision.utils import save_image

        _atomic(out, lambda p: save_image(x, str(p), nrow=8, padding=2, format="png"))
    else:
        raise ArtifactError(f"--out {out}: write samples to a .npy file (or .png for images)")
