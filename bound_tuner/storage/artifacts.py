"""Trained models as Optuna artifacts: kept per trial, loaded, exported and sampled.

Every complete trial of a study uploads one file, ``model_trial<N>.pt``, to the study's artifact
store (the folder beside the database, ``bound_tuner.storage.folders.artifact_dir_for``, or one the
user names). It is a dict of tensors and plain values that ``torch.load(..., weights_only=True)``
reads: ``state_dict`` (the weights), ``kind`` ("diffusion" or "vae"), ``config`` (the trial's
DiffusionConfig or VAEConfig as a dict), ``build`` (what rebuilds the network: the data shape, and
for a VAE its architecture) and ``data`` (how the data were prepared). The trial's user attrs
``model.artifact_id``, ``model.sha256`` and ``model.store`` say which file it is, its digest
and the folder it went to.

A study keeps the weights of its best ``keep_models`` trials by the bound (``[study]
keep_models``, default 5; "all" keeps every one): a new trial's weights are uploaded only if it
ranks among them, and the weights of a trial pushed out are deleted from the store.

``load_model(study, trial="best")`` rebuilds a trial's model, ready for sampling with its own
schedule, T, t_min and generator step count. Weights are read only with ``weights_only=True``
and only after their SHA-256 digest matches the one the trial recorded, so a file that was
changed, truncated or replaced raises ``ArtifactError`` (one line) instead of being unpickled.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from optuna.artifacts.exceptions import ArtifactNotFound
from optuna.trial import FrozenTrial, TrialState

from bound_tuner.config.objective_names import bound_value
from bound_tuner.storage.database import (
    STUDY_ARTIFACTS_ATTR,
    StorageError,
    make_storage,
    require_database,
    resolve_url,
)
from bound_tuner.storage.folders import ARTIFACTS_ENV, artifact_dir_for

if TYPE_CHECKING:
    import torch
    from torch import nn

    from bound_tuner.maths.sde import Schedule

__all__ = [
    "ArtifactError",
    "ModelKeeper",
    "TrainedModel",
    "export_model",
    "find_trial",
    "load_model",
    "save_samples",
]

FORMAT = 1
ATTR_ID = "model.artifact_id"
ATTR_SHA = "model.sha256"
ATTR_STORE = "model.store"

_log = logging.getLogger(__name__)


class ArtifactError(ValueError):
    """A trial without kept weights, or a weights file that is missing, changed or unreadable."""


def _sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _exists(store: Any, artifact_id: str) -> bool:
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


# ----------------------------------------------------------------------------- saving


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
            return _exists(self.artifact_store, t.user_attrs[ATTR_ID])
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
            digest = _sha256(path)
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


# ----------------------------------------------------------------------------- loading


@dataclass
class TrainedModel:
    """A trial's trained model, rebuilt from its artifact and ready for sampling.

    ``schedule``, ``T``, ``t_min`` and ``n_steps`` are the trial's generator (diffusion; None for
    a VAE); ``shape`` is the shape of one sample as the model makes it.
    """

    model: nn.Module
    kind: str
    config: dict[str, Any]
    shape: tuple[int, ...]
    trial: int
    value: float | None
    data: dict[str, Any] = field(default_factory=dict)
    schedule: Schedule | None = None
    T: float | None = None
    t_min: float | None = None
    n_steps: int | None = None

    @property
    def is_image(self) -> bool:
        return len(self.image_shape) == 3

    @property
    def image_shape(self) -> tuple[int, ...]:
        if len(self.shape) == 3:
            return self.shape
        return tuple(self.data.get("image_shape", ()))

    def sample(
        self, n: int, *, seed: int = 0, n_steps: int | None = None, raw: bool = False
    ) -> torch.Tensor:
        """n samples drawn with a generator seeded by ``seed`` (the same seed, the same samples).

        Diffusion: the trial's Euler-Maruyama generator from T to t_min in ``n_steps`` (default:
        the bound's N). VAE: Bernoulli means decoded from z ~ N(0, I). Images come back as pixels
        in [0, 1] ([n, C, H, W]), unless ``raw`` (the model's own scale, [-1, 1] for diffusion).
        """
        import torch

        if n < 1:
            raise ValueError(f"n={n} must be at least 1")
        if self.kind == "diffusion":
            # torch only when weights are loaded or sampled
            from bound_tuner.training.sampling import generate

            x = generate(
                self.model,
                self.schedule,
                T=self.T,
                n=n,
                shape=self.shape,
                n_steps=n_steps or self.n_steps,
                t_min=self.t_min,
                seed=seed,
            ).samples.cpu()
            if not raw and self.data.get("preprocess", "").startswith("symmetric"):
                x = ((x + 1.0) / 2.0).clamp(0.0, 1.0)
            return x
        p = next(self.model.parameters())
        # torch only when weights are loaded or sampled
        from bound_tuner.maths.draws import generator_for

        gen = generator_for(p.device, seed)
        z = torch.randn(n, int(self.model.latent), generator=gen, device=p.device)
        with torch.no_grad():
            x = torch.sigmoid(self.model.decode(z)).cpu()
        if not raw and self.is_image:
            x = x.reshape(n, *self.image_shape)
        return x


def _storage_of(study: Any, storage: str | None):

    if isinstance(study, optuna.Study):
        return study, None

    url = resolve_url(storage)
    require_database(url)  # export and sample read; they create no database
    store = make_storage(url)
    names = [s.study_name for s in store.get_all_studies()]
    if study not in names:
        raise StorageError(
            f"no study named {study!r} in this storage; studies: {', '.join(names) or 'none'}"
        )
    return optuna.load_study(study_name=study, storage=store), url


def find_trial(study: optuna.Study, trial: int | str = "best") -> FrozenTrial:
    """The study's best complete trial, or the trial numbered ``trial``."""
    if trial == "best" and len(study.directions) > 1:
        front = ", ".join(str(t.number) for t in sorted(study.best_trials, key=lambda t: t.number))
        raise ArtifactError(
            f"study {study.study_name!r} has {len(study.directions)} objectives and no single "
            f"best trial; give --trial N, N one of its Pareto set ({front or 'none yet'}; "
            "bound-tuner report lists it)"
        )
    if trial == "best":
        best = best_trial_or_none(study)
        if best is None:
            raise ArtifactError(
                f"study {study.study_name!r} has no complete trial yet; run it first"
            )
        return best
    try:
        number = int(trial)
    except (TypeError, ValueError):
        raise ArtifactError(f"trial {trial!r}: give a trial number or 'best'") from None
    for t in study.get_trials(deepcopy=False):
        if t.number == number:
            if t.state != TrialState.COMPLETE:
                raise ArtifactError(
                    f"trial {number} of study {study.study_name!r} is {t.state.name}, not "
                    "COMPLETE; only complete trials have a model"
                )
            return t
    raise ArtifactError(
        f"study {study.study_name!r} has no trial {number}; it has trials 0 to "
        f"{len(study.trials) - 1}"
    )


def _kept_numbers(study: optuna.Study, store: Any) -> list[int]:
    return [
        t.number
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if ATTR_ID in t.user_attrs and _exists(store, t.user_attrs[ATTR_ID])
    ]


def _artifact_store(
    study: optuna.Study, t: FrozenTrial, url: str | None, artifacts: str | os.PathLike | None
):
    """The store that holds trial ``t``'s weights: ``artifacts`` if given; else the first
    folder that has them of $BOUND_TUNER_ARTIFACTS, the folder the trial recorded, the folder
    its study's runs recorded, and the default folder of the storage (``artifact_dir_for``),
    so a study is exported from any working directory and a SQLite file moved with its
    ``_artifacts`` folder still finds its weights."""
    from optuna.artifacts import FileSystemArtifactStore

    if artifacts is not None:
        path = Path(artifacts).expanduser()
        return FileSystemArtifactStore(path), path
    candidates = [
        os.environ.get(ARTIFACTS_ENV),
        t.user_attrs.get(ATTR_STORE),
        study.user_attrs.get(STUDY_ARTIFACTS_ATTR),
        str(artifact_dir_for(url)) if url is not None else None,
    ]
    paths: list[Path] = []
    for c in candidates:
        if c and Path(c).expanduser() not in paths:
            paths.append(Path(c).expanduser())
    if not paths:
        paths.append(artifact_dir_for(url))
    for path in paths:
        store = FileSystemArtifactStore(path)
        if ATTR_ID in t.user_attrs and path.is_dir() and _exists(store, t.user_attrs[ATTR_ID]):
            return store, path
    return FileSystemArtifactStore(paths[0]), paths[0]


def read_weights(path: str | Path, *, expected_sha256: str | None, what: str) -> dict:
    """The checked payload of a weights file (see the module docstring)."""
    import pickle
    import zipfile

    import torch

    if expected_sha256 is not None and _sha256(path) != expected_sha256:
        raise ArtifactError(
            f"{what} does not match the digest the trial recorded (changed, truncated or "
            "replaced); it is not loaded. Re-run the trial to get its model again"
        )
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        msg = " ".join(str(e).split())[:160]
        raise ArtifactError(
            f"{what} is not a readable weights file ({type(e).__name__}: {msg})"
        ) from None
    keys = ("format", "kind", "config", "build", "state_dict")
    if not isinstance(payload, dict) or any(k not in payload for k in keys):
        raise ArtifactError(f"{what} is not a bound-tuner model file (it lacks {', '.join(keys)})")
    if payload["format"] != FORMAT or payload["kind"] not in ("diffusion", "vae"):
        raise ArtifactError(
            f"{what} has format {payload['format']!r} / kind {payload['kind']!r}; this version "
            f"reads format {FORMAT} diffusion or vae models"
        )
    return payload


def _from_factory(name: str, cfg: dict, shape: tuple[int, ...]) -> nn.Module:
    """A user's score network rebuilt by the factory its trial recorded (``[model] factory``,
    docs/own_models.md), called with the trial's config."""
    import dataclasses

    # torch only when weights are loaded or sampled
    from bound_tuner.models.factory import build_from_factory
    from bound_tuner.training.config import DiffusionConfig

    known = {f.name for f in dataclasses.fields(DiffusionConfig)}
    config = DiffusionConfig(**{k: v for k, v in cfg.items() if k in known})
    try:
        return build_from_factory(name, config, shape)
    except ValueError as e:
        raise ArtifactError(f"cannot rebuild the trial's model: {e}") from None


def build_model(payload: dict) -> nn.Module:
    """The network of a payload, with its weights loaded (strictly)."""
    kind, cfg, build = payload["kind"], payload["config"], payload["build"]
    if kind == "diffusion" and build.get("factory"):
        model = _from_factory(build["factory"], cfg, tuple(build["shape"]))
    elif kind == "diffusion":
        # torch only when weights are loaded or sampled
        from bound_tuner.models import build_score_model

        model = build_score_model(
            tuple(build["shape"]),
            width=int(cfg["width"]),
            layers=int(cfg["layers"]),
            # weights kept before `channels` existed: the UNet then took max(8, width // 4)
            channels=int(cfg.get("channels", max(8, int(cfg["width"]) // 4))),
        )
    else:
        # torch only when weights are loaded or sampled
        from bound_tuner.models.vae import MLPVAE, ConvVAE

        if cfg.get("arch", "mlp") == "conv":
            model = ConvVAE(latent=int(cfg["latent"]), width=int(build["conv_width"]))
        else:
            model = MLPVAE(
                input_dim=int(build["input_dim"]),
                hidden=tuple(build["hidden"]),
                latent=int(cfg["latent"]),
            )
    try:
        model.load_state_dict(payload["state_dict"], strict=True)
    except (RuntimeError, KeyError, TypeError) as e:
        first = " ".join(str(e).split())[:160]
        raise ArtifactError(
            f"the weights do not fit the model their config describes ({first})"
        ) from None
    return model.eval()


def load_model(
    study: optuna.Study | str,
    trial: int | str = "best",
    *,
    storage: str | None = None,
    artifacts: str | os.PathLike | None = None,
    device: str = "auto",
) -> TrainedModel:
    """A trial's trained model, its generator settings and config, from the artifact store.

    ``study`` is an ``optuna.Study`` or a study name in ``storage`` (default: $BOUND_TUNER_STORAGE
    or sqlite:///bound_tuner.db); ``trial`` a trial number or "best". The weights come from
    ``artifacts`` if given, else from the folder the trial recorded (or, for a study name, the
    folder beside its database).
    """
    study, url = _storage_of(study, storage)
    t = find_trial(study, trial)
    store, path = _artifact_store(study, t, url, artifacts)
    if ATTR_ID not in t.user_attrs or not _exists(store, t.user_attrs[ATTR_ID]):
        kept = _kept_numbers(study, store)
        why = (
            "its weights were not kept (the study keeps the best [study] keep_models trials)"
            if ATTR_ID in t.user_attrs or kept
            else f"no weights in {path}"
        )
        raise ArtifactError(
            f"trial {t.number} of study {study.study_name!r} has no model: {why}; trials with "
            f"weights: {', '.join(map(str, kept)) or 'none'} (give --artifacts DIR if they are "
            "elsewhere)"
        )
    from optuna.artifacts import download_artifact

    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "model.pt"
        download_artifact(
            artifact_store=store, file_path=str(local), artifact_id=t.user_attrs[ATTR_ID]
        )
        payload = read_weights(
            local,
            expected_sha256=t.user_attrs.get(ATTR_SHA),
            what=f"the weights of trial {t.number} ({path / t.user_attrs[ATTR_ID]})",
        )
    # torch only when weights are loaded or sampled
    from bound_tuner.runtime.device import resolve_device

    model = build_model(payload).to(resolve_device(device))
    cfg = payload["config"]
    out = TrainedModel(
        model=model,
        kind=payload["kind"],
        config=cfg,
        shape=tuple(payload["build"]["shape"]),
        trial=t.number,
        value=bound_value(t),
        data=dict(payload.get("data", {})),
    )
    if out.kind == "diffusion":
        # torch only when weights are loaded or sampled
        from bound_tuner.maths.sde import get_schedule

        out.schedule = get_schedule(cfg["schedule"], **cfg.get("schedule_params", {}))
        out.T, out.t_min, out.n_steps = float(cfg["T"]), float(cfg["t_min"]), int(cfg["n_steps"])
    return out


# ----------------------------------------------------------------------------- files out


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


def best_trial_or_none(study: optuna.Study):
    """The best complete (and feasible) trial of a single-objective study; None if there is
    none yet, and for a multi-objective study (its Pareto set: ``study.best_trials``)."""
    if len(study.directions) > 1:
        return None
    try:
        t = study.best_trial
    except ValueError:
        return None
    return t if t.value is not None and math.isfinite(t.value) else None
