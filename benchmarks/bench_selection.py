"""Selection benchmark: how well each bound variant picks and ranks models against a ground truth.

Each case is a set of selection problems (one per seed): several trained models, each scored by
every bound variant (and, as baselines, by its training losses alone), and judged by a held-out
ground truth (docs/theory.md section 4): the held-out NELBO (nats) for 2-D data, with the k-NN
sample KL(data || generated) as a second view; held-out bits per dim, with the pixel Frechet
distance beside it, for images; the held-out -ELBO for VAEs. For every score it prints the mean
regret (the pick's truth minus the best one's, and its share of the spread), the mean Spearman
correlation with the truth, the pick's rank and the share of models whose score lies at or above
the truth; for 2-D data also two yardsticks, picking by a fresh held-out sample as large as the
training set and by the references' own held-out NELBO.

  (a) T sweep on the Swiss roll, m=200                       4 seeds
  (b) 16 random configurations of studies/swiss_roll.toml's space  2 seeds
  (c) memorization: Swiss roll, m=32, long full-batch training   2 seeds
  (d) T sweeps on two other 2-D sets (two_moons, ring), m=200   2 seeds each
  (e) few-shot Fashion-MNIST, m=16, T grid, 600 steps            1 seed (skipped without the data)
  (f) VAEs: 16 random configurations of studies/fashion_mnist_vae.toml's space, binarized
      Fashion-MNIST m=1,000; truth: held-out -ELBO             2 seeds (only with --cases f)
  (g) the same at m=5,000                                       2 seeds (only with --cases g)
  (h) as (f), but 20 to 100 epochs: long enough to overfit      2 seeds (only with --cases h)
  (i) as (f), but m=200 and 100 to 300 epochs: overfitting      2 seeds (only with --cases i)
      VAE truth: the held-out -ELBO (nats); the default trains K = 5 reference VAEs per model

    python benchmarks/bench_selection.py                 # all cases, CPU-sized (--jobs: processes)
    python benchmarks/bench_selection.py --cases a,c --seeds 2 --out results.json
    python benchmarks/bench_selection.py --cases fg --out benchmarks/results/selection_vae.json

Models are trained once and every score is computed on the same trained model and the same
fixed draws. Runs are reproducible for a given machine and --jobs.
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
from dataclasses import dataclass, replace

import numpy as np

from bound_tuner.maths.bounds.vae import MEASURED_R

#: the K-fold scores of diffusion and VAE rows: the default (docs/theory.md eq. 2.11), its
#: information form recorded beside it (eq. 2.11c), and the baselines a user would pick instead
#: on the same references (K-fold cross-validation, a plain 80/20 split). The rules the default
#: replaced are not scored; their figures are in docs/theory.md 7.1.
KFOLD_SCORES = (
    "elbo-kfold (default)",
    "kfold information, R=cv",
    "K-fold CV NELBO",
    "80/20 held-out NELBO",
)
#: the diffusion scores: the K-fold ones, the training NELBO and the other variants
SCORES = (
    *KFOLD_SCORES,
    "train NELBO",
    "elbo",
    "elbo-split",
    "elbo-encoder",
    "paper",
    "train DSM",
)
CASE_TITLES = {
    "a": "(a) T sweep, Swiss roll m=200",
    "b": "(b) 16 random configs of the main job",
    "c": "(c) memorization, Swiss roll m=32",
    "d": "(d) T sweeps, two_moons and ring m=200",
    "e": "(e) few-shot Fashion-MNIST m=16",
    "x": "(x) ring and two_moons m=40, long full-batch training",
    "y": "(y) few-shot MNIST digits m=16",
    "f": "(f) 16 random VAE configs, Fashion-MNIST m=1,000",
    "g": "(g) 16 random VAE configs, Fashion-MNIST m=5,000",
    "h": "(h) 16 random VAE configs, 20-100 epochs, m=1,000",
    "i": "(i) 16 random VAE configs, 100-300 epochs, m=200 (overfitting)",
}
#: the VAE cases and their m; their scores are VAE_SCORES, their truth the held-out -ELBO
VAE_CASES = {"f": 1000, "g": 5000, "h": 1000, "i": 200}
#: cases that draw the epochs from their own range instead of the spec's
VAE_EPOCHS = {"h": (20, 100), "i": (100, 300)}
VAE_SCORES = (
    *KFOLD_SCORES,
    "vae bound, r=1 (R=1.41)",
    f"vae bound, R={MEASURED_R:g}",
    "vae bound, R data",
    "vae bound, R estimated",
    "encoder-only bound",
    "train -ELBO",
    "train REC",
)
#: K of the VAE cases' K-fold references (the objective's default)
VAE_FOLDS = 5
VAE_TEST_SIZE = 2000
#: the few-shot image cases, judged in bits per dim
IMAGE_CASES = ("e", "y")
#: how many random fresh held-out samples of m points the yardstick of ``sample_floor`` averages
FLOOR_SAMPLES = 400


@dataclass
class Task:
    case: str
    group: str  # one selection problem
    data: str
    m: int
    data_seed: int
    cfg: dict
    test_size: int
    n_generated: int
    n_steps: int


def _cfg(**kw) -> dict:
    from bound_tuner.training.config import DiffusionConfig

    return DiffusionConfig(**kw).to_dict()


def build_tasks(
    cases: str,
    seeds: int,
    *,
    memo_steps: int,
    fewshot: bool,
    seed_offset: int = 0,
    configs: int = 16,
    folds: int | None = None,
) -> list[Task]:
    """The selection problems. Every model of a problem shares its data, its evaluation draws
    (eval_seed: common random numbers, as in a study) and its folds; models differ by their
    settings and, as trials of a study do, by their training seeds."""
    tasks: list[Task] = []
    low_d = {"test_size": 10_000, "n_generated": 4000, "n_steps": 250}
    bound_2d = {"n_steps": 500, "n_paths": 256}  # the evaluation draws of DiffusionConfig
    if folds is not None:  # K of the 2-D cases' references (None: the objective's default)
        bound_2d["folds"] = folds

    def cfg(s: int, j: int, **kw) -> dict:  # model j of problem s: its own training seed
        return _cfg(seed=1000 * s + j, eval_seed=s, **bound_2d, **kw)

    if "a" in cases:
        for s in range(seeds):
            for j, T in enumerate((0.2, 0.4, 0.6, 0.8, 1.0, 1.2, 1.4, 1.6, 1.8)):
                c = cfg(s, j, T=T, steps=3000, batch_size=200, lr=2e-3)
                tasks.append(Task("a", f"a/seed{s}", "swiss_roll", 200, s, c, **low_d))
    if "b" in cases:
        for s in range(min(seeds, 2)):
            rng = np.random.default_rng(100 + s + seed_offset)
            for j in range(configs):
                sched = str(rng.choice(["linear", "cosine", "constant"]))
                params = (
                    {"beta_const": float(np.exp(rng.uniform(np.log(2), np.log(20))))}
                    if sched == "constant"
                    else {}
                )
                c = cfg(
                    s,
                    j,
                    T=float(np.exp(rng.uniform(np.log(0.05), np.log(0.95)))),
                    schedule=sched,
                    schedule_params=params,
                    lam=float(rng.uniform(0, 1)),
                    lr=float(np.exp(rng.uniform(np.log(5e-4), np.log(5e-3)))),
                    steps=1500,
                    batch_size=200,
                )
                tasks.append(Task("b", f"b/seed{s}", "swiss_roll", 200, s, c, **low_d))
    if "c" in cases:
        for s in range(min(seeds, 2)):
            for j, T in enumerate((0.2, 0.4, 0.8, 1.2, 1.6)):
                c = cfg(s, j, T=T, steps=memo_steps, batch_size=32, lr=2e-3)
                tasks.append(Task("c", f"c/seed{s}", "swiss_roll", 32, s, c, **low_d))
    if "d" in cases:
        for name in ("two_moons", "ring"):
            for s in range(min(seeds, 2)):
                for j, T in enumerate((0.1, 0.2, 0.4, 0.8, 1.2, 1.6)):
                    c = cfg(s, j, T=T, steps=3000, batch_size=200, lr=2e-3)
                    tasks.append(Task("d", f"d/{name}/seed{s}", name, 200, s, c, **low_d))
    if "e" in cases and fewshot:
        tasks += fewshot_tasks("e", "fashion_mnist")
    if "x" in cases:  # outside the cases the default was chosen on: few points trained long
        for name in ("ring", "two_moons"):
            for s in range(min(seeds, 2)):
                for j, T in enumerate((0.2, 0.4, 0.8, 1.2, 1.6)):
                    c = cfg(s, j, T=T, steps=memo_steps, batch_size=40, lr=2e-3)
                    tasks.append(Task("x", f"x/{name}/seed{s}", name, 40, s, c, **low_d))
    if "z" in cases:  # outside too: other sizes, mini-batches and lengths (averaged weights)
        for name, m, batch, steps in (("ring", 100, 25, 6000), ("two_moons", 24, 24, 4000)):
            for s in range(min(seeds, 2)):
                for j, T in enumerate((0.2, 0.4, 0.8, 1.2, 1.6)):
                    c = cfg(s, j, T=T, steps=steps, batch_size=batch, lr=2e-3)
                    tasks.append(Task("z", f"z/{name}{m}/seed{s}", name, m, s, c, **low_d))
    if "y" in cases and fewshot:  # outside too: few-shot images of another data set
        tasks += fewshot_tasks("y", "mnist")
    tasks += vae_tasks(cases, seeds, seed_offset=seed_offset, configs=configs)
    for t in tasks:  # a fresh set of problems: data, configurations, models and draws
        if seed_offset:
            t.data_seed += seed_offset
            t.group = f"{t.group}+{seed_offset}"
            t.cfg = {**t.cfg, "seed": t.cfg["seed"] + seed_offset}
            if "eval_seed" in t.cfg:
                t.cfg["eval_seed"] += seed_offset
    return tasks


def fewshot_tasks(case: str, data: str) -> list[Task]:
    """A few-shot image case: m=16 images of ``data``, a T grid, 600 steps, K = 4 folds."""
    tasks = []
    for j, T in enumerate((0.4, 0.8, 1.2, 1.6)):
        c = _cfg(
            T=T,
            steps=600,
            batch_size=16,
            lr=1e-3,
            seed=j,
            eval_seed=0,
            n_steps=100,
            n_paths=32,
            train_draws=16,
            folds=4,
        )
        tasks.append(
            Task(case, f"{case}/seed0", data, 16, 0, c, test_size=200, n_generated=256, n_steps=100)
        )
    return tasks


def vae_tasks(cases: str, seeds: int, *, seed_offset: int = 0, configs: int = 16) -> list[Task]:
    """(f), (g): 16 configurations drawn uniformly (log-uniformly where the spec says log) from
    the search space of studies/fashion_mnist_vae.toml, the same 16 for every m and seed."""
    if not any(c in cases for c in VAE_CASES):
        return []
    from pathlib import Path

    from bound_tuner.config.spec import load_spec
    from bound_tuner.objectives.vae import VAEConfig

    spec = load_spec(Path(__file__).resolve().parent.parent / "studies" / "fashion_mnist_vae.toml")
    fixed = {n: p.fixed for n, p in spec.search.items() if p.is_fixed}
    fixed.update({k: spec.training[k] for k in ("epochs", "batch_size") if k in spec.training})
    ranges = {n: p for n, p in spec.search.items() if p.low is not None}
    tasks = []
    for case, m in VAE_CASES.items():
        if case not in cases:
            continue
        for s in range(min(seeds, 2)):  # build_tasks shifts the data and training seeds
            rng = np.random.default_rng(200 + s + seed_offset)
            for _ in range(configs):
                params = dict(fixed)
                for name, p in ranges.items():
                    lo, hi = float(p.low), float(p.high)
                    u = (
                        float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
                        if p.log
                        else float(rng.uniform(lo, hi))
                    )
                    params[name] = int(round(u)) if p.kind is int else u
                if case in VAE_EPOCHS:
                    lo, hi = VAE_EPOCHS[case]
                    params["epochs"] = int(rng.integers(lo, hi + 1))
                c = VAEConfig(**params, seed=s).to_dict()
                tasks.append(
                    Task(case, f"{case}/seed{s}", "fashion_mnist", m, s, c, VAE_TEST_SIZE, 0, 0)
                )
    return tasks


def vae_split(task: Task):
    """The data of a VAE task as a VAE study sees them (binarized once, flattened), loaded once
    per process."""
    from bound_tuner.data import load_dataset

    key = ("vae", task.data, task.m, task.data_seed, task.test_size)
    if key not in _DATA:
        _DATA[key] = load_dataset(
            task.data,
            m=task.m,
            seed=task.data_seed,
            test_size=task.test_size,
            binarize="fixed",
            model="vae",
        )
    return _DATA[key]


def run_vae_task(task: Task) -> dict:
    """Train one VAE (``train_vae``) and compute its bound terms and held-out -ELBO."""
    import torch

    from bound_tuner.evaluation.vae_bound import vae_bound, vae_kfold_bound
    from bound_tuner.maths.bounds.kfold import fold_assignment
    from bound_tuner.maths.bounds.vae import reference_vae_R
    from bound_tuner.models.vae import MLPVAE
    from bound_tuner.objectives.vae import VAEConfig
    from bound_tuner.runtime.seeding import seed_everything
    from bound_tuner.training.vae import train_fold_vaes, train_vae

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    split = vae_split(task)
    cfg = VAEConfig(**task.cfg)
    t0 = time.perf_counter()
    seed_everything(cfg.seed)
    model = MLPVAE(input_dim=int(split.train.shape[1]), latent=cfg.latent)
    decoder0 = model.initial_decoder()
    train_vae(model, split.train, **cfg.training(), decoder0=decoder0)
    rep = vae_bound(model, split.train, decoder0=decoder0, test_x=split.test, seed=cfg.seed)
    ex = rep.extras
    seconds_model = time.perf_counter() - t0
    # the default bound: K-fold references with the model's settings, folds from the problem's
    # seed, the same evaluation draws for every model of a problem (as a study does)
    folds = fold_assignment(task.m, VAE_FOLDS, seed=task.data_seed)
    refs = train_fold_vaes(
        lambda: MLPVAE(input_dim=int(split.train.shape[1]), latent=cfg.latent),
        split.train,
        folds,
        **cfg.training(),
    )
    kf = vae_kfold_bound(model, refs, split.train, folds, test_x=split.test, seed=task.data_seed)
    kx = kf.extras
    return {
        "case": task.case,
        "group": task.group,
        "config": {k: task.cfg[k] for k in ("beta", "lam", "latent", "lr", "epochs")},
        "data": task.data,
        "data_seed": task.data_seed,
        "raw": {
            "rec": rep.terms["rec"],
            "kld": rep.terms["kld"],
            "mi": rep.terms["mi"],
            "m": rep.settings["m"],
            "R_estimate": ex["rec_half_range"],
            "R_data": reference_vae_R(split.train),
            "train_nelbo": kf.terms["train_nelbo"],
            "train_nelbo_mc_se": kx["train_mc_se"],
            "fold.C_fold": kf.terms["fold_info"],
            "fold.R_cv": kf.settings["R"],
            "fold.cv_nelbo": kf.terms["cv_nelbo"],
            "fold.cv_se": kx["cv_se"],
            "fold.holdout_nelbo": kx["holdout_nelbo"],
            "fold.refs_train_nelbo": kx["refs_train_nelbo"],
        },
        "heldout": {
            "neg_elbo": kx["test_neg_elbo"],
            "neg_elbo_se": kx["test_neg_elbo_se"],
            "heldout_loss": ex["heldout_loss"],
            "test_rec": ex["test_rec"],
            "test_kld": ex["test_kld"],
        },
        "seconds_model": seconds_model,
        "seconds": time.perf_counter() - t0,
    }


def kfold_scores(raw: dict) -> dict[str, float]:
    """A row's K-fold value (docs/theory.md eq. 2.11) and the information form recorded beside
    it (eq. 2.11c), through the library's ``assemble_kfold_bound`` (diffusion and VAE rows)."""
    from bound_tuner.maths.bounds.diffusion import assemble_kfold_bound

    rep = assemble_kfold_bound(
        train_nelbo=raw["train_nelbo"],
        c_fold=raw["fold.C_fold"],
        R=raw["fold.R_cv"],
        cv_nelbo=raw["fold.cv_nelbo"],
        cv_se=raw["fold.cv_se"],
        m=raw["m"],
        train_mc_se=raw["train_nelbo_mc_se"],
        refs_train_nelbo=raw.get("fold.refs_train_nelbo"),  # rows saved before it: no shift
    )
    return {"elbo-kfold (default)": rep.total, "kfold information, R=cv": rep.extras["info_bound"]}


def vae_scores_from_raw(raw: dict) -> dict[str, float]:
    """Every score of VAE_SCORES from a VAE's measured terms, through ``assemble_vae_bound``."""
    from bound_tuner.maths.bounds.vae import assemble_vae_bound, r_to_R

    def bound(R: float) -> float:
        return assemble_vae_bound(raw["rec"], raw["kld"], raw["mi"], m=raw["m"], R=R)[0]

    kfold = {}
    if "fold.R_cv" in raw:
        kfold = {
            **kfold_scores(raw),
            "K-fold CV NELBO": raw["fold.cv_nelbo"],
            "80/20 held-out NELBO": raw["fold.holdout_nelbo"],
        }
    return {
        **{k: kfold.get(k, math.nan) for k in KFOLD_SCORES},
        "vae bound, r=1 (R=1.41)": bound(r_to_R(1.0)),
        f"vae bound, R={MEASURED_R:g}": bound(MEASURED_R),
        "vae bound, R data": bound(raw["R_data"]),
        "vae bound, R estimated": bound(raw["R_estimate"]),
        "encoder-only bound": raw["rec"] + raw["kld"] ** 0.5,
        "train -ELBO": raw["rec"] + raw["kld"],
        "train REC": raw["rec"],
    }


def score_row(row: dict) -> dict[str, float]:
    """The scores of one trained model, VAE or diffusion."""
    return (
        vae_scores_from_raw(row["raw"]) if row["case"] in VAE_CASES else scores_from_raw(row["raw"])
    )


def scores_for(case: str) -> tuple[str, ...]:
    return VAE_SCORES if case in VAE_CASES else SCORES


_DATA: dict = {}


def run_task(task: Task, *, split_refs: bool = True) -> dict:
    """Train one model and its references, and compute every score and the ground truth."""
    import math

    import torch

    if task.case in VAE_CASES:
        return run_vae_task(task)

    from bound_tuner.data import load_dataset, prepare_for
    from bound_tuner.evaluation.diffusion_bound import bound_terms, draws_for
    from bound_tuner.evaluation.elbo import negative_elbo
    from bound_tuner.evaluation.heldout import heldout_metrics
    from bound_tuner.maths.bounds import VARIANTS
    from bound_tuner.maths.bounds.variants import variant_report
    from bound_tuner.training.config import DiffusionConfig
    from bound_tuner.training.diffusion import train_fold_models, train_model, train_split_models

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    device = "cuda" if torch.cuda.is_available() and task.data == "fashion_mnist" else "cpu"
    key = (task.data, task.m, task.data_seed, task.test_size)
    if key not in _DATA:  # the data as the objectives see them (images in [-1, 1])
        split = load_dataset(task.data, m=task.m, seed=task.data_seed, test_size=task.test_size)
        _DATA[key] = prepare_for(split, "diffusion")
    split = _DATA[key]
    cfg = DiffusionConfig(**task.cfg)
    t0 = time.perf_counter()
    model, schedule, _ = train_model(split.train, cfg, device=device)
    t_model = time.perf_counter() - t0
    fold_models, folds = train_fold_models(split.train, cfg, device=device)
    t_folds = time.perf_counter() - t0 - t_model
    split_models, fold_sizes = [], []
    variants = tuple(v for v in VARIANTS if split_refs or v != "elbo-split")
    if split_refs:
        split_models, fold_sizes = train_split_models(split.train, cfg, device=device)
    terms = bound_terms(
        model,
        split.train,
        schedule,
        T=cfg.T,
        variants=variants,
        n_steps=cfg.n_steps,
        n_paths=cfg.n_paths,
        train_draws=draws_for(split.train.shape[0], cfg.train_draws),
        t_min=cfg.t_min,
        seed=cfg.eval_seed,
        split_models=split_models,
        fold_sizes=fold_sizes,
        fold_models=fold_models,
        folds=folds,
    )
    t_scored = time.perf_counter() - t0
    reports = {v: variant_report(terms, variant=v) for v in variants}
    held = heldout_metrics(
        model,
        schedule,
        T=cfg.T,
        test=split.test,
        n_generated=task.n_generated,
        n_steps=task.n_steps,
        t_min=cfg.t_min,
        seed=cfg.eval_seed,
    )
    yardsticks = {}
    if task.case not in IMAGE_CASES:  # the yardsticks of 2-D rows (images: 64 UNet draws a point)
        per_point = negative_elbo(
            model, split.test, schedule, T=cfg.T, t_min=cfg.t_min, draws=64, seed=cfg.eval_seed
        ).per_point
        yardsticks["heldout_samples"] = heldout_sample_means(
            per_point, size=int(split.train.shape[0]), seed=task.data_seed
        )
        held["refs_neg_elbo"] = statistics.fmean(  # what the references themselves generalize to
            negative_elbo(
                ref, split.test, schedule, T=cfg.T, t_min=cfg.t_min, draws=64, seed=cfg.eval_seed
            ).mean
            for ref in fold_models
        )
    return {
        "case": task.case,
        "group": task.group,
        "config": {k: task.cfg[k] for k in ("T", "schedule", "schedule_params", "lam", "lr")},
        "data": task.data,
        "data_seed": task.data_seed,
        "terms": {v: r.contributions for v, r in reports.items()},
        "train_nelbo_mc_se": terms.nelbo.mc_se,
        "raw": {
            "train_nelbo": terms.nelbo.mean,
            "train_nelbo_mc_se": terms.nelbo.mc_se,
            "train_dsm": float(terms.dsm.mean()),
            "R_nelbo": reports["elbo"].settings["R_estimate"],
            "R_dsm": reports["paper"].settings["R_estimate"],
            "R_data": terms.settings["R_data"],
            "I_uniform": terms.i_uniform,
            "I_girsanov": terms.i_girsanov,
            "C_split": terms.split if terms.split is not None else math.nan,
            "C_mix": terms.encoder["c_mix"],
            "C_prior": terms.encoder["c_prior"],
            "m": int(split.train.shape[0]),
            "d": int(split.train[0].numel()),
            "sample_scale": terms.settings["sample_scale"],
            **{f"fold.{k}": v for k, v in terms.fold.items()},
        },
        "heldout": held,
        **yardsticks,
        "seconds": time.perf_counter() - t0,
        "seconds_model": t_model,
        "seconds_folds": t_folds,
        "seconds_to_score": t_scored,
    }


def heldout_sample_means(per_point, *, size: int, seed: int) -> list[float]:
    """Each model's mean held-out NELBO on FLOOR_SAMPLES random sets of ``size`` test points, the
    same sets for every model of a problem (drawn from ``seed``): what a fresh held-out set as
    large as the training set would have measured (the yardstick of ``sample_floor``)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    n = per_point.numel()
    idx = torch.stack([torch.randperm(n, generator=g)[:size] for _ in range(FLOOR_SAMPLES)])
    return per_point[idx].mean(dim=1).tolist()


def scores_from_raw(raw: dict) -> dict[str, float]:
    """Every score of SCORES from a model's measured terms, through the library's own
    ``assemble_diffusion_bound`` and ``assemble_kfold_bound`` (so a saved run can be re-scored
    with --rescore). Scores whose terms a row lacks are NaN."""
    import math

    from bound_tuner.maths.bounds import assemble_diffusion_bound

    def bound(variant: str, R: float) -> float:
        if variant == "paper":
            loss, info = raw["train_dsm"], raw["I_uniform"]
        else:
            loss = raw["train_nelbo"]
            info = raw["C_split"] if variant == "elbo-split" else raw["I_girsanov"]
        if info is None or not math.isfinite(info):
            return math.nan
        return assemble_diffusion_bound(
            variant=variant,
            train_loss=loss,
            i_gen=info,
            R=R,
            c_mix=raw["C_mix"],
            c_prior=raw["C_prior"],
        ).total

    out = {
        "train NELBO": raw["train_nelbo"],
        "elbo": bound("elbo", raw["R_data"]),
        "elbo-split": bound("elbo-split", raw["R_data"]),
        "elbo-encoder": bound("elbo-encoder", raw["R_data"]),
        "paper": bound("paper", 5.0),
        "train DSM": raw["train_dsm"],
    }
    if "fold.R_cv_std" in raw:  # rows before R_cv became the sub-Gaussian scale: not scored
        from bound_tuner.training.sampling import DIVERGED_SCALE

        stable = raw.get("sample_scale", 0.0) <= DIVERGED_SCALE  # the objective fails the rest
        for label, value in kfold_scores(raw).items():
            out[label] = value if stable else math.inf
        out["K-fold CV NELBO"] = raw["fold.cv_nelbo"]
        out["80/20 held-out NELBO"] = raw["fold.holdout_nelbo"]
    return {k: out.get(k, math.nan) for k in SCORES}


def _fill_R_data(rows: list[dict]) -> None:
    """Rows saved before R_data was recorded: compute it from the data of the row's problem."""
    from bound_tuner.data import load_dataset, prepare_for
    from bound_tuner.maths.bounds import reference_R

    for r in rows:
        if r["case"] in VAE_CASES or r["raw"].get("R_data") is not None:
            continue
        name = r.get("data") or (
            "fashion_mnist"
            if r["case"] == "e"
            else r["group"].split("/")[1]
            if r["case"] == "d"
            else "swiss_roll"
        )
        seed = r.get("data_seed", int(r["group"].split("seed")[-1].split("+")[0]))
        split = load_dataset(name, m=r["raw"]["m"], seed=seed, test_size=2)
        r["raw"]["R_data"] = reference_R(prepare_for(split, "diffusion").train)


def truths_of(case: str) -> tuple[str, ...]:
    """(primary truth, second view): the held-out NELBO a bound bounds (bits per dim for images)
    first, the sample measure beside it."""
    if case in VAE_CASES:
        return ("neg_elbo", "heldout_loss")
    return ("bits_per_dim", "pixel_fd") if case in IMAGE_CASES else ("neg_elbo", "sample_kl")


def _units(case: str, row: dict, score: str, value: float) -> float:
    """A score in the units of the case's primary truth: images' nats per image as bits per dim
    (the diffusion scores only; DSM is not a likelihood and stays as it is)."""
    if case in IMAGE_CASES and score != "train DSM":
        return value / (row["raw"]["d"] * math.log(2))
    return value


def _problems(rows: list[dict], case: str) -> list[list[dict]]:
    groups = sorted({r["group"] for r in rows if r["case"] == case})
    return [[r for r in rows if r["group"] == g] for g in groups]


def score_stats(rows: list[dict], case: str, score: str) -> dict | None:
    """Validity (pooled over the case's models), regret in the primary truth's units and
    Spearman (means over problems), the pick ranks, and the second view's ratio regret. An
    infinite score is a trial the objective fails (its generator diverged): never picked, left
    out of validity, counted beside the pick rank; regret is still against the best of all."""
    from bound_tuner.maths.selection import pick_rank, regret, regret_diff, spearman, validity

    truth, second = truths_of(case)
    vae = case in VAE_CASES
    sc_all, tr_all, se_all = [], [], []
    regs, shares, rhos, ranks, regs2 = [], [], [], [], []
    for rs in _problems(rows, case):
        sc = [_units(case, r, score, score_row(r)[score]) for r in rs]
        if any(math.isnan(v) for v in sc) or not any(math.isfinite(v) for v in sc):
            return None
        tr = [r["heldout"][truth] for r in rs]
        se = [r["heldout"].get(f"{truth}_se", 0.0) for r in rs]
        kept = [i for i, v in enumerate(sc) if math.isfinite(v)]
        kept_sc, kept_tr = [sc[i] for i in kept], [tr[i] for i in kept]
        sc_all += kept_sc
        tr_all += kept_tr
        se_all += [se[i] for i in kept]
        regs.append(regret_diff(sc, tr))
        shares.append(_spread_share(regs[-1], tr))
        rhos.append(spearman(kept_sc, kept_tr))
        failed = len(rs) - len(kept)
        ranks.append(f"{pick_rank(sc, tr)}/{len(rs)}" + (f" ({failed} failed)" if failed else ""))
        if not vae:
            regs2.append(regret(sc, [r["heldout"][second] for r in rs]))
    out = {
        "regret": statistics.fmean(regs),
        "regret_share": statistics.fmean(shares),
        "spearman": statistics.fmean(rhos),
        "ranks": " ".join(ranks),
        "regret2": statistics.fmean(regs2) if regs2 else math.nan,
        "spread": statistics.fmean(
            max(r["heldout"][truth] for r in rs) - min(r["heldout"][truth] for r in rs)
            for rs in _problems(rows, case)
        ),
    }
    out.update(validity(sc_all, tr_all, se_all))
    return out


def oracle_floor(rows: list[dict], case: str) -> float:
    """The second view's ratio regret of the primary truth's own pick (the floor of that column)."""
    from bound_tuner.maths.selection import regret

    truth, second = truths_of(case)
    return statistics.fmean(
        regret([r["heldout"][truth] for r in rs], [r["heldout"][second] for r in rs])
        for rs in _problems(rows, case)
    )


def _spread_share(regret: float, truth: list[float]) -> float:
    """A regret as a share of the problem's spread, best to worst truth (0 when there is none)."""
    spread = max(truth) - min(truth)
    return regret / spread if spread > 0 else 0.0


def _yardstick(rows: list[dict], case: str, picks) -> dict | None:
    """Mean regret (the truth's units) and mean share of the spread of the picks ``picks(rs)``
    makes in each problem: score vectors over the problem's models, the regret averaged over
    them; None where a problem's rows lack what ``picks`` reads."""
    from bound_tuner.maths.selection import regret_diff

    truth = truths_of(case)[0]
    regs, shares = [], []
    for rs in _problems(rows, case):
        try:
            scores = picks(rs)
        except KeyError:  # rows saved before the yardstick was recorded, images, VAEs
            return None
        tr = [r["heldout"][truth] for r in rs]
        reg = statistics.fmean(regret_diff(sc, tr) for sc in scores)
        regs.append(reg)
        shares.append(_spread_share(reg, tr))
    return {"regret": statistics.fmean(regs), "share": statistics.fmean(shares)}


def sample_floor(rows: list[dict], case: str) -> dict | None:
    """The regret of picking each problem's model by a fresh held-out sample of m points (m the
    training set's size; the same points for every model), averaged over FLOOR_SAMPLES such
    samples: how well m new points tell the models apart, a yardstick for any score computed
    from m training points."""

    def picks(rs: list[dict]):
        return np.asarray([r["heldout_samples"] for r in rs]).T  # [samples, models]

    return _yardstick(rows, case, picks)


def refs_floor(rows: list[dict], case: str) -> dict | None:
    """The regret of picking by the references' own held-out NELBO (their mean on the 10,000
    test points): cross-validation with unlimited evaluation points, the best any score built
    on the references' losses can pick."""
    return _yardstick(rows, case, lambda rs: [[r["heldout"]["refs_neg_elbo"] for r in rs]])


#: the yardsticks printed beside the scores (docs/theory.md section 4), by label
YARDSTICKS = (
    ("a fresh held-out sample of m points", sample_floor),
    ("the references' own held-out NELBO", refs_floor),
)


def summarize(rows: list[dict]) -> str:
    out = []
    for case in sorted({r["case"] for r in rows}):
        truth, second = truths_of(case)
        vae = case in VAE_CASES
        n = len(_problems(rows, case))
        unit = "bits/dim" if case in IMAGE_CASES else "nats"
        reg_head = f"mean regret ({unit})"
        out.append(f"\n{CASE_TITLES[case]}: truth = held-out {truth}, {n} problem(s)")
        spread = score_stats(rows, case, "train -ELBO" if vae else "train NELBO")["spread"]
        out.append(f"(best-to-worst spread of the truth: {spread:.3f} {unit} on average)")
        if not vae:
            out.append(
                f"(second view: {second}, ratio regret; its floor, the truth's own pick: "
                f"{100 * oracle_floor(rows, case):.0f}%)"
            )
        for label, yardstick in YARDSTICKS:
            y = yardstick(rows, case)
            if y is not None:
                out.append(
                    f"(yardstick, picking by {label}: regret {y['regret']:.3f} {unit}, "
                    f"{100 * y['share']:.0f}% of the spread)"
                )
        out.append(
            f"| score | {reg_head} | of the spread | mean Spearman | pick rank | above (2 se) | mean excess "
            f"| worst excess |" + ("" if vae else f" regret by {second} |")
        )
        out.append("| --- " * (8 if vae else 9) + "|")
        for score in scores_for(case):
            st = score_stats(rows, case, score)
            if st is None:
                continue
            reg = f"{st['regret']:.3f} | {100 * st['regret_share']:.0f}%"
            line = (
                f"| {score} | {reg} | {st['spearman']:+.2f} | {st['ranks']} | "
                f"{100 * st['share_above']:.0f}% | {st['mean_excess']:+.3f} | "
                f"{st['worst_excess']:+.3f} |"
            )
            if not vae:
                line += f" {100 * st['regret2']:.0f}% |"
            out.append(line)
    return "\n".join(out)


def compact_table(rows: list[dict]) -> str:
    """One markdown table: a row per score, a column per case, each cell the mean regret in the
    case's units / the share of models at or above the held-out truth."""
    vae = any(r["case"] in VAE_CASES for r in rows)
    cases = sorted({r["case"] for r in rows if (r["case"] in VAE_CASES) == vae})
    if vae and len(cases) < len({r["case"] for r in rows}):
        return (
            compact_table([r for r in rows if r["case"] not in VAE_CASES])
            + "\n\n"
            + (compact_table([r for r in rows if r["case"] in VAE_CASES]))
        )
    head = ["score"] + [f"{CASE_TITLES[c]}" for c in cases]
    out = [
        "cells: mean regret (nats; bits/dim for images) / share of models at or "
        "above the held-out truth (2 se)",
        "| " + " | ".join(head) + " |",
        "|" + " --- |" * len(head),
    ]
    for score in VAE_SCORES if vae else SCORES:
        cells = [score]
        for case in cases:
            st = score_stats(rows, case, score)
            if st is None:
                cells.append("—")
                continue
            reg = f"{st['regret']:.2f}"
            cells.append(f"{reg} / {100 * st['share_above']:.0f}%")
        out.append("| " + " | ".join(cells) + " |")
    for label, yardstick in YARDSTICKS:
        ys = [yardstick(rows, case) for case in cases]
        if any(y is not None for y in ys):
            cells = [f"yardstick: {label}"] + [
                "—" if y is None else f"{y['regret']:.2f} / —" for y in ys
            ]
            out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", default="abcde", help="which cases to run, e.g. 'ac' (default all)")
    ap.add_argument("--seeds", type=int, default=4, help="seeds of case (a); (b)-(d) use up to 2")
    ap.add_argument("--memo-steps", type=int, default=8000, help="training steps of case (c)")
    ap.add_argument(
        "--folds", type=int, help="K of the 2-D cases' K-fold references (default: the objective's)"
    )
    ap.add_argument(
        "--configs", type=int, default=16, help="random configurations of cases (b) and (f)-(i)"
    )
    ap.add_argument(
        "--no-split",
        action="store_true",
        help='skip the "elbo-split" references (two more trainings per model)',
    )
    ap.add_argument(
        "--seed-offset", type=int, default=0, help="shift every seed: a fresh set of problems"
    )
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="worker processes")
    ap.add_argument("--out", help="write every row (scores, terms, held-out metrics) as JSON")
    ap.add_argument("--rescore", metavar="JSON", help="print the tables of a saved --out file")
    args = ap.parse_args(argv)
    if args.rescore:
        with open(args.rescore) as f:
            rows = json.load(f)
        _fill_R_data(rows)
        print(compact_table(rows))
        print(summarize(rows))
        return 0
    from bound_tuner.data.images import find_fashion_mnist

    try:
        fewshot = bool(find_fashion_mnist(download=False))
    except FileNotFoundError:
        fewshot = False
    if ("e" in args.cases or "y" in args.cases) and not fewshot:
        print(
            "cases (e), (y) skipped: Fashion-MNIST not found (apt-get install dataset-fashion-mnist)"
        )
    tasks = build_tasks(
        args.cases,
        args.seeds,
        memo_steps=args.memo_steps,
        fewshot=fewshot,
        seed_offset=args.seed_offset,
        configs=args.configs,
        folds=args.folds,
    )
    from functools import partial

    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    rows: list[dict] = []

    def keep(row: dict) -> None:
        rows.append(row)
        if args.out:  # written as rows arrive, so that an interrupted run keeps what it has
            with open(args.out, "w") as f:
                json.dump(rows, f, indent=1, default=float)

    cpu = [t for t in tasks if t.case not in IMAGE_CASES]
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        run = partial(run_task, split_refs=not args.no_split)
        for row in tqdm(pool.map(run, cpu), total=len(cpu), desc="2-D and VAE models"):
            keep(row)
    for t in tqdm([t for t in tasks if t.case in IMAGE_CASES], desc="image models"):
        os.environ.setdefault("BENCH_THREADS", str(os.cpu_count() or 1))
        keep(run_task(replace(t), split_refs=not args.no_split))
    print(f"{len(rows)} models in {time.perf_counter() - t0:.0f} s with {args.jobs} processes")
    print(compact_table(rows))
    print(summarize(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
