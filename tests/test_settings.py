"""The one table of [training] and [bound] settings (bound_tuner.config.settings) against the code."""

import dataclasses
import inspect
import textwrap

import pytest

from bound_tuner.config.schema import SECTIONS, SpecError
from bound_tuner.config.settings import OBJECTIVE, SETTINGS
from bound_tuner.config.spec import load_spec
from bound_tuner.objectives.diffusion import DiffusionObjective
from bound_tuner.objectives.factory import build_objective, diffusion_base_config, load_data
from bound_tuner.objectives.vae import VAEConfig, VAEObjective
from bound_tuner.training.config import DiffusionConfig

CONFIGS = {"diffusion": DiffusionConfig, "vae": VAEConfig}
OBJECTIVES = {"diffusion": DiffusionObjective, "vae": VAEObjective}
# a value for each setting that differs from its default and passes the spec's checks
VALUES = {
    "steps": 7,
    "batch_size": 9,
    "lr": 0.0031,
    "epochs": 3,
    "checkpoints": 2,
    "t_min": 0.002,
    "ema": 0.05,
    "width": 24,
    "layers": 2,
    "channels": 12,
    "tf32": False,
    "compile": True,
    "pack": 2,
    "variant": "elbo-split",
    "R": 2.5,
    "L_estimator": "path-max",
    "N": 17,
    "k": 3,
    "n_paths": 19,
    "max_sample_scale": 7.5,
    "train_draws": 5,
    "folds": 4,
    "early_stop": True,
    "r": 0.5,
    "mc_samples": 2,
    "bound_subset": 11,
    "heldout_samples": 23,
    "heldout_steps": 13,
}
#: a VAE study's value where the diffusion one does not apply to it (VAE variants differ)
VAE_VALUES = {"variant": "paper"}


def test_every_setting_sets_a_field_that_exists():
    for s in SETTINGS:
        for model, field in s.fields.items():
            if field.startswith(OBJECTIVE):
                name = field[len(OBJECTIVE) :]
                params = inspect.signature(OBJECTIVES[model]).parameters
                assert name in params or name == "tf32", (s.key, model)  # tf32: build_objective
            else:
                assert field in {f.name for f in dataclasses.fields(CONFIGS[model])}, (s.key, model)
    for section in ("training", "bound"):
        assert set(SECTIONS[section]) == {s.key for s in SETTINGS if s.section == section}
    assert set(VALUES) == {s.key for s in SETTINGS}


def _write(tmp_path, model, section, key, value):
    # a fixed R belongs to the VAE's "paper" variant (its default takes R from cross-fitting)
    extra = 'variant = "paper"' if (model, key) == ("vae", "R") else ""
    search = "T = 0.5" if model == "diffusion" else "latent = 4"
    data = (
        'name = "swiss_roll"\nm = 32'
        if model == "diffusion"
        else ('name = "fashion_mnist"\nm = 32\ntest_size = 16\nbinarize = "fixed"')
    )
    text = f"""
    [study]
    name = "s"
    model = "{model}"
    [data]
    {data}
    [search]
    {search}
    [{section}]
    {key} = {value}
    {extra}
    """
    path = tmp_path / "s.toml"
    path.write_text(textwrap.dedent(text).replace("\n    ", "\n"))
    return path


def _toml(v):
    return ("true" if v else "false") if isinstance(v, bool) else repr(v).replace("'", '"')


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: f"{s.section}.{s.key}")
def test_a_setting_reaches_its_config_or_is_refused_in_one_line(setting, tmp_path):
    for model in ("diffusion", "vae"):
        value = (
            VAE_VALUES.get(setting.key, VALUES[setting.key])
            if model == "vae"
            else VALUES[setting.key]
        )
        path = _write(tmp_path, model, setting.section, setting.key, _toml(value))
        if model not in setting.fields:
            with pytest.raises(SpecError, match=f"{setting.key}.*a {model} study does not use it"):
                load_spec(path)
            continue
        field = setting.fields[model]
        if model == "diffusion" and setting.key == "channels":
            continue  # an image setting: checked below with image data
        spec = load_spec(path)
        if field.startswith(OBJECTIVE):
            name = field[len(OBJECTIVE) :]
            if name == "tf32":  # a process-wide switch, set by build_objective on CUDA only
                assert spec.training["tf32"] is value
                continue
            objective = build_objective(spec, load_data(spec), device="cpu")
            assert getattr(objective, name) == value
            continue
        if model == "diffusion":
            assert getattr(diffusion_base_config(spec), field) == value
        else:
            objective = build_objective(spec, load_data(spec), device="cpu")
            assert getattr(objective.base, field) == value


def test_architecture_keys_follow_the_data(tmp_path):
    spec = load_spec(_write(tmp_path, "diffusion", "training", "channels", "8"))
    with pytest.raises(SpecError, match="channels does not shape the MLP of point data"):
        build_objective(spec, load_data(spec), device="cpu")
