"""Options that reach where they belong: the pool's device, the VAE's device, the TF32 switch on
every supported torch, one grace-period default, and the artifact folder of a study wherever
it is read from."""

from __future__ import annotations

import types
from pathlib import Path

import optuna
import pytest
import torch
from worker_spec import PG_URL, needs_pg, write_worker_spec

from bound_tuner.cli import main
from bound_tuner.config.spec import load_spec
from bound_tuner.execution.accounting import WORKER_ATTR
from bound_tuner.execution.errors import WorkerError
from bound_tuner.models.vae import MLPVAE
from bound_tuner.objectives.studies import ARTIFACTS_ATTR
from bound_tuner.runtime.device import set_fp32_precision, set_tf32
from bound_tuner.storage.database import (
    DEFAULT_HEARTBEAT_INTERVAL,
    default_grace_period,
    make_storage,
)
from bound_tuner.study import run_study
from bound_tuner.training.vae import train_vae

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_one_grace_period_default(tmp_path):
    assert default_grace_period(DEFAULT_HEARTBEAT_INTERVAL) == 30
    assert default_grace_period(20) == 60  # three heartbeats once they are over 10 s apart
    storage = make_storage(f"sqlite:///{tmp_path}/g.db", heartbeat_interval=20)
    assert storage.grace_period == default_grace_period(20)


def test_a_pool_of_run_study_runs_on_the_device_it_is_given(tmp_path):
    spec = load_spec(write_worker_spec(tmp_path / "d.toml", "dev", n_trials=1, steps=5))
    url = f"sqlite:///{tmp_path}/d.db"
    study = run_study(spec, storage=url, n_workers=1, device="cpu", progress=False, dashboard=False)
    (t,) = study.get_trials()
    assert t.state.name == "COMPLETE" and t.user_attrs[WORKER_ATTR].endswith("/cpu")
    kw = {"storage": url, "n_workers": 1, "n_trials": 2, "progress": False, "dashboard": False}
    if torch.cuda.is_available():
        study = run_study(spec, device="cuda", **kw)
        assert "/cuda" in study.get_trials()[1].user_attrs[WORKER_ATTR]
    else:  # the device reaches the worker, which refuses it here instead of using the CPU
        with pytest.raises(WorkerError, match="no CUDA GPU"):
            run_study(spec, device="cuda", **kw)
        assert len(optuna.load_study(study_name="dev", storage=url).get_trials()) == 1


def test_train_vae_trains_where_the_model_is_by_default():
    model = MLPVAE(input_dim=4, hidden=(8,), latent=2).double()
    x = torch.rand(16, 4, dtype=torch.float64)
    rows = train_vae(model, x, epochs=1, batch_size=8)
    assert len(rows) == 1 and next(model.parameters()).device.type == "cpu"


@cuda
@pytest.mark.gpu
def test_train_vae_keeps_a_cuda_model_on_cuda():
    model = MLPVAE(input_dim=4, hidden=(8,), latent=2).cuda()
    train_vae(model, torch.rand(16, 4), epochs=1, batch_size=8)
    assert all(p.device.type == "cuda" for p in model.parameters())


def test_tf32_switch_on_new_and_old_torch():
    # torch >= 2.9: fp32_precision
    new_mm, new_cudnn = (
        types.SimpleNamespace(fp32_precision="ieee"),
        types.SimpleNamespace(conv=types.SimpleNamespace(fp32_precision="ieee")),
    )
    set_fp32_precision(new_mm, new_cudnn, True)
    assert new_mm.fp32_precision == "tf32" and new_cudnn.conv.fp32_precision == "tf32"
    set_fp32_precision(new_mm, new_cudnn, False)
    assert new_mm.fp32_precision == "ieee" and new_cudnn.conv.fp32_precision == "ieee"
    # torch 2.4 to 2.8: allow_tf32, and no fp32_precision to set
    old_mm, old_cudnn = (
        types.SimpleNamespace(allow_tf32=False),
        types.SimpleNamespace(allow_tf32=False),
    )
    set_fp32_precision(old_mm, old_cudnn, True)
    assert old_mm.allow_tf32 is True and old_cudnn.allow_tf32 is True
    assert not hasattr(old_mm, "fp32_precision")
    # this torch
    before = torch.backends.cuda.matmul.fp32_precision
    try:
        set_tf32(False)
        assert torch.backends.cuda.matmul.fp32_precision == "ieee"
        set_tf32(True)
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"
    finally:
        torch.backends.cuda.matmul.fp32_precision = before


@needs_pg
def test_a_postgresql_study_exports_from_any_directory(tmp_path, monkeypatch, study_name):
    run_dir, other = tmp_path / "run", tmp_path / "elsewhere"
    run_dir.mkdir()
    other.mkdir()
    monkeypatch.delenv("BOUND_TUNER_ARTIFACTS", raising=False)
    monkeypatch.chdir(run_dir)
    spec = load_spec(write_worker_spec(tmp_path / "p.toml", study_name, n_trials=1, steps=5))
    study = run_study(spec, storage=PG_URL, progress=False, dashboard=False)
    folder = Path(study.user_attrs[ARTIFACTS_ATTR])
    assert folder.is_absolute() and folder.parent == run_dir.resolve()
    assert folder.name.startswith("postgresql_") and folder.name.endswith("_artifacts")

    monkeypatch.chdir(other)
    out = other / "m.pt"
    argv = ["export", "--study", study_name, "--storage", PG_URL, "--out", str(out)]
    assert main(argv) == 0
    assert out.is_file() and out.with_suffix(".json").is_file()
    assert not any(p.name.endswith("_artifacts") for p in other.iterdir())


@needs_pg
def test_postgresql_and_sqlite_studies_of_one_name_keep_apart(tmp_path, monkeypatch, study_name):
    monkeypatch.delenv("BOUND_TUNER_ARTIFACTS", raising=False)
    monkeypatch.chdir(tmp_path)
    spec = load_spec(write_worker_spec(tmp_path / "s.toml", study_name, n_trials=1, steps=5))
    lite = run_study(spec, storage="sqlite:///bound_tuner.db", progress=False, dashboard=False)
    pg = run_study(spec, storage=PG_URL, progress=False, dashboard=False)
    (a,), (b,) = lite.get_trials(), pg.get_trials()
    store_a, store_b = Path(a.user_attrs["model.store"]), Path(b.user_attrs["model.store"])
    assert store_a != store_b
    assert sorted(p.name for p in store_a.iterdir()) == [a.user_attrs["model.artifact_id"]]
    assert sorted(p.name for p in store_b.iterdir()) == [b.user_attrs["model.artifact_id"]]


def test_the_dashboard_serves_the_folder_the_studies_recorded(tmp_path, monkeypatch):
    from bound_tuner.dashboard.server import served_artifact_dir

    kept = tmp_path / "kept"
    monkeypatch.setenv("BOUND_TUNER_ARTIFACTS", str(kept))
    url = f"sqlite:///{tmp_path}/a.db"
    spec = load_spec(write_worker_spec(tmp_path / "a.toml", "art", n_trials=1, steps=5))
    run_study(spec, storage=url, progress=False, dashboard=False)
    monkeypatch.delenv("BOUND_TUNER_ARTIFACTS")
    monkeypatch.chdir(tmp_path)
    store = make_storage(url)
    assert served_artifact_dir(store, url, None) == kept.resolve()
    assert served_artifact_dir(store, url, tmp_path / "x") == tmp_path / "x"
    (t,) = optuna.load_study(study_name="art", storage=url).get_trials()
    assert (kept / t.user_attrs["model.artifact_id"]).is_file()
