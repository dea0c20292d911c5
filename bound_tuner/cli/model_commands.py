"""The commands on a trained model: ``export`` (a trial's weights and config), ``sample``
(draws from a trial's model) and ``score`` (the bound of a diffusers pipeline trained
elsewhere)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bound_tuner.config.schema import SpecError
from bound_tuner.data import prepare_for
from bound_tuner.execution.plan import check_device
from bound_tuner.storage.artifacts import ArtifactError
from bound_tuner.storage.exports import export_model, save_samples
from bound_tuner.storage.trained import load_model


def _load(args: argparse.Namespace):
    check_device(args.device)
    return load_model(
        args.study,
        args.trial,
        storage=args.storage,
        artifacts=args.artifacts,
        device=args.device,
    )


def cmd_export(args: argparse.Namespace) -> int:
    if not args.out.endswith(".pt"):
        raise ArtifactError(f"--out {args.out}: the weights file must end in .pt")
    tm = _load(args)
    meta = export_model(tm, args.out, study_name=args.study)
    print(f"trial {tm.trial} (bound {tm.value:.4f}): weights in {args.out}, config in {meta}")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    if not args.out.lower().endswith((".npy", ".png")):
        raise ArtifactError(f"--out {args.out}: write samples to a .npy file (or .png for images)")
    tm = _load(args)
    if args.out.lower().endswith(".png") and not tm.is_image:
        raise ArtifactError(
            f"--out {args.out}: a .png grid needs image data, and this model makes points; "
            "write .npy instead"
        )
    x = tm.sample(args.n, seed=args.seed, n_steps=args.steps)
    save_samples(x, args.out, image=tm.is_image)
    print(f"{args.n} samples of trial {tm.trial} (seed {args.seed}) in {args.out}")
    return 0


# the variants ``score`` computes without reference models (those need the user's training loop)
SCORE_VARIANTS = ("elbo", "elbo-encoder", "paper")


def cmd_score(args: argparse.Namespace) -> int:
    """The bound of a diffusers pipeline saved with ``save_pretrained`` on its training data
    (``bound_tuner.score``; docs/own_models.md)."""
    if args.variant not in SCORE_VARIANTS:
        raise SpecError(
            f"--variant {args.variant}: that bound trains reference models with your training "
            f"loop; use {', '.join(SCORE_VARIANTS)} here, or bound_tuner.score(..., "
            "train_fn=...) from Python"
        )
    check_device(args.device)
    data = Path(args.data).expanduser()
    if not data.exists():
        raise SpecError(
            f"--data {args.data} not found; give a .npy, .npz, .csv or .pt file or a folder of images"
        )
    try:
        # only the commands that use it load it: --help stays light
        from bound_tuner.data.files import load_tensors, read_image_folder, read_points
        from bound_tuner.models.diffusers_adapter import load_pipeline
        from bound_tuner.runtime.device import resolve_device

        model, schedule = load_pipeline(args.diffusers, device=resolve_device(args.device))
        # every point of the file trains (a file's own test part is not needed for the bound)
        x = read_image_folder(data)[0] if data.is_dir() else read_points(data)[0]
        split = load_tensors(x, m=args.m, seed=args.seed, test_fraction=0.0, name=data.name)
        train = prepare_for(split, "diffusion").train
    except (ImportError, OSError, ValueError) as e:
        raise SpecError(" ".join(str(e).split())) from None
    # only the commands that use it load it: --help stays light
    from bound_tuner.evaluation.scoring import score

    try:
        report = score(
            model,
            train,
            schedule=schedule,
            T=args.T,
            variant=args.variant,
            R=args.R,
            n_steps=args.N,
            n_paths=args.paths,
            train_draws=args.draws,
            t_min=args.t_min,
            seed=args.seed,
        )
    except ValueError as e:  # a T or t_min outside the schedule, a model that does not fit
        raise SpecError(" ".join(str(e).split())) from None
    print(report.table())
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=2, default=str) + "\n")
        print(f"report in {args.json}")
    return 0
