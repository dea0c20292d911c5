"""Benchmark: what a device does with bound_tuner's work, each figure beside its baseline.

On whatever device is present (CUDA when available, else the CPU), in one run:

1. ``mixture_kl`` (the encoder term C_mix, docs/theory.md eq. 2.3) on Fashion-MNIST's 60,000
   training images, d = 784 (the CPU default is m = 5,000: the cost grows as m^2 d).
2. UNet training steps/s: ``train_score_model`` against a plain PyTorch loop of the same model,
   batch and loss, timed alternately.
3. 2-D trials: one Swiss-roll MLP trial at a time against packs of K (``bound_tuner.training.pack``), for
   training alone (model-steps/s) and for whole trials (training and bound, trials/s). Single
   trials and packs are scored alike: the same variant ("elbo", which packs measure together),
   N, generator paths, draws and evaluation seed, checked from the reports' settings.
4. The whole study a user runs: ``bound-tuner run`` of a 2-D spec with ``--pack K`` against
   ``--pack 1`` (PostgreSQL with ``--pg-url`` or $BOUND_TUNER_TEST_PG_URL, else SQLite), trials
   per second from the first trial's start to the last trial's record (storage, sampler and
   dashboard included), and the share of that time outside training and scoring.
5. The few-shot Fashion-MNIST study (studies/fashion_mnist_diffusion_fewshot.toml): seconds per
   trial over the trials that fit in ``--study-seconds``, and the projected wall time.
6. The default's cost: one trial of the main job (studies/swiss_roll.toml's settings: m = 200,
   1,500 steps, N = 300, 128 paths) scored by "elbo-kfold" (the model and its five references,
   trained as one pack) against the same trial scored by "elbo" (the model alone), alternately,
   seconds per trial and their ratio.
7. With ``--large-2d M``: one trial on M Swiss-roll points (training, then the default
   "elbo-kfold" bound with its five references), in a child process whose peak resident memory
   is printed, once as shipped and once with the passes that are now blocked over the points
   (the samples' distances to every training point for the memorized share, the sub-Gaussian
   scale R_cv's grid against every point) taken at once, as they were before, side by side.

Medians of ``--repeats`` timings; ratios are taken within this run.

    python benchmarks/bench_gpu.py                       # everything, on the default device
    python benchmarks/bench_gpu.py --skip-study --packs 64 --json out.json
    python benchmarks/bench_gpu.py --only whole-study,large-2d --large-2d 1000000   # CPU parts
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import math
import multiprocessing
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import torch
from torch import nn

from bound_tuner.data import load_dataset, swiss_roll
from bound_tuner.evaluation.experiment import bound_report, pack_terms
from bound_tuner.maths.bounds.mixture import mixture_kl
from bound_tuner.maths.bounds.variants import variant_report
from bound_tuner.maths.sde import get_schedule
from bound_tuner.models import build_score_model
from bound_tuner.runtime.device import resolve_device, set_tf32
from bound_tuner.training.config import DiffusionConfig
from bound_tuner.training.diffusion import train_model
from bound_tuner.training.loop import train_score_model
from bound_tuner.training.pack import train_packed

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
    """k different Swiss-roll trials (T, schedule, lambda, lr, seed), one architecture, one set
    of bound settings: the "elbo" variant (a pack's bounds are measured together only for the
    variants in ``bound_tuner.evaluation.experiment.PACKED_VARIANTS``) with DiffusionConfig's N, paths and
    draws, and one evaluation seed, as the trials of one study have."""
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
                variant="elbo",
                eval_seed=0,
            )
        )
    return out


#: the report settings that must agree between a single trial and a pack member
SAME_SETTINGS = ("variant", "N", "n_paths", "train_draws", "t_min", "m")


def _single_report(model, schedule, x, cfg, device):
    """A single trial's bound, as ``run_diffusion`` computes it (``bound_report``)."""
    return bound_report(model, schedule, x, cfg, device=device)


def bench_pack(device: torch.device, packs: list[int], steps: int, singles: int) -> dict:
    """Per-trial seconds of training and of the bound ("elbo", DiffusionConfig's N, paths and
    draws), one trial at a time (``bound_report``, as a trial computes it) and in packs (the
    pack's bounds measured together, as a packed study measures them); the settings that the
    reports record must agree, or it raises."""
    x = swiss_roll(1000, seed=0).to(device)
    rows = {}
    cfgs = _configs(singles, steps)
    train_s = bound_s = 0.0
    single_settings = None
    for cfg in cfgs:
        (model, schedule, _), t = run_timed(lambda c=cfg: train_model(x, c, device=device), device)
        train_s += t
        report, t = run_timed(
            lambda c=cfg, mod=model, s=schedule: _single_report(mod, s, x, c, device), device
        )
        bound_s += t
        single_settings = {k: report.settings.get(k) for k in SAME_SETTINGS}
    rows[1] = {"train_s": train_s / singles, "bound_s": bound_s / singles, "k": 1}
    for k in packs:
        cfgs = _configs(k, steps)
        members, t_train = run_timed(lambda c=cfgs: train_packed(x, c, device=device), device)
        if any(mem.error is not None for mem in members):
            raise RuntimeError(f"a packed member failed: {[m.error for m in members if m.error]}")
        terms, t_bound = run_timed(
            lambda c=cfgs, ms=members: pack_terms([m.model for m in ms], c, x), device
        )
        if terms is None:
            raise RuntimeError(f"pack of {k}: its bounds were not measured together")
        reports = [variant_report(t, variant=c.variant, R=c.R) for t, c in zip(terms, cfgs)]
        if not all(math.isfinite(r.total) for r in reports):
            raise RuntimeError("a packed member's bound is not finite")
        packed_settings = {key: reports[0].settings.get(key) for key in SAME_SETTINGS}
        if packed_settings != single_settings:
            raise RuntimeError(
                f"single trials and packs scored differently: {single_settings} against "
                f"{packed_settings}"
            )
        rows[k] = {"train_s": t_train / k, "bound_s": t_bound / k, "k": k}
    for r in rows.values():
        r["model_steps_per_s"] = steps / r["train_s"]
        r["trials_per_s"] = 1.0 / (r["train_s"] + r["bound_s"])
        r["train_speedup"] = rows[1]["train_s"] / r["train_s"]
        r["trial_speedup"] = r["trials_per_s"] * (rows[1]["train_s"] + rows[1]["bound_s"])
    return {"steps": steps, "settings": single_settings, "rows": list(rows.values())}


WHOLE_STUDY_SPEC = """
[study]
name = "{name}"
n_trials = {trials}
seed = 0
[data]
name = "swiss_roll"
m = 1000
seed = 0
[search]
T = {{ low = 0.3, high = 1.0 }}
lam = {{ low = 0.0, high = 1.0 }}
lr = {{ low = 3e-4, high = 3e-3, log = true }}
[training]
steps = {steps}
checkpoints = 0
[bound]
variant = "elbo"
[sampler]
type = "random"
[pruner]
type = "none"
"""


class BusyClock:
    """The union of the intervals (wall clock) during which any thread trains or scores: wraps
    the functions a single trial (``run_diffusion``) and a pack (``train_packed``,
    ``pack_terms``, ``score_model``) train and score with."""

    TARGETS = (
        ("bound_tuner.objectives.diffusion", "run_diffusion"),
        ("bound_tuner.objectives.diffusion", "score_model"),
        ("bound_tuner.objectives.packed", "train_packed"),
        ("bound_tuner.objectives.packed", "pack_terms"),
    )

    def __init__(self) -> None:
        self.intervals: list[tuple[float, float]] = []
        self._lock = threading.Lock()
        self._undo: list = []

    def __enter__(self) -> BusyClock:
        import importlib

        for module, name in self.TARGETS:
            owner = importlib.import_module(module)
            inner = getattr(owner, name)

            def timed(*args, _inner=inner, **kwargs):
                t0 = time.time()
                try:
                    return _inner(*args, **kwargs)
                finally:
                    with self._lock:
                        self.intervals.append((t0, time.time()))

            setattr(owner, name, timed)
            self._undo.append((owner, name, inner))
        return self

    def __exit__(self, *exc) -> None:
        for owner, name, inner in reversed(self._undo):
            setattr(owner, name, inner)

    def busy(self, lo: float, hi: float) -> float:
        """Seconds within [lo, hi] during which something trained or scored."""
        total, end = 0.0, lo
        for a, b in sorted(self.intervals):
            a, b = max(a, end), min(b, hi)
            if b > a:
                total += b - a
                end = b
        return total


def bench_whole_study(
    device: torch.device, url: str, packs: list[int], trials: dict[int, int], steps: int
) -> dict:
    """``bound-tuner run`` (in this process, dashboard on) of one 2-D spec with ``--pack K`` for
    each K, each on a fresh study: trials/s from the first trial's start to the last trial's
    record, and the share of that time in which nothing trained or scored."""
    import optuna

    from bound_tuner.cli import main as cli_main

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["BOUND_TUNER_ARTIFACTS"] = f"{tmp}/artifacts"
        for k in packs:
            name = f"bench_whole_{k}_{uuid.uuid4().hex[:8]}"
            spec = Path(tmp) / f"{name}.toml"
            spec.write_text(WHOLE_STUDY_SPEC.format(name=name, trials=trials[k], steps=steps))
            store = url or f"sqlite:///{tmp}/{name}.db"
            args = ["run", str(spec), "--storage", store, "--pack", str(k), "--quiet"]
            args += ["--device", str(device)]
            with BusyClock() as clock, contextlib.redirect_stdout(io.StringIO()):
                rc = cli_main(args)  # its summary of the study is not printed
            if rc != 0:
                raise RuntimeError(f"bound-tuner {' '.join(args)} exited with {rc}")
            study = optuna.load_study(study_name=name, storage=store)
            done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
            lo = min(t.datetime_start for t in done).timestamp()
            hi = max(t.datetime_complete for t in done).timestamp()
            busy = clock.busy(lo, hi)
            rows.append(
                {
                    "pack": k,
                    "trials": len(done),
                    "seconds": hi - lo,
                    "trials_per_s": len(done) / (hi - lo),
                    "outside_share": 1.0 - busy / (hi - lo),
                }
            )
            if url:
                optuna.delete_study(study_name=name, storage=store)
    for r in rows:
        r["speedup"] = r["trials_per_s"] / rows[0]["trials_per_s"]
    return {
        "storage": "postgresql" if url else "sqlite",
        "steps": steps,
        "variant": "elbo",
        "rows": rows,
    }


def _large_2d_child(m: int, steps: int, draws: int | None, blocked: bool, device: str, out):
    """One trial on m points in this (fresh) process; sends its figures through ``out``."""
    import functools

    import bound_tuner.evaluation.diffusion_bound as bound_mod
    from bound_tuner.evaluation.experiment import run_diffusion
    from bound_tuner.maths.metrics import memorized_share

    if not blocked:  # every training point at once, as before blocking
        import bound_tuner.maths.bounds.kfold as kfold_mod

        bound_mod.memorized_share = functools.partial(memorized_share, block=None)
        kfold_mod.LAMBDA_BLOCK = 1 << 62
    dev = resolve_device(device)
    x = swiss_roll(m, seed=0)
    cfg = DiffusionConfig(steps=steps, train_draws=draws, seed=0)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    res = run_diffusion(x, cfg, device=dev)
    seconds = time.perf_counter() - t0
    out.send(
        {
            "blocked": blocked,
            "seconds": seconds,
            "bound": res.report.total,
            "variant": res.report.settings.get("variant"),
            "train_draws": res.report.settings.get("train_draws"),
            "rss_before_mib": base,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "peak_cuda_mib": torch.cuda.max_memory_allocated(dev) / 2**20
            if dev.type == "cuda"
            else None,
        }
    )


def bench_large_2d(device: torch.device, m: int, steps: int, draws: int | None) -> dict:
    """One trial on m Swiss-roll points, in a fresh process each: the passes over the points
    blocked (as shipped) and all at once (as before), side by side."""
    ctx = multiprocessing.get_context("spawn")
    rows = []
    for blocked in (True, False):
        reader, writer = ctx.Pipe(duplex=False)
        p = ctx.Process(
            target=_large_2d_child, args=(m, steps, draws, blocked, str(device), writer)
        )
        p.start()
        writer.close()
        try:
            rows.append(reader.recv())
        except EOFError:  # killed: out of memory
            rows.append({"blocked": blocked, "error": "the process died (out of memory?)"})
        p.join()
    return {"m": m, "steps": steps, "rows": rows}


def bench_kfold_cost(device: torch.device, repeats: int) -> dict:
    """Seconds per trial of the main job's settings (m = 200, 1,500 steps, N = 300), timed
    alternately on the same data, seeds and evaluation draws, medians over ``repeats``:
    "elbo" (the model alone); the default "elbo-kfold" as it was before the lockstep pack (the
    model, then its K = 5 references as one pack, then the bound); and the default now, the
    lockstep pack of K + 1 with the value at 7 checkpoints and the last step and certified early
    stopping (docs/theory.md 2.12)."""
    from dataclasses import replace

    from bound_tuner.evaluation.experiment import bound_report, run_diffusion
    from bound_tuner.training.diffusion import train_model

    x = swiss_roll(200, seed=0)
    base = {"T": 0.5, "steps": 1500, "batch_size": 200, "n_steps": 300, "n_paths": 128}

    def before(cfg):  # the model trained alone, then its references (the default until now)
        model, schedule, _ = train_model(x, cfg, device=device)
        return bound_report(model, schedule, x, cfg, device=device)

    arms = {
        "elbo": lambda cfg: run_diffusion(x, replace(cfg, variant="elbo"), device=device),
        "elbo-kfold, model then references": before,
        "elbo-kfold lockstep + early stop, C = 8": lambda cfg: run_diffusion(
            x, replace(cfg, early_stop=True), device=device, checkpoints=7
        ),
    }
    times: dict[str, list[float]] = {a: [] for a in arms}
    for r in range(repeats):
        for name, arm in arms.items():
            cfg = DiffusionConfig(**base, seed=r)
            _, t = run_timed(lambda c=cfg, a=arm: a(c), device)
            times[name].append(t)
    med = {v: statistics.median(ts) for v, ts in times.items()}
    ref = med["elbo-kfold, model then references"]
    return {
        "seconds": med,
        "ratio_to_before": {a: t / ref for a, t in med.items()},
        "ratio": med["elbo-kfold lockstep + early stop, C = 8"] / med["elbo"],
        "repeats": repeats,
    }


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


SECTIONS = ("mixture", "unet", "pack", "whole-study", "study", "kfold-cost", "large-2d")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--only", help=f"comma-separated sections of {','.join(SECTIONS)}")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--mixture-m", type=int, help="default 60000 on CUDA, 5000 on the CPU")
    ap.add_argument("--unet-steps", type=int, help="default 200 on CUDA, 20 on the CPU")
    ap.add_argument("--packs", default=None, help="pack sizes, default 64,256 (CPU: 16)")
    ap.add_argument("--pack-steps", type=int, help="training steps per trial (CUDA 1000, CPU 200)")
    ap.add_argument("--singles", type=int, default=4, help="trials run one at a time")
    ap.add_argument("--pg-url", default=os.environ.get("BOUND_TUNER_TEST_PG_URL"))
    ap.add_argument("--whole-pack", type=int, help="K of the whole study (CUDA 256, CPU 8)")
    ap.add_argument(
        "--whole-trials",
        default=None,
        help="trials of the --pack 1 and --pack K studies (CUDA 64,1024; CPU 8,16)",
    )
    ap.add_argument("--whole-steps", type=int, help="training steps (CUDA 1000, CPU 100)")
    ap.add_argument("--study-seconds", type=float, default=150.0)
    ap.add_argument("--large-2d", type=int, metavar="M", help="also score a trial on M points")
    ap.add_argument("--large-2d-steps", type=int, default=200)
    ap.add_argument(
        "--large-2d-draws", type=int, help="draws per point (default: CUDA as shipped, CPU 2)"
    )
    ap.add_argument("--skip-study", action="store_true")
    ap.add_argument("--skip-pack", action="store_true")
    ap.add_argument("--compile", action="store_true", help="also time UNet training compiled")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()
    only = set(SECTIONS) if args.only is None else {x.strip() for x in args.only.split(",")}
    if only - set(SECTIONS):
        ap.error(f"--only {args.only}: sections are {','.join(SECTIONS)}")
    if args.skip_study:
        only.discard("study")
    if args.skip_pack:
        only.discard("pack")
    if args.large_2d is None:
        only.discard("large-2d")
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    if cuda:
        set_tf32(True)
    name = (
        torch.cuda.get_device_name(device)
        if cuda
        else f"CPU ({os.cpu_count()} cores, torch on {torch.get_num_threads()} threads)"
    )
    import optuna

    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "optuna": optuna.__version__,
    }
    print(f"device: {device} = {name}; " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    out: dict = {"device": name, "versions": versions}

    if "mixture" in only:
        m = args.mixture_m or (60000 if cuda else 5000)
        r = out["mixture_kl"] = bench_mixture(device, m, args.repeats)
        print(f"mixture_kl m={r['m']} d={r['d']}: {r['seconds']:.3f} s (median of {args.repeats})")

    if "unet" in only:
        unet_steps = args.unet_steps or (200 if cuda else 20)
        r = out["unet"] = bench_unet(device, unet_steps, args.repeats, args.compile)
        print(
            f"UNet training: {r['steps_per_s']:.1f} steps/s, plain PyTorch loop "
            f"{r['plain_steps_per_s']:.1f} steps/s, ratio {r['ratio']:.2f}x"
        )
        if args.compile:
            print(
                f"UNet training through torch.compile: {r['compiled_steps_per_s']:.1f} steps/s, "
                f"{r['compiled_steps_per_s'] / r['steps_per_s']:.2f}x eager (first call, "
                f"compiling: {r['compile_first_call_s']:.1f} s)"
            )

    if "pack" in only:
        packs = [int(k) for k in (args.packs or ("64,256" if cuda else "16")).split(",")]
        steps = args.pack_steps or (1000 if cuda else 200)
        r = out["pack"] = bench_pack(device, packs, steps, args.singles)
        st = r["settings"]
        print(
            f"2-D trials ({steps} steps; every one scored with variant {st['variant']}, "
            f"N = {st['N']}, {st['n_paths']} paths, {st['train_draws']} draws), per trial:"
        )
        print("   K  train s  bound s  model-steps/s  trials/s  train x  trial x")
        for row in r["rows"]:
            print(
                f"{row['k']:>4}  {row['train_s']:7.3f}  {row['bound_s']:7.3f}  "
                f"{row['model_steps_per_s']:13.0f}  {row['trials_per_s']:8.2f}  "
                f"{row['train_speedup']:7.1f}  {row['trial_speedup']:7.1f}"
            )

    if "whole-study" in only:
        k = args.whole_pack or (256 if cuda else 8)
        n1, nk = (int(v) for v in (args.whole_trials or ("64,1024" if cuda else "8,16")).split(","))
        steps = args.whole_steps or (1000 if cuda else 100)
        r = out["whole_study"] = bench_whole_study(
            device, args.pg_url, [1, k], {1: n1, k: nk}, steps
        )
        print(
            f"whole study, bound-tuner run of a 2-D spec on {r['storage']} ({steps} steps, "
            "dashboard on), first trial's start to last trial's record:"
        )
        print("    K  trials  seconds  trials/s  speedup  share outside training and scoring")
        for row in r["rows"]:
            print(
                f"{row['pack']:>5}  {row['trials']:6d}  {row['seconds']:7.1f}  "
                f"{row['trials_per_s']:8.2f}  {row['speedup']:7.1f}  "
                f"{100 * row['outside_share']:5.1f}%"
            )

    if "study" in only:
        r = out["study"] = bench_study(device, args.study_seconds)
        if r["trials"]:
            print(
                f"few-shot Fashion-MNIST study: {r['trials']} trials done in {r['seconds']:.0f} s "
                f"(start-up {r['startup']:.1f} s), {r['per_trial']:.1f} s a trial; all 10 trials: "
                f"{'measured' if r['finished'] else 'projected'} {r['projected_10']:.0f} s"
            )
        else:
            print(f"few-shot Fashion-MNIST study: no trial finished in {r['seconds']:.0f} s")

    if "kfold-cost" in only:
        r = out["kfold_cost"] = bench_kfold_cost(device, args.repeats)
        sec = r["seconds"]
        print(f"a main-job trial (m = 200, 1,500 steps, N = 300), medians of {r['repeats']}:")
        for arm, t in sec.items():
            print(f"  {arm:<42} {t:6.1f} s  {r['ratio_to_before'][arm]:.2f}x the model-then-refs")

    if "large-2d" in only:
        draws = args.large_2d_draws if args.large_2d_draws or cuda else 2
        r = out["large_2d"] = bench_large_2d(device, args.large_2d, args.large_2d_steps, draws)
        print(f"one trial on {r['m']:,} Swiss-roll points ({r['steps']} steps), fresh processes:")
        for row in r["rows"]:
            how = "blocked (as shipped)" if row["blocked"] else "all points at once (before)"
            if "error" in row:
                print(f"  {how}: {row['error']}")
                continue
            cuda_mem = (
                f", peak CUDA memory {row['peak_cuda_mib']:.0f} MiB"
                if row["peak_cuda_mib"] is not None
                else ""
            )
            print(
                f"  {how}: {row['variant']} bound {row['bound']:.4f} ({row['train_draws']} draws "
                f"a point) in {row['seconds']:.0f} s; peak RSS {row['peak_rss_mib']:.0f} MiB "
                f"({row['rss_before_mib']:.0f} MiB before the trial){cuda_mem}"
            )
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
