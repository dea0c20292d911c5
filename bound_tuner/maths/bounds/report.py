"""BoundReport: the total of a bound, every named term, and the settings that produced it."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

# how each term appears in tables, notes and charts: (symbol, label of its signed contribution),
# the names of docs/theory.md; ``term_label`` gives a variant's own (I_gir for the ELBO variants)
TERM_LABELS: dict[str, tuple[str, str]] = {
    "train_loss": ("L_dsm", "L_dsm"),
    "train_nelbo": ("NELBO_train", "NELBO_train"),
    "encoder_mixture_kl": ("C_mix", "−C_mix"),
    "prior_kl_sqrt": ("C_prior", "√2 R · C_prior"),
    "generator_info": ("I_gen", "√2 R · √I_gen"),
    "split_info": ("C_split", "√2 R · C_split"),
    "fold_info": ("C_fold", "√2 R · C_fold"),
    "cv_nelbo": ("NELBO_cv", "NELBO_cv"),
    "cv_shift": ("NELBO_train − NELBO_refs", "NELBO_train − NELBO_refs"),
    # z = 2, or Bonferroni's z_C where the kept step was chosen among C checkpoints (2.12a)
    "cv_margin": ("z se_cv", "z se_cv"),
    "mc_margin": ("1.645 mc_se", "1.645 mc_se"),
    "rec": ("REC", "REC"),
    "kld": ("KLD", "√2 R · √KLD"),  # the paper's (1+r) √KLD when R = (1+r)/√2
    "mi": ("MI", "√2 R · √(MI/m)"),
}


#: the generator term of the ELBO variants: Girsanov's KL to the data-free model (docs/theory.md
#: 2.4), where the paper's uses the worst-case score norm (I_gen, 2.1)
_GIRSANOV_TERMS = {"generator_info": ("I_gir", "√2 R · √I_gir")}


def term_label(name: str, variant: str | None = None) -> tuple[str, str]:
    """(symbol, label of its signed contribution) of term ``name`` in a bound of ``variant``
    (None: as TERM_LABELS has it); a name not in TERM_LABELS is its own label."""
    if variant is not None and variant != "paper" and name in _GIRSANOV_TERMS:
        return _GIRSANOV_TERMS[name]
    return TERM_LABELS.get(name, (name, name))


#: variants that are bounds by the benchmark's test (at or above the held-out NELBO, allowing two
#: standard errors, for at least 95% of the models of every case; docs/theory.md 7): the others
#: are labelled scores in reports, notes and charts
MEASURED_BOUNDS = ("elbo-kfold",)


def value_label(variant: str | None) -> str:
    """How a trial's value is called: "bound" for MEASURED_BOUNDS and the VAE bound (variant
    None), else "score" (docs/theory.md 7)."""
    return "bound" if variant is None or variant in MEASURED_BOUNDS else "score"


#: extras kept as user attrs of their own (a dashboard column to sort by); the others are
#: grouped in ``bound.extras``
FLAT_EXTRAS = ("total_upper95",)
#: the report's parts stored as one dict-valued user attr each
GROUPED_ATTRS = ("settings", "extras")


def flat_attrs(attrs: Mapping[str, Any], prefix: str = "bound") -> dict[str, Any]:
    """A trial's user attrs with the grouped ``bound.settings`` and ``bound.extras`` dicts
    spread into ``bound.<name>`` keys (the flat form every reader of the tool uses; a trial
    stored with flat keys comes back as it is)."""
    grouped = {f"{prefix}.{g}" for g in GROUPED_ATTRS}
    out = {k: v for k, v in attrs.items() if k not in grouped}
    for key in grouped:
        values = attrs.get(key)
        if isinstance(values, Mapping):
            for name, value in values.items():
                out.setdefault(f"{prefix}.{name}", value)
    return out


@dataclass
class BoundReport:
    """A computed bound.

    ``terms`` holds each named term in nats per sample (before its coefficient), ``contributions``
    holds each term's signed share of ``total`` (they sum to it), ``settings`` says how it was
    computed, and ``extras`` keeps related numbers that are not part of the total (for a VAE the
    encoder-only bound, for example).
    """

    kind: str
    total: float
    terms: dict[str, float]
    contributions: dict[str, float]
    settings: dict[str, Any]
    extras: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        s = sum(self.contributions.values())
        if math.isfinite(s) and math.isfinite(self.total):
            assert abs(s - self.total) <= 1e-6 * max(1.0, abs(self.total)), (s, self.total)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def user_attrs(self, prefix: str = "bound") -> dict[str, Any]:
        """Optuna trial user attrs (JSON-serializable): ``bound.total``, each term
        ``bound.<term>``, its share ``bound.contribution.<term>`` and ``bound.total_upper95``
        flat; the settings and the other extras as one dict each (``bound.settings``,
        ``bound.extras``), since every user attr is a database write of its own.
        ``flat_attrs`` spreads them back into ``bound.<name>`` keys."""
        out: dict[str, Any] = {f"{prefix}.total": self.total}
        for name, value in self.terms.items():
            out[f"{prefix}.{name}"] = value
        for name, value in self.contributions.items():
            out[f"{prefix}.contribution.{name}"] = value
        for name in FLAT_EXTRAS:
            if name in self.extras:
                out[f"{prefix}.{name}"] = self.extras[name]
        out[f"{prefix}.settings"] = dict(self.settings)
        rest = {k: v for k, v in self.extras.items() if k not in FLAT_EXTRAS}
        if rest:
            out[f"{prefix}.extras"] = rest
        return json.loads(json.dumps(out, default=str))

    def table(self) -> str:
        """A small text table of the terms and their contributions."""
        lines = [f"{self.kind} bound = {self.total:.4f}"]
        for name, value in self.terms.items():
            c = self.contributions.get(name)
            cs = f"  (contributes {c:+.4f})" if c is not None else ""
            lines.append(f"  {name:<22} {value:12.4f}{cs}")
        for name, value in self.extras.items():
            lines.append(f"  {name:<22} {value:12.4f}")
        lines.append("  settings: " + ", ".join(f"{k}={v}" for k, v in self.settings.items()))
        return "\n".join(lines)
