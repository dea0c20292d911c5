"""Settings that contradict the data, or that the study's variant would ignore, are refused before
the study exists: one line, exit 2, no database."""

from __future__ import annotations

import pytest
from worker_spec import write_worker_spec

from bound_tuner.cli import main


@pytest.mark.parametrize(
    "bound,needs",
    [
        ('variant = "elbo-kfold"\nfolds = 40\n', "bound.folds = 40 needs at least 80 training"),
        ('variant = "elbo-kfold"\nfolds = 17\n', "lower bound.folds to at most 16"),
        (
            'variant = "elbo-kfold"\nR = 2.0\n',
            'bound.R = 2.0 would be ignored: variant "elbo-kfold"',
        ),
        ('R = "estimate"\n', "bound.R = 'estimate' would be ignored"),  # the default variant
        ('variant = "elbo"\nfolds = 3\n', "variant 'elbo' ignores it"),
    ],
)
@pytest.mark.parametrize("workers", [None, "1"])
def test_bound_settings_are_checked_against_the_data_before_the_study(
    tmp_path, capsys, bound, needs, workers
):
    spec = write_worker_spec(tmp_path / "s.toml", "bad", n_trials=2, steps=5)  # m = 32
    spec.write_text(spec.read_text().replace("[bound]\n", "[bound]\n" + bound, 1))
    db = tmp_path / "s.db"
    argv = ["run", str(spec), "--storage", f"sqlite:///{db}", "--quiet", "--device", "cpu"]
    if workers:
        argv += ["--workers", workers]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("bound-tuner: error: "), err
    assert needs in err[0], err
    assert not db.exists()


def test_folds_that_fit_the_data_run(tmp_path, capsys):
    spec = write_worker_spec(tmp_path / "s.toml", "ok", n_trials=1, steps=5)
    bound = '[bound]\nvariant = "elbo-kfold"\nfolds = 16\n'
    spec.write_text(spec.read_text().replace("[bound]\n", bound, 1))
    argv = ["run", str(spec), "--storage", f"sqlite:///{tmp_path}/ok.db", "--quiet"]
    assert main([*argv, "--device", "cpu"]) == 0
