"""Benchmark: studies on a busy machine finish every trial, none FAIL.

Runs the command line as a user would, with ``--burners`` CPU-bound processes running beside it
for the whole run (each a Python loop that never sleeps), and counts the trials' end states:

- packed: ``bound-tuner run studies/swiss_roll.toml --pack 4 --n-trials 8`` on SQLite;
- workers: the same study with ``--workers 3 --n-trials 9`` on PostgreSQL.

Every run uses the default heartbeat (10 s) and grace period (30 s) and a fresh study. It prints,
per run, the exit status, COMPLETE / PRUNED / FAIL counts, each FAIL's reason, the wall time and
the load average at the end; ``--repeats R`` alternates the two kinds R times.

    BOUND_TUNER_TEST_PG_URL=postgresql+psycopg://postgres@127.0.0.1/bound_tuner_test \\
        python benchmarks/bench_loaded.py --repeats 2
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import optuna
from optuna.trial import TrialState

REPO = Path(__file__).resolve().parent.parent
SPEC = REPO / "studies" / "swiss_roll.toml"


def burn() -> None:
    """A CPU-bound process: a Python loop that never sleeps."""
    while True:
        pass


def run_once(kind: str, storage: str, tmp: Path) -> dict:
    """One study of ``kind`` ("packed" or "workers") through the command line; its figures."""
    name = f"loaded-{kind}-{uuid.uuid4().hex[:8]}"
    if kind == "packed":
        url = f"sqlite:///{tmp / (name + '.db')}"
        extra, n = ["--pack", "4"], 8
    else:
        url, extra, n = storage, ["--workers", "3"], 9
    argv = [sys.executable, "-m", "bound_tuner.cli", "run", str(SPEC), "--storage", url]
    argv += ["--study-name", name, "--n-trials", str(n), "--quiet", "--device", "cpu", *extra]
    env = {**os.environ, "BOUND_TUNER_ARTIFACTS": str(tmp / "artifacts")}
    began = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=tmp)
    wall = time.monotonic() - began
    trials = optuna.load_study(study_name=name, storage=url).get_trials()
    states = {s.name: sum(t.state == s for t in trials) for s in TrialState}
    fails = [str(t.user_attrs.get("fail_reason", "")) for t in trials if t.state == TrialState.FAIL]
    if kind == "workers":
        optuna.delete_study(study_name=name, storage=url)
    return {
        "kind": kind,
        "n_trials": n,
        "exit": proc.returncode,
        "states": {k: v for k, v in states.items() if v},
        "fail_reasons": fails,
        "wall_s": round(wall, 1),
        "load_end": os.getloadavg()[0],
        "stderr_tail": proc.stderr.strip().splitlines()[-3:],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--storage", default=os.environ.get("BOUND_TUNER_TEST_PG_URL"))
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--burners", type=int, default=1, help="CPU-bound processes beside the run")
    ap.add_argument("--only", choices=("packed", "workers"), default=None)
    ap.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = ap.parse_args()
    kinds = [args.only] if args.only else ["packed", "workers"]
    if "workers" in kinds and not args.storage:
        sys.exit("workers need PostgreSQL: give --storage or set BOUND_TUNER_TEST_PG_URL")
    burners = [mp.Process(target=burn, daemon=True) for _ in range(args.burners)]
    for b in burners:
        b.start()
    rows = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for r in range(args.repeats):
                for kind in kinds:
                    row = run_once(kind, args.storage, Path(tmp))
                    row["repeat"] = r
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    finally:
        for b in burners:
            b.terminate()
    bad = [r for r in rows if r["exit"] != 0 or r["fail_reasons"]]
    done = sum(r["states"].get("COMPLETE", 0) + r["states"].get("PRUNED", 0) for r in rows)
    print(
        f"{len(rows)} runs with {args.burners} CPU-bound process(es) beside them: "
        f"{done} of {sum(r['n_trials'] for r in rows)} trials finished, "
        f"{sum(len(r['fail_reasons']) for r in rows)} FAIL, {len(bad)} runs with a FAIL or a "
        f"non-zero exit; median wall {sorted(r['wall_s'] for r in rows)[len(rows) // 2]} s"
    )
    if args.out is not None:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
