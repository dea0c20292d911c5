"""[search] entries -> checked ``Param``s: a spec's table entries, or Python values given to an
objective without a spec (``parse_search``)."""

from __future__ import annotations

import math
from typing import Any

from bound_tuner.config.schema import DIFFUSION_PARAMS, VAE_PARAMS, Param, SpecError, StudySpec
from bound_tuner.config.validate import check_diffusion_space, type_name, type_ok


def parse_param(name: str, raw: Any, kind: type, where: str) -> Param:
    """One [search] entry as a spec gives it: a fixed value, a range table or a list of values."""
    f = f"{where}: search.{name}"
    if not isinstance(raw, dict):
        if not type_ok(raw, kind):
            raise SpecError(
                f"{f} = {raw!r} must be {type_name(kind)} or a table such as "
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
            if not type_ok(v, kind) or (kind is not str and not math.isfinite(v)):
                raise SpecError(f"{f}: value {v!r} must be {type_name(kind)}")
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
        if not type_ok(v, kind) or not math.isfinite(v):
            raise SpecError(f"{f}.{k} = {v!r} must be {type_name(kind)}")
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
    if step is not None and (not type_ok(step, kind) or step <= 0):
        raise SpecError(f"{f}.step = {step!r} must be a positive {type_name(kind)[2:]}")
    return Param(name, kind, low=low, high=high, log=log, step=step)


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
        out[name] = parse_param(name, value, allowed[name], "search")
    if model == "diffusion":
        check_diffusion_space(StudySpec(name="search", search=out), "search", schedule=schedule)
    return out
