import json
import math

import optuna
import pytest

from bound_tuner.cli import main
from bound_tuner.config.schema import SpecError
from bound_tuner.config.spec import load_spec, parse_spec
from bound_tuner.maths.bounds.report import flat_attrs
from bound_tuner.study import run_study

TERMS = (
    "bound.total",
    "bound.train_loss",
    "bound.encoder_mixture_kl",
    "bound.prior_kl_sqrt",
    "bound.generator_info",
    "bound.R",
    "bound.L_hat",
    "bound.m",
    "bound.d",
    "bound.T",
)


def test_end_to_end_grid_study_with_validation(tiny_spec, tmp_path):
    url = f"sqlite:///{tmp_path}/s.db"
    spec = load_spec(tiny_spec(validation="true"))
    study = run_study(spec, storage=url, progress=False)
    trials = study.get_trials()
    assert len(trials) == 3 and all(t.state.name == "COMPLETE" for t in trials)
    assert sorted(t.params["T"] for t in trials) == [0.3, 0.6, 0.9]
    for t in trials:
        ua = flat_attrs(t.user_attrs)
        for key in TERMS:
            assert key in ua, key
        assert t.value == pytest.approx(ua["bound.total"])
        k = math.sqrt(2) * ua["bound.R"]
        expect = (
            ua["bound.train_loss"]
            - ua["bound.encoder_mixture_kl"]
            + k * (ua["bound.prior_kl_sqrt"] + math.sqrt(ua["bound.generator_info"]))
        )
        assert t.value == pytest.approx(expect, rel=1e-9)
        assert ua["bound.m"] == 32 and ua["bound.d"] == 2 and ua["bound.T"] == t.params["T"]
        # held-out metrics recorded, never the value
        assert math.isfinite(ua["heldout.test_kl"]) and ua["heldout.denoising_loss"] > 0
    assert study.metric_names == ["generalization bound"]


def test_resume_continues_instead_of_restarting(tiny_spec, tmp_path):
    url = f"sqlite:///{tmp_path}/r.db"
    path = tiny_spec(sampler="random", T="{ low = 0.2, high = 0.9 }", n_trials=4)
    spec = load_spec(path)
    run_study(spec, storage=url, n_trials=2, progress=False)
    study = run_study(spec, storage=url, progress=False)
    nums = [t.number for t in study.get_trials()]
    assert nums == [0, 1, 2, 3]
    again = run_study(spec, storage=url, progress=False)  # already complete: nothing new
    assert len(again.get_trials()) == 4
    assert len(optuna.get_all_study_summaries(url)) == 1


def test_nan_trial_fails_with_reason_and_study_goes_on(tiny_spec, tmp_path):
    url = f"sqlite:///{tmp_path}/n.db"
    # a learning rate of 1e30 overflows the weights at once
    path = tiny_spec(sampler="grid", T="0.5", lr="{ grid = [1e30, 0.003] }", n_trials=2)
    study = run_study(load_spec(path), storage=url, progress=False)
    by_lr = {t.params["lr"]: t for t in study.get_trials()}
    bad, good = by_lr[1e30], by_lr[0.003]
    assert bad.state.name == "FAIL"
    assert "non-finite" in bad.user_attrs["fail_reason"]
    assert good.state.name == "COMPLETE" and math.isfinite(good.value)


def test_pruning_reports_partial_bounds_and_prunes(tiny_spec, tmp_path):
    url = f"sqlite:///{tmp_path}/p.db"
    # identical configurations but the first trial is good and later ones are made bad by a
    # tiny learning rate: the median pruner stops them at a checkpoint
    path = tiny_spec(
        sampler="grid",
        T="0.5",
        lr="{ grid = [0.003, 1e-9, 1e-9] }",
        n_trials=3,
        steps=40,
        checkpoints=3,
        pruner="median",
    )
    study = run_study(load_spec(path), storage=url, progress=False)
    trials = study.get_trials()
    assert all(len(t.intermediate_values) >= 1 for t in trials)
    assert sorted(next(iter(t.intermediate_values)) for t in trials)[0] == 10
    states = {t.params["lr"]: [] for t in trials}
    for t in trials:
        states[t.params["lr"]].append(t.state.name)
    assert states[0.003] == ["COMPLETE"]
    assert "PRUNED" in states[1e-9]


def test_report_json_schema_and_plot(tiny_spec, tmp_path, capsys):
    url = f"sqlite:///{tmp_path}/j.db"
    assert main(["run", str(tiny_spec(validation="true")), "--storage", url, "--quiet"]) == 0
    capsys.readouterr()
    png = tmp_path / "plot.png"
    assert (
        main(
            ["report", "--study", "tiny", "--storage", url, "--format", "json", "--plot", str(png)]
        )
        == 0
    )
    out = capsys.readouterr()
    data = json.loads(out.out)
    assert isinstance(data, list) and len(data) == 3
    for t in data:
        assert set(t) == {"number", "state", "params", "value", "user_attrs"}
        assert t["state"] == "COMPLETE" and isinstance(t["value"], float)
        assert "bound.generator_info" in t["user_attrs"]
        assert "heldout.test_kl" in t["user_attrs"]
    assert png.stat().st_size > 10_000
    assert "Spearman rho" in out.err
    assert main(["report", "--study", "tiny", "--storage", url]) == 0
    table = capsys.readouterr().out
    assert "C_mix" in table and "test_kl" in table and "Spearman" in table


def _bad(raw_update, section, key, value):
    raw = {"study": {"name": "x"}, "search": {"T": {"low": 0.2, "high": 0.8}}}
    raw.setdefault(section, {})[key] = value
    raw.update(raw_update)
    return raw


@pytest.mark.parametrize(
    "raw,match",
    [
        (_bad({}, "data", "colour", 1), "unknown key 'colour' in \\[data\\]"),
        (_bad({}, "data", "m", "many"), "data.m = 'many' must be an integer"),
        (_bad({}, "data", "name", "cifar"), "data.name = 'cifar' is an unknown data set"),
        (_bad({}, "sampler", "type", "cma"), "sampler.type = 'cma' is unknown"),
        (_bad({}, "pruner", "type", "magic"), "pruner.type = 'magic' is unknown"),
        (_bad({}, "bound", "R", -1.0), "bound.R = -1.0 must be positive"),
        (_bad({}, "study", "model", "gan"), "study.model = 'gan' is unknown"),
        (
            _bad({}, "search", "schedule", {"choices": ["linear", "sigmoid"]}),
            "unknown schedule 'sigmoid'",
        ),
        (
            _bad(
                {
                    "search": {
                        "T": {"low": 0.2, "high": 1.2},
                        "schedule": {"choices": ["linear", "cosine"]},
                    }
                },
                "study",
                "seed",
                0,
            ),
            "search.T reaches 1.2, outside the cosine schedule's range",
        ),
        (_bad({}, "search", "T", {"low": 0.0, "high": 1.0}), "not above t_min"),
        (_bad({}, "search", "T", {"low": 0.8, "high": 0.2}), "low=0.8 must be below high=0.2"),
        (_bad({}, "search", "depth", 3), "unknown search parameter 'depth'"),
        (_bad({"extra": {}}, "study", "seed", 1), "unknown section \\[extra\\]"),
        (_bad({}, "sampler", "type", "grid"), "needs a list"),
    ],
)
def test_bad_specs_name_field(raw, match):
    with pytest.raises(SpecError, match=match):
        parse_spec(raw)


def test_cli_bad_inputs_exit_2_one_line_and_no_study(tiny_spec, tmp_path, capsys):
    url = f"sqlite:///{tmp_path}/b.db"
    cases = []
    bad_spec = tmp_path / "bad.toml"
    bad_spec.write_text(tiny_spec().read_text().replace("[data]", "[data]\nmm = 3"))
    cases.append(["run", str(bad_spec), "--storage", url])
    cases.append(
        [
            "run",
            str(tiny_spec(name="cos", T="{ grid = [0.5, 1.5] }", schedule='"cosine"')),
            "--storage",
            url,
        ]
    )
    cases.append(["run", str(tmp_path / "missing.toml"), "--storage", url])
    syntax = tmp_path / "syntax.toml"
    syntax.write_text("[study\nname=")
    cases.append(["run", str(syntax), "--storage", url])
    good = str(tiny_spec())
    cases.append(["run", good, "--storage", "not a url"])
    cases.append(["run", good, "--storage", "mysql+nodriver://u@h/db"])
    cases.append(["run", good, "--storage", "postgresql://nobody@127.0.0.1:1/none"])
    cases.append(["run", good, "--storage", f"sqlite:///{tmp_path}/no/such/dir/x.db"])
    cases.append(["run", good, "--storage", "sqlite:////proc/bound_tuner.db"])  # unwritable
    cases.append(["run", good, "--storage", url, "--n-trials", "0"])
    cases.append(["report", "--study", "nope", "--storage", url])
    for argv in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("bound-tuner: error: ") and "\n" not in err, (argv, err)
    assert optuna.get_all_study_summaries(url) == []


def test_unknown_data_set_in_file_exits_2(tiny_spec, capsys, tmp_path):
    p = tiny_spec()
    p.write_text(p.read_text().replace('name = "swiss_roll"', 'name = "imagenet"'))
    assert main(["run", str(p), "--storage", f"sqlite:///{tmp_path}/d.db"]) == 2
    assert "data.name = 'imagenet' is an unknown data set" in capsys.readouterr().err


def test_default_storage_and_env_override(tiny_spec, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("BOUND_TUNER_STORAGE", raising=False)
    spec = load_spec(tiny_spec(n_trials=1, T="0.5"))
    run_study(spec, progress=False)
    assert (tmp_path / "bound_tuner.db").exists()
    monkeypatch.setenv("BOUND_TUNER_STORAGE", f"sqlite:///{tmp_path}/env.db")
    run_study(spec, progress=False)
    assert (tmp_path / "env.db").exists()


def test_shipped_specs_parse():
    from pathlib import Path

    for p in sorted(Path(__file__).parent.parent.glob("studies/*.toml")):
        spec = load_spec(p)
        assert spec.name and spec.search
