"""Reading a finished study back: JSON trials, a text table, and plots of the trade-offs.

JSON schema (``bound-tuner report --format json``): a list, one object per trial, with
``number`` (int), ``state`` ("COMPLETE" | "PRUNED" | "FAIL" | "RUNNING" | "WAITING"),
``params`` (sampled parameters), ``value`` (the bound's total, or null) and ``user_attrs``
(``bound.*`` terms and settings, ``heldout.*`` metrics in validation mode, ``fail_reason``).
"""

from __future__ import annotations

import math
from typing import Any

import optuna

from .bounds.report import TERM_LABELS, value_label
from .selection import pick_rank, regret, spearman

TERMS = (
    "train_loss",
    "train_nelbo",
    "encoder_mixture_kl",
    "prior_kl_sqrt",
    "generator_info",
    "split_info",
    "fold_info",
    "cv_nelbo",
    "cv_margin",
)
#: held-out metrics in order of preference as the ground truth (docs/theory.md section 4)
HELDOUT_PREFERENCE = (
    "heldout.sample_kl",
    "heldout.test_kl",
    "heldout.bits_per_dim",
    "heldout.heldout_loss",
    "heldout.neg_elbo",
    "heldout.denoising_loss",
)


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def trials_json(study: optuna.Study) -> list[dict[str, Any]]:
    """The study's trials in the documented JSON schema."""
    out = []
    for t in study.get_trials(deepcopy=False):
        out.append(
            {
                "number": t.number,
                "state": t.state.name,
                "params": dict(t.params),
                "value": _clean(t.value),
                "user_attrs": {k: _clean(v) for k, v in t.user_attrs.items()},
            }
        )
    return out


def heldout_keys(trials: list[dict]) -> list[str]:
    """Every held-out metric recorded (standard errors left out), the preferred truth first."""
    keys = {
        k
        for t in trials
        for k in t["user_attrs"]
        if k.startswith("heldout.") and not k.endswith("_se")
    }
    first = [k for k in HELDOUT_PREFERENCE if k in keys]
    return first + sorted(keys - set(first))


def heldout_key(trials: list[dict]) -> str | None:
    """The held-out metric to compare with: the k-NN sample KL where there is one (the ground
    truth for low-dimensional data), else the paper's test KL, bits per dim, ..."""
    keys = heldout_keys(trials)
    return keys[0] if keys else None


def _pairs(trials: list[dict], key: str) -> tuple[list[float], list[float]]:
    done = [
        (t["value"], t["user_attrs"].get(key))
        for t in trials
        if t["state"] == "COMPLETE"
        and t["value"] is not None
        and t["user_attrs"].get(key) is not None
    ]
    return [a for a, _ in done], [b for _, b in done]


def rank_correlation(trials: list[dict], key: str) -> tuple[float, int]:
    """Spearman's rho between the bound and a held-out metric over complete trials, and n."""
    values, truth = _pairs(trials, key)
    return spearman(values, truth), len(values)


def selection_stats(trials: list[dict], key: str) -> dict[str, float]:
    """How well the objective selected against a held-out metric (lower is better): Spearman's
    rho, the regret of the best trial by the objective, the rank of that trial, and n."""
    values, truth = _pairs(trials, key)
    if not values:
        return {"spearman": math.nan, "regret": math.nan, "pick_rank": math.nan, "n": 0}
    return {
        "spearman": spearman(values, truth),
        "regret": regret(values, truth),
        "pick_rank": pick_rank(values, truth),
        "n": len(values),
    }


def selection_lines(trials: list[dict]) -> list[str]:
    """One line per held-out metric: Spearman's rho and the regret of the objective's pick."""
    lines = []
    for key in heldout_keys(trials):
        st = selection_stats(trials, key)
        if st["n"] == 0:
            continue
        lines.append(
            f"{key}: Spearman rho(bound, metric) = {st['spearman']:.3f}, regret of the pick = "
            f"{100 * st['regret']:.1f}%, the pick ranks {st['pick_rank']} of {st['n']}"
        )
    return lines


VAE_TERMS = ("rec", "kld", "mi", "encoder_only_bound")


def trials_table(trials: list[dict]) -> str:
    """A text table: one row per trial, the bound terms and the held-out metric."""
    key = heldout_key(trials)
    vae = any("bound.rec" in t["user_attrs"] for t in trials)
    if vae:
        cols = ["#", "state", "beta", "lam", "latent", "bound", "REC", "KLD", "MI", "enc_only"]
        firsts = ("beta", "lam", "latent")
        names = VAE_TERMS
    else:
        firsts = ("T", "schedule")
        names = tuple(n for n in TERMS if any(f"bound.{n}" in t["user_attrs"] for t in trials))
        variants = {t["user_attrs"].get("bound.variant") for t in trials} - {None}
        label = "bound" if all(value_label(v) == "bound" for v in variants) else "score"
        cols = ["#", "state", "T", "schedule", label] + [TERM_LABELS[n][0] for n in names]
        if any("bound.total_upper95" in t["user_attrs"] for t in trials):
            cols.insert(5, "upper95")
            names = ("total_upper95", *names)
    if key:
        cols.append(key.split(".", 1)[1])
    rows = [cols]

    def f(v, fmt="{:.4g}"):
        return "-" if v is None else fmt.format(v) if isinstance(v, (int, float)) else str(v)

    for t in trials:
        ua = t["user_attrs"]
        row = [str(t["number"]), t["state"]]
        config = ua.get("config") or {}
        row += [f(t["params"].get(p, ua.get(f"bound.{p}", config.get(p)))) for p in firsts]
        row.append(f(t["value"]))
        row += [f(ua.get(f"bound.{name}")) for name in names]
        if key:
            row.append(f(ua.get(key)))
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(cols))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows)


def plot_study(trials: list[dict], path: str) -> float | None:
    """Save a PNG: the bound's signed contributions against T and, where held-out metrics exist,
    the bound against the held-out metric with Spearman's rho in the title. Returns rho or None."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [t for t in trials if t["state"] == "COMPLETE" and "bound.T" in t["user_attrs"]]
    key = heldout_key(done)
    ncols = 2 if key else 1
    fig, axes = plt.subplots(1, ncols, figsize=(6.5 * ncols, 4.5), squeeze=False)
    ax = axes[0, 0]
    done.sort(key=lambda t: t["user_attrs"]["bound.T"])
    Ts = [t["user_attrs"]["bound.T"] for t in done]
    for name in TERMS:
        if not any(f"bound.contribution.{name}" in t["user_attrs"] for t in done):
            continue
        label = TERM_LABELS[name][1]
        ax.plot(
            Ts,
            [t["user_attrs"].get(f"bound.contribution.{name}") for t in done],
            "o-",
            label=label,
            ms=4,
        )
    ax.plot(Ts, [t["value"] for t in done], "k*-", label="bound", ms=8)
    ax.set_xlabel("diffusion time T")
    ax.set_ylabel("nats per sample")
    ax.set_title("bound terms against T")
    ax.legend(fontsize=8)
    rho = None
    if key:
        rho, n = rank_correlation(trials, key)
        ax2 = axes[0, 1]
        xs = [t["user_attrs"].get(key) for t in done]
        ax2.scatter(xs, [t["value"] for t in done], c=Ts, cmap="viridis")
        for t, x in zip(done, xs, strict=True):
            ax2.annotate(f"T={t['user_attrs']['bound.T']:.2g}", (x, t["value"]), fontsize=7)
        ax2.set_xlabel(key)
        ax2.set_ylabel("bound")
        reg = selection_stats(trials, key)["regret"]
        ax2.set_title(
            f"bound against {key}: Spearman rho = {rho:.3f}, regret {100 * reg:.0f}% (n={n})",
            fontsize=9,
        )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return rho
