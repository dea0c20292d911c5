"""The paper's Swiss-roll sweep over the diffusion time T (m=200, R=5).

One score model per T; prints every bound term per T beside the held-out test KL (kernel density,
bound-spec.md 1.4), so one can see whether the T the bound picks is a good one.

    python examples/swiss_roll_sweep.py            # default budget: a few minutes on 2 CPU cores
    python examples/swiss_roll_sweep.py --steps 6000 --T 0.1 0.2 0.4 0.8 1.6
"""

from __future__ import annotations

import argparse
import time

from scipy.stats import spearmanr
from tqdm.auto import tqdm

from bound_tuner.data import load_dataset
from bound_tuner.experiment import DiffusionConfig, run_diffusion

DEFAULT_T = [0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 1.4, 1.8]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    p.add_argument("--T", type=float, nargs="+", default=DEFAULT_T, help="diffusion times")
    p.add_argument("--m", type=int, default=200, help="training points")
    p.add_argument("--steps", type=int, default=3000, help="training steps per model")
    p.add_argument("--R", type=float, default=5.0, help="sub-Gaussian scale (paper: 5)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    data = load_dataset("swiss_roll", m=args.m, seed=args.seed, test_size=2000)
    rows = []
    start = time.perf_counter()
    for T in tqdm(args.T, desc="T sweep"):
        cfg = DiffusionConfig(T=T, steps=args.steps, R=args.R, seed=args.seed, batch_size=args.m)
        res = run_diffusion(data.train, cfg, test=data.test, validation=True)
        rows.append((T, res.report, res.heldout))
    elapsed = time.perf_counter() - start

    head = (
        f"{'T':>5} {'L_train':>8} {'C_mix':>7} {'C_prior':>8} {'I_gen':>8} {'L_hat':>7} "
        f"{'R_est':>6} {'bound':>8} {'test_KL':>8} {'heldout_DSM':>11}"
    )
    print(head)
    print("-" * len(head))
    for T, r, h in rows:
        t = r.terms
        print(
            f"{T:5.2f} {t['train_loss']:8.3f} {t['encoder_mixture_kl']:7.3f} "
            f"{t['prior_kl_sqrt']:8.3f} {t['generator_info']:8.3f} {r.settings['L_hat']:7.2f} "
            f"{r.settings['R_estimate']:6.3f} {r.total:8.3f} {h['test_kl']:8.3f} "
            f"{h['denoising_loss']:11.3f}"
        )
    bounds = [r.total for _, r, _ in rows]
    kls = [h["test_kl"] for _, _, h in rows]
    i_bound = min(range(len(rows)), key=bounds.__getitem__)
    i_best = min(range(len(rows)), key=kls.__getitem__)
    rho = spearmanr(bounds, kls).statistic
    print(
        f"\nbound picks T={rows[i_bound][0]:g} (test KL {kls[i_bound]:.3f}); "
        f"best held-out T={rows[i_best][0]:g} (test KL {kls[i_best]:.3f}); "
        f"Spearman(bound, test KL) = {rho:.3f}; {elapsed:.0f} s"
    )


if __name__ == "__main__":
    main()
