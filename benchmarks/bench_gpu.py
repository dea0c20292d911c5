"""Benchmark: what a device does with bound_tuner's work, each figure beside its baseline.

On whatever device is present (CUDA when available, else the CPU), in one run:

1. ``mixture_kl`` (the encoder term C_mix, docs/theory.md eq. 2.3) on Fashion-MNIST's 60,000
   training images, d = 784 (the CPU default is m = 5,000: the cost grows as m^2 d).
2. UNet training steps/s: ``train_score_model`` against a plain PyTorch loop of the same model,
   batch and loss, timed alternately.
3. 2-D trials: one Swiss-roll MLP trial at a time against packs of K (``bound_tuner.pack``), for
   training alone (model-steps/s) and for whole trials (training and bound, trials/s).
4. The few-shot Fashion-MNIST study (studies/fashion_mnist_diffusion_fewshot.toml): seconds per
   trial over the trials that fit in ``--study-seconds``, and the projected wall time.

Medians of ``--repeats`` timings; ratios are taken within this run.

    python benchmarks/bench_gpu.py                       # everything, on the default device
    python benchmarks/bench_gpu.py --skip-study --packs 64 --json out.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from bound_tuner.bounds.mixture import mixture_kl
from bound_tuner.data import load_dataset, swiss_roll
from bound_tuner.device import resolve_device, set_tf32
from bound_tuner.evaluate import diffusion_bound, variant_report
from bound_tuner.experiment import DiffusionConfig, pack_terms, train_model
from bound_tuner.models import build_score_model
from bound_tuner.pack import train_packed
from bound_tuner.sde import get_schedule
from bound_tuner.training import train_score_model

ROOT = Path(__file__).resolve().parents[1]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    """Seconds that fn() takes, with the device's queue drained before and after."""
    return run_timed(fn, device)[1]


def run_timed(fn, device: torch.device):
    """(fn(), seconds), with the device's queue drained before and after."""
    _sync(device)
    t0 = time.perf_counter()
    value = fn()
    _sync(device)
    return value, time.perf_counter() - t0


def bench_mixture(device: torch.device, m: int, repeats: int) -> dict:
    data = load_dataset("fashion_mnist", m=m, test_size=1, model="diffusion")
    means = (0.5 * data.train.reshape(m, -1)).to(device)  # alpha_T = 0.5, sigma_T^2 = 0.75
    mixture_kl(means, 0.75, seed=0)  # warm-up (kernels, allocator)
    times = [timed(lambda: mixture_kl(means, 0.75, seed=0), device) for _ in range(repeats)]
    return {"m": m, "d": means.shape[1], "seconds": statistics.median(times)}


def _plain_loop(model, x, schedule, *, T, steps, batch, lr, seed) -> None:
    """The same training written plainly: Adam on 1/2||eps_theta(x_t, t) - eps||^2, clipped."""
    g = torch.Generator(device=x.device).manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        idx = torch.randint(x.shape[0], (batch,), generator=g, device=x.device)
        t = 1e-3 + (T - 1e-3) * torch.rand(batch, generator=g, device=x.device)
        eps = torch.randn((batch, *x.shape[1:]), generator=g, device=x.device)
        a = schedule.alpha(t.double()).float().view(-1, 1, 1, 1)
        xt = a * x[idx] + (1 - a * a).sqrt() * eps
        loss = (0.5 * (model(xt, t) - eps).pow(2).flatten(1).sum(1)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()


def bench_unet(device: torch.device, steps: int, repeats: int, with_compile: bool) -> dict:
    x = load_dataset("fashion_mnist", m=256, test_size=1, model="diffusion").train.to(device)
    schedule = get_schedule("linear")
    model = build_score_model(tuple(x.shape[1:]), width=128).to(device)
    kw = {"T": 1.0, "steps": steps, "lr": 1e-3, "seed": 0}

    def ours():
        train_score_model(model, x, schedule, batch_size=64, **kw)

    def plain():
        _plain_loop(model, x, schedule, batch=64, **kw)

    compiled = torch.compile(model)

    def ours_compiled():
        train_score_model(compiled, x, schedule, batch_size=64, **kw)

    ours()  # warm-up of each
    plain()
    compile_s = timed(ours_compiled, device) if with_compile else math.nan
    t_ours, t_plain, t_comp = [], [], []
    for _ in range(repeats):
        t_ours.append(timed(ours, device))
        t_plain.append(timed(plain, device))
        if with_compile:
            t_comp.append(timed(ours_compiled, device))
    s_ours, s_plain = steps / statistics.median(t_ours), steps / statistics.median(t_plain)
    s_comp = steps / statistics.median(t_comp) if t_comp else math.nan
    return {
        "steps_per_s": s_ours,
        "plain_steps_per_s": s_plain,
        "ratio": s_ours / s_plain,
        "compiled_steps_per_s": s_comp,
        "compile_first_call_s": compile_s,
    }


def _configs(k: int, steps: int) -> list[DiffusionConfig]:
    """k different Swiss-roll trials (T, schedule, lambda, lr, seed), one architecture."""
    g = torch.Generator().manual_seed(k)
    out = []
    for j in range(k):
        u = torch.rand(4, generator=g).tolist()
        sched = ("linear", "cosine", "constant")[j % 3]
        T = 0.3 + 0.6 * u[0] if sched == "cosine" else 0.3 + 1.2 * u[0]
        out.append(
            DiffusionConfig(
                T=T,
                schedule=sched,
                lam=0.0 if u[1] < 0.5 else 10 * u[1],
                lr=10 ** (-3.5 + 1.5 * u[2]),
                steps=steps,
                seed=j,
            )
        )
    return out


def _bound(model, x, cfg) -> float:
    schedule = get_schedule(cfg.schedule, **cfg.schedule_params)
    return diffusion_bound(model, x, schedule, T=cfg.T, variant=cfg.variant, seed=cfg.seed).total


def bench_pack(device: torch.device, packs: list[int], steps: int, singles: int) -> dict:
    """Per-trial seconds of training and of the bound (the default "elbo" variant and settings),
    one trial at a time and in packs (the pack's bounds measured together, as a packed study
    measures them)."""
    x = swiss_roll(1000, seed=0).to(device)
    rows = {}
    cfgs = _configs(singles, steps)
    train_s = bound_s = 0.0
    for cfg in cfgs:
        (model, _, _), t = run_timed(lambda c=cfg: train_model(x, c, device=device), device)
        train_s += t
        bound_s += timed(lambda c=cfg, mod=model: _bound(mod, x, c), device)
    rows[1] = {"train_s": train_s / singles, "bound_s": bound_s / singles, "k": 1}
    for k in packs:
        cfgs = _configs(k, steps)
        members, t_train = run_timed(lambda c=cfgs: train_packed(x, c, device=device), device)
        if any(mem.error is not None for mem in members):
            raise RuntimeError(f"a packed member failed: {[m.error for m in members if m.error]}")
        terms, t_bound = run_timed(
            lambda c=cfgs, ms=members: pack_terms([m.model for m in ms], c, x), device
        )
        reports = [variant_report(t, variant=c.variant, R=c.R) for t, c in zip(terms, cfgs)]
        if not all(math.isfinite(r.total) for r in reports):
            raise RuntimeError("a packed member's bound is not finite")
        rows[k] = {"train_s": t_train / k, "bound_s": t_bound / k, "k": k}
    for r in rows.values():
        r["model_steps_per_s"] = steps / r["train_s"]
        r["trials_per_s"] = 1.0 / (r["train_s"] + r["bound_s"])
        r["train_speedup"] = rows[1]["train_s"] / r["train_s"]
        r["trial_speedup"] = r["trials_per_s"] * (rows[1]["train_s"] + rows[1]["bound_s"])
    return {"steps": steps, "rows": list(rows.values())}


def bench_study(device: torch.device, seconds: float) -> dict:
    """Run the few-shot study for at most ``seconds``; the trials' own durations give the rest:
    projected wall time = start-up (to the first trial) + 10 x the mean trial."""
    import optuna

    spec = ROOT / "studies" / "fashion_mnist_diffusion_fewshot.toml"
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/fewshot.db"
        cmd = [sys.executable, "-m", "bound_tuner.cli", "run", str(spec), "--storage", url]
        cmd += ["--device", str(device), "--quiet"]
        started = datetime.datetime.now()
        t0 = time.perf_counter()
        try:
            subprocess.run(cmd, check=True, capture_output=True, timeout=seconds)
            finished = True
        except subprocess.TimeoutExpired:
            finished = False
        wall = time.perf_counter() - t0
        study = optuna.load_study(study_name="fashion_mnist_diffusion_fewshot", storage=url)
        done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not done:
        return {"trials": 0, "finished": False, "seconds": wall}
    per = [(t.datetime_complete - t.datetime_start).total_seconds() for t in done]
    startup = (min(t.datetime_start for t in done) - started).total_seconds()
    return {
        "trials": len(done),
        "finished": finished,
        "seconds": wall,
        "per_trial": statistics.mean(per),
        "startup": startup,
        "projected_10": wall
        if finished and len(done) == 10
        else startup + 10 * statistics.mean(per),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--mixture-m", type=int, help="default 60000 on CUDA, 5000 on the CPU")
    ap.add_argument("--unet-steps", type=int, help="default 200 on CUDA, 20 on the CPU")
    ap.add_argument("--packs", default=None, help="pack sizes, default 64,256 (CPU: 16)")
    ap.add_argument("--pack-steps", type=int, help="training steps per trial (CUDA 1000, CPU 200)")
    ap.add_argument("--singles", type=int, default=4, help="trials run one at a time")
    ap.add_argument("--study-seconds", type=float, default=150.0)
    ap.add_argument("--skip-study", action="store_true")
    ap.add_argument("--skip-pack", action="store_true")
    ap.add_argument("--compile", action="store_true", help="also time UNet training compiled")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    if cuda:
        set_tf32(True)
    name = (
        torch.cuda.get_device_name(device) if cuda else f"CPU ({torch.get_num_threads()} threads)"
    )
    print(f"device: {device} = {name}; torch {torch.__version__}")
    out: dict = {"device": name}

    m = args.mixture_m or (60000 if cuda else 5000)
    r = out["mixture_kl"] = bench_mixture(device, m, args.repeats)
    print(f"mixture_kl m={r['m']} d={r['d']}: {r['seconds']:.3f} s (median of {args.repeats})")

    unet_steps = args.unet_steps or (200 if cuda else 20)
    r = out["unet"] = bench_unet(device, unet_steps, args.repeats, args.compile)
    print(
        f"UNet training: {r['steps_per_s']:.1f} steps/s, plain PyTorch loop "
        f"{r['plain_steps_per_s']:.1f} steps/s, ratio {r['ratio']:.2f}x"
    )
    if args.compile:
        print(
            f"UNet training through torch.compile: {r['compiled_steps_per_s']:.1f} steps/s, "
            f"{r['compiled_steps_per_s'] / r['steps_per_s']:.2f}x eager (first call, compiling: "
            f"{r['compile_first_call_s']:.1f} s)"
        )

    packs = [int(k) for k in (args.packs or ("64,256" if cuda else "16")).split(",")]
    steps = args.pack_steps or (1000 if cuda else 200)
    if not args.skip_pack:
        r = out["pack"] = bench_pack(device, packs, steps, args.singles)
        print(f"2-D trials ({steps} steps, bound with the default settings), per trial:")
        print("   K  train s  bound s  model-steps/s  trials/s  train x  trial x")
        for row in r["rows"]:
            print(
                f"{row['k']:>4}  {row['train_s']:7.3f}  {row['bound_s']:7.3f}  "
                f"{row['model_steps_per_s']:13.0f}  {row['trials_per_s']:8.2f}  "
                f"{row['train_speedup']:7.1f}  {row['trial_speedup']:7.1f}"
            )
    if not args.skip_study:
        r = out["study"] = bench_study(device, args.study_seconds)
        if r["trials"]:
            print(
                f"few-shot Fashion-MNIST study: {r['trials']} trials done in {r['seconds']:.0f} s "
                f"(start-up {r['startup']:.1f} s), {r['per_trial']:.1f} s a trial; all 10 trials: "
                f"{'measured' if r['finished'] else 'projected'} {r['projected_10']:.0f} s"
            )
        else:
            print(f"few-shot Fashion-MNIST study: no trial finished in {r['seconds']:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
