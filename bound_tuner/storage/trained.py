"""A trial's trained model read back: the trial found, its weights checked and rebuilt, sampled.

``load_model(study, trial="best")`` rebuilds a trial's model, ready for sampling with its own
schedule, T, t_min and generator step count. Weights are read only with ``weights_only=True``
and only after their SHA-256 digest matches the one the trial recorded, so a file that was
changed, truncated or replaced raises ``ArtifactError`` (one line) instead of being unpickled.
The file and the trial's user attrs are ``bound_tuner.storage.artifacts``'s record.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
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
    "TrainedModel",
    "best_trial_or_none",
    "build_model",
    "find_trial",
    "load_model",
    "read_weights",
]


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


def _kept_numbers(study: optuna.Study, store: Any) -> list[int]:
    return [
        t.number
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if ATTR_ID in t.user_attrs and artifact_exists(store, t.user_attrs[ATTR_ID])
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
        if (
            ATTR_ID in t.user_attrs
            and path.is_dir()
            and artifact_exists(store, t.user_attrs[ATTR_ID])
        ):
            return store, path
    return FileSystemArtifactStore(paths[0]), paths[0]


def read_weights(path: str | Path, *, expected_sha256: str | None, what: str) -> dict:
    """The checked payload of a weights file (the checks: see the module docstring; its keys:
    ``bound_tuner.storage.artifacts``)."""
    import pickle
    import zipfile

    import torch

    if expected_sha256 is not None and sha256_of(path) != expected_sha256:
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
    if ATTR_ID not in t.user_attrs or not artifact_exists(store, t.user_attrs[ATTR_ID]):
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
