"""The commands that run a study's trials: ``run`` (in this process, a local pool or on Ray),
``worker`` (one machine joining a shared study) and ``storage-proxy`` (the study database served
to many workers)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from bound_tuner.cli.summary import print_summary
from bound_tuner.config.overrides import with_pack
from bound_tuner.config.schema import SpecError
from bound_tuner.config.spec import load_spec
from bound_tuner.execution.errors import WorkerConfigError
from bound_tuner.execution.loop import run_worker
from bound_tuner.execution.plan import RunOptions
from bound_tuner.execution.pool import parse_gpus, run_workers
from bound_tuner.storage.database import ENV_VAR, serve_proxy
from bound_tuner.study import run_study

VALIDATE_SUFFIX = "-validate"  # study name of ``run --validate`` for a spec without validation


def _spec_of(args: argparse.Namespace):
    """The spec of ``run`` and ``worker``, with --validate, --pack and --study-name applied.

    ``run --validate`` runs a spec that has no validation in validation mode under its own
    study, ``NAME-validate``: the same trials as the spec's own study (same spec, same seed),
    with held-out metrics beside the bound."""
    spec = load_spec(args.spec)
    if getattr(args, "validate", False) and not spec.validation:
        spec = load_spec(args.spec, validation=True)
        spec = dataclasses.replace(spec, name=spec.name + VALIDATE_SUFFIX)
    if args.pack is not None:
        spec = with_pack(spec, args.pack)
    if args.study_name is not None:
        if not args.study_name.strip():
            raise SpecError("--study-name is empty; give the name of the study to run")
        spec = dataclasses.replace(spec, name=args.study_name)
    if args.max_failures is not None and args.max_failures < 1:
        raise SpecError(f"--max-failures {args.max_failures} must be at least 1")
    return spec


def _study_options(args: argparse.Namespace) -> dict:
    """The options of ``run`` and ``worker`` that every executor takes (``run_study``'s)."""
    return {
        "heartbeat_interval": args.heartbeat_interval,
        "grace_period": args.grace_period,
        "max_consecutive_failures": args.max_failures,
        "allow_changed_spec": args.allow_changed_spec,
    }


def _run_options(args: argparse.Namespace, **more) -> RunOptions:
    """The same options as one object, for the executors called directly."""
    return RunOptions(
        n_trials=args.n_trials, progress=not args.quiet, **_study_options(args), **more
    )


def cmd_run(args: argparse.Namespace) -> int:
    spec = _spec_of(args)
    if args.n_trials is not None and args.n_trials < 1:
        raise SpecError(f"--n-trials {args.n_trials} must be at least 1")
    hb = _study_options(args)
    if args.executor == "ray":
        return _run_on_ray(args, spec, hb)
    if args.ray_address is not None or args.gpus_per_trial is not None:
        raise WorkerConfigError("--ray-address and --gpus-per-trial go with --executor ray")
    pool = args.workers is not None or args.gpus is not None or args.trials_per_gpu is not None
    if pool:
        if args.gpus is None and args.device not in ("cpu", "auto"):
            raise WorkerConfigError(
                f"--device {args.device} with --workers: give --gpus 0,1,... instead"
            )
        study = run_workers(
            spec,
            storage=args.storage,
            n_workers=args.workers,
            gpus=parse_gpus(args.gpus) if args.gpus is not None else None,
            trials_per_gpu=args.trials_per_gpu or 1,
            options=_run_options(args),
        )
    else:
        study = run_study(
            spec,
            storage=args.storage,
            n_trials=args.n_trials,
            device=args.device,
            progress=not args.quiet,
            **hb,
        )
    return print_summary(spec, study, args)


def _run_on_ray(args: argparse.Namespace, spec, hb: dict) -> int:
    """``run --executor ray``: Ray places the workers and their GPUs."""

    if args.gpus is not None or args.trials_per_gpu is not None:
        raise WorkerConfigError(
            "--executor ray assigns GPUs itself: give --gpus-per-trial G (0.5: two trials "
            "share a GPU) instead of --gpus or --trials-per-gpu"
        )
    gpus = args.gpus_per_trial or 0.0
    if args.device not in ("auto", "cpu") or (args.device == "cpu" and gpus > 0):
        raise WorkerConfigError(
            f"--device {args.device} with --executor ray: Ray trains on cuda with "
            "--gpus-per-trial G and on the CPU without it; leave out --device"
        )
    study = run_study(
        spec,
        storage=args.storage,
        n_trials=args.n_trials,
        progress=not args.quiet,
        executor="ray",
        n_workers=args.workers,
        ray_address=args.ray_address,
        gpus_per_trial=gpus,
        **hb,
    )
    return print_summary(spec, study, args)


def cmd_storage_proxy(args: argparse.Namespace) -> int:
    try:
        serve_proxy(
            args.storage,
            host=args.host,
            port=args.port,
            threads=args.threads,
            announce=lambda line: print(f"bound-tuner: {line}; Ctrl-C stops it", flush=True),
        )
    except KeyboardInterrupt:
        print("bound-tuner: storage proxy stopped", file=sys.stderr)
        return 130
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    if not (args.storage or os.environ.get(ENV_VAR)):
        raise WorkerConfigError(
            "a worker needs the study's shared database: --storage postgresql://user@host/db"
        )
    spec = _spec_of(args)
    study = run_worker(
        spec,
        storage=args.storage,
        device=args.device,
        options=_run_options(args, dashboard_charts=args.charts),
    )
    return print_summary(spec, study, args)
