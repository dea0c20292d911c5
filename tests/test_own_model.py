"""Your own score network in the built-in objective, and ``score`` for a model trained elsewhere
(docs/own_models.md)."""

import dataclasses
import textwrap

import optuna
import pytest
import torch
from optuna.artifacts import FileSystemArtifactStore
from torch import nn

import bound_tuner.training.diffusion as training_diffusion
from bound_tuner.config.fingerprint import fingerprint
from bound_tuner.config.schema import SpecError
from bound_tuner.config.spec import load_spec, parse_spec
from bound_tuner.data import load_dataset
from bound_tuner.evaluation.experiment import score_model
from bound_tuner.evaluation.scoring import score
from bound_tuner.maths.bounds.report import flat_attrs
from bound_tuner.maths.sde import get_schedule
from bound_tuner.objectives.diffusion import DiffusionObjective
from bound_tuner.objectives.factory import build_objective
from bound_tuner.storage.exports import export_model
from bound_tuner.storage.trained import load_model
from bound_tuner.study import run_study
from bound_tuner.training.config import DiffusionConfig
from bound_tuner.training.diffusion import train_fold_models, train_model

# tiny settings: a trial trains in well under a second on one CPU core
BASE = DiffusionConfig(
    steps=20,
    batch_size=8,
    width=16,
    lr=3e-3,
    n_steps=10,
    n_paths=16,
    train_draws=4,
)


class OwnNet(nn.Module):
    """A user's score network: the point and a learned embedding of t, added, then an MLP."""

    def __init__(self, dim: int, width: int) -> None:
        super().__init__()
        self.inp = nn.Linear(dim, width)
        self.time = nn.Linear(1, width)
        self.out = nn.Sequential(
            nn.SiLU(), nn.Linear(width, width), nn.SiLU(), nn.Linear(width, dim)
        )

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.out(self.inp(x) + self.time(t.reshape(-1, 1).to(x.dtype)))


class Unpackable(OwnNet):
    """The same network with data-dependent Python control flow, which torch.func cannot vmap."""

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if bool((t > 100).any()):
            t = t.clamp(max=100)
        return super().forward(x, t)


def own_net(config, data_shape):
    return OwnNet(data_shape[0], config.width)


def unpackable_net(config, data_shape):
    return Unpackable(data_shape[0], config.width)


def not_a_module(config, data_shape):
    return "a string"


@pytest.fixture(scope="module")
def data():
    return load_dataset("swiss_roll", m=20, seed=0, test_size=10)


def _one_trial(objective, tmp_path=None):
    storage = None if tmp_path is None else f"sqlite:///{tmp_path}/own.db"
    study = optuna.create_study(storage=storage, study_name="own")
    study.optimize(objective, n_trials=1)
    return study


def test_own_module_through_python_with_kfold_references_and_artifacts(data, tmp_path):
    """DiffusionObjective(model=factory): the trial trains the user's module, checkpoints
    report partial bounds, the default bound trains its K-fold references with it (one pack),
    the trial records the factory's name, and load_model rebuilds the module from the kept
    weights; export writes them."""
    seen = {}
    store = FileSystemArtifactStore(str(tmp_path / "art"))
    (tmp_path / "art").mkdir()
    obj = DiffusionObjective(
        data,
        search={"T": 0.5},
        base=BASE,
        checkpoints=1,
        artifact_store=store,
        model=own_net,
        on_result=lambda trial, res: seen.update(model=res.model),
    )
    study = _one_trial(obj, tmp_path)
    trial = study.best_trial
    assert trial.user_attrs["config"]["model"] == "test_own_model:own_net"
    assert flat_attrs(trial.user_attrs)["bound.variant"] == "elbo-kfold"
    assert (
        flat_attrs(trial.user_attrs)["bound.folds"] == 5
        and flat_attrs(trial.user_attrs)["bound.C_fold"] >= 0
    )
    assert isinstance(seen["model"], OwnNet)
    tm = load_model(study, "best")
    assert isinstance(tm.model, OwnNet)
    for a, b in zip(tm.model.state_dict().values(), seen["model"].state_dict().values()):
        torch.testing.assert_close(a.cpu(), b.cpu())
    assert tm.sample(4, n_steps=5).shape == (4, 2)
    assert export_model(tm, tmp_path / "w.pt").exists()


def test_own_module_through_the_spec(tmp_path):
    """[model] factory = "package.module:function" in a spec: trials build that module (two
    trials in one vmapped pack) and record its name; the name is part of the spec's
    fingerprint; bad entries are refused in one line."""
    text = textwrap.dedent(
        """
        [study]
        name = "own-spec"
        n_trials = 2
        [data]
        name = "swiss_roll"
        m = 20
        test_size = 10
        [search]
        T = 0.5
        [training]
        steps = 10
        batch_size = 8
        width = 12
        checkpoints = 0
        pack = 2
        [bound]
        variant = "elbo"
        N = 8
        max_sample_scale = 1000.0  # tiny models sampled in a few steps spread their samples
        n_paths = 8
        train_draws = 2
        [model]
        factory = "FACTORY"
        """
    )
    path = tmp_path / "own.toml"
    path.write_text(text.replace("FACTORY", "test_own_model:own_net"))
    spec = load_spec(path)
    assert spec.factory == "test_own_model:own_net"
    assert fingerprint(spec)["model.factory"] == "test_own_model:own_net"
    study = run_study(spec, storage=f"sqlite:///{tmp_path}/s.db", progress=False, dashboard=False)
    trials = study.get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE"] * 2
    assert sorted(t.user_attrs["worker"][-5:] for t in trials) == ["[1/2]", "[2/2]"]
    for trial in trials:
        assert trial.user_attrs["config"]["model"] == "test_own_model:own_net"
        assert trial.user_attrs["config"]["width"] == 12

    for factory, match in (
        ("no_colon", "package.module:function"),
        ("no_such_module_xyz:f", "cannot import"),
        ("test_own_model:not_a_module", "not a torch.nn.Module"),
    ):
        path.write_text(text.replace("FACTORY", factory))
        with pytest.raises(SpecError, match=match) as e:
            build_objective(load_spec(path))
        assert "\n" not in str(e.value)
    vae = {
        "study": {"name": "v", "model": "vae"},
        "data": {"name": "fashion_mnist", "m": 32, "binarize": "fixed"},
        "model": {"factory": "test_own_model:own_net"},
    }
    with pytest.raises(SpecError, match="model.factory"):
        parse_spec(vae)


def test_unpackable_module_refused_for_packs_and_trained_alone(data):
    """A module torch.func cannot vmap is refused for pack > 1 in one line; with pack = 1 the
    default bound trains its K-fold references one after another and evaluates them one by one."""
    with pytest.raises(SpecError, match=r"pack = 1") as e:
        DiffusionObjective(data, search={"T": 0.5}, base=BASE, model=unpackable_net, pack=2)
    assert "\n" not in str(e.value) and "unpackable_net" in str(e.value)
    obj = DiffusionObjective(
        data, search={"T": 0.5}, base=BASE, model=unpackable_net, checkpoints=0
    )
    trial = _one_trial(obj).best_trial
    assert flat_attrs(trial.user_attrs)["bound.variant"] == "elbo-kfold"
    assert flat_attrs(trial.user_attrs)["bound.C_fold"] >= 0 and trial.value == trial.value


def test_references_trained_alone_equal_the_pack(data, monkeypatch):
    """The K-fold references of a module that cannot be packed are trained one by one with the
    draws a pack gives its members: for a packable module both ways end at the same weights."""
    cfg = dataclasses.replace(BASE, T=0.5, model=own_net)
    x = data.train
    packed, folds = train_fold_models(x, cfg)
    monkeypatch.setattr(training_diffusion, "pack_refusal", lambda cfg, shape: "not packable")
    alone, folds2 = train_fold_models(x, cfg)
    assert torch.equal(folds, folds2)
    for a, b in zip(packed, alone):
        for p, q in zip(a.parameters(), b.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


def test_score_of_a_plain_user_loop_equals_the_trial_report(data):
    """score() on a model trained by a plain loop returns the report a trial computes for the
    same weights and evaluation draws (experiment.score_model, what the objective calls)."""
    x = data.train
    torch.manual_seed(0)
    model = OwnNet(2, 16)
    sched = get_schedule("linear")
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(30):  # the user's own loop: eps-prediction, t ~ U(1e-3, T)
        t = 1e-3 + (0.5 - 1e-3) * torch.rand(x.shape[0], dtype=torch.float64)
        eps = torch.randn_like(x)
        a = sched.alpha(t).float()[:, None]
        s = sched.sigma2(t).sqrt().float()[:, None]
        loss = 0.5 * (model(a * x + s * eps, t.float()) - eps).pow(2).sum(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    report = score(
        model, x, schedule="linear", T=0.5, variant="elbo", n_steps=10, n_paths=16, train_draws=4
    )
    cfg = dataclasses.replace(BASE, T=0.5, variant="elbo", eval_seed=0)
    trial = score_model(model, sched, [], x, cfg).report
    assert report.user_attrs() == trial.user_attrs()
    assert report.extras["total_upper95"] > report.total
    with pytest.raises(ValueError, match="train_fn"):
        score(model, x, schedule="linear", T=0.5)  # elbo-kfold needs its references


def test_score_with_train_fn_equals_the_kfold_trial(data):
    """score(..., train_fn=...) with a train_fn that trains a reference as the trial did gives
    the trial's default ("elbo-kfold") value: the same folds, references and draws."""
    seen = {}
    obj = DiffusionObjective(
        data,
        search={"T": 0.6},
        base=BASE,
        model=own_net,
        checkpoints=0,
        study_seed=3,
        on_result=lambda trial, res: seen.update(model=res.model),
    )
    trial = _one_trial(obj).best_trial
    cfg = DiffusionConfig(**trial.user_attrs["config"])

    def train_fn(points: torch.Tensor) -> nn.Module:
        return train_model(points, cfg)[0]

    report = score(
        seen["model"],
        obj.data.train,
        schedule=get_schedule(cfg.schedule, **cfg.schedule_params),
        T=cfg.T,
        train_fn=train_fn,
        n_steps=cfg.n_steps,
        n_paths=cfg.n_paths,
        train_draws=cfg.train_draws,
        seed=3,
    )
    assert report.settings["variant"] == "elbo-kfold"
    assert report.total == pytest.approx(trial.value, rel=1e-4)
    assert report.settings["C_fold"] == pytest.approx(
        flat_attrs(trial.user_attrs)["bound.C_fold"], rel=1e-3
    )
    assert report.extras["total_upper95"] == pytest.approx(
        trial.user_attrs["bound.total_upper95"], rel=1e-4
    )
