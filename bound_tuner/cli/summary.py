"""What ``run`` and ``worker`` print at the end: what ran, the pick's bound term by term,
held-out metrics in validation mode, where the study and the weights are, and the "next:"
commands (which work when pasted, and never show a password)."""

from __future__ import annotations

import argparse
import math
import os
import shlex

from bound_tuner.maths.bounds.report import value_label
from bound_tuner.storage.database import ENV_VAR, STUDY_ARTIFACTS_ATTR, redact, resolve_url
from bound_tuner.storage.trained import best_trial_or_none


def print_summary(spec, study, args: argparse.Namespace) -> int:
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
