"""Trained models out: weights kept per trial, the best K only, export, sample, load_model."""

from __future__ import annotations

import json
import textwrap
import uuid

import numpy as np
import optuna
import pytest
import torch
from optuna.artifacts import FileSystemArtifactStore
from PIL import Image

import bound_tuner
from bound_tuner.cli import main
from bound_tuner.config.spec import load_spec
from bound_tuner.data import load_dataset
from bound_tuner.maths.sde import get_schedule
from bound_tuner.models import build_score_model
from bound_tuner.objectives.diffusion import DiffusionObjective
from bound_tuner.objectives.vae import VAEConfig, VAEObjective
from bound_tuner.storage.artifacts import ATTR_ID, ArtifactError
from bound_tuner.storage.trained import load_model, read_weights
from bound_tuner.study import run_study
from bound_tuner.training.config import DiffusionConfig
from bound_tuner.training.sampling import generate

TINY = DiffusionConfig(
    width=16,
    layers=2,
    steps=15,
    batch_size=32,
    n_steps=8,
    n_paths=4,
    train_draws=2,
    max_sample_scale=1000.0,  # a 15-step model sampled in 8 steps spreads its samples
)


def _samples_of(model, cfg: DiffusionConfig, shape, seed: int = 0, n: int = 6) -> torch.Tensor:
    sched = get_schedule(cfg.schedule, **cfg.schedule_params)
    run = generate(
        model, sched, T=cfg.T, n=n, shape=shape, n_steps=cfg.n_steps, t_min=cfg.t_min, seed=seed
    )
    return run.samples


def _python_study(tmp_path, keep, n_trials=4):
    """A study run from Python that records each trial's samples (seed 0) as it trains."""
    data = load_dataset("swiss_roll", m=32, seed=0, test_size=50)
    store = FileSystemArtifactStore(str(tmp_path / "art"))
    (tmp_path / "art").mkdir(parents=True, exist_ok=True)
    seen: dict[int, torch.Tensor] = {}

    def hook(trial, res):
        cfg = DiffusionConfig(**trial.user_attrs["config"])
        seen[trial.number] = _samples_of(res.model, cfg, (2,))

    obj = DiffusionObjective(
        data,
        search={"T": [0.2, 0.5, 0.8, 1.1]},
        base=TINY,
        checkpoints=0,
        on_result=hook,
        artifact_store=store,
        keep_models=keep,
    )
    study = optuna.create_study(
        storage=f"sqlite:///{tmp_path}/py.db",
        study_name="py",
        sampler=optuna.samplers.GridSampler({"T": [0.2, 0.5, 0.8, 1.1]}, seed=0),
    )
    study.optimize(obj, n_trials=n_trials)
    return study, seen, tmp_path / "art"


def _weights_files(folder) -> int:
    n = 0
    for p in folder.iterdir():
        with open(p, "rb") as f:
            n += f.read(2) == b"PK"  # torch.save writes a zip archive; the PNGs do not
    return n


def test_best_k_kept_and_samples_reproduced(tmp_path):
    study, seen, art = _python_study(tmp_path, keep=2)
    ranked = sorted(study.trials, key=lambda t: t.value)
    kept = [t.number for t in ranked[:2]]
    assert sorted(p.name for p in art.iterdir()) == sorted(
        t.user_attrs[ATTR_ID] for t in ranked[:2]
    )
    for number in kept:
        tm = load_model(study, number)
        assert tm.trial == number and tm.T == study.trials[number].params["T"]
        # the loaded model reproduces the samples of the trial's own model, seed for seed
        assert torch.equal(tm.sample(6, seed=0, raw=True), seen[number])
    best = bound_tuner.load_model(study, "best")
    assert best.trial == ranked[0].number
    dropped = ranked[-1].number
    with pytest.raises(ArtifactError, match=f"trial {dropped} .* trials with weights: "):
        load_model(study, dropped)


def test_keep_all_and_none(tmp_path):
    study, _, art = _python_study(tmp_path / "all", keep=None, n_trials=3)
    assert len(list(art.iterdir())) == 3
    study, _, art = _python_study(tmp_path / "none", keep=0, n_trials=2)
    assert list(art.iterdir()) == []
    with pytest.raises(ArtifactError, match="has no model"):
        load_model(study, "best")


SPEC = """
[study]
name = "{name}"
n_trials = 3
keep_models = {keep}
[data]
path = "{path}"
{extra}
[search]
T = {{ grid = [0.3, 0.6, 0.9] }}
[training]
steps = {steps}
batch_size = 16
{arch}
checkpoints = 0
[bound]
N = 6
max_sample_scale = 1000.0  # tiny models sampled in a few steps spread their samples
n_paths = 4
train_draws = 2
[sampler]
type = "grid"
[pruner]
type = "none"
"""


def _spec(
    tmp_path, *, name="own", keep=2, path="x.npy", extra="", steps=15, arch="width = 16\nlayers = 2"
):
    p = tmp_path / f"{name}.toml"
    p.write_text(
        textwrap.dedent(
            SPEC.format(name=name, keep=keep, path=path, extra=extra, steps=steps, arch=arch)
        )
    )
    return p


def test_cli_export_and_sample_round_trip(tmp_path, capsys):
    np.save(tmp_path / "x.npy", np.random.default_rng(1).normal(size=(40, 2)).astype(np.float32))
    url = f"sqlite:///{tmp_path}/s.db"
    spec = load_spec(_spec(tmp_path))
    study = run_study(spec, storage=url, progress=False)
    best = min(study.trials, key=lambda t: t.value)
    assert _weights_files(tmp_path / "s_artifacts") == 2  # keep_models = 2 of 3 trials

    out = tmp_path / "out" / "best.pt"
    assert main(["export", "--study", "own", "--storage", url, "--out", str(out)]) == 0
    sd = torch.load(out, weights_only=True)
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["trial"] == best.number and meta["config"] == best.user_attrs["config"]
    assert meta["bound"] == pytest.approx(best.value)
    cfg = DiffusionConfig(**meta["config"])
    model = build_score_model(
        tuple(meta["shape"]), width=cfg.width, layers=cfg.layers, channels=cfg.channels
    )
    model.load_state_dict(sd)
    want = _samples_of(model, cfg, (2,), seed=7, n=5)

    npy = tmp_path / "s.npy"
    argv = ["sample", "--study", "own", "--storage", url, "--n", "5", "--seed", "7"]
    assert main([*argv, "--out", str(npy)]) == 0
    np.testing.assert_array_equal(np.load(npy), want.numpy())
    tm = load_model("own", storage=url)
    assert torch.equal(tm.sample(5, seed=7), want)
    capsys.readouterr()
    # a .png grid needs images; a trial without kept weights; one line each, exit 2
    assert main([*argv, "--out", str(tmp_path / "s.png")]) == 2
    worst = max(study.trials, key=lambda t: t.value).number
    assert main([*argv, "--trial", str(worst), "--out", str(npy)]) == 2
    assert main([*argv, "--trial", "99", "--out", str(npy)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(e.startswith("bound-tuner: error:") for e in err)
    assert "image data" in err[0] and "weights were not kept" in err[1]
    assert "no trial 99" in err[2]
    assert not (tmp_path / "s.png").exists()


def test_tampered_and_truncated_weights(tmp_path, capsys):
    np.save(tmp_path / "x.npy", np.random.default_rng(1).normal(size=(40, 2)).astype(np.float32))
    url = f"sqlite:///{tmp_path}/s.db"
    study = run_study(load_spec(_spec(tmp_path, keep=1)), storage=url, progress=False)
    best = min(study.trials, key=lambda t: t.value)
    path = tmp_path / "s_artifacts" / best.user_attrs[ATTR_ID]
    good = path.read_bytes()
    out = tmp_path / "m.pt"
    argv = ["export", "--study", "own", "--storage", url, "--out", str(out)]
    for bad in (good[: len(good) // 2], good[:-40] + bytes(40), b""):
        path.write_bytes(bad)
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "does not match the digest" in err
        assert not out.exists()
    path.write_bytes(good)
    assert main(argv) == 0
    # a weights file with no digest to check is still read with weights_only=True: a pickled
    # object that is not plain data is refused
    evil = tmp_path / "evil.pt"
    torch.save({"format": 1, "obj": optuna.distributions.FloatDistribution(0, 1)}, evil)
    with pytest.raises(ArtifactError, match="not a readable weights file"):
        read_weights(evil, expected_sha256=None, what="evil.pt")
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(good[:100])
    with pytest.raises(ArtifactError, match="not a readable weights file"):
        read_weights(trunc, expected_sha256=None, what="trunc.pt")


def test_image_study_sample_png(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(10):
        Image.fromarray(rng.integers(0, 256, size=(8, 8), dtype=np.uint8)).save(folder / f"{i}.png")
    url = f"sqlite:///{tmp_path}/i.db"
    spec = load_spec(_spec(tmp_path, name="img", path="imgs", steps=3, arch="channels = 8", keep=1))
    run_study(spec, storage=url, progress=False, n_trials=1)
    png = tmp_path / "grid.png"
    argv = ["sample", "--study", "img", "--storage", url, "--n", "16", "--out", str(png)]
    assert main([*argv, "--steps", "3"]) == 0
    assert Image.open(png).size == (8 * 8 + 9 * 2, 2 * 8 + 3 * 2)  # 8 per row, 2-pixel gaps
    tm = load_model("img", storage=url)
    x = tm.sample(4, seed=0, n_steps=3)
    assert x.shape == (4, 1, 8, 8) and 0 <= x.min() and x.max() <= 1
    assert tm.data["preprocess"].startswith("symmetric")


def test_vae_weights_round_trip(tmp_path):
    x = (torch.rand(24, 16, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    data = load_dataset("tensors", train=x, test_fraction=0.25)
    store = FileSystemArtifactStore(str(tmp_path))
    models = {}

    def hook(trial, res):
        models[trial.number] = res.model

    obj = VAEObjective(
        data,
        search={"latent": 2},
        base=VAEConfig(epochs=1, batch_size=8),
        hidden=(8,),
        on_result=hook,
        artifact_store=store,
    )
    study = optuna.create_study(storage=f"sqlite:///{tmp_path}/v.db")
    study.optimize(obj, n_trials=1)
    tm = load_model(study, 0)
    assert tm.kind == "vae" and tm.schedule is None
    z = torch.randn(3, 2, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = torch.sigmoid(models[0].decode(z))
    assert torch.allclose(tm.sample(3, seed=5), want)


def test_objective_keeps_base_schedule():
    data = load_dataset("swiss_roll", m=8, seed=0, test_size=8)
    base = DiffusionConfig(schedule="cosine", schedule_params={"s": 0.02})
    obj = DiffusionObjective(data, search={"T": (0.2, 0.8)}, base=base)
    trial = optuna.create_study().ask()
    cfg = obj.config_for(trial)
    assert cfg.schedule == "cosine" and cfg.schedule_params == {"s": 0.02}
    # a searched parameter of the base schedule overrides the base value
    obj = DiffusionObjective(data, search={"T": 0.5, "cosine_s": [0.05]}, base=base)
    cfg = obj.config_for(optuna.create_study().ask())
    assert cfg.schedule == "cosine" and cfg.schedule_params == {"s": 0.05}


from worker_spec import PG_URL, pg_storage  # noqa: E402


@pytest.mark.skipif(not PG_URL, reason="BOUND_TUNER_TEST_PG_URL is unset")
def test_postgres_study_with_named_artifact_folder(tmp_path, monkeypatch):
    np.save(tmp_path / "x.npy", np.random.default_rng(2).normal(size=(30, 2)).astype(np.float32))
    art = tmp_path / "shared_artifacts"
    monkeypatch.setenv("BOUND_TUNER_ARTIFACTS", str(art))
    name = f"own-{uuid.uuid4().hex[:8]}"
    spec = load_spec(_spec(tmp_path, name=name, keep=1))
    try:
        study = run_study(spec, storage=PG_URL, progress=False, n_trials=2)
        best = min(study.trials, key=lambda t: t.value)
        assert _weights_files(art) == 1
        out = tmp_path / "pg.pt"
        assert main(["export", "--study", name, "--storage", PG_URL, "--out", str(out)]) == 0
        assert json.loads(out.with_suffix(".json").read_text())["trial"] == best.number
    finally:
        optuna.delete_study(study_name=name, storage=pg_storage())


def test_weights_are_kept_without_the_dashboard(tmp_path):
    np.save(tmp_path / "x.npy", np.random.default_rng(0).normal(size=(40, 2)).astype("float32"))
    url = f"sqlite:///{tmp_path}/nodash.db"
    study = run_study(
        load_spec(_spec(tmp_path, name="nodash", keep=1)),
        storage=url,
        progress=False,
        dashboard=False,
    )
    art = tmp_path / "nodash_artifacts"
    assert _weights_files(art) == 1  # the best trial's weights, and no sample images
    assert sum(1 for _ in art.iterdir()) == 1
    assert load_model(study, "best").trial == study.best_trial.number
