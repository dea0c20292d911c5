"""Study specs: TOML files in studies/ read with tomllib and checked field by field.

Every problem raises SpecError with one line naming the field and the mend, before any study is
created. The schema (every section optional except [study].name):

  [study]    name, model ("diffusion" | "vae"), n_trials, validation, seed, keep_models (the
             best trials whose trained weights are kept: a number, default 5, or "all"),
             max_consecutive_failures (trials in a row whose objective raised before a worker
             stops; default 5), objectives (["bound"] by default, or two or three of "bound",
             "fit", "generalization", "train_seconds", "parameters" and, with validation,
             "heldout.NAME": a multi-objective study, bound_tuner.config.objective_names), constraints
             ({ train_seconds = 60 }: the largest allowed value of each; tpe and nsga2 samplers)
  [data]     name, m (an integer; "all" for every image of an image set), seed, test_size
             (+ binarize, pad_to_32 for image sets), or for a user's own data path (a .npy,
             .npz, .csv or .pt file or a folder of images, relative to the spec file), m
             (default "all"), seed, test_fraction (default 0.2), image_size, fit, binarize
  [search]   parameter = fixed value | {low, high, log?, step?} | {choices=[...]} | {grid=[...]}
  [training] fixed training settings (steps, batch_size, checkpoints, t_min, epochs, ...;
             tf32 = false keeps float32 matmuls exact on CUDA; compile = true trains through
             torch.compile; pack = K trains K diffusion trials at once as one ensemble,
             bound_tuner.training.pack)
  [bound]    variant, R (a number, "estimate" or "data"), L_estimator, N, k, n_paths, train_draws,
             max_sample_scale (a trial whose samples reach that many times the data's largest
             norm fails),
             heldout_samples, heldout_steps (generator samples and steps of validation mode)
             (VAE: R or the paper's r, mc_samples, bound_subset)
  [sampler]  type ("tpe" | "random" | "grid" | "bruteforce" | "nsga2"), seed, n_startup_trials,
             population_size (nsga2)
  [pruner]   type ("median" | "none" | "successive_halving" | "hyperband"), n_startup_trials,
             n_warmup_steps (a multi-objective study is not pruned: type "none", its default)
  [storage]  heartbeat_interval, grace_period, outage_seconds (seconds; used with PostgreSQL or
             several workers; outage_seconds: how long a worker waits for a database server
             that went away)
  [model]    factory ("package.module:function": your own score network for a diffusion study,
             factory(config, data_shape) -> nn.Module; docs/own_models.md)
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from bound_tuner.config.objective_names import DEFAULT_OBJECTIVES, constraints_problem
from bound_tuner.config.objective_names import problem as objectives_problem
from bound_tuner.config.settings import schema, unused_key
from bound_tuner.data import DATASETS, IMAGE_SETS

# the bound and schedule names live beside torch code; they are imported where a spec is checked,
# so that `bound-tuner --help` and `report` never load torch


class SpecError(ValueError):
    """A user error in a study spec; its message is one line naming the field and the mend."""


# parameters each model's objective understands, with their kind
DIFFUSION_PARAMS: dict[str, type] = {
    "T": float,
    "schedule": str,
    "beta_min": float,
    "beta_max": float,
    "beta_const": float,
    "cosine_s": float,
    "lam": float,
    "lr": float,
    "width": int,
    "layers": int,
    "channels": int,
    "steps": int,
    "batch_size": int,
}
VAE_PARAMS: dict[str, type] = {
    "beta": float,
    "lam": float,
    "latent": int,
    "lr": float,
    "epochs": int,
    "batch_size": int,
    "arch": str,
}
SECTIONS = {
    "study": {
        "name": str,
        "model": str,
        "n_trials": int,
        "validation": bool,
        "seed": int,
        "keep_models": (int, str),
        "max_consecutive_failures": int,
        "objectives": list,
        "constraints": dict,
    },
    "data": {
        "name": str,
        "path": str,
        "m": (int, str),
        "seed": int,
        "test_size": int,
        "test_fraction": float,
        "image_size": (int, list),
        "fit": str,
        "binarize": str,
        "pad_to_32": bool,
    },
    "training": schema("training"),  # bound_tuner.config.settings: every key and the field it sets
    "bound": schema("bound"),
    "sampler": {"type": str, "seed": int, "n_startup_trials": int, "population_size": int},
    "pruner": {"type": str, "n_startup_trials": int, "n_warmup_steps": int},
    "storage": {"heartbeat_interval": int, "grace_period": int, "outage_seconds": float},
    "model": {"factory": str},  # a user's own score network (bound_tuner.models.factory)
}
SAMPLERS = ("tpe", "random", "grid", "bruteforce", "nsga2")
CONSTRAINED_SAMPLERS = ("tpe", "nsga2")  # samplers that take Optuna's constraints_func
PRUNERS = ("median", "none", "successive_halving", "hyperband")
MODELS = ("diffusion", "vae")
SCHEDULE_PARAMS = {
    "beta_min": "linear",
    "beta_max": "linear",
    "beta_const": "constant",
    "cosine_s": "cosine",
}


# complete trials whose trained weights are kept as artifacts (the best ones by the bound)
DEFAULT_KEEP_MODELS = 5
# trials in a row whose objective raised (out of memory, a bug) before a worker stops
DEFAULT_MAX_CONSECUTIVE_FAILURES = 5


@dataclass
class Param:
    """One search-space entry: fixed, a numeric range, or a list of choices (grid)."""

    name: str
    kind: type
    fixed: Any = None
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: list | None = None

    @property
    def is_fixed(self) -> bool:
        return self.choices is None and self.low is None

    def values(self) -> list:
        """Every value this parameter may take where that is a finite list (fixed or choices)."""
        if self.choices is not None:
            return list(self.choices)
        if self.is_fixed:
            return [self.fixed]
        return [self.low, self.high]


@dataclass
class StudySpec:
    name: str
    model: str = "diffusion"
    n_trials: int = 20
    validation: bool = False
    seed: int = 0
    keep_models: int | None = DEFAULT_KEEP_MODELS  # None: every complete trial keeps its model
    max_consecutive_failures: int = DEFAULT_MAX_CONSECUTIVE_FAILURES
    objectives: tuple[str, ...] = DEFAULT_OBJECTIVES  # bound_tuner.config.objective_names
    constraints: dict[str, float] = field(default_factory=dict)  # {objective: largest value}
    data: dict[str, Any] = field(default_factory=dict)
    search: dict[str, Param] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    bound: dict[str, Any] = field(default_factory=dict)
    sampler: dict[str, Any] = field(default_factory=lambda: {"type": "tpe"})
    pruner: dict[str, Any] = field(default_factory=lambda: {"type": "median"})
    storage: dict[str, Any] = field(default_factory=dict)
    path: str | None = None
    factory: str | None = None  # [model] factory: "package.module:function" (None: built-in)


def _type_ok(value: Any, expected) -> bool:
    kinds = expected if isinstance(expected, tuple) else (expected,)
    for k in kinds:
        if k is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return True
        if k is int and isinstance(value, int) and not isinstance(value, bool):
            return True
        if k in (str, bool, list, dict) and isinstance(value, k):
            return True
    return False


def _tname(expected) -> str:
    kinds = expected if isinstance(expected, tuple) else (expected,)
    names = {
        float: "a number",
        int: "an integer",
        str: "a string",
        bool: "true or false",
        list: "a list",
        dict: "a table, e.g. { train_seconds = 60 }",
    }
    return " or ".join(names[k] for k in kinds)


def _check_section(name: str, table: Any, where: str) -> dict:
    if not isinstance(table, dict):
        raise SpecError(f"{where}: [{name}] must be a table, e.g. [{name}] on its own line")
    allowed = SECTIONS[name]
    for key, value in table.items():
        if key not in allowed:
            raise SpecError(
                f"{where}: unknown key '{key}' in [{name}]; allowed: {', '.join(allowed)}"
            )
        if not _type_ok(value, allowed[key]):
            raise SpecError(f"{where}: {name}.{key} = {value!r} must be {_tname(allowed[key])}")
    return dict(table)


def _parse_param(name: str, raw: Any, kind: type, where: str) -> Param:
    f = f"{where}: search.{name}"
    if not isinstance(raw, dict):
        if not _type_ok(raw, kind):
            raise SpecError(
                f"{f} = {raw!r} must be {_tname(kind)} or a table such as "
                "{ low = ..., high = ... } or { choices = [...] }"
            )
        if kind is not str and not math.isfinite(raw):
            raise SpecError(f"{f} = {raw!r} must be a finite number")
        return Param(name, kind, fixed=raw)
    keys = set(raw)
    if keys & {"choices", "grid"}:
        if len(keys & {"choices", "grid"}) > 1 or keys - {"choices", "grid"}:
            raise SpecError(f"{f}: give either choices = [...] or grid = [...], nothing else")
        values = raw.get("choices", raw.get("grid"))
        if not isinstance(values, list) or not values:
            raise SpecError(f"{f}: the list of values is empty; give at least one value")
        for v in values:
            if not _type_ok(v, kind) or (kind is not str and not math.isfinite(v)):
                raise SpecError(f"{f}: value {v!r} must be {_tname(kind)}")
        return Param(name, kind, choices=values)
    bad = keys - {"low", "high", "log", "step"}
    if bad or not {"low", "high"} <= keys:
        raise SpecError(
            f"{f}: a range needs low and high (optional log, step); "
            f"unexpected {sorted(bad) or 'missing low/high'}"
        )
    if kind is str:
        raise SpecError(f"{f}: {name} takes names; use choices = [...]")
    low, high = raw["low"], raw["high"]
    for k, v in (("low", low), ("high", high)):
        if not _type_ok(v, kind) or not math.isfinite(v):
            raise SpecError(f"{f}.{k} = {v!r} must be {_tname(kind)}")
    if not low < high:
        raise SpecError(f"{f}: low={low} must be below high={high}")
    log = raw.get("log", False)
    if not isinstance(log, bool):
        raise SpecError(f"{f}.log must be true or false")
    if log and raw.get("step") is not None:
        raise SpecError(f"{f}: a range takes log = true or a step, not both; drop one of them")
    if log and low <= 0:
        raise SpecError(f"{f}: a log range needs low > 0 (got {low}); set log = false or raise low")
    step = raw.get("step")
    if step is not None and (not _type_ok(step, kind) or step <= 0):
        raise SpecError(f"{f}.step = {step!r} must be a positive {_tname(kind)[2:]}")
    return Param(name, kind, low=low, high=high, log=log, step=step)


def _check_data(spec: StudySpec, where: str, base: Path | None) -> None:
    """[data]: a built-in set by name, or the user's own file or image folder by path."""
    # spec checks stay torch-free (bound-tuner --help, run's checks)
    from bound_tuner.data.files import FITS

    d = spec.data
    if "path" in d:
        if "name" in d:
            raise SpecError(
                f"{where}: [data] has both name and path; give name for a built-in set or path "
                "for your own file, not both"
            )
        if not d["path"].strip():
            raise SpecError(f"{where}: data.path is empty; give the file or image folder")
        p = Path(d["path"]).expanduser()
        if not p.is_absolute() and base is not None:
            p = base / p  # relative to the spec file
        d["path"] = str(p)
        d["name"] = "file"
        for key in ("test_size", "pad_to_32"):
            if key in d:
                raise SpecError(
                    f"{where}: data.{key} applies to the built-in sets; for your own file use "
                    + ("test_fraction" if key == "test_size" else "image_size and fit")
                )
        d.setdefault("m", "all")
    else:
        for key in ("test_fraction", "image_size", "fit"):
            if key in d:
                raise SpecError(
                    f"{where}: data.{key} applies to your own data (data.path), not to the "
                    "built-in sets; remove it"
                )
        dname = d.setdefault("name", "swiss_roll")
        if dname not in DATASETS:
            raise SpecError(
                f"{where}: data.name = {dname!r} is an unknown data set; choose one of "
                f"{', '.join(sorted(DATASETS))}, or give data.path for your own file"
            )
        d.setdefault("m", 200)
    if isinstance(d["m"], str):
        if d["m"] != "all":
            raise SpecError(
                f'{where}: data.m = {d["m"]!r} must be an integer or "all" '
                "(every training point of a file or image set)"
            )
    elif d["m"] < 2:
        raise SpecError(f"{where}: data.m = {d['m']} must be at least 2")
    tf = d.get("test_fraction")
    if tf is not None and not (math.isfinite(tf) and 0 <= tf < 1):
        raise SpecError(
            f"{where}: data.test_fraction = {tf} must be in [0, 1) (0: every point trains)"
        )
    if "image_size" in d:
        size = d["image_size"]
        sizes = size if isinstance(size, list) else [size]
        if not (
            len(sizes) in (1, 2)
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in sizes)
        ):
            raise SpecError(
                f"{where}: data.image_size = {size!r} must be a positive integer or [height, width]"
            )
    if "fit" in d:
        if d["fit"] not in FITS:
            raise SpecError(f"{where}: data.fit = {d['fit']!r}; choose one of {', '.join(FITS)}")
        if "image_size" not in d:
            raise SpecError(f"{where}: data.fit needs data.image_size, the size to fit images to")


def parse_spec(raw: dict, *, where: str = "spec", base: Path | None = None) -> StudySpec:
    """Check a spec given as a dict (as tomllib returns it) and build a StudySpec.

    ``base`` is the folder that a relative data.path is read from (the spec file's folder).
    """
    # spec checks stay torch-free (bound-tuner --help, run's checks)
    from bound_tuner.maths.bounds.diffusion import (
        DEFAULT_VARIANT,
        L_ESTIMATORS,
        R_SOURCES,
        VARIANTS,
    )

    for section in raw:
        if section not in SECTIONS and section != "search":
            raise SpecError(
                f"{where}: unknown section [{section}]; allowed: "
                f"{', '.join(['study', 'data', 'search', *list(SECTIONS)[2:]])}"
            )
    study = _check_section("study", raw.get("study", {}), where)
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

    spec.data = _check_section("data", raw.get("data", {}), where)
    _check_data(spec, where, base)
    dname = spec.data["name"]
    spec.data.setdefault("seed", spec.seed)
    if dname != "file":
        # a validating study on synthetic data draws enough fresh points for the k-NN sample KL
        synthetic_validation = spec.validation and dname not in IMAGE_SETS
        spec.data.setdefault("test_size", 10_000 if synthetic_validation else 1000)

    if isinstance(raw.get("training"), dict) and "device" in raw["training"]:
        raise SpecError(
            f"{where}: training.device is not read from a spec; remove it and give the device "
            "on the command line (--device cuda, or --gpus 0,1 for workers)"
        )
    spec.training = _check_section("training", raw.get("training", {}), where)
    for key in ("steps", "batch_size", "checkpoints", "epochs", "width", "layers", "channels"):
        if key in spec.training and spec.training[key] < (0 if key == "checkpoints" else 1):
            raise SpecError(f"{where}: training.{key} = {spec.training[key]} is too small")
    spec.bound = _check_section("bound", raw.get("bound", {}), where)
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

    spec.sampler = _check_section("sampler", raw.get("sampler", {"type": "tpe"}), where)
    spec.sampler.setdefault("type", "tpe")
    spec.sampler.setdefault("seed", spec.seed)
    if spec.sampler["type"] not in SAMPLERS:
        raise SpecError(
            f"{where}: sampler.type = {spec.sampler['type']!r} is unknown; "
            f"choose one of {', '.join(SAMPLERS)}"
        )
    spec.pruner = _check_section("pruner", raw.get("pruner", {"type": "median"}), where)
    spec.pruner.setdefault("type", "median")
    if spec.pruner["type"] not in PRUNERS:
        raise SpecError(
            f"{where}: pruner.type = {spec.pruner['type']!r} is unknown; "
            f"choose one of {', '.join(PRUNERS)}"
        )
    spec.storage = _check_section("storage", raw.get("storage", {}), where)
    spec.factory = _check_factory(spec, raw, where)
    _check_objectives(spec, study, pruner_given="pruner" in raw, where=where)

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
        spec.search[name] = _parse_param(name, value, allowed[name], where)
    _check_values(spec, where)
    if spec.model == "diffusion":
        _check_diffusion_space(spec, where)
    if spec.sampler["type"] in ("grid", "bruteforce"):
        for p in spec.search.values():
            if (
                not p.is_fixed
                and p.choices is None
                and not (spec.sampler["type"] == "bruteforce" and p.kind is int and p.step)
            ):
                raise SpecError(
                    f"{where}: search.{p.name} is a range, but the "
                    f"{spec.sampler['type']} sampler needs a list; "
                    f"write {p.name} = {{ grid = [...] }}"
                )
    return spec


def _check_factory(spec: StudySpec, raw: dict, where: str) -> str | None:
    """[model] factory: the import name of a diffusion study's own score network, checked for
    its form only (importing it would load torch; the objective imports and tries it)."""
    name = _check_section("model", raw.get("model", {}), where).get("factory")
    if name is None:
        return None
    if spec.model != "diffusion":
        raise SpecError(
            f"{where}: model.factory builds a diffusion score network; a {spec.model} study "
            "does not use it; remove it"
        )
    module, _, attr = name.partition(":")
    if name.count(":") != 1 or not module.strip() or not attr.strip():
        raise SpecError(
            f'{where}: model.factory = {name!r}; give the function as "package.module:function"'
        )
    return name


def _check_objectives(spec: StudySpec, study: dict, *, pruner_given: bool, where: str) -> None:
    """[study] objectives and constraints (bound_tuner.config.objective_names), and what a
    multi-objective study changes: no pruning (Optuna prunes single-objective studies only),
    and every complete trial keeps its weights unless keep_models says otherwise (there is no
    single best trial to keep)."""
    names = study.get("objectives", list(DEFAULT_OBJECTIVES))
    bad = objectives_problem(names, validation=spec.validation)
    if bad is None and len(names) == 1 and names != list(DEFAULT_OBJECTIVES):
        bad = (
            f"has only {names[0]!r}; a study optimizes the bound alone (the default) or two or "
            f'three objectives, e.g. ["{names[0]}", "bound"]'
        )
    if bad is not None:
        raise SpecError(f"{where}: study.objectives {bad}")
    spec.objectives = tuple(names)
    constraints = study.get("constraints", {})
    bad = constraints_problem(constraints, names, validation=spec.validation)
    if bad is not None:
        raise SpecError(f"{where}: study.constraints.{bad}")
    spec.constraints = {k: float(v) for k, v in constraints.items()}
    if spec.constraints and spec.sampler["type"] not in CONSTRAINED_SAMPLERS:
        raise SpecError(
            f"{where}: study.constraints need a sampler that takes constraints; set "
            f'sampler.type = "tpe" or "nsga2" (not {spec.sampler["type"]!r})'
        )
    if len(spec.objectives) > 1:
        if spec.pruner["type"] != "none":
            if pruner_given:
                raise SpecError(
                    f"{where}: pruner.type = {spec.pruner['type']!r}, but Optuna does not prune "
                    f"multi-objective studies ({len(spec.objectives)} objectives); set "
                    'pruner.type = "none" or optimize the bound alone'
                )
            spec.pruner = {"type": "none"}
        if "keep_models" not in study:
            spec.keep_models = None


def with_objectives(
    spec: StudySpec,
    *,
    objectives: list[str] | tuple[str, ...] | None = None,
    constraints: dict[str, float] | None = None,
) -> StudySpec:
    """The spec with [study] objectives and constraints replaced (``run_study``'s
    ``objectives=`` and ``constraints=``), checked like a spec. A spec made multi-objective this
    way is not pruned and keeps every complete trial's weights unless it set keep_models."""
    import dataclasses

    names = list(objectives if objectives is not None else spec.objectives)
    study: dict[str, Any] = {
        "objectives": names,
        "constraints": dict(constraints if constraints is not None else spec.constraints),
    }
    if not (len(names) > 1 and spec.keep_models == DEFAULT_KEEP_MODELS):
        study["keep_models"] = spec.keep_models  # kept as it is
    new = dataclasses.replace(spec, pruner=dict(spec.pruner))
    _check_objectives(new, study, pruner_given=False, where=spec.path or "spec")
    return new


# lowest allowed value of numeric settings and search parameters (None: no lower limit)
_AT_LEAST = {
    "training.pack": 1,
    "study.seed": 0,
    "data.seed": 0,
    "data.test_size": 1,
    "sampler.seed": 0,
    "sampler.n_startup_trials": 0,
    "sampler.population_size": 2,
    "pruner.n_startup_trials": 0,
    "pruner.n_warmup_steps": 0,
    "storage.heartbeat_interval": 1,
    "storage.grace_period": 1,
    "storage.outage_seconds": 0,
    "bound.folds": 2,
    "bound.heldout_samples": 1,
    "bound.heldout_steps": 1,
    "search.width": 1,
    "search.layers": 1,
    "search.channels": 1,
    "search.steps": 1,
    "search.batch_size": 1,
    "search.latent": 1,
    "search.epochs": 1,
    "search.beta": 0,
    "search.lam": 0,
}
_POSITIVE = ("training.t_min", "training.lr", "search.lr")
_IMAGE_ONLY = ("binarize", "pad_to_32")
BINARIZE = ("fixed", "dynamic")


def _check_values(spec: StudySpec, where: str) -> None:
    """Values of the right type that still cannot work: negative seeds, non-finite or
    non-positive rates, image options on point data, and the like."""

    tables = {
        "study": {"seed": spec.seed},
        "data": spec.data,
        "training": spec.training,
        "bound": spec.bound,
        "sampler": spec.sampler,
        "pruner": spec.pruner,
        "storage": spec.storage,
    }
    for section, table in tables.items():
        for key, value in table.items():
            name = f"{section}.{key}"
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if not math.isfinite(value):
                raise SpecError(f"{where}: {name} = {value} must be a finite number")
            low = _AT_LEAST.get(name)
            if low is not None and value < low:
                raise SpecError(f"{where}: {name} = {value} must be at least {low}")
            if name in _POSITIVE and value <= 0:
                raise SpecError(f"{where}: {name} = {value} must be positive")
    for key in _IMAGE_ONLY:
        if key == "binarize" and spec.data["name"] == "file":
            continue  # binarize applies to the images of a user's folder too
        if key in spec.data and spec.data["name"] not in IMAGE_SETS:
            raise SpecError(
                f"{where}: data.{key} applies to the image sets ({', '.join(IMAGE_SETS)}), not "
                f"{spec.data['name']}; remove it"
            )
    if "binarize" in spec.data and spec.data["binarize"] not in BINARIZE:
        raise SpecError(
            f"{where}: data.binarize = {spec.data['binarize']!r}; choose one of "
            f"{', '.join(BINARIZE)} (or leave it out for grey levels)"
        )
    if "r" in spec.bound and spec.bound["r"] < 0:
        raise SpecError(f"{where}: bound.r = {spec.bound['r']} must be at least 0")
    if spec.model == "vae" and "r" in spec.bound and "R" in spec.bound:
        raise SpecError(
            f"{where}: give bound.R or bound.r, not both (the paper's r is R = (1 + r)/sqrt(2))"
        )
    pack = spec.training.get("pack", 1)
    if pack > 1 and spec.model != "diffusion":
        raise SpecError(f"{where}: training.pack = {pack} packs diffusion trials only; remove it")
    if pack > 1:
        # spec checks stay torch-free (bound-tuner --help, run's checks)
        from bound_tuner.training.pack import SHARED

        searched = [k for k in SHARED if k in spec.search and not spec.search[k].is_fixed]
        if searched:
            raise SpecError(
                f"{where}: training.pack = {pack} trains trials of one architecture and loop "
                f"together, but search.{searched[0]} varies; fix it or set pack = 1"
            )
    t_min = spec.training.get("t_min")
    if t_min is not None and t_min >= 1:
        raise SpecError(f"{where}: training.t_min = {t_min} must be below 1 (e.g. 1e-3)")
    for p in spec.search.values():
        name = f"search.{p.name}"
        if p.kind is str:
            continue
        values = p.values()
        low = _AT_LEAST.get(name)
        if low is not None and min(values) < low:
            raise SpecError(f"{where}: {name} reaches {min(values)}; it must be at least {low}")
        if name in _POSITIVE and min(values) <= 0:
            raise SpecError(f"{where}: {name} must be positive")


def _check_diffusion_space(spec: StudySpec, where: str, *, schedule: str = "linear") -> None:
    """The diffusion search space; ``schedule`` is the one used when it leaves the schedule out."""
    # spec checks stay torch-free (bound-tuner --help, run's checks)
    from bound_tuner.maths.sde import SCHEDULES

    s = spec.search
    if "T" not in s:
        raise SpecError(f"{where}: search.T is missing; add e.g. T = {{ low = 0.1, high = 1.8 }}")
    sched = s.get("schedule")
    names = sched.values() if sched is not None else [schedule]
    for n in names:
        if n not in SCHEDULES:
            raise SpecError(
                f"{where}: search.schedule has unknown schedule {n!r}; "
                f"choose from {', '.join(SCHEDULES)}"
            )
    t_min = spec.training.get("t_min", 1e-3)
    t_vals = s["T"].values()
    for n in names:
        t_max = SCHEDULES[n].t_max
        if max(t_vals) >= t_max:
            raise SpecError(
                f"{where}: search.T reaches {max(t_vals)}, outside the {n} schedule's "
                f"range (T < {t_max}); lower T or drop {n} from search.schedule"
            )
    if min(t_vals) <= t_min:
        raise SpecError(
            f"{where}: search.T starts at {min(t_vals)}, not above t_min={t_min}; "
            "raise the lower end of T"
        )
    for key, owner in SCHEDULE_PARAMS.items():
        if key in s and owner not in names:
            raise SpecError(
                f"{where}: search.{key} applies to the {owner} schedule, which "
                "search.schedule does not include"
            )
        if key in s and min(s[key].values()) <= 0:
            raise SpecError(f"{where}: search.{key} must be positive")
    if "lam" in s and min(s["lam"].values()) < 0:
        raise SpecError(f"{where}: search.lam must be >= 0")
    if "lr" in s and min(s["lr"].values()) <= 0:
        raise SpecError(f"{where}: search.lr must be positive")


def parse_search(
    search: dict[str, Any], *, model: str = "diffusion", schedule: str = "linear"
) -> dict[str, Param]:
    """A search space from Python values, for use without a spec file.

    Each entry is a Param, a fixed value, a ``(low, high)`` tuple (a range; ``(low, high, "log")``
    for a log range), a list (choices), or a table as in a spec's [search]. ``schedule`` is the
    diffusion schedule of trials when the space leaves it out.
    """
    allowed = DIFFUSION_PARAMS if model == "diffusion" else VAE_PARAMS
    out: dict[str, Param] = {}
    for name, value in search.items():
        if isinstance(value, Param):
            out[name] = value
            continue
        if name not in allowed:
            raise SpecError(
                f"unknown search parameter '{name}' for a {model} objective; "
                f"allowed: {', '.join(allowed)}"
            )
        if isinstance(value, tuple):
            if len(value) not in (2, 3) or (len(value) == 3 and value[2] != "log"):
                raise SpecError(
                    f"search.{name} = {value!r}: give (low, high) or (low, high, 'log')"
                )
            value = {"low": value[0], "high": value[1], "log": len(value) == 3}
        elif isinstance(value, list):
            value = {"choices": value}
        out[name] = _parse_param(name, value, allowed[name], "search")
    if model == "diffusion":
        _check_diffusion_space(StudySpec(name="search", search=out), "search", schedule=schedule)
    return out


def with_pack(spec: StudySpec, pack: int) -> StudySpec:
    """The spec with [training] pack set to ``pack`` (the --pack option), checked like a spec."""
    import dataclasses

    new = dataclasses.replace(spec, training={**spec.training, "pack": pack})
    _check_values(new, "--pack")
    return new


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


# settings that change how a study runs, not what its trials are: left out of the fingerprint
_RUN_SETTINGS = frozenset(
    {
        "data.test_size",  # held-out points only; the training points do not depend on it
        "training.pack",
        "training.compile",
        "training.tf32",
        "bound.heldout_samples",  # validation mode's held-out metrics, never the objective
        "bound.heldout_steps",
    }
)


def _param_record(p: Param) -> Any:
    if p.choices is not None:
        return {"choices": list(p.choices)}
    if p.is_fixed:
        return p.fixed
    out: dict[str, Any] = {"low": p.low, "high": p.high}
    if p.log:
        out["log"] = True
    if p.step is not None:
        out["step"] = p.step
    return out


def fingerprint(spec: StudySpec) -> dict[str, Any]:
    """What defines a study's trials, as flat ``section.key`` entries of plain values: the
    model, the study seed, the data, the search space and the fixed [training] and [bound]
    settings. Not in it: n_trials, the sampler and pruner, keep_models, the storage, heartbeat,
    device, workers and packing, validation's held-out settings (``_RUN_SETTINGS``). Two specs
    with the same fingerprint train and score the same trials."""
    out: dict[str, Any] = {"study.model": spec.model, "study.seed": spec.seed}
    for section in ("data", "training", "bound"):
        for key, value in getattr(spec, section).items():
            out[f"{section}.{key}"] = list(value) if isinstance(value, tuple) else value
    for name, p in spec.search.items():
        out[f"search.{name}"] = _param_record(p)
    if spec.factory is not None:
        out["model.factory"] = spec.factory
    return {k: out[k] for k in sorted(out) if k not in _RUN_SETTINGS}


def fingerprint_changes(old: dict[str, Any], new: dict[str, Any]) -> dict[str, list]:
    """``{key: [old value, new value]}`` for every key whose value differs (None: absent)."""
    return {
        k: [old.get(k), new.get(k)] for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)
    }
