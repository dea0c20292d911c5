"""bound_tuner from Python: a study from a spec, and the same by hand with Optuna.

python examples/quickstart.py
"""

from __future__ import annotations

import optuna

from bound_tuner import DiffusionObjective, flat_attrs, load_dataset, load_spec, run_study
from bound_tuner.training.config import DiffusionConfig

STORAGE = "sqlite:///quickstart.db"


def from_spec() -> None:
    """1. A study from a spec file: created on the first run, resumed on the next."""
    spec = load_spec("studies/swiss_roll.toml")
    study = run_study(spec, storage=STORAGE, n_trials=4)
    best = study.best_trial
    attrs = flat_attrs(best.user_attrs)  # settings and extras spread into bound.<name> keys
    print(f"[spec] best T={best.params['T']:.3f} bound={best.value:.3f}")
    print(f"    variant {attrs['bound.variant']}: the K-fold cross-fitted bound")
    for key in ("train_nelbo", "cv_nelbo", "cv_shift", "cv_margin"):  # terms of elbo-kfold
        print(f"    {key:<20} {attrs['bound.' + key]:.4f}")
    print(f"    {'fold_info (C_fold)':<20} {attrs['bound.fold_info']:.4f}  (recorded, not summed)")


def by_hand() -> None:
    """2. The same kind of study built by hand: Optuna's API plus DiffusionObjective."""
    data = load_dataset("swiss_roll", m=200, seed=0, test_size=10_000)
    objective = DiffusionObjective(
        data,
        search={"T": (0.1, 1.5, "log"), "schedule": ["linear", "constant"], "lam": (0.0, 0.5)},
        base=DiffusionConfig(
            steps=800, batch_size=200, n_steps=200, n_paths=128, heldout_n_steps=200
        ),
        validation=True,  # also record heldout.sample_kl, heldout.test_kl, heldout.neg_elbo
        checkpoints=2,
    )
    study = optuna.create_study(
        study_name="quickstart-by-hand",
        storage=STORAGE,
        direction="minimize",
        sampler=optuna.samplers.TPESampler(seed=0),
        load_if_exists=True,
    )
    study.optimize(objective, n_trials=4)
    for t in study.trials:
        if t.state.name == "COMPLETE":
            print(
                f"[hand] #{t.number} T={t.params['T']:.3f} bound={t.value:.3f} "
                f"sample KL={t.user_attrs['heldout.sample_kl']:.3f}"
            )


if __name__ == "__main__":
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    from_spec()
    by_hand()
