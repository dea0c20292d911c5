"""Certified early stopping of VAEs against the fixed number of epochs (docs/theory.md 2.12, 7.3).

Every model of the selection benchmark's VAE cases (``bench_selection.vae_tasks``: (f)
Fashion-MNIST m = 1,000, 5 to 20 epochs; (i) m = 200, 100 to 300 epochs; pass ``--seed-offset``
for problems none of the rules was tuned on) trains with its K = 5 references in lockstep
(``evaluation.vae_along_training``) at the objective's checkpoints (``[training] checkpoints`` =
7 before the last epoch, so C = 8 or 9, every epoch below 16). At each it records the parts of
the value (eq. 5.4 in the form of eq. 2.11) and the model's held-out -ELBO on the test images.
Per problem it compares

- the fixed epochs: each configuration trained for its epochs, picked by the value at the last
  epoch (margin 2 se; the rule before VAE early stopping);
- certified early stopping: each configuration's smallest value over its C checkpoints with the
  margin z_C of eq. 2.12, the pick being that (configuration, epoch);
- the oracle of the fixed epochs (the best configuration at its last epoch) and the
  (configuration, checkpoint) oracle, against which regret is measured;

and prints the mean regret of each pick (held-out -ELBO above the checkpoint oracle's, nats) with
its share of the spread over all (configuration, checkpoint) pairs, and the share of (model,
epoch) pairs whose value lies at or above the held-out -ELBO (allowing two of its standard
errors), with z_C, with z = 2 and at the kept epochs.

    python benchmarks/bench_early_stop_vae.py --cases f,i --seed-offset 120 --out results.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from bench_early_stop import (  # noqa: E402
    add_run_args,
    by_case,
    run_resumable,
    saved_rows,
    value,
)
from bench_selection import VAE_CASES, VAE_FOLDS, Task, build_tasks, vae_split  # noqa: E402

#: the objective's default: checkpoints before the last epoch
CHECKPOINTS = 7
CONFIG_KEYS = ("beta", "lam", "latent", "lr", "epochs", "seed")


def run_task(task: Task) -> dict:
    """Train one VAE configuration with its references in lockstep; the value's parts and the
    held-out -ELBO at every checkpoint epoch."""
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    from bound_tuner.evaluation.vae_along_training import train_vae_certified
    from bound_tuner.maths.bounds.kfold import fold_assignment
    from bound_tuner.models.vae import MLPVAE
    from bound_tuner.objectives.vae import VAEConfig
    from bound_tuner.runtime.seeding import seed_everything

    split = vae_split(task)
    cfg = VAEConfig(**task.cfg)
    d = int(split.train.shape[1])
    start = time.perf_counter()
    seed_everything(cfg.seed)
    err, rows = None, []
    try:
        run = train_vae_certified(
            MLPVAE(input_dim=d, latent=cfg.latent),
            lambda: MLPVAE(input_dim=d, latent=cfg.latent),
            split.train,
            fold_assignment(task.m, VAE_FOLDS, seed=task.data_seed),
            **cfg.training(),
            checkpoints=CHECKPOINTS,
            early_stop=False,
            eval_seed=task.data_seed,
            test_x=split.test,
        )
        for (epoch, _), rep in zip(run.curve, run.reports, strict=True):
            rows.append(
                {
                    "step": epoch,
                    "train_nelbo": rep.terms["train_nelbo"],
                    "cv_nelbo": rep.terms["cv_nelbo"],
                    "cv_se": rep.extras["cv_se"],
                    "refs_train_nelbo": rep.extras["refs_train_nelbo"],
                    "heldout": rep.extras["test_neg_elbo"],
                    "heldout_se": rep.extras["test_neg_elbo_se"],
                }
            )
    except FloatingPointError as e:  # a diverged configuration: a failed trial, never picked
        err = str(e)
    return {
        "case": task.case,
        "group": task.group,
        "config": {k: task.cfg[k] for k in CONFIG_KEYS},
        "m": task.m,
        "folds": VAE_FOLDS,
        "checkpoints": rows,
        "error": err,
        "seconds": time.perf_counter() - start,
    }


def cost(task: Task, *, repeats: int) -> dict[str, float]:
    """Seconds of one trial's training and value, timed alternately (medians of ``repeats``):
    the model, then ``train_fold_vaes``, then the bound (before), against the lockstep training
    with the value at the default checkpoints and early stopping, then the bound (now)."""
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    from bound_tuner.evaluation.vae_along_training import train_vae_certified
    from bound_tuner.evaluation.vae_bound import vae_kfold_bound
    from bound_tuner.maths.bounds.kfold import fold_assignment
    from bound_tuner.models.vae import MLPVAE
    from bound_tuner.objectives.vae import VAEConfig
    from bound_tuner.runtime.seeding import seed_everything
    from bound_tuner.training.vae import train_fold_vaes, train_vae

    split, cfg = vae_split(task), VAEConfig(**task.cfg)
    x, d = split.train, int(split.train.shape[1])
    folds = fold_assignment(task.m, VAE_FOLDS, seed=task.data_seed)

    def build() -> MLPVAE:
        return MLPVAE(input_dim=d, latent=cfg.latent)

    def before() -> None:
        seed_everything(cfg.seed)
        model = build()
        train_vae(model, x, **cfg.training())
        refs = train_fold_vaes(build, x, folds, **cfg.training())
        vae_kfold_bound(model, refs, x, folds, seed=task.data_seed)

    def now() -> None:
        seed_everything(cfg.seed)
        run = train_vae_certified(
            build(), build, x, folds, **cfg.training(), checkpoints=CHECKPOINTS, early_stop=True
        )
        vae_kfold_bound(run.model, run.references, x, folds, seed=task.data_seed, z=run.z)

    times: dict[str, list[float]] = {"before": [], "now": []}
    for _ in range(repeats):
        for name, fn in (("before", before), ("now", now)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def summarize(rows: list[dict]) -> tuple[str, dict]:
    """Per case: the regret of each pick and the value's validity; the table and the numbers.
    Each model has its own C (its epochs differ), so its own z_C."""
    from bound_tuner.maths.bounds.kfold import CV_Z, checkpoint_z

    lines, summary = [], {}
    for case, groups in by_case(rows):
        acc: dict[str, list[float]] = {}
        valid = {"z_C": 0, "z = 2": 0, "kept": 0}
        pairs, kept_n, seconds, n_models = 0, 0, 0.0, 0
        for models in groups.values():
            seconds += sum(m["seconds"] for m in models)
            n_models += len(models)
            models = [m for m in models if m["error"] is None]
            if len(models) < 2:
                continue
            held = [[c["heldout"] for c in m["checkpoints"]] for m in models]
            zs = [checkpoint_z(len(m["checkpoints"])) for m in models]
            oracle = min(min(h) for h in held)
            spread = max(max(h) for h in held) - oracle
            finals = [h[-1] for h in held]
            fixed = min(range(len(models)), key=lambda i: value(models[i]["checkpoints"][-1], CV_Z))
            stopped = min(
                (value(c, zs[i]), i, j)
                for i, m in enumerate(models)
                for j, c in enumerate(m["checkpoints"])
            )
            picks = {
                "fixed epochs (value at the last, z = 2)": finals[fixed],
                "certified early stopping (z_C)": held[stopped[1]][stopped[2]],
                "oracle of the fixed epochs": min(finals),
                "(configuration, checkpoint) oracle": oracle,
            }
            for name, truth in picks.items():
                acc.setdefault(name, []).append(truth - oracle)
                acc.setdefault(name + " /spread", []).append((truth - oracle) / spread)
            for m, z in zip(models, zs, strict=True):
                vs = [value(c, z) for c in m["checkpoints"]]
                c = m["checkpoints"][vs.index(min(vs))]
                kept_n += 1
                valid["kept"] += min(vs) >= c["heldout"] - 2 * c["heldout_se"]
                for c in m["checkpoints"]:
                    pairs += 1
                    floor = c["heldout"] - 2 * c["heldout_se"]
                    valid["z_C"] += value(c, z) >= floor
                    valid["z = 2"] += value(c, CV_Z) >= floor
        lines.append(
            f"\n({case}) {len(groups)} problems, {n_models} models, {seconds:.0f} s on one thread"
        )
        lines.append(f"  {'pick':<42} {'regret':>8} {'share':>7} {'worst':>7}")
        stats: dict = {"problems": len(groups), "models": n_models, "seconds": seconds}
        for name in [k for k in acc if not k.endswith(" /spread")]:
            reg, share = statistics.mean(acc[name]), statistics.mean(acc[name + " /spread"])
            stats[name] = {"regret": reg, "share": share, "worst": max(acc[name])}
            lines.append(f"  {name:<42} {reg:8.2f} {100 * share:6.1f}% {max(acc[name]):7.2f}")
        lines.append(
            f"  value >= held-out (2 se): {valid['z_C']}/{pairs} (model, epoch) pairs with z_C, "
            f"{valid['z = 2']}/{pairs} with z = 2, {valid['kept']}/{kept_n} kept epochs"
        )
        stats.update(valid=valid, pairs=pairs, kept=kept_n)
        summary[case] = stats
    return "\n".join(lines), summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", default="f,i", help="VAE cases of bench_selection: f, i (g, h)")
    ap.add_argument("--configs", type=int, default=8, help="configurations per problem")
    ap.add_argument("--cost", type=int, default=0, help="time the first task's trial N times")
    add_run_args(ap, jobs=1)
    args = ap.parse_args(argv)
    if args.summarize:
        print(summarize(saved_rows(args.summarize))[0])
        return 0
    tasks = build_tasks(
        args.cases.replace(",", ""),
        args.seeds,
        memo_steps=0,
        fewshot=False,
        seed_offset=args.seed_offset,
        configs=args.configs,
    )
    # VAE cases only, the problems of the cases alternating (an interrupted run has both)
    tasks = sorted((t for t in tasks if t.case in VAE_CASES), key=lambda t: (t.data_seed, t.case))
    if args.cost:
        print(json.dumps({"config": tasks[0].cfg, **cost(tasks[0], repeats=args.cost)}))
        return 0
    rows = run_resumable(
        tasks,
        run_task,
        keys=CONFIG_KEYS,
        out=args.out,
        jobs=args.jobs,
        meta={"checkpoints": CHECKPOINTS},
    )
    print(summarize(rows)[0])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
