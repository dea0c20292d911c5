"""Optuna objectives: where Optuna meets torch.

``DiffusionObjective`` samples a configuration, trains a score model, computes the bound and
returns its total; every term goes to the trial's user attrs (``bound.*``), the held-out metrics
of validation mode to ``heldout.*`` (never to the value). At checkpoints it reports a cheap
partial bound so pruners work. A NaN or infinite loss fails the trial with ``fail_reason``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import optuna
import torch
from torch import nn

from .bounds.diffusion import assemble_diffusion_bound, encoder_terms, model_terms
from .data import DataSplit
from .experiment import DiffusionConfig, run_diffusion
from .schedules import get_schedule
from .seeding import derive_seed
from .space import sample_diffusion_params
from .spec import parse_search

TrialHook = Callable[[optuna.Trial, Any], None]


class DiffusionObjective:
    """Objective for ``study.optimize``: the diffusion bound of bound-spec.md 1.3 for one trial.

    Args:
        data: the training set (and test set for validation mode), loaded once per worker.
        search: the search space: ``{name: value}`` with a fixed value, a ``(low, high)`` range
            (``(low, high, "log")`` for a log scale), a list of choices, or a Param.
        base: defaults for everything the search space leaves out (training, bound settings).
        validation: also compute held-out metrics (stored as ``heldout.*`` user attrs).
        checkpoints: how many partial bounds to report during training (0: none).
        study_seed: per-trial seeds derive from it and the trial number.
        device: torch device of the trial.
        on_result: optional hook ``(trial, DiffusionResult)`` after a trial's bound (artifacts).
    """

    def __init__(
        self,
        data: DataSplit,
        *,
        search: dict[str, Any],
        base: DiffusionConfig | None = None,
        validation: bool = False,
        checkpoints: int = 3,
        study_seed: int = 0,
        device: str | torch.device = "cpu",
        on_result: TrialHook | None = None,
    ) -> None:
        self.data = data
        self.search = parse_search(search, model="diffusion")
        self.base = base or DiffusionConfig()
        self.validation = validation
        self.checkpoints = checkpoints
        self.study_seed = study_seed
        self.device = device
        self.on_result = on_result

    def config_for(self, trial: optuna.Trial) -> DiffusionConfig:
        params = sample_diffusion_params(trial, self.search)
        return replace(self.base, **params, seed=derive_seed(self.study_seed, trial.number))

    def __call__(self, trial: optuna.Trial) -> float:
        cfg = self.config_for(trial)
        x = self.data.train.to(self.device)
        checkpoint, every = self._checkpoint(trial, cfg, x)
        try:
            res = run_diffusion(
                self.data.train,
                cfg,
                test=self.data.test,
                validation=self.validation,
                device=self.device,
                checkpoint=checkpoint,
                checkpoint_every=every,
            )
        except FloatingPointError as e:
            trial.set_user_attr("fail_reason", f"non-finite loss: {e}")
            return math.nan  # Optuna records a NaN value as a failed trial; the study goes on
        report = res.report
        for key, value in report.user_attrs().items():
            trial.set_user_attr(key, value)
        for key, value in res.heldout.items():
            trial.set_user_attr(f"heldout.{key}", value)
        trial.set_user_attr("config", {k: v for k, v in cfg.to_dict().items()})
        if not math.isfinite(report.total):
            trial.set_user_attr("fail_reason", f"bound is {report.total} (a term overflowed)")
            return math.nan
        if self.on_result is not None:
            self.on_result(trial, res)
        return report.total

    def _checkpoint(self, trial: optuna.Trial, cfg: DiffusionConfig, x: torch.Tensor):
        if self.checkpoints <= 0:
            return None, 0
        every = max(1, cfg.steps // (self.checkpoints + 1))
        schedule = get_schedule(cfg.schedule, **cfg.schedule_params)
        # the encoder terms do not depend on the model: once per trial
        enc: dict[str, float] = {}

        def report_partial(step: int, model: nn.Module) -> None:
            if step >= cfg.steps:
                return
            if not enc:
                enc.update(encoder_terms(x, schedule, T=cfg.T, mc_samples=1, seed=cfg.seed))
            mt = model_terms(
                model,
                x,
                schedule,
                T=cfg.T,
                n_steps=min(100, cfg.n_steps),
                n_paths=64,
                train_draws=4,
                t_min=cfg.t_min,
                seed=cfg.seed,
            )
            R = cfg.R if cfg.R is not None else mt["R_estimate"]
            partial = assemble_diffusion_bound(
                train_loss=mt["train_loss"],
                c_mix=enc["c_mix"],
                c_prior=enc["c_prior"],
                i_gen=mt["i_gen"],
                R=R,
                settings={},
            ).total
            model.train()
            if not math.isfinite(partial):
                raise FloatingPointError(f"partial bound became {partial} at step {step}")
            trial.report(partial, step)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at step {step} with partial bound {partial:.4f}")

        return report_partial, every
