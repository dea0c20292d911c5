"""The Optuna objective of VAE studies: one trial trains a VAE and returns its bound."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import optuna
import torch
from torch import nn

from bound_tuner.config.objective_names import is_multi, record_cost
from bound_tuner.config.schema import DEFAULT_KEEP_MODELS, SpecError, StudySpec
from bound_tuner.config.search import parse_search
from bound_tuner.config.settings import config_kwargs
from bound_tuner.config.space import suggest
from bound_tuner.data import prepare_for
from bound_tuner.data.split import DataSplit
from bound_tuner.evaluation.checkpoints import (
    CURVE_ATTR,
    DEFAULT_CHECKPOINTS,
    DEFAULT_EARLY_STOP,
    early_stop_refusal,
)
from bound_tuner.evaluation.vae_along_training import CertifiedVAE, train_vae_certified
from bound_tuner.evaluation.vae_bound import vae_bound, vae_kfold_bound
from bound_tuner.maths.bounds.diffusion import R_SOURCES
from bound_tuner.maths.bounds.kfold import fold_assignment, folds_for
from bound_tuner.maths.bounds.report import BoundReport
from bound_tuner.maths.bounds.vae import (
    DEFAULT_VAE_VARIANT,
    VAE_VARIANTS,
    assemble_vae_bound,
    reference_vae_R,
)
from bound_tuner.models.vae import MLPVAE, ConvVAE
from bound_tuner.objectives.outcome import TrialHook, certified_reporter, unusable
from bound_tuner.runtime.device import DEFAULT_DEVICE, resolve_device
from bound_tuner.runtime.seeding import seed_everything, trial_seed
from bound_tuner.storage.keeper import ModelKeeper
from bound_tuner.training.vae import train_vae

VAE_ARCHS = ("mlp", "conv")


# extras of vae_bound computed on the test set: held-out metrics, kept out of bound.*
_TEST_EXTRAS = (
    "heldout_loss",
    "test_neg_elbo",
    "test_neg_elbo_se",
    "test_rec",
    "test_kld",
    "test_size",
)


@dataclass
class VAEConfig:
    """One VAE trial's settings (docs/theory.md sections 5 and 6); the search space overrides them.

    ``variant`` is the bound a trial returns: "elbo-kfold" (docs/theory.md 5.4, the default: a
    bound on the population NELBO from ``folds`` K-fold reference VAEs, None: 5, fewer below 10
    points; pruners see its value at checkpoints, and ``early_stop`` keeps the best one, docs/
    theory.md 2.12) or "paper" ((5.2) with ``R`` or ``r``, reported every epoch). ``lam`` weighs the bound-regularizer of ``bound_tuner.training.vae`` (0: plain training),
    ``R`` the (5.2) bound's sub-Gaussian scale (docs/theory.md section 5.1: a number, "data" or
    "estimate"; None: the paper's form with ``r``, R = (1 + r)/sqrt(2)), ``r`` the paper's r (also
    the regularizer's weight 1 + r), ``mc_samples`` the draws of z per point in each bound
    evaluation.
    """

    beta: float = 1.0
    lam: float = 0.0
    latent: int = 16
    lr: float = 1e-3
    epochs: int = 10
    batch_size: int = 64
    arch: str = "mlp"
    r: float = 1.0
    R: float | str | None = None
    mc_samples: int = 1
    variant: str = DEFAULT_VAE_VARIANT
    folds: int | None = None
    # "elbo-kfold": keep the checkpoint epoch with the smallest certified value and its weights
    # (docs/theory.md 2.12); None: checkpoints.DEFAULT_EARLY_STOP
    early_stop: bool | None = None
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def training(self) -> dict[str, Any]:
        """The keyword arguments of ``train_vae`` that this configuration sets, the same for
        the model and its K-fold references."""
        keys = ("epochs", "batch_size", "lr", "beta", "lam", "r", "seed")
        return {k: getattr(self, k) for k in keys}


@dataclass
class VAEResult:
    """A finished VAE trial: the final bound (on all m points), held-out metrics, the model."""

    report: BoundReport
    heldout: dict[str, float]
    model: nn.Module
    history: list[dict[str, float]]
    epoch_terms: list[dict[str, float]]

    @property
    def samples(self) -> torch.Tensor:
        """64 Bernoulli means decoded from z ~ N(0, I) with a fixed seed (trial artifacts)."""
        p = next(self.model.parameters())
        z = torch.randn(64, int(self.model.latent), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            return torch.sigmoid(self.model.decode(z.to(p.device))).cpu()


class VAEObjective:
    """Objective for ``study.optimize``: the VAE bound of docs/theory.md section 5 for one trial.

    Each trial samples beta, lam, latent, lr (and epochs, batch_size, arch where the search space
    has them), trains the VAE on REC + beta KLD + lam S (docs/theory.md section 6, ``train_vae``) and
    returns its bound on all m training points: with "elbo-kfold" (the default) the K-fold bound
    of eq. 5.4, its K references trained in lockstep with the model
    (``evaluation.vae_along_training``); with "paper" REC + (1 + r) sqrt(KLD) + (1 + r)
    sqrt(MI / m) (5.2).

    After every epoch it evaluates the (5.2) bound on the training set (on ``bound_subset``
    points only, if set) and keeps the terms in the user attr ``epoch_terms`` (one dict per
    epoch: epoch, total, rec, kld, mi, encoder_only_bound; in validation mode also heldout_loss
    and test_neg_elbo on the test set). With "paper" it reports that total to the pruner
    (``trial.report(total, epoch)``); with "elbo-kfold" the pruner gets the value of eq. 5.4 at
    ``checkpoints`` evenly spaced epochs and the last (the smallest so far with early stopping,
    ``VAEConfig.early_stop``, which keeps the weights of the epoch of the smallest value;
    docs/theory.md 2.12), recorded as ``bound.along_training`` ([epoch, value] pairs) with
    ``bound.step`` (the kept epoch), ``bound.steps_trained`` and ``bound.cv_z``. The final
    report's terms go to ``bound.*`` user attrs, the held-out metrics of validation mode to
    ``heldout.*``; neither test number ever feeds the value. A non-finite loss or bound fails
    the trial with ``fail_reason``.

    Args:
        data: training points [m, d] or images [m, 1, H, W] in [0, 1] (binarized, or grey with
            ``dynamic_binarize``), and the test set for validation mode.
        search: the search space (see ``DiffusionObjective``), keys of ``bound_tuner.config.schema.VAE_PARAMS``.
        base: defaults for everything the search space leaves out.
        validation: also compute the held-out metrics.
        bound_subset: evaluate the per-epoch bounds on this many training points, a subset fixed
            by ``study_seed`` and shared by all trials (None: all m). REC, KLD and MI are then
            averages over the subset, and the MI term still divides by the full m, so a
            per-epoch total estimates the bound on all m at lower cost. The final bound always
            uses all m points.
        study_seed: per-trial seeds derive from it and the trial number.
        device: torch device of the trial ("auto": CUDA when present, else the CPU).
        on_result: optional hook ``(trial, VAEResult)`` after a trial's bound (artifacts).
        dynamic_binarize: resample x ~ Bernoulli(x) in every batch; None takes
            ``data.info["dynamic_binarize"]``.
        hidden: hidden widths of the MLP encoder (mirrored in the decoder).
        conv_width: channels of the first convolution of the conv VAE.
        eval_batch_size: points per batch in the bound evaluations.
        artifact_store: an Optuna artifact store; every complete trial among the best
            ``keep_models`` uploads its weights there (``bound_tuner.storage.keeper``). None: none.
        keep_models: how many of the best trials keep their weights (None: all).
        checkpoints: epochs before the last one at which "elbo-kfold" computes and reports its
            value (evenly spaced, ``checkpoints.checkpoint_every``; 0: the last only).

    ``data`` are prepared for a VAE first (``bound_tuner.data.prepare_for``: images flattened).
    """

    def __init__(
        self,
        data: DataSplit,
        *,
        search: dict[str, Any],
        base: VAEConfig | None = None,
        validation: bool = False,
        bound_subset: int | None = None,
        study_seed: int = 0,
        device: str | torch.device = DEFAULT_DEVICE,
        on_result: TrialHook | None = None,
        dynamic_binarize: bool | None = None,
        hidden: tuple[int, ...] = (512, 256),
        conv_width: int = 32,
        eval_batch_size: int = 1024,
        artifact_store: Any | None = None,
        keep_models: int | None = DEFAULT_KEEP_MODELS,
        checkpoints: int = DEFAULT_CHECKPOINTS,
    ) -> None:
        data = prepare_for(data, "vae")
        self.data = data
        self.search = parse_search(search, model="vae")
        self.base = base or VAEConfig()
        self.validation = validation
        self.study_seed = study_seed
        self.device = resolve_device(device)
        self.on_result = on_result
        if dynamic_binarize is None:
            dynamic_binarize = bool(data.info.get("dynamic_binarize", False))
        self.dynamic_binarize = dynamic_binarize
        self.hidden = tuple(hidden)
        self.conv_width = conv_width
        self.eval_batch_size = eval_batch_size
        self.checkpoints = checkpoints
        self.m = int(data.train.shape[0])
        self.input_dim = int(data.train[0].numel())
        self._check_space()
        # R = "data" from all m training points, once: the same for every trial (section 5.1)
        self.data_R = reference_vae_R(data.train) if self.base.R == "data" else None
        if bound_subset is not None and bound_subset < 1:
            raise SpecError(f"bound_subset={bound_subset} must be at least 1 (or None: all m)")
        self.bound_subset = None if bound_subset is None or bound_subset >= self.m else bound_subset
        self.epoch_x = data.train
        if self.bound_subset is not None:
            g = torch.Generator().manual_seed(study_seed)
            idx = torch.randperm(self.m, generator=g)[: self.bound_subset].sort().values
            self.epoch_x = data.train[idx]
        self.keeper = None
        if artifact_store is not None:
            self.keeper = ModelKeeper(
                artifact_store,
                kind="vae",
                build={
                    "shape": [self.input_dim],
                    "input_dim": self.input_dim,
                    "hidden": list(self.hidden),
                    "conv_width": self.conv_width,
                },
                data=data.info,
                keep=keep_models,
            )

    @classmethod
    def from_spec(
        cls,
        spec: StudySpec,
        data: DataSplit,
        *,
        device: str | torch.device = DEFAULT_DEVICE,
        on_result: TrialHook | None = None,
        artifact_store: Any | None = None,
    ) -> VAEObjective:
        """The objective of a VAE study spec: [search], fixed values from [training] (epochs,
        batch_size, lr) and [bound] (R or r, mc_samples, bound_subset); the keys and fields are
        those of ``bound_tuner.config.settings``."""
        bd = spec.bound
        kw = config_kwargs("vae", {"training": spec.training, "bound": bd})
        try:
            return cls(
                data,
                search=spec.search,
                base=VAEConfig(**kw),
                validation=spec.validation,
                bound_subset=bd.get("bound_subset"),
                study_seed=spec.seed,
                device=device,
                on_result=on_result,
                artifact_store=artifact_store,
                keep_models=spec.keep_models,
                checkpoints=spec.training.get("checkpoints", DEFAULT_CHECKPOINTS),
            )
        except SpecError as e:
            raise SpecError(f"{spec.path}: {e}") from None

    def _check_space(self) -> None:
        s, b = self.search, self.base

        def values(name: str) -> list:
            return s[name].values() if name in s else [getattr(b, name)]

        for name, ok, need in (
            ("beta", lambda v: v >= 0, ">= 0"),
            ("lam", lambda v: v >= 0, ">= 0"),
            ("lr", lambda v: v > 0, "positive"),
            ("latent", lambda v: v >= 1, "at least 1"),
            ("epochs", lambda v: v >= 1, "at least 1"),
            ("batch_size", lambda v: v >= 1, "at least 1"),
        ):
            if not all(ok(v) for v in values(name)):
                raise SpecError(f"search.{name} must be {need} (got {values(name)})")
        if b.r < 0 or not math.isfinite(b.r):
            raise SpecError(f"bound.r = {b.r} must be a finite number >= 0")
        if b.variant not in VAE_VARIANTS:
            raise SpecError(f"bound.variant = {b.variant!r}; choose from {VAE_VARIANTS}")
        if b.early_stop and b.variant != "elbo-kfold":
            raise SpecError(early_stop_refusal(b.variant))
        if b.variant == "elbo-kfold":
            if b.R is not None:
                raise SpecError(
                    f'bound.R = {b.R!r} belongs to variant "paper"; "elbo-kfold" takes its scale '
                    'from cross-fitting: remove bound.R or set bound.variant = "paper"'
                )
            k = folds_for(self.m, b.folds)
            if k < 2 or self.m < 2 * k:
                raise SpecError(
                    f"bound.folds = {k} needs at least {2 * max(k, 2)} training points (m = "
                    f"{self.m}); lower bound.folds or use more data"
                )
        if isinstance(b.R, str) and b.R not in R_SOURCES:
            raise SpecError(f'bound.R = {b.R!r}; give a positive number, "estimate" or "data"')
        if b.R is not None and not isinstance(b.R, str) and not (math.isfinite(b.R) and b.R > 0):
            raise SpecError(f'bound.R = {b.R} must be positive (or "estimate" or "data")')
        for arch in values("arch"):
            if arch not in VAE_ARCHS:
                raise SpecError(f"search.arch has unknown {arch!r}; choose from {VAE_ARCHS}")
            if arch == "conv" and self.input_dim != 784:
                raise SpecError(
                    f"the conv VAE takes 28x28 images, but the data have {self.input_dim} values "
                    'per point; set data.pad_to_32 = false or use arch = "mlp"'
                )

    def config_for(self, trial: optuna.Trial) -> VAEConfig:
        seed = trial_seed(trial, self.study_seed)  # before sampling: a fresh trial is no retry
        params = {name: suggest(trial, p) for name, p in self.search.items()}
        return replace(self.base, **params, seed=seed)

    def build_model(self, cfg: VAEConfig) -> nn.Module:
        """A fresh VAE of ``cfg.arch`` (weights from the torch seed set by the caller)."""
        if cfg.arch == "conv":
            return ConvVAE(latent=cfg.latent, width=self.conv_width)
        return MLPVAE(input_dim=self.input_dim, hidden=self.hidden, latent=cfg.latent)

    def __call__(self, trial: optuna.Trial) -> float:
        start = time.perf_counter()
        prune = not is_multi(trial)  # Optuna prunes single-objective studies only
        cfg = self.config_for(trial)
        # "elbo-kfold": the references train beside the model and its checkpoints report the
        # certified value (docs/theory.md 2.12) instead of the per-epoch (5.2)
        certified = cfg.variant == "elbo-kfold"
        trial.set_user_attr("config", {**cfg.to_dict(), "bound_subset": self.bound_subset})
        seed_everything(cfg.seed)
        model = self.build_model(cfg).to(self.device)
        decoder0 = model.initial_decoder()
        test = self.data.test if self.validation else None
        rows: list[dict[str, float]] = []
        last: list[BoundReport] = []  # the latest epoch's bound

        def bound_on(x: torch.Tensor, model: nn.Module) -> BoundReport:
            return vae_bound(
                model,
                x,
                decoder0=decoder0,
                test_x=test,
                r=cfg.r,
                R=cfg.R,
                data_R=self.data_R if cfg.R == "data" else None,
                mc_samples=cfg.mc_samples,
                seed=cfg.seed,
                batch_size=self.eval_batch_size,
            )

        def on_epoch(epoch: int, model: nn.Module) -> None:
            rep = bound_on(self.epoch_x, model)
            row = self._epoch_row(epoch, rep)
            rows.append(row)
            trial.set_user_attr("epoch_terms", rows)
            if not math.isfinite(row["total"]):
                raise FloatingPointError(f"bound is {row['total']} at epoch {epoch}")
            last[:] = [rep]
            if not prune or certified:
                return
            trial.report(row["total"], epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at epoch {epoch} with bound {row['total']:.4f}")

        run = None
        try:
            if certified:
                run = self._train_certified(cfg, model, trial, on_epoch)
                history, full = run.history, self._kfold_bound(run, test)
            else:
                history = train_vae(
                    model,
                    self.data.train,
                    **cfg.training(),
                    dynamic_binarize=self.dynamic_binarize,
                    device=self.device,
                    callback=on_epoch,
                    decoder0=decoder0,
                )
                if self.bound_subset is None and last and len(rows) == cfg.epochs:
                    full = last[0]  # the last epoch's bound is already on all m points
                else:
                    full = bound_on(self.data.train, model)
        except FloatingPointError as e:
            trial.set_user_attr("fail_reason", f"non-finite loss: {e}")
            return math.nan  # Optuna records a NaN value as a failed trial; the study goes on
        heldout = {k: float(v) for k, v in full.extras.items() if k in _TEST_EXTRAS}
        heldout.pop("test_size", None)
        report = replace(
            full, extras={k: v for k, v in full.extras.items() if k not in _TEST_EXTRAS}
        )
        for key, value in report.user_attrs().items():
            trial.set_user_attr(key, value)
        for key, value in heldout.items():
            trial.set_user_attr(f"heldout.{key}", value)
        if run is not None:
            trial.set_user_attr(CURVE_ATTR, [[epoch, value] for epoch, value in run.curve])
        record_cost(trial, model, time.perf_counter() - start)
        reason = unusable(report)
        if reason is not None:
            trial.set_user_attr("fail_reason", reason)
            return math.nan
        if self.on_result is not None:
            self.on_result(trial, VAEResult(report, heldout, model, history, rows))
        if self.keeper is not None:
            self.keeper(trial, model, report.total)
        return report.total

    def _train_certified(
        self,
        cfg: VAEConfig,
        model: nn.Module,
        trial: optuna.Trial,
        on_epoch: Callable[[int, nn.Module], None],
    ) -> CertifiedVAE:
        """Train the model and its K reference VAEs in lockstep (docs/theory.md 2.12, 5.4), the
        value at the ``checkpoints`` epochs going to the pruner; folds and evaluation draws come
        from the study's seed, the same for every trial (common random numbers)."""
        k = folds_for(self.m, cfg.folds)
        return train_vae_certified(
            model,
            lambda: self.build_model(cfg).to(self.device),
            self.data.train,
            fold_assignment(self.m, k, seed=self.study_seed),
            **cfg.training(),
            checkpoints=self.checkpoints,
            early_stop=DEFAULT_EARLY_STOP["vae"] if cfg.early_stop is None else cfg.early_stop,
            eval_seed=self.study_seed,
            eval_batch_size=self.eval_batch_size,
            report=certified_reporter(trial),
            callback=on_epoch,
            dynamic_binarize=self.dynamic_binarize,
            device=self.device,
        )

    def _kfold_bound(self, run: CertifiedVAE, test: torch.Tensor | None) -> BoundReport:
        """The bound (5.4) of the kept epoch's model and references, with its margin z."""
        report = vae_kfold_bound(
            run.model,
            run.references,
            self.data.train,
            run.folds,
            test_x=test,
            seed=self.study_seed,
            batch_size=self.eval_batch_size,
            z=run.z,
        )
        report.extras.update(step=run.epoch, steps_trained=run.epochs_trained)
        return report

    def _epoch_row(self, epoch: int, rep: BoundReport) -> dict[str, float]:
        """One entry of ``epoch_terms``; the MI term divides by the full m (see bound_subset)."""
        rec, kld, mi = rep.terms["rec"], rep.terms["kld"], rep.terms["mi"]
        total, _, _ = assemble_vae_bound(rec, kld, mi, m=self.m, R=rep.settings["R"])
        row = {
            "epoch": epoch,
            "total": total,
            "rec": rec,
            "kld": kld,
            "mi": mi,
            "encoder_only_bound": rep.extras["encoder_only_bound"],
        }
        for key in ("heldout_loss", "test_neg_elbo"):
            if key in rep.extras:
                row[key] = rep.extras[key]
        return row
