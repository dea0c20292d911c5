"""Multi-objective studies (fit, generalization, cost), constraints, the end-of-run summary and
``run --validate``: tiny Swiss-roll studies of a second or two a trial (the "elbo" variant, no
reference models)."""

from __future__ import annotations

import json
import math
import re
import textwrap
from pathlib import Path

import optuna
import pytest

from bound_tuner.cli import main
from bound_tuner.config.objective_names import (
    OBJECTIVES,
    ObjectiveValues,
    constraints_func,
    directions,
    metric_names,
    value_of,
)
from bound_tuner.config.schema import SpecError
from bound_tuner.config.spec import load_spec, parse_spec
from bound_tuner.dashboard.charts import CHART_PARETO, study_figures
from bound_tuner.dashboard.report import trials_json
from bound_tuner.maths.bounds.diffusion import assemble_kfold_bound
from bound_tuner.maths.bounds.report import flat_attrs
from bound_tuner.study import run_study

SPEC = """
[study]
name = "{name}"
n_trials = {n_trials}
seed = 0
{study_extra}

[data]
name = "swiss_roll"
m = 32
test_size = 64

[search]
T = {{ low = 0.2, high = 0.9 }}
width = {width}
lr = 0.003

[training]
steps = 15
batch_size = 32
checkpoints = {checkpoints}

[bound]
variant = "elbo"
N = 10
max_sample_scale = 1000.0  # tiny models sampled in a few steps spread their samples
n_paths = 8
train_draws = 2
heldout_samples = 200
heldout_steps = 20

[sampler]
type = "{sampler}"
{sampler_extra}
{pruner}
"""


def write_spec(folder: Path, name: str, **kw) -> Path:
    vals = {
        "name": name,
        "n_trials": 4,
        "study_extra": "",
        "width": "{ choices = [8, 24] }",
        "checkpoints": 0,
        "sampler": "tpe",
        "sampler_extra": "",
        "pruner": "",
    }
    vals.update(kw)
    path = folder / f"{name}.toml"
    path.write_text(textwrap.dedent(SPEC.format(**vals)))
    return path


def _values_match_user_attrs(study: optuna.Study, names: list[str]) -> None:
    done = [t for t in study.get_trials() if t.state.name == "COMPLETE"]
    assert done
    for t in done:
        assert len(t.values) == len(names)
        for name, v in zip(names, t.values, strict=True):
            assert v == pytest.approx(value_of(name, t.user_attrs)), name
        ua = t.user_attrs
        assert ua["train_seconds"] > 0 and ua["parameters"] > 0
        # fit and generalization split the bound: the training NELBO and what the bound adds
        assert value_of("fit", ua) == pytest.approx(ua["bound.train_nelbo"])
        assert value_of("fit", ua) + value_of("generalization", ua) == pytest.approx(
            ua["bound.total"]
        )


def test_every_objective_name_through_the_cli_and_python(tmp_path, capsys):
    url = f"sqlite:///{tmp_path}/mo.db"
    names = ["bound", "fit", "generalization"]
    path = write_spec(tmp_path, "cli", study_extra=f"objectives = {json.dumps(names)}")
    assert main(["run", str(path), "--storage", url, "--quiet"]) == 0
    out = capsys.readouterr().out
    study = optuna.load_study(study_name="cli", storage=url)
    assert study.directions == [optuna.study.StudyDirection.MINIMIZE] * 3
    assert study.metric_names == metric_names(names)
    _values_match_user_attrs(study, names)
    assert "Pareto set:" in out and "--trial " in out

    # the other two names from Python: run_study(objectives=...) on a single-objective spec
    spec = load_spec(write_spec(tmp_path, "py", n_trials=3))
    assert spec.objectives == ("bound",) and spec.keep_models == 5
    study = run_study(
        spec,
        storage=url,
        progress=False,
        dashboard=False,
        objectives=["train_seconds", "parameters"],
    )
    _values_match_user_attrs(study, ["train_seconds", "parameters"])
    assert study.metric_names == ["train seconds", "parameters"]
    by_width = {t.params["width"]: t.values[1] for t in study.get_trials()}
    assert by_width.get(8, 0) < by_width.get(24, math.inf)  # a wider MLP has more parameters
    assert set(OBJECTIVES) == {"bound", "fit", "generalization", "train_seconds", "parameters"}
    # the spec's own study cannot change its objectives afterwards: one line
    assert main(["run", str(tmp_path / "py.toml"), "--storage", url, "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "optimizes train seconds, parameters" in err and "\n" not in err


def test_heldout_objectives_need_validation_and_a_wrapped_objective_reads_user_attrs():
    raw = {
        "study": {"name": "h", "objectives": ["bound", "heldout.sample_kl"]},
        "search": {"T": {"low": 0.2, "high": 0.8}},
    }
    with pytest.raises(SpecError, match="validation mode only"):
        parse_spec(raw)
    raw["study"]["validation"] = True
    assert parse_spec(raw).objectives == ("bound", "heldout.sample_kl")
    assert directions(["fit", "heldout.sample_kl"]) == ["minimize", "minimize"]

    class Trial:  # what ObjectiveValues reads and writes of an optuna.Trial
        user_attrs = {"bound.total": 3.0, "bound.train_nelbo": 2.5, "heldout.sample_kl": 0.2}

        def set_user_attr(self, key, value):
            self.user_attrs[key] = value

    wrapped = ObjectiveValues(lambda trial: 3.0, ["generalization", "heldout.sample_kl"])
    assert wrapped(Trial()) == pytest.approx((0.5, 0.2))
    missing = ObjectiveValues(lambda trial: 3.0, ["bound", "train_seconds"])
    trial = Trial()
    assert all(math.isnan(v) for v in missing(trial))
    assert "'train_seconds' has no finite value" in trial.user_attrs["fail_reason"]


@pytest.mark.parametrize(
    "study_extra,extra,match",
    [
        ('objectives = ["fit"]', "", "optimizes the bound alone"),
        ('objectives = ["fit", "speed"]', "", "unknown 'speed'"),
        ('objectives = ["fit", "fit"]', "", "twice"),
        ('objectives = ["bound", "fit"]', '[pruner]\ntype = "median"', "does not prune"),
        ("constraints = { train_seconds = 60 }", "", None),
        ("constraints = { seconds = 60 }", "", "unknown 'seconds'"),
    ],
)
def test_bad_objectives_and_constraints_are_refused_in_one_line(
    tmp_path, study_extra, extra, match
):
    text = write_spec(tmp_path, "bad", study_extra=study_extra).read_text() + extra
    path = tmp_path / "bad.toml"
    path.write_text(text)
    if match is None:
        assert load_spec(path).constraints == {"train_seconds": 60.0}
        random = path.read_text().replace('type = "tpe"', 'type = "random"')
        path.write_text(random)
        match = "need a sampler that takes constraints"
    with pytest.raises(SpecError, match=match) as e:
        load_spec(path)
    assert "\n" not in str(e.value)


def test_a_constraint_marks_infeasible_trials_in_the_report_and_the_front(tmp_path, capsys):
    """A parameter budget between the two MLP widths: the wide ones are infeasible, every
    time (a train_seconds budget works the same way but depends on the machine)."""
    url = f"sqlite:///{tmp_path}/c.db"
    extra = 'objectives = ["fit", "generalization"]\nconstraints = { parameters = 400 }'
    path = write_spec(tmp_path, "con", study_extra=extra, n_trials=6)
    assert main(["run", str(path), "--storage", url, "--quiet"]) == 0
    capsys.readouterr()
    study = optuna.load_study(study_name="con", storage=url)
    trials = study.get_trials()
    widths = {t.params["width"] for t in trials}
    assert widths == {8, 24}, "both widths drawn"
    for t in trials:
        (c,) = t.constraints.values()
        assert c == pytest.approx(t.user_attrs["parameters"] - 400)
        assert (c <= 0) == (t.params["width"] == 8)
    front = {t.number for t in study.best_trials}
    assert front and all(t.params["width"] == 8 for t in study.best_trials)
    rows = trials_json(study)
    assert {r["number"] for r in rows if r["pareto"]} == front
    assert [r["feasible"] for r in rows] == [t.params["width"] == 8 for t in trials]

    assert main(["report", "--study", "con", "--storage", url]) == 0
    out = capsys.readouterr().out
    bad = [t.number for t in trials if t.params["width"] == 24]
    assert (
        f"infeasible (over the [study] constraints, left out of the set): {', '.join(map(str, bad))}"
        in out
    )
    assert "feasible" in out and "fit ↓" in out and "generalization ↓" in out

    fig = study_figures(rows)[CHART_PARETO]
    names = [tr.name for tr in fig.data]
    assert "infeasible (over the constraints)" in names and "Pareto front" in names
    infeasible = next(tr for tr in fig.data if tr.name.startswith("infeasible"))
    assert len(infeasible.x) == len(bad)

    # the budget of the shipped example: train_seconds from the user attr the objective stored
    check = constraints_func({"train_seconds": 60})
    assert check(trials[0]) == [pytest.approx(trials[0].user_attrs["train_seconds"] - 60)]


def test_report_lists_the_pareto_set_and_export_takes_a_trial(tmp_path, capsys):
    url = f"sqlite:///{tmp_path}/p.db"
    path = write_spec(tmp_path, "par", study_extra='objectives = ["fit", "generalization"]')
    assert main(["run", str(path), "--storage", url, "--quiet"]) == 0
    capsys.readouterr()
    study = optuna.load_study(study_name="par", storage=url)
    front = sorted(t.number for t in study.best_trials)
    assert main(["report", "--study", "par", "--storage", url]) == 0
    out = capsys.readouterr().out
    section = out[out.index("Pareto set:") :]
    assert f"Pareto set: {len(front)} of 4 complete trials" in section
    listed = [int(line.split()[0]) for line in section.splitlines()[2:] if line[:1].isdigit()]
    assert sorted(listed) == front
    assert main(["report", "--study", "par", "--storage", url, "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert sorted(t["number"] for t in data if t["pareto"]) == front
    assert all(set(t["values"]) == {"fit", "generalization"} for t in data)

    # no single best trial: export and sample ask for --trial N, and take it
    out_pt = tmp_path / "m.pt"
    assert main(["export", "--study", "par", "--storage", url, "--out", str(out_pt)]) == 2
    err = capsys.readouterr().err.strip()
    assert "no single best trial; give --trial N" in err and "\n" not in err
    argv = ["--study", "par", "--storage", url, "--trial", str(front[0])]
    assert main(["export", *argv, "--out", str(out_pt)]) == 0
    assert f"trial {front[0]} (bound " in capsys.readouterr().out and out_pt.exists()
    assert main(["sample", *argv, "--n", "16", "--out", str(tmp_path / "s.npy")]) == 0


def _summary_rows(out: str) -> list[list[str]]:
    """The rows of the contributions table of a run's summary (header first)."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if "add up to" in line) + 1
    rows = []
    for line in lines[start:]:
        if not re.match(r"\s*(#|\d+\s)", line):
            break
        rows.append(line)
    return rows


def test_the_summary_says_the_unit_and_its_columns_add_up_to_the_bound(tmp_path, capsys):
    url = f"sqlite:///{tmp_path}/s.db"
    path = write_spec(tmp_path, "sum", n_trials=3)
    argv = ["run", str(path), "--storage", url, "--quiet"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    study = optuna.load_study(study_name="sum", storage=url)
    best = study.best_trial
    assert f"best trial #{best.number} (" in out
    assert "nats per training point; lower is better" in out
    header, row = _summary_rows(out)
    # the elbo variant's generator term is Girsanov's I_gir (docs/theory.md 2.6), not I_gen
    assert "√2 R · √I_gir" in header and "I_gen" not in out
    assert "NELBO_train" in header and header.rstrip().endswith("= score")
    cells = row.split()
    contributions = [float(c) for c in cells if c[0] in "+-"]
    assert len(contributions) == 2
    assert sum(contributions) == pytest.approx(float(cells[-1]), abs=2e-4)
    assert float(cells[-1]) == pytest.approx(best.value, abs=1e-4)
    assert f"study written to {url} (study 'sum')" in out
    assert "weights of the best 5 trials by the bound in" in out
    for cmd in ("report", "dashboard", "export", "sample"):
        assert f"bound-tuner {cmd} " in out
    assert "nothing left" not in out

    assert main(argv) == 0  # a rerun of the finished study
    again = capsys.readouterr()
    # said once, on stderr (the run's own line), not again in the summary
    assert (again.out + again.err).count("nothing left") == 1 and "nothing left to run" in again.err
    assert len(study.get_trials()) == 3


def test_validate_runs_a_spec_with_heldout_metrics_in_its_own_study(tmp_path, capsys):
    url = f"sqlite:///{tmp_path}/v.db"
    path = write_spec(tmp_path, "val", n_trials=3)
    assert not load_spec(path).validation
    assert main(["run", str(path), "--storage", url, "--quiet", "--validate"]) == 0
    out = capsys.readouterr().out
    assert "study 'val-validate'" in out and "validation mode:" in out
    study = optuna.load_study(study_name="val-validate", storage=url)
    for t in study.get_trials():
        assert t.value == pytest.approx(t.user_attrs["bound.total"])  # never the metric
        assert math.isfinite(t.user_attrs["heldout.sample_kl"])
    assert "held-out metrics of the pick (never the objective): heldout.sample_kl = " in out
    assert re.search(r"heldout\.sample_kl: Spearman rho\(bound, metric\) = ", out)
    assert "the pick ranks" in out
    # the same trials as the spec's own study would have: same proposals, same seed
    assert load_spec(path, validation=True).data["test_size"] == 64


def test_a_pruned_trials_partial_bound_is_marked_in_the_report(tmp_path, capsys):
    url = f"sqlite:///{tmp_path}/r.db"
    path = write_spec(
        tmp_path,
        "pru",
        n_trials=3,
        width="16",
        checkpoints=2,
        sampler="grid",
        pruner='[pruner]\ntype = "median"\nn_startup_trials = 1',
    )
    path.write_text(
        path.read_text()
        .replace("T = { low = 0.2, high = 0.9 }", "T = 0.5")
        .replace("lr = 0.003", "lr = { grid = [0.003, 1e-9, 1e-9] }")
    )
    assert main(["run", str(path), "--storage", url, "--quiet"]) == 0
    capsys.readouterr()
    assert main(["report", "--study", "pru", "--storage", url]) == 0
    out = capsys.readouterr().out
    study = optuna.load_study(study_name="pru", storage=url)
    pruned = [t for t in study.get_trials() if t.state.name == "PRUNED"]
    assert pruned, "the tiny learning rates are pruned"
    for t in pruned:
        line = next(x for x in out.splitlines() if x.split()[:2] == [str(t.number), "PRUNED"])
        assert "(partial)" in line
    assert "(partial): a pruned trial's bound at its last checkpoint" in out
    data = {t["number"]: t for t in trials_json(study)}
    assert all(data[t.number]["partial"] is True for t in pruned)


def test_generalization_of_the_default_is_the_references_gap_plus_its_margin(tmp_path):
    """docs/tradeoffs.md: for "elbo-kfold", generalization = bound − fit = max(NELBO_cv −
    NELBO_refs + 2 se_cv, 0), computed here from the trial's stored terms, not from its total."""
    spec = parse_spec(
        {
            "study": {"name": "kf", "n_trials": 2, "seed": 0},
            "data": {"name": "swiss_roll", "m": 24},
            "search": {"T": {"low": 0.3, "high": 0.8}},
            "training": {"steps": 15, "checkpoints": 0, "batch_size": 24},
            "bound": {
                "variant": "elbo-kfold",
                "N": 10,
                "n_paths": 8,
                "train_draws": 2,
                "folds": 3,
                "max_sample_scale": 1000.0,
            },
        }
    )
    study = run_study(
        spec,
        storage=f"sqlite:///{tmp_path}/kf.db",
        progress=False,
        dashboard=False,
        objectives=["fit", "generalization"],
    )
    done = [t for t in study.get_trials() if t.state.name == "COMPLETE"]
    assert done
    for t in done:
        ua = flat_attrs(t.user_attrs)
        margin = ua.get("bound.cv_z", 2.0) * ua["bound.cv_se"]
        gap = ua["bound.cv_nelbo"] - ua["bound.refs_train_nelbo"]
        fit, generalization = t.values
        assert fit == pytest.approx(ua["bound.train_nelbo"])
        assert generalization == pytest.approx(max(gap + margin, 0.0), abs=1e-9)
        # the paper's information form is recorded beside it, and is not the objective
        info = math.sqrt(2) * ua["bound.R_cv"] * ua["bound.C_fold"]
        assert ua["bound.info_bound"] == pytest.approx(fit + info + ua["bound.mc_margin"])
        assert generalization != pytest.approx(info)


def test_generalization_is_zero_where_the_training_nelbo_floors_the_bound():
    rep = assemble_kfold_bound(
        train_nelbo=3.0, c_fold=0.1, R=1.0, cv_nelbo=2.0, cv_se=0.1, m=200, refs_train_nelbo=3.5
    )  # 2.0 + (3.0 − 3.5) + 0.2 < 3.0: the floor binds
    ua = rep.user_attrs()
    assert rep.total == 3.0 and value_of("generalization", ua) == 0.0
    rep = assemble_kfold_bound(
        train_nelbo=3.0, c_fold=0.1, R=1.0, cv_nelbo=3.4, cv_se=0.1, m=200, refs_train_nelbo=3.1
    )
    assert value_of("generalization", rep.user_attrs()) == pytest.approx(3.4 - 3.1 + 0.2)


def test_the_objectives_table_of_the_docs_is_their_definitions():
    """docs/tradeoffs.md's table gives each objective's definition as OBJECTIVES holds it."""
    page = (Path(__file__).resolve().parents[1] / "docs" / "tradeoffs.md").read_text()
    rows = {
        line.split(" | ")[0].strip("|` "): line.split(" | ")[1]
        for line in page.splitlines()
        if line.startswith("| `")
    }
    assert {n: rows.get(n) for n in OBJECTIVES} == {n: o.help for n, o in OBJECTIVES.items()}
    spec_comment = Path(__file__).resolve().parents[1] / "studies" / "swiss_roll_tradeoff.toml"
    assert "C_fold" not in spec_comment.read_text()  # the objective is bound − fit, not C_fold
