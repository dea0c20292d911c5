"""Regularizer benchmark: does the bound regularizer (``lam``, docs/theory.md section 6) lower the
held-out NELBO?

For each regime, every data set is trained at one fixed T with lam in --lams (0 and several
decades) and several seeds. Seed s draws the training set with seed s and trains with seed s, so
for a given s every lam sees the same data, the same initial weights and the same training draws;
all models are scored on the same test set with the same evaluation draws. The table gives, per
lam, the mean held-out NELBO over seeds, its standard error over seeds, and the paired difference
to lam = 0 (same seed) with its standard error.

  m200      the main job's settings (studies/swiss_roll.toml): Swiss roll, m=200, 1,500 steps,
            batch 200, T=0.4; held-out NELBO (nats) on 10,000 test points
  long      a few dozen points trained long, as cases (x) and (c) of bench_selection: 40 ring
            points and 32 Swiss-roll points, full batch, 6,000 steps, T=1.0
  fewshot   few-shot images as cases (e) and (y): 16 images, the small UNet, 600 steps,
            batch 16, T=1.2; held-out bits per dim on --test-images test images

    python benchmarks/bench_regularizer.py --regime m200 --seeds 8
    python benchmarks/bench_regularizer.py --regime long --seeds 5 --jobs 2
    python benchmarks/bench_regularizer.py --regime fewshot --image-data mnist --seeds 3
    python benchmarks/bench_regularizer.py --rescore benchmarks/results/regularizer_m200.json

Each regime writes every row to benchmarks/results/regularizer_<regime>.json (or --out). A run
whose training loss becomes NaN or infinite is recorded as diverged and left out of the means.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from bench_selection import build_tasks, fewshot_tasks  # the benchmark's case settings
from tqdm.auto import tqdm

LAMS = (0.0, 0.01, 0.1, 1.0, 10.0, 100.0)
REGIMES = ("m200", "long", "fewshot")
RESULTS = Path(__file__).resolve().parent / "results"
#: the evaluation draws shared by every model (common random numbers)
EVAL_SEED = 0


def settings(regime: str, image_data: str) -> list[tuple[str, int, dict]]:
    """(data set, m, DiffusionConfig settings without seed and lam) for each data set of a regime."""
    if regime == "m200":  # the main job's training settings, the shipped defaults otherwise
        return [("swiss_roll", 200, {"T": 0.4, "steps": 1500, "batch_size": 200, "lr": 2e-3})]
    if regime == "long":  # the settings of bench_selection's cases (x) and (c), at T = 1.0
        out = []
        for case, data in (("x", "ring"), ("c", "swiss_roll")):
            task = next(
                t for t in build_tasks(case, 1, memo_steps=6000, fewshot=False) if t.data == data
            )
            cfg = {k: task.cfg[k] for k in ("steps", "batch_size", "lr")}
            out.append((data, task.m, {**cfg, "T": 1.0}))
        return out
    if regime == "fewshot":  # the settings of bench_selection's few-shot image cases, at T = 1.2
        task = fewshot_tasks("e", image_data)[0]
        cfg = {k: task.cfg[k] for k in ("steps", "batch_size", "lr")}
        return [(image_data, task.m, {**cfg, "T": 1.2})]
    raise ValueError(f"unknown regime {regime!r}; choose one of {', '.join(REGIMES)}")


_DATA: dict = {}


def run_one(job: dict) -> dict:
    """Train one model and measure its held-out NELBO (2-D) or bits per dim (images)."""
    import torch

    from bound_tuner.data import load_dataset, prepare_for
    from bound_tuner.evaluation.elbo import bits_per_dim, negative_elbo
    from bound_tuner.training.config import DiffusionConfig
    from bound_tuner.training.diffusion import train_model

    torch.set_num_threads(job["threads"])
    key = (job["data"], job["m"], job["data_seed"], job["test_size"])
    if key not in _DATA:
        split = load_dataset(
            job["data"], m=job["m"], seed=job["data_seed"], test_size=job["test_size"]
        )
        _DATA[key] = prepare_for(split, "diffusion")  # images in [-1, 1], as a study sees them
    split = _DATA[key]
    cfg = DiffusionConfig(**job["cfg"], lam=job["lam"], seed=job["seed"], eval_seed=EVAL_SEED)
    row = {k: job[k] for k in ("regime", "data", "m", "data_seed", "seed", "lam")}
    row["config"] = {k: getattr(cfg, k) for k in ("T", "schedule", "steps", "batch_size", "lr")}
    t0 = time.perf_counter()
    try:
        model, schedule, losses = train_model(split.train, cfg, device="cpu")
    except FloatingPointError as e:  # the training loss became NaN or infinite
        row.update(diverged=str(e), seconds_train=time.perf_counter() - t0)
        return row
    row["seconds_train"] = time.perf_counter() - t0
    row["final_loss"] = statistics.fmean(losses[-100:])
    t1 = time.perf_counter()
    if split.test.dim() == 4:
        bpd, se = bits_per_dim(
            model, split.test, schedule, T=cfg.T, t_min=cfg.t_min, draws=8, seed=EVAL_SEED + 13
        )
        row.update(heldout=bpd, heldout_mc_se=se, unit="bits/dim")
    else:
        est = negative_elbo(
            model, split.test, schedule, T=cfg.T, t_min=cfg.t_min, draws=64, seed=EVAL_SEED + 13
        )
        row.update(heldout=est.mean, heldout_mc_se=est.se, unit="nats")
    row["seconds_eval"] = time.perf_counter() - t1
    return row


def mean_se(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = statistics.fmean(values) if n else math.nan
    se = statistics.stdev(values) / math.sqrt(n) if n > 1 else math.nan
    return mean, se


def summarize(rows: list[dict]) -> list[dict]:
    """Per data set and lam: mean and se over seeds, and the paired difference to lam = 0."""
    out = []
    for data, m in dict.fromkeys((r["data"], r["m"]) for r in rows):
        mine = [r for r in rows if (r["data"], r["m"]) == (data, m)]
        base = {r["seed"]: r["heldout"] for r in mine if r["lam"] == 0 and "heldout" in r}
        for lam in sorted({r["lam"] for r in mine}):
            at = [r for r in mine if r["lam"] == lam]
            ok = [r for r in at if "heldout" in r]
            mean, se = mean_se([r["heldout"] for r in ok])
            diffs = [r["heldout"] - base[r["seed"]] for r in ok if r["seed"] in base]
            dmean, dse = mean_se(diffs)
            out.append(
                {
                    "data": data,
                    "m": m,
                    "lam": lam,
                    "unit": ok[0]["unit"] if ok else "",
                    "mean": mean,
                    "se": se,
                    "diff": dmean,
                    "diff_se": dse,
                    "n": len(ok),
                    "diverged": len(at) - len(ok),
                    "steps": at[0]["config"]["steps"],
                    "T": at[0]["config"]["T"],
                    "seconds_train": statistics.fmean(r["seconds_train"] for r in at),
                    "seconds_eval": statistics.fmean(r["seconds_eval"] for r in ok)
                    if ok
                    else math.nan,
                    "helps": bool(ok and lam > 0 and dmean + 2 * dse < 0),
                }
            )
    return out


def print_table(summary: list[dict]) -> None:
    head = (
        f"{'data':<12}{'m':>4}{'T':>5}{'lam':>8}{'held-out':>10}{'se':>8}"
        f"{'diff to lam=0':>17}{'n':>4}{'div':>4}{'steps':>7}{'train s':>9}{'eval s':>8}  "
    )
    print(head)
    print("-" * len(head))
    for s in summary:
        diff = f"{s['diff']:+.3f} +- {s['diff_se']:.3f}" if s["lam"] > 0 else "-"
        flag = "helps" if s["helps"] else ""
        print(
            f"{s['data']:<12}{s['m']:>4}{s['T']:>5g}{s['lam']:>8g}{s['mean']:>10.3f}"
            f"{s['se']:>8.3f}{diff:>17}{s['n']:>4}{s['diverged']:>4}{s['steps']:>7}"
            f"{s['seconds_train']:>9.1f}{s['seconds_eval']:>8.1f}  {flag}"
        )
    units = sorted({s["unit"] for s in summary if s["unit"]})
    print(
        f"held-out: mean over seeds ({', '.join(units)}); se: over seeds; diff: paired by seed, "
        "mean +- se; 'helps': diff + 2 se < 0"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--regime", choices=REGIMES, default="m200")
    ap.add_argument("--seeds", type=int, default=3, help="training seeds (each its own data draw)")
    ap.add_argument("--seed-offset", type=int, default=0, help="first seed")
    ap.add_argument(
        "--lams", default=",".join(f"{x:g}" for x in LAMS), help="comma-separated lam values"
    )
    ap.add_argument("--test-size", type=int, default=10_000, help="test points of 2-D data")
    ap.add_argument(
        "--test-images", type=int, default=200, help="test images of the fewshot regime"
    )
    ap.add_argument(
        "--image-data",
        default="fashion_mnist",
        choices=("fashion_mnist", "mnist"),
        help="fewshot set",
    )
    ap.add_argument("--threads", type=int, default=1, help="torch threads per worker process")
    ap.add_argument("--jobs", type=int, default=1, help="worker processes")
    ap.add_argument(
        "--out", help="JSON file (default benchmarks/results/regularizer_<regime>.json)"
    )
    ap.add_argument("--rescore", metavar="JSON", help="print the table of a saved file")
    args = ap.parse_args(argv)

    if args.rescore:
        saved = json.loads(Path(args.rescore).read_text())
        print_table(summarize(saved["rows"]))
        return 0
    lams = [float(x) for x in args.lams.split(",")]
    if 0.0 not in lams:
        lams.insert(0, 0.0)
    test_size = args.test_images if args.regime == "fewshot" else args.test_size
    jobs = [
        {
            "regime": args.regime,
            "data": data,
            "m": m,
            "data_seed": s,
            "seed": s,
            "lam": lam,
            "cfg": cfg,
            "test_size": test_size,
            "threads": args.threads,
        }
        for data, m, cfg in settings(args.regime, args.image_data)
        for s in range(args.seed_offset, args.seed_offset + args.seeds)
        for lam in lams
    ]
    t0 = time.perf_counter()
    rows = []
    bar = tqdm(total=len(jobs), desc=f"regularizer {args.regime}")
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs) as pool:
            for fut in as_completed([pool.submit(run_one, j) for j in jobs]):
                rows.append(fut.result())
                bar.update()
    else:
        for j in jobs:
            rows.append(run_one(j))
            bar.update()
    bar.close()
    rows.sort(key=lambda r: (r["data"], r["seed"], r["lam"]))
    summary = summarize(rows)
    out = Path(args.out) if args.out else RESULTS / f"regularizer_{args.regime}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "regime": args.regime,
        "lams": lams,
        "seeds": list(range(args.seed_offset, args.seed_offset + args.seeds)),
        "test_size": test_size,
        "threads": args.threads,
        "jobs": args.jobs,
        "cpu_count": os.cpu_count(),
        "wall_seconds": time.perf_counter() - t0,
    }
    out.write_text(json.dumps({"meta": meta, "summary": summary, "rows": rows}, indent=1) + "\n")
    print_table(summary)
    print(f"wrote {out} ({len(rows)} runs, {meta['wall_seconds'] / 60:.1f} min wall)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
