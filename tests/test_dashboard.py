"""optuna-dashboard integration: charts, trial notes, sample images, and the served pages."""

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import optuna
import pytest
import torch
from optuna.artifacts import get_all_artifact_meta
from optuna_dashboard import get_note
from optuna_dashboard._custom_plot_data import get_plotly_graph_objects

import bound_tuner.objectives.factory as factory
import bound_tuner.study as study_mod
from bound_tuner.cli import main
from bound_tuner.config.spec import load_spec
from bound_tuner.dashboard.charts import (
    CHART_BOUND_VS_HELDOUT,
    CHART_TERMS_VS_T,
    CHART_VAE_EPOCHS,
    ChartsCallback,
    study_figures,
)
from bound_tuner.dashboard.hooks import dashboard_hooks
from bound_tuner.dashboard.notes import bound_note, save_samples_png
from bound_tuner.dashboard.report import rank_correlation, selection_stats, trials_json
from bound_tuner.maths.bounds.report import BoundReport
from bound_tuner.storage.folders import artifact_dir_for, artifact_store_for

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

SPEC = """
[study]
name = "dash"
n_trials = 3
validation = {validation}
seed = 0

[data]
name = "swiss_roll"
m = 32
test_size = 200

[search]
T = {{ grid = [0.3, 0.6, 0.9] }}
schedule = "linear"
lr = 0.003

[training]
steps = 20
batch_size = 32
width = 16
checkpoints = 0

[bound]
variant = "paper"  # these tests check the paper's four terms
R = 5.0
N = 10
max_sample_scale = 1000.0  # tiny models sampled in a few steps spread their samples
n_paths = 8
train_draws = 2

[sampler]
type = "grid"
"""


def _run_tiny(folder: Path, *, validation: bool = True, **kw) -> tuple[str, optuna.Study]:
    """Run the tiny study (small held-out settings) into folder/dash.db."""
    spec_path = folder / "dash.toml"
    spec_path.write_text(textwrap.dedent(SPEC.format(validation=str(validation).lower())))
    url = f"sqlite:///{folder}/dash.db"
    base = factory.diffusion_base_config
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(
            factory,
            "diffusion_base_config",
            lambda spec: replace(base(spec), heldout_n_generated=200, heldout_n_steps=50),
        )
        mp.delenv("BOUND_TUNER_ARTIFACTS", raising=False)
        study = study_mod.run_study(load_spec(spec_path), storage=url, progress=False, **kw)
    return url, study


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished three-trial grid study over T with validation on, dashboard outputs written."""
    folder = tmp_path_factory.mktemp("dash")
    url, study = _run_tiny(folder)
    return url, study, folder


def _charts(study: optuna.Study) -> dict[str, dict]:
    attrs = study._storage.get_study_system_attrs(study._study_id)
    return {k: json.loads(v) for k, v in get_plotly_graph_objects(attrs).items()}


def test_finished_study_has_notes_and_sample_images(finished):
    url, study, folder = finished
    trials = study.get_trials()
    assert len(trials) == 3 and all(t.state.name == "COMPLETE" for t in trials)
    for t in trials:
        trial = optuna.Trial(study, t._trial_id)
        note = get_note(trial)
        # "paper" is not measured above the held-out NELBO: its notes call it a score
        assert f"### Trial {t.number}: diffusion generalization score {t.value:.4f}" in note
        for name in ("train_loss", "encoder_mixture_kl", "prior_kl_sqrt", "generator_info"):
            c = t.user_attrs[f"bound.contribution.{name}"]
            assert f"`{name}`) | {t.user_attrs[f'bound.{name}']:.4f} | {c:+.4f} |" in note
        assert f"| **score** | | **{t.value:.4f}** |" in note
        assert "test_kl = " in note  # held-out metrics of validation mode
        metas = get_all_artifact_meta(t, storage=study._storage)
        # the samples image, and the trained weights (3 trials, fewer than keep_models)
        assert sorted(m.filename for m in metas) == [
            f"model_trial{t.number}.pt",
            f"samples_trial{t.number}.png",
        ]
        metas = [m for m in metas if m.filename.endswith(".png")]
        assert metas[0].mimetype == "image/png"
        png = folder / "dash_artifacts" / metas[0].artifact_id
        assert png.read_bytes().startswith(PNG_MAGIC)
    assert artifact_dir_for(url) == folder / "dash_artifacts"


def test_terms_chart_stacks_contributions_to_the_total(finished):
    _, study, _ = finished
    charts = _charts(study)
    assert set(charts) == {CHART_TERMS_VS_T, CHART_BOUND_VS_HELDOUT}
    fig = charts[CHART_TERMS_VS_T]
    assert fig["layout"]["barmode"] == "relative"
    assert fig["layout"]["title"]["text"].startswith("Bound terms against T")
    bars = [d for d in fig["data"] if d["type"] == "bar"]
    (line,) = [d for d in fig["data"] if d["type"] == "scatter"]
    assert [b["name"] for b in bars] == ["L_dsm", "−C_mix", "√2 R · C_prior", "√2 R · √I_gen"]
    assert line["x"] == [0.3, 0.6, 0.9]
    by_T = {t.params["T"]: t.value for t in study.get_trials()}
    for i, T in enumerate(line["x"]):
        assert line["y"][i] == pytest.approx(by_T[T])
        assert sum(b["y"][i] for b in bars) == pytest.approx(by_T[T], rel=1e-9)
    assert min(bars[1]["y"]) < 0  # -C_mix stacks below zero


def test_heldout_chart_has_spearman_rho_in_title(finished):
    _, study, _ = finished
    fig = _charts(study)[CHART_BOUND_VS_HELDOUT]
    trials = trials_json(study)
    rho, n = rank_correlation(trials, "heldout.sample_kl")
    reg = selection_stats(trials, "heldout.sample_kl")["regret"]
    # the regret of the pick, from the trials themselves: the held-out truth of the trial
    # with the lowest bound over the best truth of any trial, minus 1
    done = study.get_trials()
    truth = {t.number: t.user_attrs["heldout.sample_kl"] for t in done}
    pick = min(done, key=lambda t: t.value).number
    assert n == 3 and reg == pytest.approx(truth[pick] / min(truth.values()) - 1)
    assert fig["layout"]["title"]["text"] == (
        f"Bound against held-out sample_kl<br>Spearman ρ = {rho:.3f} (n=3), "
        f"regret of the pick {100 * reg:.0f}%"
    )
    ys = sorted(fig["data"][0]["y"])
    assert ys == pytest.approx(sorted(t.value for t in study.get_trials()))


def _fake_trial(T: float, parts: tuple[float, ...], **attrs) -> optuna.trial.FrozenTrial:
    names = ("train_loss", "encoder_mixture_kl", "prior_kl_sqrt", "generator_info")
    ua = {"bound.T": T, **{f"bound.contribution.{n}": v for n, v in zip(names, parts)}, **attrs}
    return optuna.trial.create_trial(
        params={"T": T},
        distributions={"T": optuna.distributions.FloatDistribution(0.1, 1.0)},
        value=sum(parts),
        user_attrs=ua,
    )


def test_charts_callback_every_and_best_trial_per_T(tmp_path):
    study = optuna.create_study(storage=f"sqlite:///{tmp_path}/c.db", study_name="c")
    study.add_trial(_fake_trial(0.5, (1.0, -0.5, 2.0, 1.0)))
    study.add_trial(_fake_trial(0.5, (1.0, -0.5, 1.0, 1.0)))  # the better one at T = 0.5
    study.add_trial(_fake_trial(0.8, (1.0, -0.1, 0.5, 2.0)))
    cb = ChartsCallback(every=2)
    cb(study, study.trials[-1])
    assert _charts(study) == {}
    cb(study, study.trials[-1])
    fig = _charts(study)[CHART_TERMS_VS_T]
    assert "best trial at each T" in fig["layout"]["title"]["text"]
    line = fig["data"][-1]
    assert line["x"] == [0.5, 0.8] and line["y"] == pytest.approx([2.5, 3.4])
    assert line["customdata"] == [1, 2]
    with pytest.raises(ValueError):
        ChartsCallback(every=0)


def test_only_the_chart_writer_gets_the_charts_callback(tmp_path):
    url = f"sqlite:///{tmp_path}/w.db"
    hook, callbacks = dashboard_hooks(url, charts=False)
    assert callbacks == [] and hook.artifact_store is not None
    assert [type(c) for c in dashboard_hooks(url)[1]] == [ChartsCallback]


def test_vae_epoch_terms_chart_for_the_best_trial():
    rows = [{"epoch": e, "rec": 90.0 / e, "kld": 5.0 + e, "mi": 0.1 * e} for e in (1, 2, 3)]
    trials = [
        {"number": 0, "state": "COMPLETE", "value": 99.0, "params": {}, "user_attrs": {}},
        {"number": 1, "state": "COMPLETE", "value": 80.0, "params": {}, "user_attrs": {}},
        {"number": 2, "state": "COMPLETE", "value": 95.0, "params": {}, "user_attrs": {}},
    ]
    trials[0]["user_attrs"]["epoch_terms"] = rows
    trials[1]["user_attrs"]["epoch_terms"] = {"rec": [70.0, 60.0], "bound": [85.0, 80.0]}
    figs = study_figures(trials)
    assert set(figs) == {CHART_VAE_EPOCHS}  # no T, no held-out metric: only the VAE chart
    fig = figs[CHART_VAE_EPOCHS]
    assert fig.layout.title.text == "VAE bound terms against epoch (best trial #1)"
    assert [d.name for d in fig.data] == ["REC", "bound"]
    assert list(fig.data[0].x) == [1, 2]
    del trials[1]["user_attrs"]["epoch_terms"]
    fig = study_figures(trials)[CHART_VAE_EPOCHS]
    assert [d.name for d in fig.data] == ["REC", "KLD", "MI"] and list(fig.data[0].x) == [1, 2, 3]


def test_artifact_folder_follows_the_storage(tmp_path, monkeypatch):
    monkeypatch.delenv("BOUND_TUNER_ARTIFACTS", raising=False)
    assert artifact_dir_for(f"sqlite:///{tmp_path}/my.db") == tmp_path / "my_artifacts"
    # a PostgreSQL study gets a folder named after its server and database, never the one of
    # the default SQLite file (sqlite:///bound_tuner.db -> bound_tuner_artifacts)
    pg = artifact_dir_for("postgresql://u:secret@localhost:5433/db")
    assert pg == Path("postgresql_localhost_5433_db_artifacts")
    assert artifact_dir_for("sqlite:///bound_tuner.db") == Path("bound_tuner_artifacts")
    assert artifact_dir_for("postgresql://u@otherhost/db") != pg
    assert "secret" not in str(pg)
    monkeypatch.setenv("BOUND_TUNER_ARTIFACTS", str(tmp_path / "elsewhere"))
    assert artifact_dir_for(f"sqlite:///{tmp_path}/my.db") == tmp_path / "elsewhere"
    store = artifact_store_for(f"sqlite:///{tmp_path}/my.db")
    assert not (tmp_path / "elsewhere").exists()  # created on the first upload, not before
    src = tmp_path / "a.txt"
    src.write_text("x")
    study = optuna.create_study(storage=f"sqlite:///{tmp_path}/my.db")
    optuna.artifacts.upload_artifact(artifact_store=store, file_path=str(src), study_or_trial=study)
    assert len(list((tmp_path / "elsewhere").iterdir())) == 1


def test_run_study_without_dashboard_writes_no_charts_notes_or_images(tmp_path):
    url, study = _run_tiny(tmp_path, validation=False, n_trials=1, dashboard=False)
    assert _charts(study) == {}
    assert get_note(optuna.Trial(study, study.trials[0]._trial_id)) == ""
    # only the trained weights are kept (a torch zip archive), no sample images
    files = list((tmp_path / "dash_artifacts").iterdir())
    assert len(files) == 1 and files[0].read_bytes()[:2] == b"PK"


def test_images_become_a_grid_and_points_a_scatter(tmp_path):
    from PIL import Image

    save_samples_png(torch.rand(10, 1, 28, 28), tmp_path / "g.png")
    assert Image.open(tmp_path / "g.png").size == (8 * 30 + 2, 2 * 30 + 2)
    save_samples_png(torch.rand(4, 784), tmp_path / "f.png", reference=torch.rand(3, 784))
    assert Image.open(tmp_path / "f.png").size == (4 * 30 + 2, 30 + 2)
    save_samples_png(torch.randn(50, 2), tmp_path / "s.png", reference=torch.randn(8, 2))
    assert (tmp_path / "s.png").read_bytes().startswith(PNG_MAGIC)


def test_note_lists_terms_extras_and_settings():
    report = BoundReport(
        "vae",
        3.0,
        {"rec": 1.0, "kld": 1.0, "mi": 0.25},
        {"rec": 1.0, "kld": 2.0, "mi": 0.0},
        {"r": 1.0},
        extras={"heldout_loss": 2.5},
    )
    note = bound_note(7, report)
    assert note.startswith("### Trial 7: vae generalization bound 3.0000")
    assert "| KLD (`kld`) | 1.0000 | +2.0000 |" in note
    assert "- heldout_loss = 2.5" in note and "Settings: r = 1" in note
    assert "early stopping" not in note
    report.extras.update(step=400, steps_trained=1000)
    assert "Certified early stopping kept step 400 of 1000" in bound_note(7, report)
    report.extras.update(step=1000)  # the last step kept: nothing was stopped early
    assert "early stopping" not in bound_note(7, report)


def test_dashboard_command_on_a_missing_database_exits_2(tmp_path, capsys):
    assert main(["dashboard", "--storage", f"sqlite:///{tmp_path}/none.db"]) == 2
    assert "no study database" in capsys.readouterr().err
    assert not (tmp_path / "none.db").exists()
    with pytest.raises(SystemExit) as e:
        main(["dashboard", "--port", "70000"])
    assert e.value.code == 2


# ----------------------------------------------------------------------------- browser


def _browser_missing() -> str | None:
    if not os.path.exists(CHROMIUM):
        return f"{CHROMIUM} is not installed (Debian package chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright Python package is not installed (pip install -e .[dev])"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def dashboard_server(finished, tmp_path):
    """`bound-tuner dashboard` on the finished study, in a subprocess; yields its base URL."""
    url, _, _ = finished
    with _dashboard_at(url, tmp_path) as base:
        yield base


@contextlib.contextmanager
def _dashboard_at(url: str, tmp_path: Path):
    """`bound-tuner dashboard` on a storage, in a subprocess; yields its base URL."""
    port = _free_port()
    log = open(tmp_path / "server.log", "w")
    env = {k: v for k, v in os.environ.items() if k != "BOUND_TUNER_ARTIFACTS"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bound_tuner.cli",
            "dashboard",
            "--storage",
            url,
            "--port",
            str(port),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.close()
                    pytest.fail(
                        "dashboard did not start:\n" + (tmp_path / "server.log").read_text()
                    )
                time.sleep(0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_served_api_has_charts_notes_and_artifacts(finished, dashboard_server):
    """What the dashboard's pages load, over HTTP (no browser needed)."""
    from urllib.request import urlopen

    _, study, _ = finished
    with urlopen(f"{dashboard_server}/api/studies/{study._study_id}", timeout=30) as r:
        detail = json.load(r)
    assert {g["id"] for g in detail["plotly_graph_objects"]} == {
        CHART_TERMS_VS_T,
        CHART_BOUND_VS_HELDOUT,
    }
    trial = detail["trials"][0]
    assert "contribution to the score" in trial["note"]["body"]
    # the samples image, and the trial's trained weights
    (artifact,) = [a for a in trial["artifacts"] if a["filename"].endswith(".png")]
    assert sorted(a["filename"] for a in trial["artifacts"]) == [
        f"model_trial{trial['number']}.pt",
        f"samples_trial{trial['number']}.png",
    ]
    path = f"/artifacts/{study._study_id}/{trial['trial_id']}/{artifact['artifact_id']}"
    with urlopen(dashboard_server + path, timeout=30) as r:
        assert r.read().startswith(PNG_MAGIC)


def test_browser_shows_charts_note_and_samples(finished, dashboard_server, tmp_path):
    """Chromium sees the custom charts, a trial's note and its samples image.

    Screenshots go to tmp_path: the study page (dashboard.png), its custom charts
    (dashboard_charts.png, also copied to $BOUND_TUNER_SCREENSHOT_OUT when set) and the trial
    page (trial.png). Nothing is written in the repository.
    """
    reason = _browser_missing()
    if reason:
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    _, study, _ = finished
    sid = study._study_id
    best = study.best_trial
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"{dashboard_server}/dashboard/studies/{sid}", timeout=30_000)
            titles = page.locator(".gtitle")
            titles.filter(has_text="Bound terms against T").wait_for(timeout=30_000)
            titles.filter(has_text="Spearman ρ =").wait_for(timeout=30_000)
            chart = page.locator(
                ".js-plotly-plot", has=page.locator(".gtitle", has_text="Bound terms")
            )
            assert chart.locator(".barlayer .point").count() == 12  # 4 terms x 3 values of T
            page.wait_for_timeout(1000)  # let plotly finish drawing
            page.evaluate("window.scrollTo(0, 0)")
            shot = tmp_path / "dashboard.png"
            page.screenshot(path=str(shot), full_page=True)
            # the docs' picture: the row of the two custom charts
            boxes = [
                page.locator(
                    ".js-plotly-plot", has=page.locator(".gtitle", has_text=t)
                ).bounding_box()
                for t in ("Bound terms against T", "Spearman")
            ]
            x0 = min(b["x"] for b in boxes) - 8
            y0 = min(b["y"] for b in boxes) - 8
            x1 = max(b["x"] + b["width"] for b in boxes) + 8
            y1 = max(b["y"] + b["height"] for b in boxes) + 8
            charts = tmp_path / "dashboard_charts.png"
            page.screenshot(
                path=str(charts),
                full_page=True,
                clip={"x": x0, "y": y0, "width": x1 - x0, "height": y1 - y0},
            )

            page.goto(
                f"{dashboard_server}/dashboard/studies/{sid}/trials?numbers={best.number}",
                timeout=30_000,
            )
            page.get_by_text("contribution to the score").wait_for(timeout=30_000)
            assert page.get_by_text(f"Trial {best.number}: diffusion generalization score").count()
            assert page.get_by_text(f"{best.value:.4f}").count() >= 1
            img = page.locator(f'img[alt="samples_trial{best.number}.png"]')
            img.scroll_into_view_if_needed(timeout=30_000)
            page.wait_for_function(
                "img => img.complete && img.naturalWidth > 0", arg=img.element_handle()
            )
            resp = page.request.get(dashboard_server + img.get_attribute("src"))
            assert resp.status == 200 and resp.body().startswith(PNG_MAGIC)
            page.screenshot(path=str(tmp_path / "trial.png"))
        finally:
            browser.close()
    assert shot.read_bytes().startswith(PNG_MAGIC) and charts.read_bytes().startswith(PNG_MAGIC)
    # the test writes only under tmp_path; BOUND_TUNER_SCREENSHOT_OUT=FILE.png keeps a copy of
    # the charts picture (for refreshing docs/dashboard.png by hand)
    keep = os.environ.get("BOUND_TUNER_SCREENSHOT_OUT")
    if keep:
        shutil.copyfile(charts, keep)


def test_browser_shows_the_pareto_front_of_a_multi_objective_study(tmp_path):
    """A two-objective study (fit against generalization): optuna-dashboard's own Pareto-front
    plot and the custom front chart, coloured by T, on the study's page in Chromium."""
    reason = _browser_missing()
    if reason:
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    spec_path = tmp_path / "front.toml"
    text = textwrap.dedent(SPEC.format(validation="false"))
    text = text.replace('name = "dash"', 'name = "front"')
    objectives = 'objectives = ["fit", "generalization"]\n'
    spec_path.write_text(text.replace("seed = 0\n", "seed = 0\n" + objectives, 1))
    url = f"sqlite:///{tmp_path}/front.db"
    study = study_mod.run_study(load_spec(spec_path), storage=url, progress=False)
    assert len(study.directions) == 2 and len(study.best_trials) >= 1
    with _dashboard_at(url, tmp_path) as base, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"{base}/dashboard/studies/{study._study_id}", timeout=30_000)
            page.get_by_text("Pareto Front", exact=True).wait_for(timeout=30_000)
            ours = page.locator(".gtitle", has_text="Pareto front: fit against generalization")
            ours.wait_for(timeout=30_000)
            chart = page.locator(".js-plotly-plot", has=ours)
            assert chart.locator(".scatterlayer .point").count() == 3  # the three trials
            assert chart.locator(".colorbar").count() == 1  # coloured by T
            page.wait_for_timeout(1000)
            page.screenshot(path=str(tmp_path / "pareto.png"), full_page=True)
        finally:
            browser.close()
    assert (tmp_path / "pareto.png").read_bytes().startswith(PNG_MAGIC)
