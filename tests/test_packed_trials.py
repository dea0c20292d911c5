"""Studies whose trials train in packs ([training] pack, --pack): same trials, same bounds."""

import math

import optuna
import pytest
import torch

from bound_tuner.cli import main
from bound_tuner.config.overrides import with_pack
from bound_tuner.config.schema import SpecError
from bound_tuner.config.spec import load_spec
from bound_tuner.evaluation.experiment import run_diffusion
from bound_tuner.objectives.factory import load_data
from bound_tuner.study import run_study
from bound_tuner.training.config import DiffusionConfig

PACKED = """
[study]
name = "packed"
n_trials = {n_trials}
seed = 0

[data]
name = "swiss_roll"
m = 48
test_size = 50

[search]
T = {{ grid = [0.3, 0.6, 0.9] }}
lam = {lam}

[training]
steps = 40
batch_size = 16
width = 16
checkpoints = 1
pack = {pack}

[bound]
N = 10
max_sample_scale = 1000.0  # tiny models sampled in a few steps spread their samples
n_paths = 8
train_draws = 2

[sampler]
type = "grid"
"""


def _spec(tmp_path, **kw):
    vals = {"n_trials": 3, "lam": "1.0", "pack": 3, **kw}
    path = tmp_path / "packed.toml"
    path.write_text(PACKED.format(**vals))
    return path


def test_a_packed_study_trains_its_trials_together_with_their_own_bounds(tmp_path):
    spec = load_spec(_spec(tmp_path))
    study = run_study(spec, storage=f"sqlite:///{tmp_path}/p.db", device="cpu", progress=False)
    trials = study.get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE"] * 3
    assert sorted(t.params["T"] for t in trials) == [0.3, 0.6, 0.9]
    # one pack: every trial started before any finished, each in its own thread
    assert max(t.datetime_start for t in trials) < min(t.datetime_complete for t in trials)
    assert sorted(t.user_attrs["worker"][-5:] for t in trials) == ["[1/3]", "[2/3]", "[3/3]"]
    data = load_data(spec).train
    for t in trials:
        # its own certificate at its checkpoint and at the last step (docs/theory.md 2.12)
        assert list(t.intermediate_values) == [20, 40]
        cfg = DiffusionConfig(**t.user_attrs["config"])
        # trained alone with the study's one checkpoint (its margin, eq. 2.12a, depends on it)
        alone = run_diffusion(data, cfg, device="cpu", checkpoints=1).report.total
        assert t.value == pytest.approx(alone, rel=1e-3)  # the bound of the trial trained alone


def test_more_trials_than_a_pack_and_a_last_smaller_pack(tmp_path):
    spec = load_spec(_spec(tmp_path, n_trials=5, lam="{ grid = [0.0, 2.0] }", pack=2))
    study = run_study(spec, storage=f"sqlite:///{tmp_path}/q.db", device="cpu", progress=False)
    trials = study.get_trials()
    assert len(trials) == 5 and all(t.state.name == "COMPLETE" for t in trials)
    assert all(math.isfinite(t.value) for t in trials)


def test_pack_settings_are_checked(tmp_path):
    spec = load_spec(_spec(tmp_path, pack=1))
    assert with_pack(spec, 4).training["pack"] == 4
    with pytest.raises(SpecError, match="training.pack = 0 must be at least 1"):
        with_pack(spec, 0)
    bad = tmp_path / "w.toml"
    bad.write_text(
        PACKED.format(n_trials=3, lam="1.0", pack=2).replace(
            "lam = 1.0", "lam = 1.0\nwidth = { grid = [8, 16] }"
        )
    )
    with pytest.raises(SpecError, match="search.width varies"):
        load_spec(bad)


def test_cli_pack_option(tmp_path, capsys):
    path = _spec(tmp_path, pack=1)
    url = f"sqlite:///{tmp_path}/c.db"
    assert main(["run", str(path), "--storage", url, "--pack", "0", "--quiet"]) == 2
    assert "--pack" in capsys.readouterr().err
    assert (
        main(["run", str(path), "--storage", url, "--pack", "3", "--quiet", "--device", "cpu"]) == 0
    )
    out = capsys.readouterr().out
    assert out.startswith("study 'packed': 3 complete\n"), out
    trials = optuna.load_study(study_name="packed", storage=url).get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE"] * 3
    # --pack 3: the three trials ran in one pack, each in its own thread of the pack
    assert sorted(t.user_attrs["worker"][-5:] for t in trials) == ["[1/3]", "[2/3]", "[3/3]"]
    best = min(trials, key=lambda t: t.value)
    assert f"best trial #{best.number} (" in out
    assert f"bound {best.value:.4f} nats per training point" in out


def test_an_error_in_one_pack_fails_its_trials_and_the_run_goes_on(tmp_path, capsys, monkeypatch):
    """The second pack raises (as a CUDA out-of-memory would): its two trials fail with that
    error as their reason, the next packs train, and the command exits 0 with every trial
    finished; no "interrupted", no exit 130."""
    import bound_tuner.objectives.packed as packed

    real = packed.train_packed
    calls = {"n": 0}

    def second_fails(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(*args, **kwargs)

    monkeypatch.setattr(packed, "train_packed", second_fails)
    path = _spec(tmp_path, n_trials=6, lam="{ grid = [0.0, 2.0] }", pack=2)
    # "elbo": trials without K-fold references train in the worker's packs
    path.write_text(path.read_text().replace("[bound]\n", '[bound]\nvariant = "elbo"\n', 1))
    url = f"sqlite:///{tmp_path}/e.db"
    argv = ["run", str(path), "--storage", url, "--quiet", "--device", "cpu"]
    assert main([*argv, "--max-failures", "3"]) == 0
    err = capsys.readouterr().err
    assert "interrupted" not in err, err
    trials = optuna.load_study(study_name="packed", storage=url).get_trials()
    failed = [t for t in trials if t.state.name == "FAIL"]
    assert len(failed) == 2 and len(trials) == 6, [t.state for t in trials]
    for t in failed:
        assert t.user_attrs["fail_reason"] == (
            "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
        )
    assert sum(t.state.name == "COMPLETE" for t in trials) == 4


@pytest.mark.parametrize("pruned", ["odd", "all"])
def test_members_pruned_at_a_checkpoint_of_a_pack_with_fold_references(
    tmp_path, monkeypatch, pruned
):
    """A pack of four elbo-kfold trials (K-fold reference models: fold rows) in which the pruner
    drops two members at the checkpoint while the other two train on, or every member at once:
    the pruned trials end PRUNED, the others COMPLETE with finite bounds; no trial fails."""

    def prune_odd(self) -> bool:
        return pruned == "all" or self.number % 2 == 1

    monkeypatch.setattr(optuna.trial.Trial, "should_prune", prune_odd)
    text = PACKED.format(n_trials=4, lam="{ grid = [0.0, 2.0] }", pack=4)
    text = text.replace("[bound]\n", '[bound]\nvariant = "elbo-kfold"\nfolds = 2\n')
    path = tmp_path / "kfold.toml"
    path.write_text(text)
    spec = load_spec(path)
    study = run_study(spec, storage=f"sqlite:///{tmp_path}/k.db", device="cpu", progress=False)
    trials = study.get_trials()
    states = {t.number: t.state.name for t in trials}
    kept = "PRUNED" if pruned == "all" else "COMPLETE"
    assert states == {0: kept, 1: "PRUNED", 2: kept, 3: "PRUNED"}, states
    assert all(math.isfinite(t.value) for t in trials if t.state.name == "COMPLETE")
