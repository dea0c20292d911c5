"""Benchmark: mixture_kl (chunked GEMM) against the broadcast estimator, k=1, d=784.

Prints both times and their ratio, measured side by side in one run. The broadcast estimator
forms a (rows, m, d) difference tensor in row chunks so it fits in memory. At m=10,000 it takes
minutes on 2 cores; ``--broadcast-rows R`` times it on the first R rows only and scales the time
by m/R (every row costs the same), which the output marks as "scaled".

    python benchmarks/bench_mixture_kl.py                  # m = 1000 and 10000
    python benchmarks/bench_mixture_kl.py --m 60000 --device cuda --skip-broadcast
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from bound_tuner.maths.bounds.mixture import mixture_kl


def broadcast_rows(mu: torch.Tensor, var: float, rows: int, *, row_chunk: int, seed: int) -> float:
    """The broadcast estimator (float32, as the reference code ran) over the first ``rows`` rows."""
    g = torch.Generator().manual_seed(seed)
    m, d = mu.shape
    eps = torch.randn((m, d), generator=g).to(mu.device)
    sd = math.sqrt(var)
    total = torch.zeros((), dtype=torch.float64, device=mu.device)
    for start in range(0, rows, row_chunk):
        e = eps[start : min(rows, start + row_chunk)]
        z = mu[start : start + e.shape[0]] + sd * e
        diff = z[:, None, :] - mu[None, :, :]
        logits = -(diff * diff).sum(dim=2) / (2 * var)
        val = -0.5 * (e * e).sum(1) - torch.logsumexp(logits, dim=1) + math.log(m)
        total += val.double().sum()
    return float(total) / rows


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--m", type=int, nargs="+", default=[1000, 10000])
    p.add_argument("--d", type=int, default=784)
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--broadcast-rows",
        type=int,
        default=1000,
        help="rows timed for the broadcast estimator when m exceeds it (0: all rows)",
    )
    p.add_argument("--row-chunk", type=int, default=8)
    p.add_argument("--skip-broadcast", action="store_true")
    args = p.parse_args()

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {args.device}")
    g = torch.Generator().manual_seed(0)
    for m in args.m:
        # image-like means: 50 clusters in [0,1]^d plus spread, scaled by alpha_T
        centers = torch.rand((50, args.d), generator=g)
        x = centers[torch.randint(50, (m,), generator=g)] + 0.2 * torch.randn(
            (m, args.d), generator=g
        )
        var = 0.97  # C_mix well inside (0, ln m): a test of agreement, not only of speed
        mu = (math.sqrt(1 - var) * x).to(args.device)
        fast_t, fast_v = timed(
            lambda mu=mu, var=var: mixture_kl(mu, var, seed=1), args.device, args.repeats
        )
        line = f"m={m:>6} d={args.d}: mixture_kl {fast_t:8.3f} s (median of {args.repeats})"
        if not args.skip_broadcast:
            rows = m if args.broadcast_rows <= 0 else min(m, args.broadcast_rows)
            b_t, b_v = timed(
                lambda mu=mu, var=var, rows=rows: broadcast_rows(
                    mu, var, rows, row_chunk=args.row_chunk, seed=1
                ),
                args.device,
                1,
            )
            scaled = b_t * m / rows
            fast_rows = float(mixture_kl(mu, var, seed=1, per_point=True)[:rows].mean())
            tag = "" if rows == m else f" (scaled from {rows} rows)"
            line += (
                f" | broadcast {scaled:9.2f} s{tag} | ratio {scaled / fast_t:7.1f}x"
                f" | |diff| on the same rows {abs(fast_rows - b_v):.2e} (value {fast_v:.4f})"
            )
        print(line, flush=True)


if __name__ == "__main__":
    main()
