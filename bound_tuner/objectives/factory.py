"""A spec -> its data set and its objective (what every executor's workers build)."""

from __future__ import annotations

from bound_tuner.config.objective_names import ObjectiveValues
from bound_tuner.config.schema import SpecError, StudySpec
from bound_tuner.config.settings import config_kwargs
from bound_tuner.data import load_dataset
from bound_tuner.data.split import DataSplit
from bound_tuner.evaluation.checkpoints import DEFAULT_CHECKPOINTS
from bound_tuner.maths.bounds.diffusion import DEFAULT_VARIANT, FOLD_VARIANTS
from bound_tuner.maths.bounds.kfold import folds_for
from bound_tuner.objectives.vae import VAEObjective
from bound_tuner.runtime.device import DEFAULT_TF32, resolve_device, set_tf32
from bound_tuner.training.config import DiffusionConfig


def load_data(spec: StudySpec) -> DataSplit:
    """The spec's data set, prepared for its model (``bound_tuner.data.prepare_for``: the same
    data a Python user gets from ``load_dataset(..., model=...)``); a problem with it becomes a
    SpecError naming [data]."""
    d = dict(spec.data)
    name = d.pop("name")
    try:
        split = load_dataset(name, **d, model=spec.model)
    except (ValueError, FileNotFoundError, OSError) as e:
        raise SpecError(f"{spec.path}: [data] {e}") from None
    if spec.validation and split.test.shape[0] == 0:
        raise SpecError(
            f"{spec.path}: [data] validation needs held-out points, but test_fraction = 0 "
            "keeps none; raise data.test_fraction or set study.validation = false"
        )
    return split


def diffusion_base_config(spec: StudySpec) -> DiffusionConfig:
    """Defaults for everything the search space leaves out, from [training] and [bound]
    (``bound_tuner.config.settings``: the one table of spec keys and config fields)."""
    fixed = {"training": spec.training, "bound": spec.bound}
    return DiffusionConfig(**config_kwargs("diffusion", fixed))


def check_architecture_keys(spec: StudySpec, *, images: bool) -> None:
    """Refuse the architecture keys that the data's score network does not have: ``width`` and
    ``layers`` shape the MLP of point data, ``channels`` the UNet of images (one line)."""
    for key in ("width", "layers", "channels"):
        if (key in spec.training or key in spec.search) and (key == "channels") != images:
            net, mend = ("UNet", "channels") if images else ("MLP", "width and layers")
            kind = "images" if images else "point data"
            raise SpecError(
                f"{spec.path}: {key} does not shape the {net} of {kind}; it takes {mend}"
            )


def check_bound_settings(spec: StudySpec, m: int) -> None:
    """Refuse, before any study exists, the [bound] settings of a diffusion study that cannot
    work with ``m`` training points or that its variant would ignore (as VAE studies do): K-fold
    references need at least two points in each of their ``folds``; ``folds`` means nothing
    to a variant without K-fold references; and elbo-kfold takes its scale R from cross-fitting,
    so a fixed or estimated R would be ignored. One line naming the mend."""
    where = spec.path or "spec"
    variant = spec.bound.get("variant", DEFAULT_VARIANT)
    folds = spec.bound.get("folds")
    if variant not in FOLD_VARIANTS:
        if folds is not None:
            raise SpecError(
                f'{where}: bound.folds = {folds} is read by variant "elbo-kfold" only; '
                f"variant {variant!r} ignores it: remove bound.folds or set bound.variant = "
                '"elbo-kfold"'
            )
        return
    k = folds_for(m, folds)
    if m < 2 * max(k, 2):
        most = m // 2
        mend = f"lower bound.folds to at most {most}" if most >= 2 else "use more data"
        raise SpecError(
            f"{where}: bound.folds = {k} needs at least {2 * max(k, 2)} training points (two "
            f"in each fold), but the data has m = {m}; {mend}, or raise data.m"
        )
    r = spec.bound.get("R")
    if r is not None:
        raise SpecError(
            f'{where}: bound.R = {r!r} would be ignored: variant "elbo-kfold" takes its scale '
            'from cross-fitting; remove bound.R, or set bound.variant = "paper" (or another '
            "variant that reads R)"
        )


def build_objective(
    spec: StudySpec,
    data: DataSplit | None = None,
    *,
    device: str = "auto",
    on_result=None,
    artifact_store=None,
):
    """The objective of a spec's model, on its data (loaded here unless given).

    Trained weights go to ``artifact_store`` (the best ``[study] keep_models`` trials); by
    default to the store of the dashboard hook ``on_result`` when it has one. ``bound-tuner run``,
    ``worker`` and ``run_study`` always give one (the store beside the database), with or
    without the dashboard.
    """
    data = data if data is not None else load_data(spec)
    if resolve_device(device).type == "cuda":
        set_tf32(spec.training.get("tf32", DEFAULT_TF32))
    if artifact_store is None:
        artifact_store = getattr(on_result, "artifact_store", None)
    if spec.model == "diffusion":
        # scipy only when an objective is built
        from bound_tuner.objectives.diffusion import DiffusionObjective

        if spec.factory is None:  # a [model] factory reads width, layers, channels as it likes
            check_architecture_keys(spec, images=data.train.dim() > 2)
        check_bound_settings(spec, int(data.train.shape[0]))

        objective = DiffusionObjective(
            data,
            search=spec.search,
            base=diffusion_base_config(spec),
            validation=spec.validation,
            # checkpoints serve certified early stopping (docs/theory.md 2.12) and pruners,
            # which Optuna runs for single-objective studies only (the objective reports
            # nothing to a study of several objectives)
            checkpoints=spec.training.get("checkpoints", DEFAULT_CHECKPOINTS),
            study_seed=spec.seed,
            device=device,
            on_result=on_result,
            artifact_store=artifact_store,
            keep_models=spec.keep_models,
            pack=spec.training.get("pack", 1),
            model=spec.factory,
        )
    else:
        objective = VAEObjective.from_spec(
            spec, data, device=device, on_result=on_result, artifact_store=artifact_store
        )
    if tuple(spec.objectives) == ("bound",):
        return objective
    return ObjectiveValues(objective, spec.objectives, validation=spec.validation)
