"""Reading a finished study back: JSON trials, a text table, and plots of the trade-offs.

JSON schema (``bound-tuner report --format json``): a list, one object per trial, with
``number`` (int), ``state`` ("COMPLETE" | "PRUNED" | "FAIL" | "RUNNING" | "WAITING"),
``params`` (sampled parameters), ``value`` (the bound's total, or null) and ``user_attrs``
(``bound.*`` terms and settings, ``heldout.*`` metrics in validation mode, ``train_seconds``,
``parameters``, ``fail_reason``). A PRUNED trial's value is its last partial bound (a
checkpoint's, not the final one) and it has ``"partial": true``; a FAIL trial's value is the
bound it computed before it failed (a diverged generator's), if any (docs/cli.md). In a multi-objective study
every trial also has ``values`` ({objective name: value}, see ``bound_tuner.config.objective_names``)
and ``pareto`` (whether it is in the study's Pareto set, feasible trials only), and, with
[study] constraints, ``feasible``.
"""

from __future__ import annotations

import math
import re
import textwrap
from typing import Any

import optuna

from bound_tuner.config.objective_names import OBJECTIVES, bound_value, fit_term, objective
from bound_tuner.maths.bounds.report import TERM_LABELS, flat_attrs, term_label, value_label
from bound_tuner.maths.selection import pick_rank, regret, spearman

TERMS = (
    "train_loss",
    "train_nelbo",
    "encoder_mixture_kl",
    "prior_kl_sqrt",
    "generator_info",
    "split_info",
    "fold_info",
    "cv_nelbo",
    "cv_shift",
    "cv_margin",
    "mc_margin",
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


def objective_names_of(study: optuna.Study) -> list[str] | None:
    """The objective names of a multi-objective study (from its spec's record), else None."""
    if len(study.directions) < 2:
        return None

    by_label = {o.label: name for name, o in OBJECTIVES.items()}
    names = study.metric_names or [f"objective {i}" for i in range(len(study.directions))]
    return [by_label.get(n, n.replace("held-out ", "heldout.", 1)) for n in names]


def trials_json(study: optuna.Study) -> list[dict[str, Any]]:
    """The study's trials in the documented JSON schema."""
    names = objective_names_of(study)
    pareto = {t.number for t in study.best_trials} if names else set()
    out = []
    for t in study.get_trials(deepcopy=False):
        row = {
            "number": t.number,
            "state": t.state.name,
            "params": dict(t.params),
            "value": _clean(bound_value(t)),
            "user_attrs": {k: _clean(v) for k, v in flat_attrs(t.user_attrs).items()},
        }
        if t.state.name == "PRUNED" and row["value"] is not None:
            row["partial"] = True
        if names:
            values = t.values or [None] * len(names)
            row["values"] = {n: _clean(v) for n, v in zip(names, values)}
            row["pareto"] = t.number in pareto
        if t.constraints:
            row["feasible"] = all(c <= 0 for c in t.constraints.values())
        out.append(row)
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
#: quantities a trial records beside its value, which do not enter it: the paper's bound in its
#: information form on the same K-fold references, and its C_fold (docs/theory.md 2.9 to 2.11)
BESIDE = ("info_bound", "fold_info")
BESIDE_LABELS = {"info_bound": "info bound", "fold_info": TERM_LABELS["fold_info"][0]}
#: the user attr of the training step whose weights a trial kept (an int), shown when present
STEP_ATTR = "bound.step"
#: the columns of the default's value, in words (the legend of ``trials_table``)
KFOLD_LEGEND = (
    "bound (elbo-kfold, the default) is a cross-fitted certificate, not the paper's bound: K "
    "reference models train with each model, each without one fold of the points. It is the sum "
    "of the columns between the bars: NELBO_cv, each point's NELBO under the reference that did "
    "not see it; NELBO_train − NELBO_refs, how much worse (+) or better (−) the model fits its "
    "own points (NELBO_train) than the references fit theirs; z se_cv, z = 2 standard errors "
    "(bound.cv_z of them, more than 2, where the kept step was chosen among checkpoints), raised where the "
    "sum would fall below NELBO_train. Put otherwise: the model's training "
    "NELBO plus the references' generalization gap (NELBO_cv − NELBO_refs) plus z se_cv, the "
    "last two being the `generalization` objective. upper95: the same value read as a 95% "
    "certificate. It is a bound on the held-out NELBO only as measured (above it for every "
    "benchmark model, docs/benchmarks.md), not by a theorem.",
    "(in parentheses): recorded beside the bound, not part of it. (info bound) is the paper's "
    "bound (Chen, Zhu and Shkurti, ICLR 2025) in its information form on the same references, "
    "NELBO_train + √2 R · C_fold + 1.645 mc_se; (C_fold) is how much the generator learned about "
    "its own points, in nats per point.",
)
SCORE_LEGEND = (
    "score: the sum of the columns between the bars (each term's signed contribution); this "
    "variant is not measured to stay above the held-out NELBO, so it ranks trials but is not a "
    "bound (docs/theory.md 7)."
)


def _beside(trials: list[dict]) -> list[str]:
    return [n for n in BESIDE if any(f"bound.{n}" in t["user_attrs"] for t in trials)]


def _contribution_names(trials: list[dict]) -> list[str]:
    prefix = "bound.contribution."
    found = {k[len(prefix) :] for t in trials for k in t["user_attrs"] if k.startswith(prefix)}
    return [n for n in TERM_LABELS if n in found] + sorted(found - set(TERM_LABELS))


def trials_table(trials: list[dict]) -> str:
    """A text table, one row per trial: its number and state, every searched parameter (and the
    kept training step where trials record ``bound.step``), its value, the terms that add up to
    the value (signed contributions, as the dashboard's notes give them), what the trial records
    beside the value without adding it in (the paper's information form and C_fold, in
    parentheses), and the preferred held-out metric; a legend in words follows."""
    key = heldout_key(trials)
    firsts = _firsts(trials)
    step = any(STEP_ATTR in t["user_attrs"] for t in trials)
    ident = ["#", "state", *firsts, *(["step"] if step else [])]
    vae = any("bound.rec" in t["user_attrs"] for t in trials)
    variants = {t["user_attrs"].get("bound.variant") for t in trials} - {None}
    variant = next(iter(variants)) if len(variants) == 1 else None
    label = "bound" if all(value_label(v) == "bound" for v in variants) else "score"
    upper = any("bound.total_upper95" in t["user_attrs"] for t in trials)
    if vae:  # the paper's VAE bound: its terms, as the paper names them
        adds: list[str] = []
        terms = list(VAE_TERMS)
        heads = ["REC", "KLD", "MI", "enc_only"]
        beside: list[str] = []
    else:
        adds = _contribution_names(trials)
        # the fit where it is no column of its own (the default's): the value's floor
        terms = sorted({fit_term(t["user_attrs"]) for t in trials} - {None, *adds})
        beside = _beside(trials)
        heads = [term_label(n, variant)[0] for n in terms]
        if adds:
            heads += [
                "|",
                *[("+ " if i else "") + term_label(n, variant)[1] for i, n in enumerate(adds)],
                "|",
            ]
        heads += [f"({BESIDE_LABELS[n]})" for n in beside]
    cols = [*ident, label, *(["upper95"] if upper else []), *heads]
    if key:
        cols.append(key.split(".", 1)[1])
    rows = [cols]
    for t in trials:
        ua = t["user_attrs"]
        row = [str(t["number"]), t["state"], *[_cell(_param(t, p)) for p in firsts]]
        if step:
            row.append(_cell(ua.get(STEP_ATTR)))
        row.append(_cell(t["value"], "{:.4f}") + (" (partial)" if t.get("partial") else ""))
        if upper:
            row.append(_cell(ua.get("bound.total_upper95"), "{:.4f}"))
        row += [_cell(ua.get(f"bound.{n}"), "{:.4g}" if vae else "{:.4f}") for n in terms]
        if adds:
            row.append("|")
            for n in adds:
                c = ua.get(f"bound.contribution.{n}")
                row.append("" if c is None else f"{c:+.4f}")
            row.append("|")
        row += [_cell(ua.get(f"bound.{n}"), "{:.4f}") for n in beside]
        if key:
            row.append(_cell(ua.get(key)))
        rows.append(row)
    lines = [_aligned(rows)]
    if any(t.get("partial") for t in trials):
        lines.append("(partial): a pruned trial's bound at its last checkpoint, not a final bound")
    lines += legend(trials)
    return "\n".join(lines)


def legend(trials: list[dict]) -> list[str]:
    """What the value of ``trials_table`` is, in words: for the default ``elbo-kfold`` what its
    columns mean and what is recorded beside it; for a variant labelled a score, that it is not
    a bound."""
    variants = {t["user_attrs"].get("bound.variant") for t in trials} - {None}
    if variants == {"elbo-kfold"}:
        return [_fill(p) for p in KFOLD_LEGEND]
    if variants and any(value_label(v) != "bound" for v in variants):
        return [_fill(SCORE_LEGEND)]
    return []


def _fill(text: str, width: int = 100) -> str:
    """``text`` in lines of ``width``, a formula's terms kept on one line (no break beside an
    operator, nor after a number)."""
    keep = re.sub(r"(?<=[−+·√\d]) (?=\S)|(?<=\S) (?=[−+·])", "\xa0", text)
    return textwrap.fill(keep, width).replace("\xa0", " ")


def _aligned(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows)


def _firsts(trials: list[dict]) -> tuple[str, ...]:
    """The parameters that identify a trial in a table: T and schedule for diffusion, beta,
    lam and latent for a VAE, then the other searched ones."""
    vae = any("bound.latent" in t["user_attrs"] or "bound.rec" in t["user_attrs"] for t in trials)
    base = ("beta", "lam", "latent") if vae else ("T", "schedule")
    searched = sorted({p for t in trials for p in t["params"]} - set(base))
    return (*base, *searched)


def _param(t: dict, name: str) -> Any:
    ua = t["user_attrs"]
    return t["params"].get(name, ua.get(f"bound.{name}", (ua.get("config") or {}).get(name)))


def _cell(v: Any, fmt: str = "{:.4g}") -> str:
    return "-" if v is None else fmt.format(v) if isinstance(v, (int, float)) else str(v)


def contributions_table(trials: list[dict]) -> str:
    """One row per trial: its parameters, each term's signed contribution (the labels of
    ``bounds.report.term_label``, as the dashboard's notes give them), and the bound they add
    up to. A term that a trial's bound does not use (the other form of "elbo-kfold") is blank."""
    prefix = "bound.contribution."
    found = {k[len(prefix) :] for t in trials for k in t["user_attrs"] if k.startswith(prefix)}
    names = [n for n in TERM_LABELS if n in found] + sorted(found - set(TERM_LABELS))
    variants = {t["user_attrs"].get("bound.variant") for t in trials} - {None}
    variant = next(iter(variants)) if len(variants) == 1 else None
    label = "bound" if all(value_label(v) == "bound" for v in variants) else "score"
    firsts = _firsts(trials)
    heads = [term_label(n, variant)[1] for n in names]
    rows = [["#", *firsts, *[("+ " if i else "") + h for i, h in enumerate(heads)], f"= {label}"]]
    for t in trials:
        ua = t["user_attrs"]
        row = [str(t["number"]), *[_cell(_param(t, p)) for p in firsts]]
        for n in names:
            c = ua.get(prefix + n)
            row.append("" if c is None else f"{c:+.4f}")
        row.append(_cell(ua.get("bound.total", t["value"]), "{:.4f}"))
        rows.append(row)
    return _aligned(rows)


def pareto_table(trials: list[dict]) -> str:
    """The Pareto set of a multi-objective study (``trials_json``'s ``pareto``): one row per
    trial, its parameters and its objectives' values (all minimized), and whether it kept
    within the study's constraints where it has them."""
    front = [t for t in trials if t.get("pareto")]
    names = list(front[0]["values"]) if front else []
    firsts = _firsts(front)
    feas = any("feasible" in t for t in front)
    rows = [["#", *firsts, *[f"{n} ↓" for n in names], *(["feasible"] if feas else [])]]
    for t in sorted(front, key=lambda t: [t["values"][n] for n in names]):
        row = [str(t["number"]), *[_cell(_param(t, p)) for p in firsts]]
        row += [_cell(t["values"][n]) for n in names]
        if feas:
            row.append("yes" if t.get("feasible", True) else "no")
        rows.append(row)
    return _aligned(rows)


def pareto_lines(trials: list[dict]) -> list[str]:
    """The report's section on a multi-objective study's Pareto set (empty for one objective)."""
    multi = [t for t in trials if "values" in t]
    if not multi:
        return []
    names = list(multi[0]["values"])
    front = [t for t in multi if t.get("pareto")]
    units = ", ".join(f"{n} in {objective(n).unit}" for n in names)
    lines = [
        f"Pareto set: {len(front)} of {sum(t['state'] == 'COMPLETE' for t in multi)} complete "
        f"trials, those no other trial beats on every objective (each lower is better; {units})"
    ]
    if any("feasible" in t for t in multi):
        bad = [t["number"] for t in multi if t.get("feasible") is False]
        lines.append(
            f"infeasible (over the [study] constraints, left out of the set): "
            f"{', '.join(map(str, bad)) or 'none'}"
        )
    if front:
        lines.append(pareto_table(multi))
        lines.append(
            "no single best trial: export or sample one with --trial N (bound-tuner export "
            "--study NAME --trial N --out model.pt)"
        )
    return lines


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
