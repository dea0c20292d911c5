"""The Optuna objective of diffusion studies: one trial trains a score network and returns its bound."""

from __future__ import annotations

import math
import time
from dataclasses import replace
from typing import Any

import optuna
import torch
from torch import nn

from bound_tuner.config.objective_names import is_multi, record_cost
from bound_tuner.config.schema import DEFAULT_KEEP_MODELS, Param, SpecError
from bound_tuner.config.search import parse_search
from bound_tuner.config.space import sample_diffusion_params
from bound_tuner.data import prepare_for
from bound_tuner.data.split import DataSplit
from bound_tuner.evaluation.checkpoints import (
    CURVE_ATTR,
    DEFAULT_CHECKPOINTS,
    checkpoint_every,
    early_stop_refusal,
)
from bound_tuner.evaluation.diffusion_bound import diffusion_bound
from bound_tuner.evaluation.experiment import lockstep, run_diffusion, score_model
from bound_tuner.maths.bounds.diffusion import (
    ENCODER_VARIANTS,
    FOLD_VARIANTS,
    SPLIT_VARIANTS,
    encoder_terms,
)
from bound_tuner.maths.sde import get_schedule
from bound_tuner.models.factory import ModelFactory, check_output, factory_name, vmap_error
from bound_tuner.objectives.outcome import TrialHook, certified_reporter, unusable
from bound_tuner.objectives.pack_stop import PACK_STOPPED, PackInterrupted
from bound_tuner.objectives.packed import PackCoordinator
from bound_tuner.runtime.device import DEFAULT_DEVICE, resolve_device
from bound_tuner.runtime.seeding import trial_seed
from bound_tuner.storage.keeper import ModelKeeper
from bound_tuner.training.config import DiffusionConfig, build_initial
from bound_tuner.training.pack import PackStopped


class DiffusionObjective:
    """Objective for ``study.optimize``: the diffusion bound of docs/theory.md section 2 for one trial.

    Args:
        data: the training set (and test set for validation mode), loaded once per worker.
        search: the search space: ``{name: value}`` with a fixed value, a ``(low, high)`` range
            (``(low, high, "log")`` for a log scale), a list of choices, or a Param.
        base: defaults for everything the search space leaves out (training, bound settings).
        validation: also compute held-out metrics (stored as ``heldout.*`` user attrs).
        checkpoints: how many steps before the last one the value is computed and reported at
            (evenly spaced; 0: none): pruning, and certified early stopping for "elbo-kfold"
            (docs/theory.md 2.12).
        study_seed: per-trial seeds derive from it and the trial number.
        device: torch device of the trial ("auto": CUDA when present, else the CPU).
        on_result: optional hook ``(trial, DiffusionResult)`` after a trial's bound (artifacts).
        artifact_store: an Optuna artifact store; every complete trial among the best
            ``keep_models`` uploads its weights there (``bound_tuner.storage.keeper``). None: none.
        keep_models: how many of the best trials keep their weights (None: all).
        pack: trials trained at once as one ensemble (``bound_tuner.objectives.packed``): with
            pack > 1 the objective expects that many concurrent calls (threads; ``run_study``
            and the workers start them), and its calls wait for one another to form a pack.
        model: your own score network (docs/own_models.md): a factory
            ``factory(config, data_shape) -> nn.Module`` whose module predicts the noise from
            (x_t, t), or its import name ``"package.module:function"`` (a spec's
            ``[model] factory``). None: the built-in MLP (points) or UNet (images). Trials
            record the name, so kept weights can be rebuilt by ``load_model``; a module that
            ``torch.func`` cannot vmap is refused for ``pack > 1``.

    ``data`` are prepared for diffusion first (``bound_tuner.data.prepare_for``: images in
    [0, 1] become pixel bin centres in [-1, 1]). Settings the search space leaves out come from
    ``base``, the schedule and its parameters included.
    """

    def __init__(
        self,
        data: DataSplit,
        *,
        search: dict[str, Any],
        base: DiffusionConfig | None = None,
        validation: bool = False,
        checkpoints: int = DEFAULT_CHECKPOINTS,
        study_seed: int = 0,
        device: str | torch.device = DEFAULT_DEVICE,
        on_result: TrialHook | None = None,
        artifact_store: Any | None = None,
        keep_models: int | None = DEFAULT_KEEP_MODELS,
        pack: int = 1,
        model: str | ModelFactory | None = None,
    ) -> None:
        self.data = prepare_for(data, "diffusion")
        self.base = base or DiffusionConfig()
        if model is not None:
            self.base = replace(self.base, model=model)
        self.search = parse_search(search, model="diffusion", schedule=self.base.schedule)
        if self.base.early_stop and self.base.variant not in FOLD_VARIANTS:
            raise SpecError(early_stop_refusal(self.base.variant))
        build: dict[str, Any] = {"shape": list(self.data.train.shape[1:])}
        if self.base.model is not None:
            build["factory"] = factory_name(self.base.model)
            self._check_model(pack)
        self.keeper = None
        if artifact_store is not None:
            self.keeper = ModelKeeper(
                artifact_store,
                kind="diffusion",
                build=build,
                data=self.data.info,
                keep=keep_models,
            )
        self.validation = validation
        self.checkpoints = checkpoints
        self.study_seed = study_seed
        self.device = resolve_device(device)
        self.on_result = on_result
        self.pack = pack
        self.packer = None
        if pack > 1:
            self.packer = PackCoordinator(self.data.train, size=pack, device=self.device)

    def _check_model(self, pack: int) -> None:
        """Refuse (SpecError, one line) a factory that cannot be imported, does not build a
        module that maps x_t to a tensor of its shape on the data, or cannot be packed when
        ``pack > 1``."""
        name = factory_name(self.base.model)
        shape = tuple(self.data.train.shape[1:])
        try:
            net = build_initial(self.base, shape)
            check_output(net, self.data.train[:2].to(torch.float32), name=name)
        except ValueError as e:
            raise SpecError(str(e)) from None
        why = vmap_error(net, shape) if pack > 1 or self.base.early_stop else None
        if self.base.early_stop and why is not None:
            raise SpecError(
                f"model {name} cannot train in lockstep with its references for [bound] "
                f"early_stop = true: torch.func cannot vmap it ({why}); remove early_stop"
            )
        if pack > 1:
            if why is not None:
                raise SpecError(
                    f"model {name} cannot train in a pack of {pack}: torch.func cannot vmap it "
                    f"({why}); set [training] pack = 1"
                )

    def config_for(self, trial: optuna.Trial) -> DiffusionConfig:
        seed = trial_seed(trial, self.study_seed)  # before sampling: a fresh trial is no retry
        search = self.search
        if "schedule" not in search:  # the base schedule, with its parameters
            search = {**search, "schedule": Param("schedule", str, fixed=self.base.schedule)}
        params = sample_diffusion_params(trial, search)
        if "schedule" not in self.search:
            params["schedule_params"] = {**self.base.schedule_params, **params["schedule_params"]}
        # the evaluation draws are the study's (common random numbers): trials differ only by
        # their models, each trained from its own seed
        return replace(
            self.base,
            **params,
            seed=seed,
            eval_seed=self.study_seed,
        )

    def __call__(self, trial: optuna.Trial) -> float:
        if self.packer is None:
            return self._run(trial)
        with self.packer.trial():
            return self._run(trial)

    def _train_and_score(self, trial: optuna.Trial, cfg: DiffusionConfig, x: torch.Tensor):
        together = lockstep(cfg, x)  # the trial is its own pack of K + 1: model and references
        checkpoint, every = (None, 0) if together else self._checkpoint(trial, cfg, x)
        if together or self.packer is None:
            try:
                return run_diffusion(
                    self.data.train,
                    cfg,
                    test=self.data.test,
                    validation=self.validation,
                    device=self.device,
                    checkpoint=checkpoint,
                    checkpoint_every=every,
                    checkpoints=self.checkpoints,
                    report=certified_reporter(trial),
                    # in a packed worker, the coordinator's stop ends this thread's training too
                    stop=None if self.packer is None else self.packer.stop,
                    together=together,
                )
            except PackStopped:
                raise PackInterrupted(PACK_STOPPED) from None
        member = self.packer.train(cfg, checkpoint, every)
        if member.error is not None:
            raise member.error
        return score_model(
            member.model,
            member.schedule,
            member.losses,
            self.data.train,
            cfg,
            test=self.data.test,
            validation=self.validation,
            device=self.device,
            terms=member.terms,
        )

    def _run(self, trial: optuna.Trial) -> float:
        start = time.perf_counter()
        cfg = self.config_for(trial)
        x = self.data.train.to(self.device)
        try:
            res = self._train_and_score(trial, cfg, x)
        except FloatingPointError as e:
            trial.set_user_attr("fail_reason", f"non-finite loss: {e}")
            return math.nan  # Optuna records a NaN value as a failed trial; the study goes on
        report = res.report
        for key, value in report.user_attrs().items():
            trial.set_user_attr(key, value)
        for key, value in res.heldout.items():
            trial.set_user_attr(f"heldout.{key}", value)
        trial.set_user_attr("config", cfg.to_dict())
        if res.curve:
            trial.set_user_attr(CURVE_ATTR, [[step, value] for step, value in res.curve])
        record_cost(trial, res.model, time.perf_counter() - start)
        reason = unusable(report, max_scale=cfg.max_sample_scale)
        if reason is not None:
            trial.set_user_attr("fail_reason", reason)
            return math.nan
        if self.on_result is not None:
            self.on_result(trial, res)
        if self.keeper is not None:
            self.keeper(trial, res.model, report.total)
        return report.total

    def _checkpoint(self, trial: optuna.Trial, cfg: DiffusionConfig, x: torch.Tensor):
        if self.checkpoints <= 0 or is_multi(trial):  # Optuna prunes single-objective studies
            return None, 0
        every = checkpoint_every(cfg.steps, self.checkpoints)
        schedule = get_schedule(cfg.schedule, **cfg.schedule_params)
        # the encoder terms do not depend on the model: once per trial
        enc: dict[str, float] = {}

        def report_partial(step: int, model: nn.Module) -> None:
            if step >= cfg.steps:
                return
            # "elbo-split" (and "elbo-kfold" with a network that cannot be packed) train their
            # references at the end only: their checkpoints report the "elbo" bound of the
            # model so far (README, pruning)
            refs = cfg.variant in SPLIT_VARIANTS or cfg.variant in FOLD_VARIANTS
            variant = "elbo" if refs else cfg.variant
            if not enc and variant in ENCODER_VARIANTS:
                enc.update(encoder_terms(x, schedule, T=cfg.T, mc_samples=1, seed=cfg.eval_seed))
            partial = diffusion_bound(
                model,
                x,
                schedule,
                T=cfg.T,
                variant=variant,
                R=cfg.R,
                l_estimator=cfg.l_estimator,
                n_steps=min(100, cfg.n_steps),
                n_paths=64,
                train_draws=4,
                t_min=cfg.t_min,
                seed=cfg.eval_seed,
                encoder=enc or None,
            ).total
            model.train()
            if not math.isfinite(partial):
                raise FloatingPointError(f"partial bound became {partial} at step {step}")
            trial.report(partial, step)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at step {step} with partial bound {partial:.4f}")

        return report_partial, every
