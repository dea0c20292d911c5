"""The ``bound-tuner`` command.

  bound-tuner run SPEC [--storage URL] [--n-trials N] [--workers K | --gpus 0,1 [--trials-per-gpu k]]
  bound-tuner run SPEC --validate  (held-out metrics beside the bound, in the study NAME-validate)
  bound-tuner run SPEC --executor ray [--ray-address ADDR] [--workers K] [--gpus-per-trial G]
  bound-tuner worker SPEC --storage URL [--device DEV]
  bound-tuner storage-proxy --storage URL [--host H] [--port P]
  bound-tuner report --study NAME [--storage URL] [--format table|json] [--plot FILE.png]
  bound-tuner dashboard [--storage URL] [--host 127.0.0.1] [--port 8080] [--artifacts DIR]
  bound-tuner export --study NAME [--storage URL] [--trial N|best] --out FILE.pt
  bound-tuner sample --study NAME [--storage URL] [--trial N|best] --n K --out FILE.npy|FILE.png
  bound-tuner score --diffusers DIR --data FILE [--variant elbo] [--json OUT]  (a model trained elsewhere)

A user error (spec, data, storage) prints one line and exits with status 2; nothing is written.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shlex
import signal
import sys
import threading

from bound_tuner.config.spec import SpecError, load_spec, with_pack
from bound_tuner.dashboard.server import serve
from bound_tuner.data import prepare_for
from bound_tuner.execution.errors import TrialError, WorkerConfigError, WorkerError
from bound_tuner.execution.loop import run_worker
from bound_tuner.execution.plan import RunOptions, check_device, thread_excepthook
from bound_tuner.execution.pool import parse_gpus, run_workers
from bound_tuner.execution.signals import (
    catch_lost_interrupts,
    install_sigterm_handler,
    restore_unraisable_hook,
)
from bound_tuner.maths.bounds.report import value_label
from bound_tuner.storage.artifacts import (
    ArtifactError,
    best_trial_or_none,
    export_model,
    load_model,
    save_samples,
)
from bound_tuner.storage.database import (
    ENV_VAR,
    STUDY_ARTIFACTS_ATTR,
    StorageError,
    make_storage,
    redact,
    require_database,
    resolve_url,
    scrub,
    serve_proxy,
)
from bound_tuner.study import run_study

USER_ERRORS = (SpecError, StorageError, WorkerConfigError, ArtifactError)
RUN_ERRORS = (WorkerError, TrialError)
INTERRUPTED_MESSAGE = (
    "bound-tuner: interrupted; the running trials were marked interrupted and are retried "
    "when the study resumes"
)


def _storage_help() -> str:
    return "SQLAlchemy URL of the study database (default: $BOUND_TUNER_STORAGE or sqlite:///bound_tuner.db)"


VALIDATE_SUFFIX = "-validate"  # study name of ``run --validate`` for a spec without validation


def _spec_of(args: argparse.Namespace):
    """The spec of ``run`` and ``worker``, with --validate, --pack and --study-name applied.

    ``run --validate`` runs a spec that has no validation in validation mode under its own
    study, ``NAME-validate``: the same trials as the spec's own study (same spec, same seed),
    with held-out metrics beside the bound."""
    import dataclasses

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
    return _print_summary(spec, study, args)


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
    return _print_summary(spec, study, args)


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
    return _print_summary(spec, study, args)


def _print_summary(spec, study, args: argparse.Namespace) -> int:
    """What a newcomer needs at the end of a run: what ran (or that nothing was left to do),
    the value's unit and direction, the pick's bound term by term (the columns add up to it),
    held-out metrics in validation mode, where the study and the weights are, and what next."""
    # only the commands that use it load it: --help stays light
    from bound_tuner.dashboard.report import (
        contributions_table,
        heldout_keys,
        pareto_lines,
        selection_lines,
        trials_json,
    )

    trials = trials_json(study)
    counts: dict[str, int] = {}
    for t in trials:
        counts[t["state"]] = counts.get(t["state"], 0) + 1
    done = ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items())) or "no trials"
    # a study that already had its trials: the run said so in one line (on stderr), once
    print(f"study {spec.name!r}: {done}")
    names = list(spec.objectives)
    variants = {t["user_attrs"].get("bound.variant") for t in trials} - {None}
    label = "bound" if all(value_label(v) == "bound" for v in variants) else "score"
    kind = f"{'/'.join(sorted(variants))} {label}" if variants else label
    flag, note = _storage_flag(args.storage)
    if spec.validation:
        print(
            "validation mode: held-out metrics are recorded beside the bound and never used "
            "by the objective"
        )
    if len(names) > 1:
        front = [t for t in trials if t.get("pareto")]
        for line in pareto_lines(trials):
            print(line)
        if not front:
            print("no trial completed" + (" within the constraints" if spec.constraints else ""))
            return 1
        shown = sorted(front, key=lambda t: t["value"] if t["value"] is not None else math.inf)
        pick = shown[0]["number"]
        print(
            f"the {kind} of the Pareto set's trials, term by term (nats per training point; "
            "lower is better; each row's terms add up to its last column):"
        )
        print(contributions_table(shown))
        trial_flag = f" --trial {pick}"
    else:
        best = best_trial_or_none(study)
        if best is None:
            print("no trial completed" + (" within the constraints" if spec.constraints else ""))
            return 1
        pick_row = next(t for t in trials if t["number"] == best.number)
        params = ", ".join(f"{k}={_short(v)}" for k, v in best.params.items())
        print(
            f"best trial #{best.number} ({params}): {kind} {best.value:.4f} nats per training "
            "point; lower is better"
        )
        print("its terms add up to it (signed contributions, as in the dashboard's notes):")
        print(contributions_table([pick_row]))
        upper = pick_row["user_attrs"].get("bound.total_upper95")
        if upper is not None:
            print(f"95% certificate (bound.total_upper95): {upper:.4f}")
        keys = heldout_keys(trials)
        if keys:
            ua = pick_row["user_attrs"]
            shown = ", ".join(f"{k} = {_short(ua[k])}" for k in keys if ua.get(k) is not None)
            print(f"held-out metrics of the pick (never the objective): {shown}")
            for line in selection_lines(trials):
                print(line)
        trial_flag = ""
    print(f"study written to {redact(resolve_url(args.storage))} (study {spec.name!r})")
    folder = study.user_attrs.get(STUDY_ARTIFACTS_ATTR)
    keep = spec.keep_models
    if folder and keep != 0:
        which = "every complete trial" if keep is None else f"the best {keep} trials by the bound"
        print(f"weights of {which} in {folder}")
    study_flag = f"--study {shlex.quote(spec.name)}{flag}"
    steps = (
        (f"bound-tuner report {study_flag}", "every trial and its terms"),
        (f"bound-tuner dashboard{flag}", "charts, notes and samples in the browser"),
        (f"bound-tuner export {study_flag}{trial_flag} --out model.pt", "the trial's weights"),
        (
            f"bound-tuner sample {study_flag}{trial_flag} --n 1000 --out samples.npy",
            "samples from its model",
        ),
    )
    width = max(len(cmd) for cmd, _ in steps)
    print("next:")
    for cmd, what in steps:
        print(f"  {cmd.ljust(width)}  # {what}")
    if note:
        print(note)
    return 0


def _storage_flag(storage: str | None) -> tuple[str, str]:
    """The ``--storage`` of the "next:" commands, which must work when pasted, and a line to
    print under them (or ""). No flag when the URL came from $BOUND_TUNER_STORAGE (the commands
    read it too); a URL with a password is never printed: the commands take
    ``"$BOUND_TUNER_STORAGE"`` and the line says to set it."""
    if not storage:
        return "", ""
    if redact(storage) == storage:
        return f" --storage {shlex.quote(storage)}", ""
    if os.environ.get(ENV_VAR) == storage:
        return "", ""
    return (
        f' --storage "${ENV_VAR}"',
        f"(set {ENV_VAR} to the storage URL first: its password is not printed here)",
    )


def _short(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def cmd_report(args: argparse.Namespace) -> int:
    import optuna

    # only the commands that use it load it: --help stays light
    from bound_tuner.dashboard.report import (
        pareto_lines,
        plot_study,
        selection_lines,
        trials_json,
        trials_table,
    )

    require_database(resolve_url(args.storage))  # a read-only command creates no database
    store = make_storage(args.storage)
    names = [s.study_name for s in store.get_all_studies()]
    if args.study not in names:
        raise StorageError(
            f"no study named {args.study!r} in this storage; studies: {', '.join(names) or 'none'}"
        )
    study = optuna.load_study(study_name=args.study, storage=store)
    trials = trials_json(study)
    if args.format == "json":
        print(json.dumps(trials, indent=2))
    else:
        print(trials_table(trials))
        for line in selection_lines(trials):
            print(line)
        for line in pareto_lines(trials):
            print(line)
    if args.plot:
        rho = plot_study(trials, args.plot)
        msg = f"plot saved to {args.plot}"
        if rho is not None:
            msg += f"; Spearman rho(bound, held-out) = {rho:.3f}"
        print(msg, file=sys.stderr if args.format == "json" else sys.stdout)
    return 0


def _heartbeat_args(p: argparse.ArgumentParser) -> None:
    """The options of ``run`` and ``worker`` beyond the spec: study name, failures, heartbeat."""
    p.add_argument(
        "--study-name",
        metavar="NAME",
        help="run the spec under this study name instead of its [study] name (a new study for "
        "a changed spec)",
    )
    p.add_argument(
        "--allow-changed-spec",
        action="store_true",
        help="continue a study that was created from a different spec (data, fixed settings, "
        "search space or bound); its new trials record what changed (user attr spec.changed)",
    )
    p.add_argument(
        "--max-failures",
        type=int,
        metavar="N",
        help="stop a worker after N trials in a row whose objective raised "
        "(default: [study] max_consecutive_failures or 5)",
    )
    p.add_argument(
        "--heartbeat-interval",
        type=int,
        metavar="S",
        help="seconds between a running trial's heartbeats (default: [storage] or 10)",
    )
    p.add_argument(
        "--grace-period",
        type=int,
        metavar="S",
        help="seconds without a heartbeat before a trial is failed and retried "
        "(default: [storage] or 30)",
    )


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 < port < 65536:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (1 to 65535)")
    return port


def cmd_dashboard(args: argparse.Namespace) -> int:

    serve(args.storage, host=args.host, port=args.port, artifact_dir=args.artifacts)
    return 0


def _trial(text: str) -> int | str:
    if text == "best":
        return text
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give a trial number (0, 1, ...) or best")
    return n


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive integer")
    return n


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
    from pathlib import Path

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


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--study", required=True, help="study name")
    p.add_argument("--storage", help=_storage_help())
    p.add_argument(
        "--trial",
        type=_trial,
        default="best",
        help="trial number, or best (the default; a multi-objective study has no single best: "
        "give a trial of its Pareto set, which report lists)",
    )
    p.add_argument(
        "--artifacts",
        metavar="DIR",
        help="artifact folder holding the weights (default: the one the trial was saved to, "
        "else as for dashboard)",
    )
    p.add_argument(
        "--device", default="auto", help="torch device to load the model on (auto: CUDA if present)"
    )


def _pack_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--pack",
        type=int,
        metavar="K",
        help="train K diffusion trials at once as one ensemble (the spec's [training] pack; "
        "pays on a GPU for small models)",
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bound-tuner",
        description=(
            "Optuna studies of diffusion models and VAEs scored by a generalization bound "
            "computed from the training data alone."
        ),
    )
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run or resume the study of a spec")
    r.add_argument("spec", help="study spec, e.g. studies/swiss_roll.toml")
    r.add_argument("--storage", help=_storage_help())
    r.add_argument(
        "--n-trials", type=int, help="finished trials to reach in all (default: the spec's)"
    )
    r.add_argument(
        "--device",
        default="auto",
        help="torch device for the trials: auto (CUDA when present, else cpu; the default), "
        "cpu, cuda, cuda:1; a pool of --workers without --gpus runs on the CPU",
    )
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    r.add_argument(
        "--validate",
        action="store_true",
        help="validation mode: record held-out metrics beside the bound (never the objective) "
        "and say how well the bound picked; a spec without validation runs as study NAME-validate",
    )
    _pack_arg(r)
    r.add_argument(
        "--workers", type=int, metavar="K", help="run K worker processes on the CPU (PostgreSQL)"
    )
    r.add_argument(
        "--gpus", metavar="0,1,2,3", help="run workers on these GPUs, one process per GPU share"
    )
    r.add_argument(
        "--trials-per-gpu", type=int, metavar="k", help="workers (trials at once) per GPU (1)"
    )
    r.add_argument(
        "--executor",
        choices=("local", "ray"),
        default="local",
        help="local: this machine's processes (the default); ray: Ray tasks on a local "
        'instance or a cluster (pip install "bound_tuner[ray]")',
    )
    r.add_argument(
        "--ray-address",
        metavar="ADDR",
        help="Ray cluster to join: auto, or ray://host:10001 (default: a new local instance)",
    )
    r.add_argument(
        "--gpus-per-trial",
        type=float,
        metavar="G",
        help="with --executor ray: GPUs per worker, fractions allowed (0.25: four per GPU)",
    )
    _heartbeat_args(r)
    r.set_defaults(func=cmd_run)

    w = sub.add_parser(
        "worker", help="join a study from this machine: run its trials against a shared database"
    )
    w.add_argument("spec", help="the study spec the other workers use")
    w.add_argument("--storage", help="SQLAlchemy URL of the shared study database (PostgreSQL)")
    w.add_argument(
        "--n-trials", type=int, help="finished trials of the whole study (default: the spec's)"
    )
    w.add_argument(
        "--device",
        default="auto",
        help="torch device for the trials: auto (CUDA when present, else cpu; the default)",
    )
    w.add_argument("--quiet", action="store_true", help="no progress bar")
    _pack_arg(w)
    w.add_argument(
        "--charts",
        action="store_true",
        help="also rebuild the study's dashboard charts (give this to one worker of a study)",
    )
    _heartbeat_args(w)
    w.set_defaults(func=cmd_worker)

    px = sub.add_parser(
        "storage-proxy",
        help="serve a study database to many workers through Optuna's gRPC storage proxy",
    )
    px.add_argument("--storage", help="SQLAlchemy URL of the study database (PostgreSQL) to serve")
    px.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    px.add_argument("--port", type=_port, default=13000, help="port to listen on (13000)")
    px.add_argument(
        "--threads",
        type=_positive,
        default=10,
        help="requests served at once, and database connections held (10)",
    )
    px.set_defaults(func=cmd_storage_proxy)

    rep = sub.add_parser("report", help="print a study's trials and plot its trade-offs")
    rep.add_argument("--study", required=True, help="study name")
    rep.add_argument("--storage", help=_storage_help())
    rep.add_argument("--format", choices=("table", "json"), default="table")
    rep.add_argument("--plot", metavar="FILE.png", help="save the trade-off plot here")
    rep.set_defaults(func=cmd_report)

    d = sub.add_parser(
        "dashboard", help="serve optuna-dashboard with the studies' charts and samples"
    )
    d.add_argument("--storage", help=_storage_help())
    d.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    d.add_argument("--port", type=_port, default=8080, help="port to listen on (default 8080)")
    d.add_argument(
        "--artifacts",
        metavar="DIR",
        help="artifact folder (default: $BOUND_TUNER_ARTIFACTS, else <db name>_artifacts beside "
        "a SQLite file, else ./bound_tuner_artifacts)",
    )
    d.set_defaults(func=cmd_dashboard)

    e = sub.add_parser("export", help="write a trial's trained weights (.pt) and config (.json)")
    _model_args(e)
    e.add_argument("--out", required=True, metavar="FILE.pt", help="weights file to write")
    e.set_defaults(func=cmd_export)

    s = sub.add_parser("sample", help="draw samples from a trial's trained model")
    _model_args(s)
    s.add_argument("--n", type=_positive, required=True, metavar="K", help="number of samples")
    s.add_argument(
        "--out",
        required=True,
        metavar="FILE",
        help=".npy (any data; images as pixels in [0, 1]) or .png (an 8-wide grid, images)",
    )
    s.add_argument("--seed", type=int, default=0, help="seed of the generator's noise (0)")
    s.add_argument(
        "--steps", type=_positive, metavar="N", help="generator steps (default: the bound's N)"
    )
    s.set_defaults(func=cmd_sample)

    sc = sub.add_parser(
        "score",
        help="the bound of a diffusers pipeline trained elsewhere (pip install "
        "'bound_tuner[diffusers]')",
    )
    sc.add_argument(
        "--diffusers",
        required=True,
        metavar="DIR",
        help="pipeline folder written by save_pretrained",
    )
    sc.add_argument(
        "--data",
        required=True,
        metavar="FILE",
        help="its training data: a .npy, .npz, .csv or .pt file or a folder of images (pixels "
        "in [0, 1] are scored as 8-bit images in [-1, 1])",
    )
    sc.add_argument("--m", type=_positive, help="score on m points of the file (default: all)")
    sc.add_argument(
        "--variant",
        default="elbo",
        help=f"bound variant without reference models: {', '.join(SCORE_VARIANTS)} (elbo)",
    )
    sc.add_argument("--T", type=float, help="diffusion time (default 1: the whole process)")
    sc.add_argument("--t-min", type=float, help="smallest time (default 1/N of the scheduler)")
    sc.add_argument("--R", type=float, help="sub-Gaussian scale (default: the variant's)")
    sc.add_argument("--N", type=_positive, help="generator steps of the bound (500)")
    sc.add_argument("--paths", type=_positive, help="generator paths of the bound (256)")
    sc.add_argument("--draws", type=_positive, help="draws per point of the NELBO pass")
    sc.add_argument("--seed", type=int, default=0, help="evaluation seed (0)")
    sc.add_argument("--device", default="auto", help="torch device (auto: CUDA if present)")
    sc.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    sc.set_defaults(func=cmd_score)
    return p


class _OneLine(logging.Handler):
    """bound_tuner's warnings (a study with nothing left to run, a chart not saved) as
    ``bound-tuner: ...`` lines on stderr, passwords masked."""

    def __init__(self, storage: str | None) -> None:
        super().__init__(logging.WARNING)
        self.storage = storage

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = scrub(record.getMessage(), self.storage)
            print(f"bound-tuner: {text}", file=sys.stderr, flush=True)
        except (OSError, ValueError):  # stderr closed or gone: nothing left to tell
            self.handleError(record)


def _quiet_stdout() -> None:
    """After a closed pipe (``report | head``): point stdout at /dev/null, so that Python's
    final flush does not fail again (the recipe of Python's signal documentation)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # no file descriptor behind sys.stdout (captured)
        pass
    finally:
        os.close(devnull)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.getLogger("optuna").setLevel(logging.WARNING)
    old_sigterm = install_sigterm_handler()  # SIGTERM stops a run like Ctrl-C
    old_unraisable = catch_lost_interrupts()  # a signal lost in a finalizer is sent again
    # the SIGINT handler it found, put back on return (main may run inside a longer process; an
    # ignored SIGINT would also pass on to every process it starts); main thread only
    main_thread = threading.current_thread() is threading.main_thread()
    old_sigint = signal.getsignal(signal.SIGINT) if main_thread else None
    if old_sigint is signal.SIG_IGN:
        # started with SIGINT ignored (a background job of a shell script, or a parent that
        # ignores it): a run must still answer Ctrl-C and Ray's cancel, which arrive as SIGINT,
        # and the processes it starts would inherit the ignored disposition
        signal.signal(signal.SIGINT, signal.default_int_handler)
    storage = getattr(args, "storage", None)
    old_hook = threading.excepthook
    threading.excepthook = thread_excepthook(old_hook, storage)
    ours = logging.getLogger("bound_tuner")
    handler = _OneLine(storage)
    ours.addHandler(handler)
    propagate, ours.propagate = ours.propagate, False
    try:
        code = args.func(args)
        sys.stdout.flush()  # a closed pipe shows here, not in Python's flush at exit
        return code
    except BrokenPipeError:  # the reader of our output went away (report ... | head)
        _quiet_stdout()
        return 141  # as a process ended by SIGPIPE, the shell's 128 + 13
    except USER_ERRORS as e:
        print(f"bound-tuner: error: {scrub(e, storage)}", file=sys.stderr)
        return 2
    except RUN_ERRORS as e:
        print(f"bound-tuner: error: {scrub(e, storage)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        # the run is over: a late second Ctrl-C must not turn exit status 130 into a traceback
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        # CPython remembers a KeyboardInterrupt that passed through code run by exec or eval of
        # a string (libraries do that) and then ends the process by SIGINT, status -2, even
        # though it was handled here; evaluating a string resets that record (run_eval_code_obj)
        exec("")
        print(INTERRUPTED_MESSAGE, file=sys.stderr)
        return 130
    finally:
        threading.excepthook = old_hook
        restore_unraisable_hook(old_unraisable)
        ours.removeHandler(handler)
        ours.propagate = propagate
        if old_sigterm is not None:
            signal.signal(signal.SIGTERM, old_sigterm)
        if old_sigint is not None:
            signal.signal(signal.SIGINT, old_sigint)


if __name__ == "__main__":
    sys.exit(main())
