"""Certified early stopping against what a user would do instead (docs/theory.md 2.12, 7.2).

Every model of the selection benchmark's 2-D cases and few-shot image cases (e, y)
(``bench_selection.build_tasks``; pass ``--seed-offset`` for problems none of the rules was
tuned on) trains with its K references in lockstep (``evaluation.along_training``). At C evenly
spaced checkpoints the run records the value's parts (eq. 2.11: training NELBO, cross-fitted
NELBO, its standard error, the references' own NELBO) and the model's held-out NELBO on test
points (images: dequantized, in nats per image, as the value; docs/theory.md 1.3). From one table per problem it compares:

- today's default: each configuration trained for the fixed steps, picked by the value at the
  last step (margin 2 se);
- certified early stopping: each configuration's smallest value over its C checkpoints with the
  margin z_C of eq. 2.12, the pick being that (configuration, step); also with C/2 checkpoints
  (every other one, z_{C/2});
- ``steps`` searched as a parameter: TPE over (configuration, step) with as many trials as the
  problem has configurations, each trial scored by today's rule at its step (the value at that
  checkpoint, margin 2 se), repeated over TPE seeds;
- the oracle of today's search (the best configuration at the last step) and the checkpoint
  oracle (the best (configuration, step) pair).

It prints, per case, the mean regret of each pick (held-out NELBO above the checkpoint oracle's)
and its share of the spread, and the share of (model, step) pairs whose value lies at or above
the held-out NELBO (allowing two of its standard errors), for every pair and for the kept steps.

    python benchmarks/bench_early_stop.py --cases c,x --seed-offset 120 --out results.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor

sys.path.insert(0, os.path.dirname(__file__))
from bench_selection import Task, build_tasks  # noqa: E402

#: checkpoints per model (C, the last step included) and the heldout evaluation of each
CHECKPOINTS = 8
HELDOUT_POINTS = 4000
HELDOUT_DRAWS = 16
TPE_SEEDS = 20
#: the settings a row records (and a resumed run matches rows by)
CONFIG_KEYS = ("T", "schedule", "lr", "lam", "steps", "seed", "ema")


def run_task(task: Task) -> dict:
    """Train one configuration with its references in lockstep; the value's parts and the
    held-out NELBO at every checkpoint."""
    import torch

    torch.set_num_threads(1)
    from bound_tuner.data import load_dataset, prepare_for
    from bound_tuner.evaluation.along_training import value_parts
    from bound_tuner.evaluation.diffusion_bound import nelbo_terms
    from bound_tuner.evaluation.elbo import negative_elbo
    from bound_tuner.maths.bounds.kfold import fold_assignment, fold_rows, folds_for
    from bound_tuner.maths.sde import get_schedule
    from bound_tuner.training.config import DiffusionConfig
    from bound_tuner.training.members import Members
    from bound_tuner.training.pack import train_packed

    split = load_dataset(task.data, m=task.m, seed=task.data_seed, test_size=task.test_size)
    split = prepare_for(split, "diffusion")
    x, test = split.train, split.test[:HELDOUT_POINTS]
    cfg = DiffusionConfig(**task.cfg)
    k = folds_for(x.shape[0], cfg.folds)
    folds = fold_assignment(x.shape[0], k, seed=cfg.eval_seed + 7)
    schedule = get_schedule(cfg.schedule, **cfg.schedule_params)
    rows: list[dict] = []

    def at_checkpoint(step: int, models) -> None:
        parts = value_parts(models[0], models[1:], x, schedule, folds, cfg)
        if test.dim() == 4:  # images: dequantized, in nats per image, the units of the value
            held = nelbo_terms(
                Members.single(models[0], schedule),
                test,
                T=[cfg.T],
                seeds=[cfg.eval_seed + 13],
                draws=HELDOUT_DRAWS,
                t_min=cfg.t_min,
            )[0][0]
        else:  # 2-D points: the draws of the saved rows (nelbo_terms would shift the seed)
            held = negative_elbo(
                models[0],
                test,
                schedule,
                T=cfg.T,
                t_min=cfg.t_min,
                draws=HELDOUT_DRAWS,
                seed=cfg.eval_seed + 13,
            )
        rows.append({"step": step, **parts, "heldout": held.mean, "heldout_se": held.se})

    start = time.perf_counter()
    err = None
    try:
        train_packed(
            x,
            [cfg] * (k + 1),
            device="cpu",
            rows=[None, *fold_rows(folds, k)],
            joint=at_checkpoint,
            callback_every=cfg.steps // CHECKPOINTS,
        )
    except FloatingPointError as e:  # a diverged configuration: a failed trial, never picked
        err = str(e)
    return {
        "case": task.case,
        "group": task.group,
        "config": {k_: task.cfg[k_] for k_ in CONFIG_KEYS},
        "m": task.m,
        "folds": k,
        "checkpoints": rows,
        "error": err,
        "seconds": time.perf_counter() - start,
    }


def value(c: dict, z: float) -> float:
    """Eq. 2.11 with margin z from a checkpoint's parts."""
    from bound_tuner.maths.bounds.diffusion import certified_value

    parts = ("train_nelbo", "cv_nelbo", "cv_se", "refs_train_nelbo")
    return certified_value(**{k: c[k] for k in parts}, z=z)


def tpe_regret(models: list[dict], oracle: float, *, seeds: int = TPE_SEEDS) -> float:
    """Mean held-out NELBO above the checkpoint oracle of TPE over (configuration, step), as
    many trials as configurations, each scored by today's rule at its step."""
    import optuna

    from bound_tuner.maths.bounds.kfold import CV_Z

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    steps = [c["step"] for c in models[0]["checkpoints"]]
    table = {(i, c["step"]): c for i, mdl in enumerate(models) for c in mdl["checkpoints"]}
    out = []
    for s in range(seeds):
        study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=s))

        def objective(trial):
            i = trial.suggest_categorical("config", list(range(len(models))))
            step = trial.suggest_categorical("steps", steps)
            c = table.get((i, step))
            return math.nan if c is None else value(c, CV_Z)  # a failed trial

        study.optimize(objective, n_trials=len(models))
        done = [t for t in study.trials if t.value is not None and math.isfinite(t.value)]
        best = min(done, key=lambda t: t.value)
        out.append(table[(best.params["config"], best.params["steps"])]["heldout"] - oracle)
    return statistics.mean(out)


def by_case(rows: list[dict]) -> list[tuple[str, dict[str, list[dict]]]]:
    """The rows of each case (sorted), by problem."""
    cases: dict[str, dict[str, list[dict]]] = {}
    for r in rows:
        cases.setdefault(r["case"], {}).setdefault(r["group"], []).append(r)
    return sorted(cases.items())


def summarize(rows: list[dict]) -> tuple[str, dict]:
    """Per case: the regret of each pick and the value's validity; the table and the numbers."""
    from bound_tuner.maths.bounds.kfold import CV_Z, checkpoint_z

    lines, summary = [], {}
    for case, groups in by_case(rows):
        acc: dict[str, list[float]] = {}
        valid_all, valid_kept, n_pairs, valid_z2 = 0, 0, 0, 0
        for models in groups.values():
            models = [m for m in models if m["error"] is None]
            if len(models) < 2:
                continue
            C = len(models[0]["checkpoints"])  # the same steps for every model of a problem
            held = [[c["heldout"] for c in m["checkpoints"]] for m in models]
            base = picks(models)
            oracle = base["checkpoint oracle"]
            spread_all = max(max(h) for h in held) - oracle
            finals = [h[-1] for h in held]
            spread_final = max(finals) - min(finals)
            chosen: dict[str, float] = {}
            # today's default: the value at the last step, margin 2
            chosen["today's default (fixed steps)"] = base["today's default (fixed steps)"]
            for name, every in (("early stopping, C", 1), ("early stopping, C/2", 2)):
                used = [j for j in range(C) if (C - 1 - j) % every == 0]  # the last step in
                z = checkpoint_z(len(used))
                best = min(
                    (value(m["checkpoints"][j], z), i, j)
                    for i, m in enumerate(models)
                    for j in used
                )
                chosen[name] = held[best[1]][best[2]]
                if every == 1:  # validity at the kept step of every configuration
                    for m in models:
                        vs = [value(c, z) for c in m["checkpoints"]]
                        c = m["checkpoints"][vs.index(min(vs))]
                        valid_kept += min(vs) >= c["heldout"] - 2 * c["heldout_se"]
                    for m in models:
                        for c in m["checkpoints"]:
                            n_pairs += 1
                            floor = c["heldout"] - 2 * c["heldout_se"]
                            valid_all += value(c, z) >= floor
                            valid_z2 += value(c, CV_Z) >= floor  # the curve without early stopping
            # each model's step chosen by the point estimate (z = 0), its value still with z_C:
            # valid under the same union bound (eq. 2.12a); is the margin what ranks steps poorly?
            z = checkpoint_z(C)
            steps = [
                min(range(C), key=lambda j, m=m: value(m["checkpoints"][j], 0.0)) for m in models
            ]
            best = min(
                range(len(models)), key=lambda i: value(models[i]["checkpoints"][steps[i]], z)
            )
            chosen["step by point estimate, C"] = held[best][steps[best]]
            chosen["steps searched by TPE (same budget)"] = oracle + tpe_regret(models, oracle)
            chosen["oracle of today's search"] = base["oracle of today's search"]
            for name, truth in chosen.items():
                acc.setdefault(name, []).append(truth - oracle)
                acc.setdefault(name + " /all", []).append((truth - oracle) / spread_all)
                acc.setdefault(name + " /final", []).append(
                    (truth - oracle) / spread_final if spread_final > 0 else 0.0
                )
        n_models = sum(len(g) for g in groups.values())
        lines.append(f"\n({case}) {len(groups)} problems, {n_models} models")
        lines.append(f"  {'pick':<40} {'regret':>8} {'share(all)':>11} {'share(final)':>13}")
        stats: dict = {}
        for name in [k for k in acc if not k.endswith((" /all", " /final"))]:
            reg = statistics.mean(acc[name])
            sa = statistics.mean(acc[name + " /all"])
            sf = statistics.mean(acc[name + " /final"])
            stats[name] = {
                "regret": reg,
                "share_all": sa,
                "share_final": sf,
                "worst": max(acc[name]),
            }
            lines.append(f"  {name:<40} {reg:8.3f} {100 * sa:10.0f}% {100 * sf:12.0f}%")
        kept = sum(len(g) for g in groups.values())
        lines.append(
            f"  value >= held-out (2 se): {valid_all}/{n_pairs} (model, step) pairs with z_C, "
            f"{valid_z2}/{n_pairs} with z = 2, {valid_kept}/{kept} kept steps"
        )
        stats["valid_pairs"], stats["pairs"], stats["valid_pairs_z2"] = valid_all, n_pairs, valid_z2
        stats["valid_kept"], stats["kept"] = valid_kept, kept
        summary[case] = stats
    return "\n".join(lines), summary


def picks(models: list[dict]) -> dict[str, float]:
    """The held-out NELBO of each pick of one problem: the checkpoint oracle, the oracle of
    today's search, today's default and certified early stopping (C checkpoints)."""
    from bound_tuner.maths.bounds.kfold import CV_Z, checkpoint_z

    held = [[c["heldout"] for c in m["checkpoints"]] for m in models]
    z = checkpoint_z(len(models[0]["checkpoints"]))
    today = min(range(len(models)), key=lambda i: value(models[i]["checkpoints"][-1], CV_Z))
    stop = min(
        (value(c, z), i, j) for i, m in enumerate(models) for j, c in enumerate(m["checkpoints"])
    )
    return {
        "checkpoint oracle": min(min(h) for h in held),
        "oracle of today's search": min(h[-1] for h in held),
        "today's default (fixed steps)": held[today][-1],
        "early stopping, C": held[stop[1]][stop[2]],
    }


def compare(before: list[dict], after: list[dict]) -> str:
    """Per case, the mean held-out NELBO of each pick in two runs of the same problems (e.g. the
    last weights against their average, ``--ema 0`` and the default) and the mean paired
    difference with its standard error over problems."""
    lines = []
    b_cases, a_cases = dict(by_case(before)), dict(by_case(after))
    for case in sorted(set(b_cases) & set(a_cases)):
        diffs: dict[str, list[tuple[float, float]]] = {}
        for group in sorted(set(b_cases[case]) & set(a_cases[case])):
            runs = [
                [m for m in g[group] if m["error"] is None] for g in (b_cases[case], a_cases[case])
            ]
            if min(len(r) for r in runs) < 2:
                continue
            pb, pa = picks(runs[0]), picks(runs[1])
            for name in pb:
                diffs.setdefault(name, []).append((pb[name], pa[name]))
        n = len(next(iter(diffs.values()), []))
        lines.append(f"\n({case}) {n} problems: mean held-out NELBO of the pick")
        lines.append(f"  {'pick':<32} {'first':>8} {'second':>8} {'second - first':>22}")
        for name, pairs in diffs.items():
            d = [a - b for b, a in pairs]
            se = statistics.stdev(d) / math.sqrt(len(d)) if len(d) > 1 else float("nan")
            first, second = (
                statistics.mean(b for b, _ in pairs),
                statistics.mean(a for _, a in pairs),
            )
            lines.append(
                f"  {name:<32} {first:8.3f} {second:8.3f} {statistics.mean(d):+12.3f} +- {se:.3f}"
            )
    return "\n".join(lines)


def add_run_args(ap: argparse.ArgumentParser, *, jobs: int) -> None:
    """The options of a run: problems, processes, the JSON file of rows."""
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--seed-offset", type=int, default=120, help="fresh problems")
    ap.add_argument("--jobs", type=int, default=jobs)
    ap.add_argument("--out", default=None, help="JSON file of every row (appended to)")
    ap.add_argument("--summarize", default=None, help="only summarize this JSON file")


def saved_rows(path: str | None) -> list[dict]:
    """The rows of a JSON file of a run (none where it does not exist yet)."""
    if not path or not os.path.exists(path):
        return []
    with open(path) as f:
        return json.load(f)["rows"]


def run_resumable(tasks: list[Task], run, *, keys, out: str | None, jobs: int, meta: dict):
    """The rows of ``run`` over ``tasks`` (each row's "config" holds the task's ``keys``): the
    rows saved in ``out`` first, then those of the tasks not in it, in ``jobs`` processes, saved
    as they come (with ``meta``), so that an interrupted run resumes."""
    from tqdm import tqdm

    rows = saved_rows(out)
    done = {(r["group"], json.dumps(r["config"], sort_keys=True)) for r in rows}

    def key(t: Task):
        return (t.group, json.dumps({k: t.cfg[k] for k in keys}, sort_keys=True))

    todo = [t for t in tasks if key(t) not in done]
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        for row in tqdm(pool.map(run, todo), total=len(todo), desc="models"):
            rows.append(row)
            if out:
                with open(out, "w") as f:
                    json.dump({**meta, "rows": rows}, f)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--cases",
        default="c,x",
        help="diffusion cases of bench_selection: 2-D a,b,c,d,x,z; few-shot images e,y",
    )
    ap.add_argument("--memo-steps", type=int, default=8000, help="steps of cases c and x")
    ap.add_argument("--configs", type=int, default=16, help="configurations of case b")
    ap.add_argument(
        "--ema",
        type=float,
        default=None,
        help="width of the average of the weights (default: the library's; 0: the last weights)",
    )
    ap.add_argument(
        "--compare",
        nargs=2,
        metavar=("FIRST", "SECOND"),
        help="only compare the picks of two JSON files of the same problems",
    )
    add_run_args(ap, jobs=2)
    args = ap.parse_args(argv)
    if args.summarize:
        print(summarize(saved_rows(args.summarize))[0])
        return 0
    if args.compare:
        print(compare(*(saved_rows(p) for p in args.compare)))
        return 0
    cases = args.cases.replace(",", "")
    tasks = [
        t
        for t in build_tasks(
            cases,
            args.seeds,
            memo_steps=args.memo_steps,
            fewshot="e" in cases or "y" in cases,
            seed_offset=args.seed_offset,
            configs=args.configs,
        )
        if t.case in "abcdxyez"
    ]
    if args.ema is not None:
        for t in tasks:
            t.cfg["ema"] = args.ema
    rows = run_resumable(
        tasks,
        run_task,
        keys=CONFIG_KEYS,
        out=args.out,
        jobs=args.jobs,
        meta={"checkpoints": CHECKPOINTS},
    )
    text, _ = summarize(rows)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
