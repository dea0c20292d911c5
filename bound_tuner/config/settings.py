"""The fixed settings of a study's [training] and [bound] sections, defined once.

Each setting names its spec key, its type, and for each model the field it sets: a field of the
model's trial configuration (``experiment.DiffusionConfig`` or ``objectives.VAEConfig``), or,
prefixed ``objective.``, an argument of the objective. The spec schema, the one-line refusal of a
key the study's model does not use, and the configuration built from a spec all come from this
table, so a key cannot be accepted by the spec and then dropped (tests/test_settings.py checks
every field against the dataclasses). No torch here: ``bound-tuner --help`` reads it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

OBJECTIVE = "objective."  # prefix of a setting that goes to the objective, not the config


@dataclass(frozen=True)
class Setting:
    section: str  # "training" or "bound"
    key: str  # the spec key
    kind: Any  # its TOML type (a type or a tuple of types)
    fields: dict[str, str]  # model -> the field it sets
    help: str


SETTINGS: tuple[Setting, ...] = (
    Setting("training", "steps", int, {"diffusion": "steps"}, "training steps of a score model"),
    Setting(
        "training",
        "batch_size",
        int,
        {"diffusion": "batch_size", "vae": "batch_size"},
        "mini-batch size",
    ),
    Setting("training", "lr", float, {"diffusion": "lr", "vae": "lr"}, "Adam's learning rate"),
    Setting("training", "epochs", int, {"vae": "epochs"}, "passes over the training set"),
    Setting(
        "training",
        "checkpoints",
        int,
        {"diffusion": OBJECTIVE + "checkpoints", "vae": OBJECTIVE + "checkpoints"},
        "steps (VAEs: epochs) before the last the value is computed at (early stopping, pruning)",
    ),
    Setting("training", "t_min", float, {"diffusion": "t_min"}, "smallest diffusion time"),
    Setting(
        "training",
        "ema",
        float,
        {"diffusion": "ema"},
        "width of the average of the weights a run returns (default 0.09; 0: the last weights)",
    ),
    Setting("training", "width", int, {"diffusion": "width"}, "hidden units of the point-data MLP"),
    Setting(
        "training", "layers", int, {"diffusion": "layers"}, "hidden layers of the point-data MLP"
    ),
    Setting(
        "training",
        "channels",
        int,
        {"diffusion": "channels"},
        "base channels of the image UNet",
    ),
    Setting(
        "training",
        "tf32",
        bool,
        {"diffusion": "tf32", "vae": OBJECTIVE + "tf32"},
        "TF32 matmuls on CUDA (default true)",
    ),
    Setting("training", "compile", bool, {"diffusion": "compile"}, "train via torch.compile"),
    Setting(
        "training",
        "pack",
        int,
        {"diffusion": OBJECTIVE + "pack"},
        "trials trained at once as one ensemble",
    ),
    Setting(
        "bound", "variant", str, {"diffusion": "variant", "vae": "variant"}, "the bound's form"
    ),
    Setting(
        "bound",
        "R",
        (float, str),
        {"diffusion": "R", "vae": "R"},
        'sub-Gaussian scale: a number, "data" or "estimate" ("cv" for elbo-kfold)',
    ),
    Setting(
        "bound",
        "folds",
        int,
        {"diffusion": "folds", "vae": "folds"},
        "K of the K-fold references (elbo-kfold)",
    ),
    Setting(
        "bound",
        "early_stop",
        bool,
        {"diffusion": "early_stop", "vae": "early_stop"},
        "keep the checkpoint with the smallest certified value (elbo-kfold; default: VAEs only)",
    ),
    Setting(
        "bound",
        "L_estimator",
        str,
        {"diffusion": "l_estimator"},
        "estimator of the score norm bound L",
    ),
    Setting("bound", "N", int, {"diffusion": "n_steps"}, "generator steps of the bound"),
    Setting(
        "bound", "k", int, {"diffusion": "mix_draws"}, "draws per point of the mixture KL C_mix"
    ),
    Setting("bound", "n_paths", int, {"diffusion": "n_paths"}, "generator paths of the bound"),
    Setting(
        "bound",
        "max_sample_scale",
        float,
        {"diffusion": "max_sample_scale"},
        "a trial whose samples reach this many times the data's largest norm fails (diverged)",
    ),
    Setting(
        "bound",
        "train_draws",
        int,
        {"diffusion": "train_draws"},
        "draws per training point of the ELBO or denoising pass",
    ),
    Setting("bound", "r", float, {"vae": "r"}, "the paper's r of the VAE bound"),
    Setting("bound", "mc_samples", int, {"vae": "mc_samples"}, "draws of z per point (VAE bound)"),
    Setting(
        "bound",
        "bound_subset",
        int,
        {"vae": OBJECTIVE + "bound_subset"},
        "training points of the per-epoch VAE bound",
    ),
    Setting(
        "bound",
        "heldout_samples",
        int,
        {"diffusion": "heldout_n_generated"},
        "generator samples of validation mode",
    ),
    Setting(
        "bound",
        "heldout_steps",
        int,
        {"diffusion": "heldout_n_steps"},
        "generator steps of validation mode",
    ),
)


def schema(section: str) -> dict[str, Any]:
    """{key: type} of a section, for the spec's type checks."""
    return {s.key: s.kind for s in SETTINGS if s.section == section}


def unused_key(model: str, tables: dict[str, dict[str, Any]]) -> Setting | None:
    """The first setting given in ``tables`` ({section: {key: value}}) that ``model`` does not use."""
    for s in SETTINGS:
        if s.key in tables.get(s.section, {}) and model not in s.fields:
            return s
    return None


def config_kwargs(model: str, tables: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """{config field: value} of the settings given in ``tables`` that set ``model``'s config."""
    out = {}
    for s in SETTINGS:
        field = s.fields.get(model)
        if field and not field.startswith(OBJECTIVE) and s.key in tables.get(s.section, {}):
            value = tables[s.section][s.key]
            out[field] = (
                float(value) if s.kind == (float, str) and not isinstance(value, str) else value
            )
    return out
