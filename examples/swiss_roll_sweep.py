"""The Swiss-roll sweep over the diffusion time T (m=200), every bound variant side by side.

One score model per T; prints each variant's bound (docs/theory.md section 2) beside the held-out
ground truth, the k-NN sample KL (docs/theory.md section 4), and the paper's kernel-density test
KL, so one can see which T each variant picks and how good that T is.

    python examples/swiss_roll_sweep.py            # default budget: a few minutes on 2 CPU cores
    python examples/swiss_roll_sweep.py --steps 6000 --T 0.1 0.2 0.4 0.8 1.6
"""

from __future__ import annotations

import argparse
import time

from tqdm.auto import tqdm

from bound_tuner.data import load_dataset
from bound_tuner.evaluation.diffusion_bound import bound_terms
from bound_tuner.evaluation.heldout import heldout_metrics
from bound_tuner.maths.bounds import VARIANTS
from bound_tuner.maths.bounds.variants import variant_report
from bound_tuner.maths.selection import regret, spearman
from bound_tuner.training.config import DiffusionConfig
from bound_tuner.training.diffusion import train_model, train_split_models

DEFAULT_T = [0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 1.4, 1.8]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--T", type=float, nargs="+", default=DEFAULT_T, help="diffusion times")
    p.add_argument("--m", type=int, default=200, help="training points")
    p.add_argument("--steps", type=int, default=3000, help="training steps per model")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    data = load_dataset("swiss_roll", m=args.m, seed=args.seed, test_size=10_000)
    rows = []
    start = time.perf_counter()
    for T in tqdm(args.T, desc="T sweep"):
        cfg = DiffusionConfig(T=T, steps=args.steps, seed=args.seed, batch_size=args.m)
        model, schedule, _ = train_model(data.train, cfg)
        refs, sizes = train_split_models(data.train, cfg)
        terms = bound_terms(
            model,
            data.train,
            schedule,
            T=T,
            variants=VARIANTS,
            n_steps=cfg.n_steps,
            seed=cfg.seed,
            split_models=refs,
            fold_sizes=sizes,
        )
        bounds = {v: variant_report(terms, variant=v).total for v in VARIANTS}
        held = heldout_metrics(model, schedule, T=T, test=data.test, n_steps=500, seed=cfg.seed)
        rows.append((T, bounds, held))
    elapsed = time.perf_counter() - start

    head = (
        f"{'T':>5} " + " ".join(f"{v:>12}" for v in VARIANTS) + f" {'sample_KL':>9} {'test_KL':>8}"
    )
    print(head)
    print("-" * len(head))
    for T, b, h in rows:
        print(
            f"{T:5.2f} "
            + " ".join(f"{b[v]:12.3f}" for v in VARIANTS)
            + f" {h['sample_kl']:9.3f} {h['test_kl']:8.3f}"
        )
    truth = [h["sample_kl"] for _, _, h in rows]
    print()
    for v in VARIANTS:
        scores = [b[v] for _, b, _ in rows]
        pick = rows[min(range(len(rows)), key=scores.__getitem__)][0]
        print(
            f"{v:>12}: picks T={pick:g}, regret {100 * regret(scores, truth):.0f}%, "
            f"Spearman with the sample KL {spearman(scores, truth):+.2f}"
        )
    print(f"{len(rows)} models (and their split references) in {elapsed:.0f} s")


if __name__ == "__main__":
    main()
