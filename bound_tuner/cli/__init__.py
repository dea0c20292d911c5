"""The ``bound-tuner`` command.

  bound-tuner run SPEC [--storage URL] [--n-trials N] [--workers K | --gpus 0,1 [--trials-per-gpu k]]
  bound-tuner run SPEC --validate  (held-out metrics beside the bound, in the study NAME-validate)
  bound-tuner run SPEC --executor ray [--ray-address ADDR] [--workers K] [--gpus-per-trial G]
  bound-tuner worker SPEC --storage URL [--device DEV]
  bound-tuner storage-proxy --storage URL [--host H] [--port P]
  bound-tuner report --study NAME [--storage URL] [--format table|json] [--plot FILE.png]
  bound-tuner dashboard [--storage URL] [--host 127.0.0.1] [--port 8080] [--artifacts DIR]
  bound-tuner export --study NAME [--storage URL] [--trial N|best] --out FILE.pt
  bound-tuner sample --study NAME [--storage URL] [--trial N|best] --n K --out FILE.npy|FILE.png
  bound-tuner score --diffusers DIR --data FILE [--variant elbo] [--json OUT]  (a model trained elsewhere)

A user error (spec, data, storage) prints one line and exits with status 2; nothing is written.

Its modules: ``parser`` (the arguments), ``run_commands`` (run, worker, storage-proxy),
``report_commands`` (report, dashboard), ``model_commands`` (export, sample, score), ``summary``
(what ``run`` and ``worker`` print at the end) and ``process`` (``main``: signals, logging and
errors as one-line messages around a command). ``main`` is the package's entry point.
"""

from bound_tuner.cli.process import main

__all__ = ["main"]
