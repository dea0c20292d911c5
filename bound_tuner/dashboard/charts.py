"""The study's custom plotly charts for optuna-dashboard.

Every term's signed contribution against T, stacked, with the total as a line; in validation mode
the bound against the held-out metric with Spearman's rho; for VAE trials with per-epoch terms (a
user attr ``epoch_terms``), the terms against epoch for the best trial and, in validation mode, its
bound, encoder-only bound and held-out loss against epoch; for a multi-objective study, its trials in
objective space with the Pareto front, coloured by T and marked by schedule.

The charts belong to the study: exactly one process may rebuild them. In a single process pass a
``ChartsCallback`` (``run_study`` does; it is throttled so that a study of many short trials does
not spend its time on charts, and current when a run ends); in a multi-worker run give it only to
worker 0 and call ``save_charts(study)`` once in the parent after the workers have finished."""

from __future__ import annotations

import logging
import math
import threading
import time
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import FrozenTrial

from bound_tuner.dashboard.notes import short_value
from bound_tuner.dashboard.report import heldout_key, rank_correlation, selection_stats, trials_json
from bound_tuner.maths.bounds.report import TERM_LABELS, term_label

if TYPE_CHECKING:
    import plotly.graph_objects as go

_log = logging.getLogger(__name__)


CHART_TERMS_VS_T = "bound-terms-vs-T"


CHART_BOUND_VS_HELDOUT = "bound-vs-heldout"


CHART_VAE_EPOCHS = "vae-terms-vs-epoch"


CHART_VAE_BOUND_VS_HELDOUT = "vae-bound-vs-heldout-by-epoch"


CHART_PARETO = "pareto-front"


# series of the VAE chart of the bound against the held-out loss: (epoch_terms key, label, colour, dash)
VAE_BOUND_CURVES = (
    ("total", "bound", "black", "solid"),
    ("encoder_only_bound", "encoder-only bound", "#F58518", "solid"),
    ("heldout_loss", "held-out loss REC + √KLD", "#4C78A8", "solid"),
    ("test_neg_elbo", "test −ELBO", "#4C78A8", "dot"),
)


TERM_COLORS = ("#4C78A8", "#F58518", "#54A24B", "#B279A2", "#72B7B2", "#EECA3B")


def _best_per_T(done: list[dict]) -> tuple[list[dict], bool]:
    best: dict[float, dict] = {}
    for t in done:
        T = round(float(t["user_attrs"]["bound.T"]), 10)
        if T not in best or t["value"] < best[T]["value"]:
            best[T] = t
    rows = [best[T] for T in sorted(best)]
    return rows, len(rows) < len(done)


def terms_vs_T_figure(trials: list[dict]) -> go.Figure | None:
    """Each term's signed contribution against T, stacked, with the bound's total as a line."""
    import plotly.graph_objects as go

    done = [
        t
        for t in trials
        if t["state"] == "COMPLETE" and t["value"] is not None and "bound.T" in t["user_attrs"]
    ]
    if not done:
        return None
    rows, dedup = _best_per_T(done)
    Ts = [float(t["user_attrs"]["bound.T"]) for t in rows]
    prefix = "bound.contribution."
    found = {k[len(prefix) :] for t in rows for k in t["user_attrs"] if k.startswith(prefix)}
    names = [n for n in TERM_LABELS if n in found] + sorted(found - set(TERM_LABELS))
    variants = {t["user_attrs"].get("bound.variant") for t in rows} - {None}
    variant = next(iter(variants)) if len(variants) == 1 else None
    fig = go.Figure()
    for i, name in enumerate(names):
        fig.add_bar(
            x=Ts,
            y=[t["user_attrs"].get(f"bound.contribution.{name}") for t in rows],
            name=term_label(name, variant)[1],
            marker_color=TERM_COLORS[i % len(TERM_COLORS)],
            customdata=[t["number"] for t in rows],
            hovertemplate="T=%{x:.3g}<br>%{y:.4f}<br>trial %{customdata}<extra>%{fullData.name}</extra>",
        )
    fig.add_scatter(
        x=Ts,
        y=[t["value"] for t in rows],
        mode="lines+markers",
        name="bound (total)",
        line={"color": "black", "width": 2},
        marker={"size": 8, "symbol": "star"},
        customdata=[t["number"] for t in rows],
        hovertemplate="T=%{x:.3g}<br>bound %{y:.4f}<br>trial %{customdata}<extra></extra>",
    )
    title = "Bound terms against T (stacked contributions, total as a line)"
    if dedup:
        title += "<br><sup>best trial at each T</sup>"
    fig.update_layout(
        title={"text": title},
        barmode="relative",
        xaxis_title="diffusion time T",
        yaxis_title="nats per sample",
        legend={"orientation": "h", "y": -0.25},
    )
    return fig


def bound_vs_heldout_figure(trials: list[dict]) -> go.Figure | None:
    """The bound against the held-out metric of validation mode, with Spearman's rho."""
    import plotly.graph_objects as go

    key = heldout_key(trials)
    if key is None:
        return None
    done = [
        t
        for t in trials
        if t["state"] == "COMPLETE"
        and t["value"] is not None
        and t["user_attrs"].get(key) is not None
    ]
    if not done:
        return None
    rho, n = rank_correlation(trials, key)
    metric = key.split(".", 1)[1]
    stats = selection_stats(trials, key)
    rho_text = (
        f"Spearman ρ = {rho:.3f} (n={n}), regret of the pick {100 * stats['regret']:.0f}%"
        if math.isfinite(rho)
        else f"Spearman ρ needs 3 trials (n={n})"
    )
    xs = [t["user_attrs"][key] for t in done]
    Ts = [t["user_attrs"].get("bound.T") for t in done]
    marker: dict[str, Any] = {"size": 10}
    if all(T is not None for T in Ts):
        marker.update(color=Ts, colorscale="Viridis", showscale=True, colorbar={"title": "T"})
    fig = go.Figure(
        go.Scatter(
            x=xs,
            y=[t["value"] for t in done],
            mode="markers+text",
            text=[f"#{t['number']}" for t in done],
            textposition="top center",
            marker=marker,
            hovertemplate=f"{metric} %{{x:.4g}}<br>bound %{{y:.4f}}<br>trial %{{text}}<extra></extra>",
        )
    )
    spread = min(xs) > 0 and max(xs) / min(xs) > 30  # a log axis keeps small values apart
    fig.update_layout(
        title={"text": f"Bound against held-out {metric}<br>{rho_text}"},
        xaxis={"title": {"text": f"held-out {metric}"}, "type": "log" if spread else "linear"},
        yaxis_title="generalization bound",
    )
    return fig


def _epoch_series(raw: Any) -> dict[str, list[float]] | None:
    """Per-epoch terms as ``{name: values}`` plus ``epoch``, from a list of per-epoch dicts or a
    dict of lists."""
    if isinstance(raw, dict):
        series = {k: list(v) for k, v in raw.items() if isinstance(v, list)}
    elif isinstance(raw, list) and raw and all(isinstance(r, dict) for r in raw):
        keys = [k for k in raw[0] if all(isinstance(r.get(k), (int, float)) for r in raw)]
        series = {k: [r[k] for r in raw] for k in keys}
    else:
        return None
    if not series:
        return None
    n = max(len(v) for v in series.values())
    series.setdefault("epoch", list(range(1, n + 1)))
    return series


def vae_epochs_figure(trials: list[dict]) -> go.Figure | None:
    """The bound's terms against epoch for the best trial that stores ``epoch_terms``."""
    import plotly.graph_objects as go

    done = [
        t
        for t in trials
        if t["state"] == "COMPLETE"
        and t["value"] is not None
        and _epoch_series(t["user_attrs"].get("epoch_terms")) is not None
    ]
    if not done:
        return None
    best = min(done, key=lambda t: t["value"])
    series = _epoch_series(best["user_attrs"]["epoch_terms"])
    assert series is not None
    epochs = series.pop("epoch")
    fig = go.Figure()
    for i, (name, values) in enumerate(series.items()):
        emphasis = name in ("bound", "total")
        fig.add_scatter(
            x=epochs[: len(values)],
            y=values,
            mode="lines+markers",
            name=TERM_LABELS.get(name, (name, name))[0],
            line={"color": "black" if emphasis else TERM_COLORS[i % len(TERM_COLORS)]},
        )
    fig.update_layout(
        title={"text": f"VAE bound terms against epoch (best trial #{best['number']})"},
        xaxis_title="epoch",
        yaxis_title="nats per sample",
    )
    return fig


def vae_bound_vs_heldout_figure(trials: list[dict]) -> go.Figure | None:
    """The bound, the encoder-only bound and the held-out loss against epoch (docs/theory.md
    section 5) for the best trial whose ``epoch_terms`` hold the held-out loss (validation mode)."""
    import plotly.graph_objects as go

    done = [
        t
        for t in trials
        if t["state"] == "COMPLETE"
        and t["value"] is not None
        and "heldout_loss" in (_epoch_series(t["user_attrs"].get("epoch_terms")) or {})
    ]
    if not done:
        return None
    best = min(done, key=lambda t: t["value"])
    series = _epoch_series(best["user_attrs"]["epoch_terms"])
    assert series is not None
    fig = go.Figure()
    for key, label, color, dash in VAE_BOUND_CURVES:
        if key in series:
            fig.add_scatter(
                x=series["epoch"][: len(series[key])],
                y=series[key],
                mode="lines+markers",
                name=label,
                line={"color": color, "dash": dash},
            )
    below = [
        e
        for e, b, h in zip(series["epoch"], series["total"], series["heldout_loss"], strict=False)
        if b < h
    ]
    n = len(series["total"])
    note = (
        f"below the held-out loss at {len(below)} of {n} epochs, first at epoch {below[0]}"
        if below
        else f"above the held-out loss at all {n} epochs"
    )
    fig.update_layout(
        title={"text": f"VAE bound against held-out loss (best trial #{best['number']}): {note}"},
        xaxis_title="epoch",
        yaxis_title="nats per sample",
    )
    return fig


PARETO_SYMBOLS = ("circle", "diamond", "square", "cross", "x", "circle-open")


def _colour_and_symbol(trials: list[dict]) -> tuple[str | None, str | None]:
    """The parameters that colour and mark the trials of the Pareto chart: T (else the first
    numeric parameter) and schedule (else the first named one)."""
    params: dict[str, list] = {}
    for t in trials:
        for k, v in t["params"].items():
            params.setdefault(k, []).append(v)
    numeric = [k for k, vs in params.items() if all(isinstance(v, (int, float)) for v in vs)]
    named = [k for k, vs in params.items() if any(isinstance(v, str) for v in vs)]
    colour = "T" if "T" in numeric else (numeric[0] if numeric else None)
    symbol = "schedule" if "schedule" in named else (named[0] if named else None)
    return colour, symbol


def pareto_front_figure(trials: list[dict]) -> go.Figure | None:
    """A multi-objective study's complete trials in objective space: the first objective
    against the second (and, for three, against the third in a second panel), each trial
    coloured by T and marked by its schedule, the Pareto set outlined (and joined where there
    are two objectives), the trials over the [study] constraints as grey crosses."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    done = [
        t
        for t in trials
        if t["state"] == "COMPLETE"
        and t.get("values")
        and all(v is not None for v in t["values"].values())
    ]
    if not done:
        return None
    names = list(done[0]["values"])
    panels = [(names[0], n) for n in names[1:]]
    colour, symbol = _colour_and_symbol(done)
    if colour is None:  # a fixed search space: colour by the bound
        colour_of = {t["number"]: t["value"] for t in done}
        colour_title = "bound"
    else:
        colour_of = {t["number"]: t["params"].get(colour) for t in done}
        colour_title = colour
    groups: dict[str, list[dict]] = {}
    for t in done:
        if t.get("feasible") is False:
            key = "infeasible (over the constraints)"
        else:
            key = f"{symbol} = {t['params'].get(symbol)}" if symbol else "trials"
        groups.setdefault(key, []).append(t)
    ordered = sorted(groups.items(), key=lambda kv: kv[0].startswith("infeasible"))
    fig = make_subplots(rows=1, cols=len(panels), horizontal_spacing=0.12)
    for col, (xname, yname) in enumerate(panels, start=1):
        for i, (key, group) in enumerate(ordered):
            infeasible = key.startswith("infeasible")
            marker: dict[str, Any] = {
                "size": [12 if t.get("pareto") else 8 for t in group],
                "symbol": "x" if infeasible else PARETO_SYMBOLS[i % len(PARETO_SYMBOLS)],
                "line": {"width": [2 if t.get("pareto") else 0 for t in group], "color": "black"},
            }
            if infeasible:
                marker["color"] = "#BBBBBB"
            else:
                marker.update(color=[colour_of[t["number"]] for t in group], coloraxis="coloraxis")
            text = [
                f"trial {t['number']}"
                + (" (Pareto set)" if t.get("pareto") else "")
                + "".join(f"<br>{n} = {short_value(t['values'][n])}" for n in names)
                + "".join(f"<br>{k} = {short_value(v)}" for k, v in t["params"].items())
                for t in group
            ]
            fig.add_trace(
                go.Scatter(
                    x=[t["values"][xname] for t in group],
                    y=[t["values"][yname] for t in group],
                    mode="markers",
                    name=key,
                    legendgroup=key,
                    showlegend=col == 1,
                    text=text,
                    hovertemplate="%{text}<extra></extra>",
                    marker=marker,
                ),
                row=1,
                col=col,
            )
        fig.update_xaxes(title_text=f"{xname} ↓", row=1, col=col)
        fig.update_yaxes(title_text=f"{yname} ↓", row=1, col=col)
    front = sorted((t for t in done if t.get("pareto")), key=lambda t: t["values"][names[0]])
    if front and len(names) == 2:
        fig.add_scatter(
            x=[t["values"][names[0]] for t in front],
            y=[t["values"][names[1]] for t in front],
            mode="lines",
            line={"color": "black", "dash": "dot", "shape": "hv"},
            name="Pareto front",
            hoverinfo="skip",
        )
    title = "Pareto front: " + " against ".join(names)
    title += f"<br><sup>{len(front)} of {len(done)} trials in the Pareto set (outlined); colour: "
    title += colour_title + (f", marker: {symbol}" if symbol else "") + "</sup>"
    fig.update_layout(
        title={"text": title},
        coloraxis={"colorscale": "Viridis", "colorbar": {"title": {"text": colour_title}}},
        legend={"orientation": "h", "y": -0.25},
    )
    return fig


def study_figures(trials: list[dict]) -> dict[str, go.Figure]:
    """The custom charts that the trials support, by graph object id."""
    out = {}
    for gid, make in (
        (CHART_TERMS_VS_T, terms_vs_T_figure),
        (CHART_BOUND_VS_HELDOUT, bound_vs_heldout_figure),
        (CHART_VAE_EPOCHS, vae_epochs_figure),
        (CHART_VAE_BOUND_VS_HELDOUT, vae_bound_vs_heldout_figure),
        (CHART_PARETO, pareto_front_figure),
    ):
        fig = make(trials)
        if fig is not None:
            out[gid] = fig
    return out


def save_charts(study: optuna.Study) -> list[str]:
    """Rebuild the study's custom charts from all its trials; returns the ids saved.

    Only one process may call this for a study at a time (see the module docstring).
    """
    from optuna_dashboard import save_plotly_graph_object

    figures = study_figures(trials_json(study))
    for gid, fig in figures.items():
        save_plotly_graph_object(study, fig, graph_object_id=gid)
    return list(figures)


#: the study's charts are rebuilt during a run at most every CHARTS_MIN_INTERVAL seconds, and
#: only so often that rebuilding takes at most CHARTS_SHARE of the run's time (it reads every
#: trial, so it costs more as the study grows); the end of a run rebuilds them once more
CHARTS_MIN_INTERVAL = 2.0


CHARTS_SHARE = 0.02


class ChartsCallback:
    """Study callback ``(study, frozen_trial)`` that keeps the custom charts current.

    A rebuild reads every trial of the study, so its cost grows with the study; rebuilt after
    every trial, a study of thousands of short trials would spend most of its time on charts.
    After a finished trial the charts are rebuilt only once ``min_interval`` seconds have passed
    since the last rebuild, and no sooner than ``(1 - share) / share`` times the last rebuild's
    duration after it, so that rebuilding takes at most ``share`` of the time. ``flush`` rebuilds
    them if a trial finished since the last rebuild: ``bound_tuner.execution.loop.run_worker`` calls it
    when its loop ends, so the charts are up to date when the run ends. A trial that takes
    longer than ``min_interval`` (most real trials) still gets its charts at once.

    Give it to exactly one process of a study: the single process, or worker 0 of a pool (then
    call ``save_charts`` once after the pool has finished). Thread-safe within that process.

    Args:
        every: consider a rebuild after every ``every``-th finished trial of this process.
        min_interval: seconds between rebuilds at least (default CHARTS_MIN_INTERVAL; 0: none).
        share: the largest share of the time that rebuilds may take (default CHARTS_SHARE;
            1: no limit).
        clock: seconds, monotonic (for tests).
    """

    def __init__(
        self,
        *,
        every: int = 1,
        min_interval: float | None = None,
        share: float | None = None,
        clock: Any = time.monotonic,
    ) -> None:
        if every < 1:
            raise ValueError(f"every={every} must be at least 1")
        self.every = every
        self.min_interval = CHARTS_MIN_INTERVAL if min_interval is None else float(min_interval)
        self.share = CHARTS_SHARE if share is None else float(share)
        if self.min_interval < 0 or not 0 < self.share <= 1:
            raise ValueError(
                f"min_interval={self.min_interval} must be at least 0 and share={self.share} "
                "in (0, 1]"
            )
        self.clock = clock
        self.rebuilds = 0
        self.pending = False  # a trial finished since the last rebuild
        self._seen = 0
        self._next = -math.inf  # clock time from which the next rebuild may run
        self._lock = threading.Lock()

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        with self._lock:
            self._seen += 1
            if self._seen % self.every:
                return
            self.pending = True
            if self.clock() >= self._next:
                self._rebuild(study)

    def flush(self, study: optuna.Study) -> None:
        """Rebuild the charts now if a trial finished since the last rebuild."""
        with self._lock:
            if self.pending:
                self._rebuild(study)

    def _rebuild(self, study: optuna.Study) -> None:
        start = self.clock()
        try:
            save_charts(study)
        except Exception as e:  # charts are a view; the study goes on
            _log.warning("could not save the dashboard charts: %s", e)
        end = self.clock()
        self.rebuilds += 1
        self.pending = False
        wait = (end - start) * (1 - self.share) / self.share
        self._next = end + max(self.min_interval, wait)
