"""A user's own score network: a factory ``factory(config, data_shape) -> nn.Module``.

The module it returns predicts the noise from (x_t, t): ``model(x_t [b, *data_shape], t [b])``
returns a tensor of x_t's shape, with t the absolute diffusion time of docs/theory.md section 1.1
(a float32 tensor; the score is -eps/sigma_t, section 1.2). ``config`` is the trial's
``experiment.DiffusionConfig`` (width, layers, channels and anything searched), ``data_shape``
the shape of one training point. A factory is given as the function itself or as its import
name ``"package.module:function"`` (a spec's ``[model] factory``); the name is what a trial
records, so ``load_model`` can rebuild the network from the kept weights.

Packing (``bound_tuner.training.pack``) runs the module through ``torch.func`` (``stack_module_state``,
``functional_call``, ``vmap``); ``vmap_error`` says whether it can.
"""

from __future__ import annotations

import copy
import importlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from bound_tuner.models import model_device, model_dtype

__all__ = [
    "ModelFactory",
    "build_from_factory",
    "check_output",
    "factory_name",
    "resolve_factory",
    "vmap_error",
]

ModelFactory = Callable[[Any, tuple[int, ...]], nn.Module]
FORMAT = '"package.module:function"'


def factory_name(factory: str | ModelFactory) -> str:
    """The import name ``module:qualname`` of a factory (a string is returned as it is). A
    lambda or a function defined inside another gets a name that ``resolve_factory`` refuses."""
    if isinstance(factory, str):
        return factory
    module = getattr(factory, "__module__", None) or type(factory).__module__
    qualname = getattr(factory, "__qualname__", None) or type(factory).__qualname__
    return f"{module}:{qualname}"


def resolve_factory(factory: str | ModelFactory) -> ModelFactory:
    """The factory a name ``"package.module:function"`` (attributes dotted after the colon)
    names, imported; a callable is returned as it is. Raises ValueError (one line)."""
    if callable(factory):
        return factory
    if not isinstance(factory, str) or factory.count(":") != 1:
        raise ValueError(f"model factory {factory!r} must be a name such as {FORMAT}")
    module_name, attr = factory.split(":")
    if not module_name or not attr or "<" in attr:
        raise ValueError(
            f"model factory {factory!r} cannot be imported by name; define the function at "
            f"module level and give it as {FORMAT}"
        )
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(
            f"model factory {factory!r}: cannot import {module_name} ({e}); put it on PYTHONPATH "
            "or install its package"
        ) from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"model factory {factory!r}: {module_name} has no {attr}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"model factory {factory!r} is not callable")
    return obj


def build_from_factory(
    factory: str | ModelFactory, config: Any, data_shape: tuple[int, ...]
) -> nn.Module:
    """``factory(config, data_shape)``, checked to be an ``nn.Module`` (ValueError otherwise)."""
    model = resolve_factory(factory)(config, tuple(data_shape))
    if not isinstance(model, nn.Module):
        raise ValueError(
            f"model factory {factory_name(factory)} returned {type(model).__name__}, not a "
            "torch.nn.Module predicting the noise from (x_t, t)"
        )
    return model


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text[:200]


def check_output(model: nn.Module, x: torch.Tensor, *, name: str) -> None:
    """Raise ValueError (one line) unless ``model(x[:2], t)`` runs and returns x's shape."""
    xb = x[:2]
    t = torch.full((xb.shape[0],), 0.5, dtype=xb.dtype, device=xb.device)
    try:
        with torch.no_grad():
            out = model(xb, t)
    except Exception as e:
        raise ValueError(
            f"model {name} fails on a batch of shape {tuple(xb.shape)} with times t [b]: "
            f"{_one_line(e)}"
        ) from None
    if not isinstance(out, torch.Tensor) or out.shape != xb.shape:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(
            f"model {name} returns {got} for x_t of shape {tuple(xb.shape)}; it must predict "
            "the noise, a tensor of x_t's shape"
        )


def vmap_error(model: nn.Module, data_shape: tuple[int, ...]) -> str | None:
    """Why ``torch.func`` cannot train copies of ``model`` as one pack (None: it can).

    Runs a forward and backward pass of two stacked copies on two points of zeros, as
    ``bound_tuner.training.pack`` does (``stack_module_state``, ``functional_call`` on a meta copy,
    ``vmap``), on the model's device and dtype."""

    try:
        copies = [copy.deepcopy(model) for _ in range(2)]
        params, buffers = torch.func.stack_module_state(copies)
        params = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
        base = copy.deepcopy(model).to("meta")

        def one(p, b, x, t):
            return torch.func.functional_call(base, (p, b), (x, t))

        dev, dtype = model_device(model), model_dtype(model)
        x = torch.zeros((2, 2, *data_shape), device=dev, dtype=dtype)
        t = torch.full((2, 2), 0.5, device=dev, dtype=dtype)
        out = torch.func.vmap(one)(params, buffers, x, t)
        if not isinstance(out, torch.Tensor) or out.shape != x.shape:
            return f"its vmapped output is not a tensor of shape {tuple(x.shape)}"
        if params:
            out.float().square().sum().backward()
    except Exception as e:
        return _one_line(e)
    return None
