"""``bound-tuner report``'s table on a tiny study of the default ("elbo-kfold", K = 3 references):
every searched parameter, the terms that add up to the bound between bars, what is recorded
beside it in parentheses, the kept step where trials record one, and the legend in words."""

from __future__ import annotations

import pytest

from bound_tuner import parse_spec, run_study
from bound_tuner.cli import main
from bound_tuner.dashboard.report import trials_json, trials_table
from bound_tuner.maths.bounds.report import flat_attrs

SEARCH = {
    "T": {"low": 0.3, "high": 0.8},
    "lr": {"low": 1e-3, "high": 1e-2, "log": True},
    "width": {"choices": [8, 16]},
}


@pytest.fixture(scope="module")
def kfold_study(tmp_path_factory):
    folder = tmp_path_factory.mktemp("report")
    spec = parse_spec(
        {
            "study": {"name": "rep", "n_trials": 2, "seed": 0},
            "data": {"name": "swiss_roll", "m": 24},
            "search": SEARCH,
            "training": {"steps": 15, "checkpoints": 0, "batch_size": 24},
            "bound": {
                "variant": "elbo-kfold",
                "N": 10,
                "n_paths": 8,
                "train_draws": 2,
                "folds": 3,
                "max_sample_scale": 1000.0,  # tiny models sampled in a few steps spread out
            },
        }
    )
    url = f"sqlite:///{folder}/rep.db"
    study = run_study(spec, storage=url, progress=False, dashboard=False)
    return url, study


def _cells(line: str, heads: list[str], header: str) -> dict[str, str]:
    """A row's cells by column, cut where the right-aligned header's columns end."""
    out, start = {}, 0
    for h in heads:
        end = header.index(h, start) + len(h)
        out[h] = line[start:end].strip()
        start = end
    return out


def test_the_table_shows_every_parameter_the_terms_of_the_bound_and_what_is_beside_it(
    kfold_study, capsys
):
    url, study = kfold_study
    done = [t for t in study.get_trials() if t.state.name == "COMPLETE"]
    assert len(done) == 2
    assert main(["report", "--study", "rep", "--storage", url]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    header = lines[0]
    step = any("bound.step" in flat_attrs(t.user_attrs) for t in done)  # kept step, if any
    heads = [
        "#",
        "state",
        "T",
        "schedule",
        "lr",
        "width",
        *(["step"] if step else []),
        "bound",
        "upper95",
        "NELBO_train",
        "|",
        "NELBO_cv",
        "+ NELBO_train − NELBO_refs",
        "+ z se_cv",
        "|",
        "(info bound)",
        "(C_fold)",
    ]
    assert header.split() == " ".join(heads).split()  # every searched parameter, in this order
    assert ("step" in header.split()) == step
    assert "mc_se" not in header
    bars = [i for i, c in enumerate(header) if c == "|"]
    assert len(bars) == 2
    for t in done:
        line = next(x for x in lines if x.split()[:2] == [str(t.number), "COMPLETE"])
        assert [line[i] for i in bars] == ["|", "|"]
        cells = _cells(line, heads, header)
        assert float(cells["lr"]) == pytest.approx(t.params["lr"], rel=1e-3)
        if step:
            assert int(cells["step"]) == flat_attrs(t.user_attrs)["bound.step"]
        assert int(cells["width"]) == t.params["width"]
        assert cells["schedule"] == "linear"  # not searched: the trial's setting
        ua = flat_attrs(t.user_attrs)
        total = float(cells["bound"])
        assert total == pytest.approx(t.value, abs=1e-4)
        # between the bars: the terms that add up to the bound, nothing else
        first = heads.index("NELBO_cv")
        added = [cells[h] for h in heads[first : first + 3]]
        assert sum(float(c) for c in added) == pytest.approx(total, abs=3e-4)
        assert float(added[0]) == pytest.approx(ua["bound.cv_nelbo"], abs=1e-4)
        shift = ua["bound.train_nelbo"] - ua["bound.refs_train_nelbo"]
        assert float(added[1]) == pytest.approx(shift, abs=1e-4)
        # beside it, in parentheses: the paper's information form and C_fold, not in the sum
        assert float(cells["(info bound)"]) == pytest.approx(ua["bound.info_bound"], abs=1e-4)
        assert float(cells["(C_fold)"]) == pytest.approx(ua["bound.C_fold"], abs=1e-4)
        assert float(cells["NELBO_train"]) == pytest.approx(ua["bound.train_nelbo"], abs=1e-4)
        assert total >= ua["bound.train_nelbo"]  # never below the training NELBO
    legend = " ".join(out.split())
    assert "a cross-fitted certificate, not the paper's bound" in legend
    assert "recorded beside the bound, not part of it" in legend
    assert "the paper's bound (Chen, Zhu and Shkurti, ICLR 2025) in its information form" in legend
    assert "how much the generator learned about its own points" in legend
    assert "only as measured" in legend


def _row(number: int, **ua) -> dict:
    attrs = {"bound.variant": "elbo-kfold", "bound.train_nelbo": 2.0, **ua}
    attrs.setdefault("bound.contribution.cv_nelbo", 2.1)
    attrs.setdefault("bound.contribution.cv_shift", -0.1)
    attrs.setdefault("bound.contribution.cv_margin", 0.3)
    return {
        "number": number,
        "state": "COMPLETE",
        "params": {"T": 0.5, "lam": 0.25, "beta_const": 12.0},
        "value": 2.3,
        "user_attrs": attrs,
    }


def test_a_kept_step_is_a_column_and_searched_parameters_follow_t_and_schedule():
    heads = trials_table([_row(0), _row(1)]).splitlines()[0].split()
    assert heads[:7] == ["#", "state", "T", "schedule", "beta_const", "lam", "bound"]
    assert "step" not in heads
    table = trials_table([_row(0, **{"bound.step": 1200}), _row(1)]).splitlines()
    heads = table[0].split()
    assert heads[:8] == ["#", "state", "T", "schedule", "beta_const", "lam", "step", "bound"]
    assert table[1].split()[6] == "1200" and table[2].split()[6] == "-"
    # a variant the benchmark does not count as a bound is called a score, and said so
    score = [dict(_row(0), user_attrs={**_row(0)["user_attrs"], "bound.variant": "elbo"})]
    text = trials_table(score)
    assert text.splitlines()[0].split()[6] == "score" and "is not a bound" in text


def test_the_json_and_the_table_show_the_same_trials(kfold_study):
    _, study = kfold_study
    rows = trials_json(study)
    table = trials_table(rows).splitlines()
    numbers = [int(x.split()[0]) for x in table[1 : 1 + len(rows)]]
    assert numbers == [r["number"] for r in rows]
    assert all(r["value"] == pytest.approx(r["user_attrs"]["bound.total"]) for r in rows)
    assert all(r["params"].keys() == SEARCH.keys() for r in rows)
