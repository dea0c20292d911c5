"""The commands that show what a study found: ``report`` (its trials as a table or JSON, and
the trade-off plot) and ``dashboard`` (optuna-dashboard with the study's charts and samples)."""

from __future__ import annotations

import argparse
import json
import sys

import optuna

from bound_tuner.dashboard.server import serve
from bound_tuner.storage.database import StorageError, make_storage, require_database, resolve_url


def cmd_report(args: argparse.Namespace) -> int:
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


def cmd_dashboard(args: argparse.Namespace) -> int:
    serve(args.storage, host=args.host, port=args.port, artifact_dir=args.artifacts)
    return 0
