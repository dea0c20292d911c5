"""Study specs read: a TOML file (``load_spec``) or a dict (``parse_spec``) -> a checked StudySpec.

Every problem raises SpecError with one line naming the field and the mend, before any study is
created. The sections, their keys and types: ``bound_tuner.config.schema``; the checks of their
values: ``bound_tuner.config.validate``.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from bound_tuner.config.schema import (
    DEFAULT_KEEP_MODELS,
    DEFAULT_MAX_CONSECUTIVE_FAILURES,
    DIFFUSION_PARAMS,
    MODELS,
    PRUNERS,
    SAMPLERS,
    SECTIONS,
    VAE_PARAMS,
    SpecError,
    StudySpec,
)
from bound_tuner.config.search import parse_param
from bound_tuner.config.settings import unused_key
from bound_tuner.config.validate import (
    check_data,
    check_diffusion_space,
    check_factory,
    check_objectives,
    check_sampler_space,
    check_section,
    check_values,
)
from bound_tuner.data import IMAGE_SETS

__all__ = ["load_spec", "parse_spec"]

# the bound names live beside torch code; they are imported where a spec is checked, so that
# `bound-tuner --help` and `report` never load torch


def parse_spec(raw: dict, *, where: str = "spec", base: Path | None = None) -> StudySpec:
    """Check a spec given as a dict (as tomllib returns it) and build a StudySpec.

    ``base`` is the folder that a relative data.path is read from (the spec file's folder).
    """
    for section in raw:
        if section not in SECTIONS and section != "search":
            raise SpecError(
                f"{where}: unknown section [{section}]; allowed: "
                f"{', '.join(['study', 'data', 'search', *list(SECTIONS)[2:]])}"
            )
    study = check_section("study", raw.get("study", {}), where)
    spec = _read_study(study, where)
    _read_data(spec, raw, where, base)
    _read_training(spec, raw, where)
    _read_bound(spec, raw, where)
    _read_sampler_and_pruner(spec, raw, where)
    spec.storage = check_section("storage", raw.get("storage", {}), where)
    spec.factory = check_factory(spec, raw, where)
    check_objectives(spec, study, pruner_given="pruner" in raw, where=where)
    _read_search(spec, raw, where)
    check_values(spec, where)
    if spec.model == "diffusion":
        check_diffusion_space(spec, where)
    check_sampler_space(spec, where)
    return spec


def _read_study(study: dict, where: str) -> StudySpec:
    """A spec with [study]'s settings (its objectives and constraints come later, with the
    sampler they need)."""
    if "name" not in study or not study["name"].strip():
        raise SpecError(f'{where}: study.name is missing; add name = "my-study" under [study]')
    spec = StudySpec(name=study["name"], path=where)
    spec.model = study.get("model", "diffusion")
    if spec.model not in MODELS:
        raise SpecError(f"{where}: study.model = {spec.model!r} is unknown; choose one of {MODELS}")
    spec.n_trials = study.get("n_trials", 20)
    if spec.n_trials < 1:
        raise SpecError(f"{where}: study.n_trials = {spec.n_trials} must be at least 1")
    spec.validation = study.get("validation", False)
    spec.seed = study.get("seed", 0)
    keep = study.get("keep_models", DEFAULT_KEEP_MODELS)
    if isinstance(keep, str):
        if keep != "all":
            raise SpecError(
                f'{where}: study.keep_models = {keep!r}; give a number of trials or "all"'
            )
        spec.keep_models = None
    elif keep < 0:
        raise SpecError(f"{where}: study.keep_models = {keep} must be at least 0 (0: none)")
    else:
        spec.keep_models = keep
    spec.max_consecutive_failures = study.get(
        "max_consecutive_failures", DEFAULT_MAX_CONSECUTIVE_FAILURES
    )
    if spec.max_consecutive_failures < 1:
        raise SpecError(
            f"{where}: study.max_consecutive_failures = {spec.max_consecutive_failures} must be "
            "at least 1"
        )
    return spec


def _read_data(spec: StudySpec, raw: dict, where: str, base: Path | None) -> None:
    """[data], with the study's seed and the held-out size of a built-in set as defaults."""
    spec.data = check_section("data", raw.get("data", {}), where)
    check_data(spec, where, base)
    dname = spec.data["name"]
    spec.data.setdefault("seed", spec.seed)
    if dname != "file":
        # a validating study on synthetic data draws enough fresh points for the k-NN sample KL
        synthetic_validation = spec.validation and dname not in IMAGE_SETS
        spec.data.setdefault("test_size", 10_000 if synthetic_validation else 1000)


def _read_training(spec: StudySpec, raw: dict, where: str) -> None:
    """[training]: no device, and sizes of at least 1 (checkpoints: 0)."""
    if isinstance(raw.get("training"), dict) and "device" in raw["training"]:
        raise SpecError(
            f"{where}: training.device is not read from a spec; remove it and give the device "
            "on the command line (--device cuda, or --gpus 0,1 for workers)"
        )
    spec.training = check_section("training", raw.get("training", {}), where)
    for key in ("steps", "batch_size", "checkpoints", "epochs", "width", "layers", "channels"):
        if key in spec.training and spec.training[key] < (0 if key == "checkpoints" else 1):
            raise SpecError(f"{where}: training.{key} = {spec.training[key]} is too small")


def _read_bound(spec: StudySpec, raw: dict, where: str) -> None:
    """[bound], after [training]: no setting of either that the study's model does not use,
    then R, the variant, the L estimator and the counts."""
    # spec checks stay torch-free (bound-tuner --help, run's checks)
    from bound_tuner.maths.bounds.diffusion import (
        DEFAULT_VARIANT,
        L_ESTIMATORS,
        R_SOURCES,
        VARIANTS,
    )

    spec.bound = check_section("bound", raw.get("bound", {}), where)
    unused = unused_key(spec.model, {"training": spec.training, "bound": spec.bound})
    if unused is not None:
        users = " and ".join(unused.fields)
        raise SpecError(
            f"{where}: {unused.section}.{unused.key} ({unused.help}) is a {users} setting; "
            f"a {spec.model} study does not use it; remove it"
        )
    r = spec.bound.get("R", 1.0)
    if isinstance(r, str) and r not in R_SOURCES:
        raise SpecError(f'{where}: bound.R = {r!r}; give a positive number, "estimate" or "data"')
    if not isinstance(r, str) and not (math.isfinite(r) and r > 0):
        raise SpecError(f"{where}: bound.R = {r} must be positive")
    variant = spec.bound.get("variant", DEFAULT_VARIANT)
    if variant not in VARIANTS:
        raise SpecError(
            f"{where}: bound.variant = {variant!r}; choose one of {', '.join(VARIANTS)}"
        )
    est = spec.bound.get("L_estimator", "path-mean")
    if est not in L_ESTIMATORS:
        raise SpecError(f"{where}: bound.L_estimator = {est!r}; choose one of {L_ESTIMATORS}")
    for key in (
        "N",
        "k",
        "n_paths",
        "train_draws",
        "mc_samples",
        "bound_subset",
        "heldout_samples",
        "heldout_steps",
        "max_sample_scale",
    ):
        if key in spec.bound and spec.bound[key] < 1:
            raise SpecError(f"{where}: bound.{key} = {spec.bound[key]} must be at least 1")


def _read_sampler_and_pruner(spec: StudySpec, raw: dict, where: str) -> None:
    """[sampler] and [pruner], each of a known type (tpe and median by default)."""
    spec.sampler = check_section("sampler", raw.get("sampler", {"type": "tpe"}), where)
    spec.sampler.setdefault("type", "tpe")
    spec.sampler.setdefault("seed", spec.seed)
    if spec.sampler["type"] not in SAMPLERS:
        raise SpecError(
            f"{where}: sampler.type = {spec.sampler['type']!r} is unknown; "
            f"choose one of {', '.join(SAMPLERS)}"
        )
    spec.pruner = check_section("pruner", raw.get("pruner", {"type": "median"}), where)
    spec.pruner.setdefault("type", "median")
    if spec.pruner["type"] not in PRUNERS:
        raise SpecError(
            f"{where}: pruner.type = {spec.pruner['type']!r} is unknown; "
            f"choose one of {', '.join(PRUNERS)}"
        )


def _read_search(spec: StudySpec, raw: dict, where: str) -> None:
    """[search]: each parameter one the study's model takes (``bound_tuner.config.search``)."""
    search = raw.get("search", {})
    if not isinstance(search, dict):
        raise SpecError(f"{where}: [search] must be a table of parameters")
    allowed = DIFFUSION_PARAMS if spec.model == "diffusion" else VAE_PARAMS
    for name, value in search.items():
        if name not in allowed:
            raise SpecError(
                f"{where}: unknown search parameter '{name}' for a {spec.model} "
                f"study; allowed: {', '.join(allowed)}"
            )
        spec.search[name] = parse_param(name, value, allowed[name], where)


def load_spec(path: str | Path, *, validation: bool | None = None) -> StudySpec:
    """Read and check a study spec from a TOML file; ``validation`` (``bound-tuner run
    --validate``) replaces its [study] validation, as if the file said so (on synthetic data the
    held-out set then defaults to 10,000 points)."""
    p = Path(path)
    if p.is_dir():
        raise SpecError(
            f"spec path {str(p)!r} is a folder; give the path of a .toml study spec file in it"
        )
    if not p.exists():
        raise SpecError(f"spec file {str(p)!r} not found; give the path of a .toml study spec")
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise SpecError(
            f"{p}: not UTF-8 text (byte {e.start}); a study spec is a TOML text file, save it "
            "as UTF-8"
        ) from None
    except OSError as e:
        raise SpecError(f"cannot read spec file {p}: {e.strerror or e}") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise SpecError(f"{p}: not valid TOML ({e}); fix the syntax") from None
    if validation is not None and isinstance(raw.get("study", {}), dict):
        raw["study"] = {**raw.get("study", {}), "validation": validation}
    return parse_spec(raw, where=str(p), base=p.resolve().parent)
