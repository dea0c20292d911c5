"""Summarize the runs of examples/vae_bound_check.py: where the paper's bound (r = 1, R = sqrt(2))
falls below the held-out loss, the smallest R of (5.2) that keeps it above at every epoch, and what
each way of setting R costs in tightness (bound minus held-out loss).

    python examples/vae_bound_summary.py docs/vae_check/*.json [--markdown]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from bound_tuner.maths.bounds.vae import assemble_vae_bound, r_to_R


def summarize(result: dict) -> dict:
    s = result["settings"]
    m = s["m"]
    rows = [r for r in result["rows"] if r["epoch"] >= 1]

    def margins(R_of) -> list[float]:
        return [
            assemble_vae_bound(r["rec"], r["kld"], r["mi"], m=m, R=R_of(r))[0] - r["heldout_loss"]
            for r in rows
        ]

    paper = margins(lambda r: r_to_R(1.0))
    below = [r["epoch"] for r, g in zip(rows, paper, strict=True) if g < 0]
    R_star = max(r["R_needed"] for r in rows)
    at_star = margins(lambda r: R_star)
    data = margins(lambda r: s["R_data"])
    est = margins(lambda r: r["R_estimate"])
    last = rows[-1]
    return {
        "setting": f"{s['dataset']} {s['side']}x{s['side']}, m={m:,}",
        "epochs": len(rows),
        "test_size": s["test_size"],
        "final": {
            k: last[k]
            for k in (
                "bound",
                "encoder_only_bound",
                "heldout_loss",
                "test_neg_elbo",
                "rec",
                "kld",
                "mi",
            )
        },
        "paper_below_epochs": len(below),
        "paper_first_below": below[0] if below else None,
        "paper_margin_min": min(paper),
        "paper_margin_last": paper[-1],
        "encoder_only_below_epochs": sum(r["encoder_only_bound"] < r["heldout_loss"] for r in rows),
        "R_star": R_star,
        "R_star_epoch": max(rows, key=lambda r: r["R_needed"])["epoch"],
        "R_star_margin_mean": statistics.fmean(at_star),
        "R_star_margin_last": at_star[-1],
        "R_data": s["R_data"],
        "R_data_margin_min": min(data),
        "R_data_margin_last": data[-1],
        "R_estimate_range": (
            min(r["R_estimate"] for r in rows),
            max(r["R_estimate"] for r in rows),
        ),
        "R_estimate_margin_min": min(est),
        "R_estimate_margin_last": est[-1],
        "seconds": rows[-1]["seconds"],
    }


def markdown(summaries: list[dict]) -> str:
    head = (
        "| setting | epochs | paper's bound (R=1.41) below held-out | final: bound / enc-only / held-out / test −ELBO "
        "| smallest R above at every epoch (epoch) | margin at that R: mean, last | R data: value, last margin "
        "| R estimate: range, last margin |"
    )
    out = [head, "|" + " --- |" * 8]
    for x in summaries:
        f = x["final"]
        below = (
            f"{x['paper_below_epochs']} of {x['epochs']} (from epoch {x['paper_first_below']})"
            if x["paper_below_epochs"]
            else "never"
        )
        out.append(
            f"| {x['setting']} | {x['epochs']} | {below} | {f['bound']:.1f} / {f['encoder_only_bound']:.1f} / "
            f"{f['heldout_loss']:.1f} / {f['test_neg_elbo']:.1f} | {x['R_star']:.2f} ({x['R_star_epoch']}) | "
            f"{x['R_star_margin_mean']:.1f}, {x['R_star_margin_last']:.1f} | {x['R_data']:.0f}, "
            f"{x['R_data_margin_last']:.0f} | {x['R_estimate_range'][0]:.0f}-{x['R_estimate_range'][1]:.0f}, "
            f"{x['R_estimate_margin_last']:.0f} |"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args(argv)
    out = [summarize(json.loads(f.read_text())) for f in args.files]
    if args.markdown:
        print(markdown(out))
    else:
        for x in out:
            print(json.dumps(x, default=lambda v: round(v, 3) if isinstance(v, float) else v))
    return out


if __name__ == "__main__":
    main()
