"""Per-trial notes and sample images for optuna-dashboard.

``TrialArtifacts`` is an ``on_result`` hook of the objectives: per trial it saves a markdown note with
the bound's breakdown (``optuna_dashboard.save_note``) and uploads a PNG of generated samples to the
artifact store (``optuna.artifacts.upload_artifact``). Notes and images belong to one trial each, so
any number of workers may write them."""

from __future__ import annotations

import logging
import math
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from optuna.artifacts import upload_artifact

from bound_tuner.maths.bounds.report import term_label, value_label

if TYPE_CHECKING:
    import torch

_log = logging.getLogger(__name__)


def short_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else str(v)
    return str(v)


def bound_note(number: int, report: Any, heldout: dict[str, float] | None = None) -> str:
    """Markdown for a trial's note: the bound's terms and contributions as a table."""
    label = value_label(report.settings.get("variant"))  # a measured bound, or a score
    lines = [
        f"### Trial {number}: {report.kind} generalization {label} {report.total:.4f}",
        "",
        f"| term | value | contribution to the {label} |",
        "| --- | ---: | ---: |",
    ]
    for name, value in report.terms.items():
        symbol = term_label(name, report.settings.get("variant"))[0]
        c = report.contributions.get(name)
        cs = f"{c:+.4f}" if c is not None else ""
        lines.append(f"| {symbol} (`{name}`) | {value:.4f} | {cs} |")
    lines.append(f"| **{label}** | | **{report.total:.4f}** |")
    if "total_upper95" in report.extras:
        lines.append(f"| 95% certificate | | {report.extras['total_upper95']:.4f} |")
    step, trained = report.extras.get("step"), report.extras.get("steps_trained")
    if step is not None and trained is not None and step < trained:
        lines += [
            "",
            f"Certified early stopping kept step {step:g} of {trained:g} (docs/theory.md 2.12): "
            "the weights, samples and held-out metrics are that step's.",
        ]
    if report.extras:
        lines += ["", "Related numbers (not in the total):"]
        lines += [f"- {k} = {short_value(v)}" for k, v in report.extras.items()]
    if report.settings:
        items = [f"{k} = {short_value(v)}" for k, v in report.settings.items()]
        rows = [", ".join(items[i : i + 6]) for i in range(0, len(items), 6)]
        lines += ["", "Settings: " + "  \n".join(rows)]  # two spaces + newline: a line break
    if heldout:
        lines += [
            "",
            "Held-out metrics (validation mode; never the objective): "
            + ", ".join(f"{k} = {short_value(v)}" for k, v in heldout.items()),
        ]
    return "\n".join(lines)


def _as_images(x: torch.Tensor) -> torch.Tensor | None:
    """[n, C, H, W] for image-like samples (including flattened square images), else None."""
    if x.dim() == 4:
        return x
    if x.dim() == 3:
        return x.unsqueeze(1)
    if x.dim() == 2 and x.shape[1] >= 64 and math.isqrt(x.shape[1]) ** 2 == x.shape[1]:
        s = math.isqrt(x.shape[1])
        return x.reshape(-1, 1, s, s)
    return None


def save_samples_png(
    samples: torch.Tensor,
    path: str | Path,
    *,
    reference: torch.Tensor | None = None,
    title: str = "",
) -> None:
    """A PNG of generated samples: a grid for images, else a scatter of the first two
    coordinates over the training points (``reference``) when given."""
    samples = samples.detach().float().cpu()
    images = _as_images(samples)
    if images is not None:
        from torchvision.utils import save_image

        ref = _as_images(reference.detach().float().cpu()) if reference is not None else None
        lo, hi = (float(ref.min()), float(ref.max())) if ref is not None else (None, None)
        value_range = (lo, hi) if ref is not None and hi > lo else None
        images = images[:64]
        if value_range is not None:
            images = images.clamp(*value_range)
        save_image(images, str(path), nrow=8, normalize=True, value_range=value_range)
        return

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    flat = samples.reshape(samples.shape[0], -1)
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    if reference is not None:
        r = reference.detach().float().cpu().reshape(reference.shape[0], -1)
        ax.scatter(r[:, 0], r[:, 1], s=18, marker="x", c="#F58518", label="training data")
        lo, hi = r[:, :2].min(0).values, r[:, :2].max(0).values
        pad = 0.5 * (hi - lo)
        ax.set_xlim(float(lo[0] - pad[0]), float(hi[0] + pad[0]))
        ax.set_ylim(float(lo[1] - pad[1]), float(hi[1] + pad[1]))
    ax.scatter(flat[:, 0], flat[:, 1], s=4, alpha=0.5, c="#4C78A8", label="generated")
    ax.set_xlabel("x[0]")
    ax.set_ylabel("x[1]")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _diffusion_samples(
    result: Any, *, n: int, n_steps: int, shape: tuple[int, ...], seed: int
) -> torch.Tensor:

    from bound_tuner.maths.sde import get_schedule  # torch only when a trial's samples are drawn

    # torch only when a trial's samples are drawn
    from bound_tuner.training.sampling import generate

    st = result.report.settings
    params = {k.split(".", 1)[1]: v for k, v in st.items() if k.startswith("schedule.")}
    schedule = get_schedule(st["schedule"], **params)
    run = generate(
        result.model,
        schedule,
        T=float(st["T"]),
        n=n,
        shape=shape,
        n_steps=n_steps,
        t_min=float(st.get("t_min", 1e-3)),
        seed=seed,
    )
    return run.samples


# every trial among a study's first NOTE_EVERY_TRIAL_UNTIL gets a note and samples; later ones
# only when they lower the best bound this process has seen. optuna-dashboard keeps all notes in
# the study's system attributes and reads them all on every save, so a note costs about 0.18 ms
# more per earlier note (docs/benchmarks.md): unbounded notes would make trial n cost O(n).
NOTE_EVERY_TRIAL_UNTIL = 200


class TrialArtifacts:
    """``on_result`` hook: a trial note with the bound's breakdown and a PNG of samples.

    Args:
        artifact_store: where the PNGs go (see ``artifact_store_for``); None: notes only.
        reference: training points drawn under the generated ones in 2-D scatters, and the value
            range of image grids.
        n_samples: generated samples per image (at most 64 are drawn for images).
        n_steps: generator steps for the samples (for images, at most the bound's N: a UNet
            pass per step and sample is the dominant cost of a trial's artifacts on a CPU).
        shape: shape of one sample; by default that of ``reference``, else of the model's data.
        every_trial_until: trials numbered below this all get a note and samples; later trials
            only when their bound is the lowest this hook has seen (``NOTE_EVERY_TRIAL_UNTIL``).

    A failure here is logged and never fails the trial.
    """

    def __init__(
        self,
        artifact_store: Any | None = None,
        *,
        reference: torch.Tensor | None = None,
        n_samples: int = 512,
        n_steps: int = 200,
        shape: tuple[int, ...] | None = None,
        every_trial_until: int = NOTE_EVERY_TRIAL_UNTIL,
    ) -> None:
        self.artifact_store = artifact_store
        self.every_trial_until = every_trial_until
        self.best_bound = math.inf
        self.reference = reference
        self.n_samples = n_samples
        self.n_steps = n_steps
        self.shape = shape

    def wanted(self, trial: optuna.Trial, result: Any) -> bool:
        """Whether this trial gets a note and samples: one of the study's first
        ``every_trial_until`` trials, or the lowest bound this hook has seen."""
        total = float(result.report.total)
        lowest = total < self.best_bound
        if lowest:
            self.best_bound = total
        return trial.number < self.every_trial_until or lowest

    def __call__(self, trial: optuna.Trial, result: Any) -> None:
        if not self.wanted(trial, result):
            return
        try:
            self.note(trial, result)
        except Exception as e:  # the bound is computed; a note must not lose the trial
            _log.warning("trial %d: could not save its note: %s", trial.number, e)
        if self.artifact_store is None:
            return
        try:
            self.samples_artifact(trial, result)
        except Exception as e:
            _log.warning("trial %d: could not save its samples: %s", trial.number, e)

    def note(self, trial: optuna.Trial, result: Any) -> None:
        from optuna_dashboard import save_note

        save_note(trial, bound_note(trial.number, result.report, getattr(result, "heldout", None)))

    def samples_artifact(self, trial: optuna.Trial, result: Any) -> str | None:
        """Upload the PNG of samples; returns the artifact id, or None without samples."""
        samples = self._samples(result, seed=trial.number)
        if samples is None:
            return None
        st = result.report.settings
        title = f"trial {trial.number}: {samples.shape[0]} generated samples"
        if "T" in st:
            title += f", T = {float(st['T']):.3g}"
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"samples_trial{trial.number}.png"
            save_samples_png(samples, path, reference=self.reference, title=title)
            return upload_artifact(
                artifact_store=self.artifact_store,
                file_path=str(path),
                study_or_trial=trial,
                mimetype="image/png",
            )

    def _samples(self, result: Any, *, seed: int) -> torch.Tensor | None:
        samples = getattr(result, "samples", None)
        if samples is not None:
            return samples
        if result.report.kind != "diffusion" or getattr(result, "model", None) is None:
            return None
        shape = self.shape
        if shape is None and self.reference is not None:
            shape = tuple(self.reference.shape[1:])
        if shape is None:
            shape = (int(result.report.settings["d"]),)
        n, n_steps = self.n_samples, self.n_steps
        if len(shape) > 1:  # images: one 8x8 grid, at most the bound's generator step count
            n = min(n, 64)
            n_steps = min(n_steps, int(result.report.settings.get("N", n_steps)))
        return _diffusion_samples(result, n=n, n_steps=n_steps, shape=shape, seed=seed)
