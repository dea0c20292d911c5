"""The checks of a study spec's values: each table against the schema, the data, the model
factory, the objectives, values that cannot work, the diffusion search space, and a grid
sampler's lists. Each raises SpecError with one line naming the field and the mend."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from bound_tuner.config.objective_names import DEFAULT_OBJECTIVES, constraints_problem
from bound_tuner.config.objective_names import problem as objectives_problem
from bound_tuner.config.schema import (
    CONSTRAINED_SAMPLERS,
    SCHEDULE_PARAMS,
    SECTIONS,
    SpecError,
    StudySpec,
)
from bound_tuner.data import DATASETS, IMAGE_SETS
from bound_tuner.maths.averaging import DEFAULT_EMA, EMA_RANGE

# the schedule names live beside torch code; they are imported where a spec is checked, so that
# `bound-tuner --help` and `report` never load torch


def type_ok(value: Any, expected) -> bool:
    """Whether ``value`` has the schema's type ``expected`` (a type or a tuple of types; a bool
    is no number)."""
    kinds = expected if isinstance(expected, tuple) else (expected,)
    for k in kinds:
        if k is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return True
        if k is int and isinstance(value, int) and not isinstance(value, bool):
            return True
        if k in (str, bool, list, dict) and isinstance(value, k):
            return True
    return False


def type_name(expected) -> str:
    """The schema's type ``expected`` in words, as the errors say it."""
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


def check_section(name: str, table: Any, where: str) -> dict:
    """The table of section ``name``, each key known to the schema and of its type."""
    if not isinstance(table, dict):
        raise SpecError(f"{where}: [{name}] must be a table, e.g. [{name}] on its own line")
    allowed = SECTIONS[name]
    for key, value in table.items():
        if key not in allowed:
            raise SpecError(
                f"{where}: unknown key '{key}' in [{name}]; allowed: {', '.join(allowed)}"
            )
        if not type_ok(value, allowed[key]):
            raise SpecError(f"{where}: {name}.{key} = {value!r} must be {type_name(allowed[key])}")
    return dict(table)


def check_data(spec: StudySpec, where: str, base: Path | None) -> None:
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


def check_factory(spec: StudySpec, raw: dict, where: str) -> str | None:
    """[model] factory: the import name of a diffusion study's own score network, checked for
    its form only (importing it would load torch; the objective imports and tries it)."""
    name = check_section("model", raw.get("model", {}), where).get("factory")
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


def check_objectives(spec: StudySpec, study: dict, *, pruner_given: bool, where: str) -> None:
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


def check_values(spec: StudySpec, where: str) -> None:
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
    ema = spec.training.get("ema")
    if ema is not None and not (ema == 0 or EMA_RANGE[0] < ema < EMA_RANGE[1]):
        raise SpecError(
            f"{where}: training.ema = {ema} must be 0 (the last weights) or between "
            f"{EMA_RANGE[0]:g} and {EMA_RANGE[1]:.3f} (e.g. {DEFAULT_EMA})"
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


def check_diffusion_space(spec: StudySpec, where: str, *, schedule: str = "linear") -> None:
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


def check_sampler_space(spec: StudySpec, where: str) -> None:
    """A grid or bruteforce sampler needs lists: a range is refused (bruteforce takes an integer
    range with a step)."""
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
