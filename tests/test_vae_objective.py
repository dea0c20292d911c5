"""VAEObjective end to end (docs/theory.md sections 5 and 6): tiny studies on synthetic binary images."""

from __future__ import annotations

import gzip
import math
import struct
import textwrap
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch

from bound_tuner.config.schema import SpecError
from bound_tuner.config.spec import load_spec, parse_spec
from bound_tuner.dashboard.report import trials_json, trials_table
from bound_tuner.data import load_dataset
from bound_tuner.data.images import FASHION_MNIST_FILES
from bound_tuner.data.split import DataSplit
from bound_tuner.maths.bounds.kfold import checkpoint_z
from bound_tuner.maths.bounds.report import flat_attrs
from bound_tuner.objectives.factory import load_data
from bound_tuner.objectives.vae import VAEConfig, VAEObjective
from bound_tuner.study import run_study

STUDIES = Path(__file__).resolve().parent.parent / "studies"

TINY_VAE_SPEC = """
[study]
name = "{name}"
model = "vae"
n_trials = {n_trials}
validation = {validation}
seed = 0

[data]
name = "fashion_mnist"
m = {m}
test_size = 16
binarize = "fixed"

[search]
beta = 1.0
lam = {lam}
latent = 4
lr = {lr}
arch = {arch}

[training]
epochs = {epochs}
batch_size = 16

[bound]
variant = "{variant}"
r = 1.0
mc_samples = 1
{bound_extra}

[sampler]
type = "grid"

[pruner]
type = "{pruner}"
n_startup_trials = 1
"""

N_TRAIN, N_TEST = 48, 16


def _write_idx(path: Path, arr: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    path.write_bytes(gzip.compress(header + arr.tobytes()))


@pytest.fixture
def binary_images(tmp_path, monkeypatch) -> Path:
    """Fashion-MNIST-shaped idx files of binary images (noisy copies of 4 prototypes)."""
    rng = np.random.default_rng(0)
    protos = rng.random((4, 28, 28)) < 0.3

    def images(n: int) -> np.ndarray:
        flips = rng.random((n, 28, 28)) < 0.05
        return ((protos[rng.integers(0, 4, n)] ^ flips) * 255).astype(np.uint8)

    arrays = {
        "train_images": images(N_TRAIN),
        "train_labels": rng.integers(0, 10, N_TRAIN, dtype=np.uint8),
        "test_images": images(N_TEST),
        "test_labels": rng.integers(0, 10, N_TEST, dtype=np.uint8),
    }
    folder = tmp_path / "data"
    folder.mkdir()
    for key, name in FASHION_MNIST_FILES.items():
        _write_idx(folder / f"{name}.gz", arrays[key])
    monkeypatch.setenv("BOUND_TUNER_DATA", str(folder))
    return folder


@pytest.fixture
def vae_spec(tmp_path):
    def make(**kw) -> Path:
        vals = dict(
            name="tiny-vae",
            n_trials=2,
            validation="false",
            m='"all"',
            lam="{ grid = [0.0, 20.0] }",
            lr="0.003",
            arch='"mlp"',
            epochs=3,
            bound_extra="",
            pruner="none",
            variant="paper",
        )
        vals.update(kw)
        path = tmp_path / f"{vals['name']}.toml"
        path.write_text(textwrap.dedent(TINY_VAE_SPEC.format(**vals)))
        return path

    return make


def _complexity(t: optuna.trial.FrozenTrial) -> float:
    ua = flat_attrs(t.user_attrs)
    return ua["bound.contribution.kld"] + ua["bound.contribution.mi"]


def test_vae_study_end_to_end_with_validation(binary_images, vae_spec, tmp_path):
    spec = load_spec(vae_spec(validation="true"))
    study = run_study(spec, storage=f"sqlite:///{tmp_path}/v.db", progress=False)
    trials = study.get_trials()
    assert len(trials) == 2 and all(t.state.name == "COMPLETE" for t in trials)
    for t in trials:
        ua = flat_attrs(t.user_attrs)
        assert ua["bound.m"] == N_TRAIN and ua["bound.d"] == 784 and ua["bound.latent"] == 4
        rec, kld, mi = ua["bound.rec"], ua["bound.kld"], ua["bound.mi"]
        expect = rec + 2 * math.sqrt(max(kld, 0)) + 2 * math.sqrt(max(mi, 0) / N_TRAIN)
        assert t.value == pytest.approx(ua["bound.total"]) == pytest.approx(expect, rel=1e-9)
        assert ua["bound.encoder_only_bound"] == pytest.approx(rec + math.sqrt(kld))
        # held-out metrics: recorded under heldout.*, never in bound.* nor the value
        assert ua["heldout.heldout_loss"] > 0 and ua["heldout.test_neg_elbo"] > 0
        assert not any(k.startswith("bound.") and "test" in k for k in ua)
        assert "bound.heldout_loss" not in ua
        rows = ua["epoch_terms"]
        assert [r["epoch"] for r in rows] == [1, 2, 3]
        assert set(rows[0]) == {
            "epoch", "total", "rec", "kld", "mi", "encoder_only_bound",
            "heldout_loss", "test_neg_elbo",
        }  # fmt: skip
        assert t.intermediate_values == {r["epoch"]: pytest.approx(r["total"]) for r in rows}
        assert rows[-1]["total"] == pytest.approx(t.value)  # no subset: last epoch = final
        assert rows[-1]["heldout_loss"] == pytest.approx(ua["heldout.heldout_loss"])
        assert ua["config"]["epochs"] == 3 and ua["config"]["bound_subset"] is None
    by_lam = {t.params["lam"]: t for t in trials}
    # docs/theory.md section 6: lam > 0 lowers the complexity terms it trains on
    assert _complexity(by_lam[20.0]) < _complexity(by_lam[0.0])
    # the dashboard hook got a note and a samples image for each trial, and each trial kept its
    # weights (2 trials, fewer than keep_models)
    heads = sorted(p.read_bytes()[:4] for p in (tmp_path / "v_artifacts").iterdir())
    assert heads == [b"PK\x03\x04"] * 2 + [b"\x89PNG"] * 2
    # the report table shows the VAE terms, not the diffusion ones
    table = trials_table(trials_json(study)).splitlines()
    assert table[0].split() == [
        "#",
        "state",
        "beta",
        "lam",
        "latent",
        "bound",
        "REC",
        "KLD",
        "MI",
        "enc_only",
        "heldout_loss",
    ]
    row = table[1].split()
    t0 = study.trials[0]
    assert float(row[5]) == pytest.approx(t0.value, rel=1e-3)
    assert float(row[6]) == pytest.approx(t0.user_attrs["bound.rec"], rel=1e-3)
    assert row[4] == "4"


def test_without_validation_no_heldout(binary_images, vae_spec, tmp_path):
    spec = load_spec(vae_spec(lam="0.0", n_trials=1, epochs=2, bound_extra="bound_subset = 20"))
    study = run_study(spec, storage=f"sqlite:///{tmp_path}/n.db", progress=False, dashboard=False)
    (t,) = study.get_trials()
    assert not any(k.startswith("heldout.") for k in t.user_attrs)
    rows = t.user_attrs["epoch_terms"]
    assert len(rows) == 2 and "heldout_loss" not in rows[0]
    assert (
        flat_attrs(t.user_attrs)["bound.m"] == N_TRAIN
        and t.user_attrs["config"]["bound_subset"] == 20
    )
    assert rows[-1]["total"] != pytest.approx(t.value)  # the final bound uses all m points


def test_pruned_per_epoch_and_nan_fails(binary_images, vae_spec):
    # trial 0 learns (lr 1e-2), trial 1 barely moves (1e-7): its first epoch's bound is above the
    # median of the finished trial, so the median pruner stops it there; trial 2 overflows
    spec = load_spec(vae_spec(lam="0.0", lr="{ choices = [1e-2, 1e-7, 1e30] }"))
    study = optuna.create_study(pruner=optuna.pruners.MedianPruner(n_startup_trials=1))
    for lr in (1e-2, 1e-7, 1e30):
        study.enqueue_trial({"lr": lr})
    objective = VAEObjective.from_spec(spec, load_data(spec), device="cpu")
    study.optimize(objective, n_trials=3)
    good, slow, bad = study.get_trials()
    assert good.state.name == "COMPLETE" and len(good.intermediate_values) == 3
    assert slow.state.name == "PRUNED" and list(slow.intermediate_values) == [1]
    assert len(slow.user_attrs["epoch_terms"]) == 1
    assert bad.state.name == "FAIL" and "non-finite" in bad.user_attrs["fail_reason"]


def test_bound_subset_is_fixed_by_the_study_seed():
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(40, 64, generator=g) < 0.5).float()
    data = DataSplit(x, x[:8], "toy", {})
    search = {"latent": 2, "lr": 1e-3, "epochs": 1}
    a = VAEObjective(data, search=search, bound_subset=10, study_seed=1, hidden=(16,))
    b = VAEObjective(data, search=search, bound_subset=10, study_seed=1, hidden=(16,))
    assert a.epoch_x.shape == (10, 64) and torch.equal(a.epoch_x, b.epoch_x)
    assert VAEObjective(data, search=search, bound_subset=100).bound_subset is None
    study = optuna.create_study()
    study.optimize(a, n_trials=1)
    assert flat_attrs(study.trials[0].user_attrs)["bound.m"] == 40


def test_m_all_and_spec_errors(binary_images, vae_spec):
    split = load_data(load_spec(vae_spec()))
    assert split.train.shape == (N_TRAIN, 784) and set(split.train.unique().tolist()) <= {0, 1}
    assert load_dataset("fashion_mnist", m=None, test_size=4).train.shape[0] == N_TRAIN
    with pytest.raises(ValueError, match="applies only to the image sets"):
        load_dataset("swiss_roll", m="all")
    raw = {"study": {"name": "x", "model": "vae"}, "data": {"m": "most"}}
    with pytest.raises(SpecError, match="data.m = 'most' must be an integer or \"all\""):
        parse_spec(raw)
    with pytest.raises(SpecError, match="unknown 'resnet'"):
        VAEObjective(split, search={"arch": ["mlp", "resnet"]})
    with pytest.raises(SpecError, match="search.lam must be >= 0"):
        VAEObjective(split, search={"lam": (-1.0, 1.0)})
    padded = DataSplit(torch.zeros(4, 1024), torch.zeros(2, 1024), "p", {})
    with pytest.raises(SpecError, match="conv VAE takes 28x28"):
        VAEObjective(padded, search={"arch": "conv"})


def test_fashion_mnist_vae_study_spec_parses():
    spec = load_spec(STUDIES / "fashion_mnist_vae.toml")
    assert spec.model == "vae" and spec.sampler["type"] == "tpe"
    assert {"beta", "lam", "latent", "lr"} <= {n for n, p in spec.search.items() if not p.is_fixed}
    assert spec.data["binarize"] == "fixed"
    # the shipped bound is the K-fold default (docs/theory.md 5.4): no R chosen on held-out data
    assert spec.bound["variant"] == "elbo-kfold" and "R" not in spec.bound and "r" not in spec.bound
    assert spec.data["m"] == 5000 and "epochs" in spec.search


def test_R_settings_in_a_vae_study(binary_images, vae_spec, tmp_path):
    from bound_tuner.maths.bounds.vae import reference_vae_R

    path = vae_spec(lam="0.0", n_trials=1, epochs=2, bound_extra='R = "data"')
    path.write_text(path.read_text().replace("r = 1.0\n", ""))
    spec = load_spec(path)
    objective = VAEObjective.from_spec(spec, load_data(spec))
    study = optuna.create_study()
    study.optimize(objective, n_trials=1)
    (t,) = study.get_trials()
    ua = flat_attrs(t.user_attrs)
    R = reference_vae_R(load_data(spec).train)
    assert ua["bound.R"] == pytest.approx(R) and ua["bound.R_source"] == "data"
    rec, kld, mi = ua["bound.rec"], ua["bound.kld"], ua["bound.mi"]
    expect = rec + math.sqrt(2) * R * (math.sqrt(kld) + math.sqrt(max(mi, 0) / N_TRAIN))
    assert t.value == pytest.approx(expect, rel=1e-9)
    assert ua["epoch_terms"][-1]["total"] == pytest.approx(t.value)
    with pytest.raises(SpecError, match="give bound.R or bound.r, not both"):
        load_spec(vae_spec(bound_extra="R = 2.0"))
    with pytest.raises(SpecError, match="bound.R = 'guess'"):
        load_spec(vae_spec(bound_extra='R = "guess"'))


def test_dashboard_chart_of_bound_against_heldout_by_epoch():
    from bound_tuner.dashboard.charts import CHART_VAE_BOUND_VS_HELDOUT, study_figures

    rows = [
        {"epoch": e, "total": 100.0 - e, "encoder_only_bound": 95.0 - e, "heldout_loss": 97.0}
        for e in (1, 2, 3, 4)
    ]
    trials = [
        {"number": 0, "state": "COMPLETE", "value": 96.0, "params": {}, "user_attrs": {}},
        {"number": 1, "state": "COMPLETE", "value": 90.0, "params": {}, "user_attrs": {}},
    ]
    trials[0]["user_attrs"]["epoch_terms"] = rows
    trials[1]["user_attrs"]["epoch_terms"] = [{"epoch": 1, "total": 90.0}]  # no held-out loss
    fig = study_figures(trials)[CHART_VAE_BOUND_VS_HELDOUT]
    assert [d.name for d in fig.data] == [
        "bound",
        "encoder-only bound",
        "held-out loss REC + √KLD",
    ]
    assert list(fig.data[0].y) == [99.0, 98.0, 97.0, 96.0]
    # 97 and 96 lie at or below 97: below at epoch 4 only (strictly)
    assert fig.layout.title.text == (
        "VAE bound against held-out loss (best trial #0): below the held-out loss at 1 of 4 "
        "epochs, first at epoch 4"
    )
    del trials[0]["user_attrs"]["epoch_terms"]
    assert CHART_VAE_BOUND_VS_HELDOUT not in study_figures(trials)


def test_vae_kfold_default_end_to_end(binary_images, vae_spec, tmp_path):
    """The default VAE bound (docs/theory.md 5.4): K-fold reference VAEs, R from cross-fitting,
    the cross-fitted form as the value, the information form, the certificate and the
    held-out NELBO beside it."""
    spec = load_spec(
        vae_spec(validation="true", lam="0.0", n_trials=1, variant="elbo-kfold", epochs=2)
    )
    study = run_study(spec, storage=f"sqlite:///{tmp_path}/k.db", progress=False, dashboard=False)
    (t,) = study.get_trials()
    ua = flat_attrs(t.user_attrs)
    assert t.state.name == "COMPLETE" and ua["bound.variant"] == "elbo-kfold"
    assert ua["bound.folds"] == 5 and ua["bound.R_source"] == "cv" and ua["bound.R"] > 0
    info = ua["bound.train_nelbo"] + math.sqrt(2) * ua["bound.R"] * ua["bound.fold_info"]
    info += 1.6448536 * ua["bound.train_mc_se"]  # the estimate's Monte Carlo margin
    shift = ua["bound.train_nelbo"] - ua["bound.refs_train_nelbo"]  # eq. 2.10b
    # early stopping by default: the margin of the smallest of C = 2 checkpoints (eq. 2.12)
    assert ua["bound.cv_z"] == pytest.approx(checkpoint_z(2))
    z = ua["bound.cv_z"]
    cv = max(ua["bound.cv_nelbo"] + shift + z * ua["bound.cv_se"], ua["bound.train_nelbo"])
    assert ua["bound.info_bound"] == pytest.approx(info)
    assert ua["bound.cv_bound"] == pytest.approx(cv)
    assert t.value == pytest.approx(cv)
    assert ua["bound.total_upper95"] >= t.value
    assert ua["heldout.test_neg_elbo"] > 0 and ua["heldout.test_neg_elbo_se"] > 0
    assert not any(k.startswith("bound.test") for k in ua)
    assert ua["config"]["variant"] == "elbo-kfold"
    table = trials_table(trials_json(study)).splitlines()
    # the kept epoch is shown as the step (certified early stopping)
    head = ["#", "state", "beta", "lam", "latent", "step", "bound", "upper95"]
    assert table[0].split()[:8] == head


def test_vae_kfold_refuses_a_fixed_R(binary_images, vae_spec):
    spec = load_spec(vae_spec(variant="elbo-kfold", n_trials=1))
    data = load_data(spec)
    with pytest.raises(SpecError, match='belongs to variant "paper"'):
        VAEObjective(data, search={"lam": 0.0}, base=VAEConfig(R=10.0))
    with pytest.raises(SpecError, match="bound.variant = 'kfold'"):
        VAEObjective(data, search={"lam": 0.0}, base=VAEConfig(variant="kfold"))
