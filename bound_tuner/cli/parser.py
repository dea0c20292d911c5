"""The arguments of ``bound-tuner`` and its subcommands: ``build_parser``, each subcommand's
options and help, and the types that check a port, a trial and a positive count."""

from __future__ import annotations

import argparse

from bound_tuner.cli.model_commands import SCORE_VARIANTS, cmd_export, cmd_sample, cmd_score
from bound_tuner.cli.report_commands import cmd_dashboard, cmd_report
from bound_tuner.cli.run_commands import cmd_run, cmd_storage_proxy, cmd_worker


def _storage_help() -> str:
    return "SQLAlchemy URL of the study database (default: $BOUND_TUNER_STORAGE or sqlite:///bound_tuner.db)"


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
