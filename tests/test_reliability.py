"""Reliability: secrets never echoed, bad inputs refused before a study exists, files that are not
study databases left untouched, a database that fills up or turns read-only mid-study, the
dashboard's --host warning, and one definition of the trials that count.

Interrupts, killed processes and the worker pool are in tests/test_reliability_runs.py.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
import uuid
from pathlib import Path

import optuna
import pytest
import sqlalchemy
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial
from worker_spec import PG_URL, needs_pg, pg_storage, write_worker_spec

from bound_tuner.cli import main
from bound_tuner.config.schema import SECTIONS
from bound_tuner.config.spec import load_spec
from bound_tuner.dashboard.server import host_warning
from bound_tuner.execution.accounting import WORKER_ATTR, counts, finished_count
from bound_tuner.execution.signals import INTERRUPTED
from bound_tuner.storage.database import StorageError, check_storage, redact, scrub
from bound_tuner.study import run_study

SECRET = "s3cretPW9"


def write_spec(path: Path, name: str = "rel", *, n_trials: int = 2, steps: int = 10) -> Path:
    return write_worker_spec(path, name, n_trials=n_trials, steps=steps)


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("bound-tuner: error: ") and "\n" not in err, err
    return err


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------- 1. secrets

SECRET_URLS = [
    f"postgresql+psycopg2://alice:{SECRET}@host/db",  # driver not installed (ImportError)
    f"mysql+nodriver://alice:{SECRET}@host/db",  # no such dialect
    f"redis://:{SECRET}@127.0.0.1:6379/0",  # a journal storage
    f"file://alice:{SECRET}@host/journal.log",  # a journal storage
    f"postgresql://alice:{SECRET}@127.0.0.1:1/db",  # unreachable
    f"postgresql://alice:{SECRET}@127.0.0.1:notaport/db",  # malformed
    f"alice:{SECRET}@host/db",  # no scheme
    f"postgresql://alice:{SECRET.replace('9', '%39')}@127.0.0.1:1/db",  # percent-encoded
]


@pytest.mark.parametrize("url", SECRET_URLS)
def test_storage_errors_never_show_the_password(url, tmp_path, capsys, monkeypatch):
    with pytest.raises(StorageError) as e:
        check_storage(url)
    assert SECRET not in str(e.value) and "s3cretPW" not in str(e.value)
    spec = write_spec(tmp_path / "s.toml")
    for argv in (
        ["run", str(spec), "--storage", url, "--quiet"],
        ["run", str(spec), "--storage", url, "--quiet", "--workers", "2"],
        ["worker", str(spec), "--storage", url, "--quiet"],
        ["report", "--study", "x", "--storage", url],
        ["dashboard", "--storage", url, "--port", "1"],
    ):
        assert main(argv) == 2, argv
        err = one_line_error(capsys)
        assert "s3cretPW" not in err, (argv, err)
    monkeypatch.setenv("BOUND_TUNER_STORAGE", url)  # the same through the environment
    assert main(["run", str(spec), "--quiet"]) == 2
    assert "s3cretPW" not in one_line_error(capsys)


def test_redact_and_scrub():
    assert redact(f"postgresql://bob:{SECRET}@h:5432/db") == "postgresql://bob:***@h:5432/db"
    assert redact("sqlite:///a.db") == "sqlite:///a.db"
    assert scrub(f"failed for {SECRET}", f"postgresql://bob:{SECRET}@h/db") == "failed for ***"


@needs_pg
def test_a_study_on_a_password_url_stores_and_prints_no_password(tmp_path, capsys, caplog):
    # trust authentication accepts any password: the URL carries one, the server ignores it
    u = sqlalchemy.engine.make_url(PG_URL).set(password=SECRET)
    url = u.render_as_string(hide_password=False)
    name = f"rel-secret-{uuid.uuid4().hex[:8]}"
    spec = write_spec(tmp_path / "s.toml", name, n_trials=1)
    os.environ["BOUND_TUNER_ARTIFACTS"] = str(tmp_path / "art")
    try:
        with caplog.at_level(logging.DEBUG):
            assert main(["run", str(spec), "--storage", url]) == 0
            assert main(["report", "--study", name, "--storage", url, "--format", "json"]) == 0
        out = capsys.readouterr()
        study = optuna.load_study(study_name=name, storage=pg_storage())
        store = optuna.storages.get_storage(PG_URL)
        study_attrs = store.get_study_system_attrs(store.get_study_id_from_name(name))
        stored = repr(
            [(t.user_attrs, t.system_attrs) for t in study.get_trials()]
            + [study.user_attrs, study_attrs]
        )
        assert study.get_trials()[0].state == TrialState.COMPLETE
        for text in (out.out, out.err, caplog.text, stored):
            assert SECRET not in text
    finally:
        os.environ.pop("BOUND_TUNER_ARTIFACTS", None)
        optuna.delete_study(study_name=name, storage=pg_storage())


# ------------------------------------------------------------------------------- 4. bad input

WRONG_TYPE = {
    int: "seven",
    float: "high",
    str: 7,
    bool: "yes",
    (int, str): 2.5,
    (float, str): True,
    (int, list): "big",
    list: "bound",
    dict: 5,
}
# a value of the right type that cannot work, for every key of the schema
WRONG_VALUE = {
    "study": {
        "name": " ",
        "model": "gan",
        "n_trials": 0,
        "validation": None,
        "seed": -1,
        "keep_models": -1,
        "max_consecutive_failures": 0,
        "objectives": ["bound", "magic"],
        "constraints": {"wall_seconds": 60},
    },
    "data": {
        "name": "cifar",
        "path": "",  # a path beside the spec's name
        "m": 1,
        "seed": -3,
        "test_size": 0,
        "test_fraction": 1.5,  # an own-data option on swiss_roll
        "image_size": 0,
        "fit": "stretch",
        "binarize": "fixed",  # an image option on swiss_roll
        "pad_to_32": True,  # an image option on swiss_roll
    },
    "training": {
        "steps": 0,
        "batch_size": 0,
        "checkpoints": -1,
        "t_min": -0.1,
        "ema": 0.5,  # wider than the plain running mean: no power-function average
        "lr": 0.0,
        "width": 0,
        "layers": 0,
        "channels": 0,
        "epochs": 0,
        "tf32": None,
        "compile": None,
        "pack": 0,
    },
    "bound": {
        "variant": "best",
        "R": -1.0,
        "folds": 1,
        "L_estimator": "path-median",
        "N": 0,
        "k": 0,
        "n_paths": 0,
        "max_sample_scale": 0.5,
        "train_draws": 0,
        "r": -0.5,
        "mc_samples": 0,
        "bound_subset": 0,
        "heldout_samples": 0,
        "heldout_steps": 0,
        "early_stop": None,  # true or false: only a wrong type
    },
    "sampler": {"type": "cma", "seed": -1, "n_startup_trials": -1, "population_size": 1},
    "model": {"factory": "no_such_module:net"},
    "pruner": {"type": "magic", "n_startup_trials": -1, "n_warmup_steps": -1},
    "storage": {"heartbeat_interval": 0, "grace_period": 0, "outage_seconds": -1},
}


def _toml(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return f'"{v}"'
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml(x)}" for k, x in v.items()) + " }"
    return repr(v)


def _schema_cases():
    for section, keys in SECTIONS.items():
        assert set(keys) == set(WRONG_VALUE.get(section, {})), f"update WRONG_VALUE [{section}]"
        for key, kind in keys.items():
            yield pytest.param(section, key, WRONG_TYPE[kind], id=f"{section}.{key}-type")
            value = WRONG_VALUE[section][key]
            if value is not None:
                yield pytest.param(section, key, value, id=f"{section}.{key}-value")


@pytest.mark.parametrize("section,key,value", list(_schema_cases()))
def test_every_schema_key_refuses_a_wrong_type_and_value(tmp_path, capsys, section, key, value):
    spec = write_spec(tmp_path / "s.toml").read_text()
    header = f"[{section}]\n"
    line = f"{key} = {_toml(value)}\n"
    lines = [x for x in spec.splitlines(keepends=True) if not x.startswith(f"{key} =")]
    spec = "".join(lines)
    spec = spec.replace(header, header + line) if header in spec else spec + header + line
    (tmp_path / "s.toml").write_text(spec)
    db = tmp_path / "db" / "x.db"
    db.parent.mkdir()
    assert main(["run", str(tmp_path / "s.toml"), "--storage", f"sqlite:///{db}", "--quiet"]) == 2
    err = one_line_error(capsys)
    assert key in err or key.lower() in err.lower(), err
    assert list(db.parent.iterdir()) == []  # no database, no study


@pytest.mark.parametrize(
    "edit,match",
    [
        (("[data]\n", "[data]\npad_to_32 = true\n"), "data.pad_to_32 applies to the image sets"),
        (("[data]\n", '[data]\nbinarize = "dynamic"\n'), "data.binarize applies to the image"),
        (
            (
                "T = { low = 0.2, high = 0.9 }",
                "T = { low = 0.2, high = 0.9, log = true, step = 0.1 }",
            ),
            "log = true or a step, not both",
        ),
        (("[training]\n", '[training]\ndevice = "cuda"\n'), "training.device is not read"),
        (("T = { low = 0.2, high = 0.9 }", "T = nan"), "must be a finite number"),
        (("T = { low = 0.2, high = 0.9 }", "T = { choices = [0.3, inf] }"), "must be a number"),
        (("[training]\n", "[training]\nt_min = nan\n"), "must be a finite number"),
    ],
)
@pytest.mark.parametrize("command", ["run", "worker", "run-pool"])
def test_bad_inputs_exit_2_before_any_study(tmp_path, capsys, edit, match, command):
    path = write_spec(tmp_path / "s.toml")
    path.write_text(path.read_text().replace(*edit))
    db = tmp_path / "x.db"
    argv = [command.split("-")[0], str(path), "--storage", f"sqlite:///{db}", "--quiet"]
    if command == "run-pool":
        argv += ["--workers", "1"]
    assert main(argv) == 2
    assert match in one_line_error(capsys)
    assert not db.exists()


def test_cuda_device_without_cuda_exits_2(tmp_path, capsys):
    import torch

    spec = write_spec(tmp_path / "s.toml")
    db = tmp_path / "x.db"
    device = f"cuda:{torch.cuda.device_count()}"  # one past the last GPU (cuda:0 on a CPU box)
    for argv in (
        ["run", str(spec), "--device", device],
        ["worker", str(spec), "--device", device],
        ["run", str(spec), "--device", "tpu"],
    ):
        assert main([*argv, "--storage", f"sqlite:///{db}", "--quiet"]) == 2
        assert "--device" in one_line_error(capsys)
    if not torch.cuda.is_available():
        assert main(["run", str(spec), "--gpus", "0", "--storage", f"sqlite:///{db}"]) == 2
        assert "no CUDA GPU" in one_line_error(capsys)
    assert not db.exists()


# ------------------------------------------------------------------- 5. not a study database


def _garbage(p: Path) -> None:
    p.write_bytes(bytes(range(256)) * 40)


def _truncated(p: Path) -> None:
    url = f"sqlite:///{p}.full"
    optuna.create_study(storage=url, study_name="s").optimize(
        lambda t: t.suggest_float("x", 0, 1), 3
    )
    data = Path(f"{p}.full").read_bytes()
    p.write_bytes(data[: len(data) // 2])


def _other_program(p: Path) -> None:
    con = sqlite3.connect(p)
    con.execute("CREATE TABLE contacts (name TEXT, phone TEXT)")
    con.execute("INSERT INTO contacts VALUES ('ada', '123')")
    con.commit()
    con.close()


def _text(p: Path) -> None:
    p.write_text("name,value\nT,0.5\n" * 200)


@pytest.mark.parametrize("make", [_garbage, _truncated, _other_program, _text])
def test_a_file_that_is_not_a_study_database_is_refused_unchanged(tmp_path, capsys, make):
    db = tmp_path / "study.db"
    make(db)
    before, mtime = digest(db), db.stat().st_mtime_ns
    spec = write_spec(tmp_path / "s.toml")
    url = f"sqlite:///{db}"
    for argv in (
        ["run", str(spec), "--storage", url, "--quiet"],
        ["worker", str(spec), "--storage", url, "--quiet"],
        ["report", "--study", "rel", "--storage", url],
        ["dashboard", "--storage", url, "--port", "1"],
    ):
        assert main(argv) == 2, argv
        err = one_line_error(capsys)
        assert str(db) in err and ("SQLite" in err or "database" in err), err
    assert digest(db) == before and db.stat().st_mtime_ns == mtime
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("study.db")) == [
        "study.db",
        *(["study.db.full"] if make is _truncated else []),
    ]


FULL_TABLES = ("trials", "trial_user_attributes", "trial_system_attributes", "trial_values")


def _limit_sqlite(db: Path, mode: str):
    """Once a trial runs, every connection to ``db`` stops taking writes as a full disk or a
    read-only folder would: ``full`` caps the file at its size (max_page_count) and refuses new
    rows with SQLite's 'database or disk is full'; ``readonly`` sets query_only, SQLite's
    'attempt to write a readonly database'. The file itself is not touched."""

    def checkout(dbapi_conn, record, proxy):
        if str(db) not in str(dbapi_conn.execute("PRAGMA database_list").fetchall()):
            return
        if not dbapi_conn.execute("SELECT count(*) FROM trials WHERE state = 'RUNNING'").fetchone()[
            0
        ]:
            return
        if mode == "readonly":
            dbapi_conn.execute("PRAGMA query_only = ON")
            return
        pages = dbapi_conn.execute("PRAGMA page_count").fetchone()[0]
        dbapi_conn.execute(f"PRAGMA max_page_count = {pages}")
        for table in FULL_TABLES:
            dbapi_conn.execute(
                f"CREATE TEMP TRIGGER IF NOT EXISTS full_{table} BEFORE INSERT ON main.{table} "
                "BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END"
            )

    sqlalchemy.event.listen(sqlalchemy.pool.Pool, "checkout", checkout)
    return lambda: sqlalchemy.event.remove(sqlalchemy.pool.Pool, "checkout", checkout)


@pytest.mark.parametrize("mode", ["full", "readonly"])
def test_database_that_fills_up_or_turns_read_only_mid_study(tmp_path, capsys, mode):
    db = tmp_path / "s.db"
    url = f"sqlite:///{db}"
    path = write_spec(tmp_path / "s.toml", n_trials=4)
    path.write_text(path.read_text() + "[storage]\nheartbeat_interval = 1\ngrace_period = 2\n")
    # two trials finish, then the database stops taking writes during the third
    assert main(["run", str(path), "--storage", url, "--quiet", "--n-trials", "2"]) == 0
    capsys.readouterr()
    finished = {
        t.number: (t.state, t.value, t.params)
        for t in optuna.load_study(study_name="rel", storage=url).get_trials()
    }
    assert len(finished) == 2
    undo = _limit_sqlite(db, mode)
    try:
        rc = main(["run", str(path), "--storage", url, "--quiet"])
    finally:
        undo()
    assert rc == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err)
    last = err[-1]
    assert last.startswith(("bound-tuner: error: trial 2 failed: ", "bound-tuner: error: a new"))
    assert ("full" if mode == "full" else "readonly") in last and "resume" in last, last
    # the database is intact: the finished trials are as they were
    con = sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True)
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    con.close()
    trials = optuna.load_study(study_name="rel", storage=url).get_trials()
    for t in trials[:2]:
        assert (t.state, t.value, t.params) == finished[t.number]
    third = trials[2]
    if third.state == TrialState.FAIL:  # its failure could be written: with the reason
        assert third.user_attrs["fail_reason"].startswith("storage error: ")
    # once the database takes writes again the study resumes: trial 2 does not count, and the
    # study reaches n_trials completed trials
    study = run_study(load_spec(path), storage=url, progress=False)
    assert finished_count(study) == 4
    assert sum(t.state == TrialState.COMPLETE for t in study.get_trials()) == 4


# ------------------------------------------------------------------------ 6. dashboard host


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.5", "example.org"])
def test_dashboard_on_a_non_loopback_host_warns(host, tmp_path, capsys):
    assert "no login" in host_warning(host) and "delete" in host_warning(host)
    missing = tmp_path / "none.db"
    assert main(["dashboard", "--storage", f"sqlite:///{missing}", "--host", host]) == 2
    err = capsys.readouterr().err
    assert "warning" in err and "no login" in err and "delete studies" in err


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "127.0.0.2"])
def test_dashboard_on_loopback_does_not_warn(host, tmp_path, capsys):
    assert host_warning(host) is None
    assert main(["dashboard", "--storage", f"sqlite:///{tmp_path}/n.db", "--host", host]) == 2
    assert "warning" not in capsys.readouterr().err


def test_readme_warns_about_non_loopback_dashboards():
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert "no login" in readme and "--host" in readme


# --------------------------------------------------------------------- 2. one trial accounting


def _trial(state, number_attrs=None, **kw):
    return create_trial(
        state=state,
        params={"T": 0.5},
        distributions={"T": FloatDistribution(0.2, 0.9)},
        value=1.0 if state == TrialState.COMPLETE else None,
        **kw,
    )


def test_counts_complete_pruned_and_failed_for_good_only():
    study = optuna.create_study()
    study.add_trial(_trial(TrialState.FAIL))  # 0: stale, retried as 1
    study.add_trial(
        _trial(TrialState.COMPLETE, system_attrs={"failed_trial": 0, "retry_history": [0]})
    )
    study.add_trial(_trial(TrialState.FAIL, user_attrs={"fail_reason": INTERRUPTED}))  # 2
    study.add_trial(_trial(TrialState.FAIL, user_attrs={"fail_reason": "non-finite loss"}))  # 3
    study.add_trial(_trial(TrialState.PRUNED))  # 4
    study.add_trial(_trial(TrialState.WAITING))  # 5
    trials = study.get_trials()
    retried = {0}
    assert [counts(t, retried) for t in trials] == [False, True, False, True, True, False]
    assert finished_count(study) == 3


def test_single_process_resume_counts_retries_as_the_pool_does(tmp_path):
    url = f"sqlite:///{tmp_path}/acc.db"
    path = write_spec(tmp_path / "s.toml", "acc", n_trials=4)
    spec = load_spec(path)
    run_study(spec, storage=url, n_trials=1, progress=False)  # trial 0
    study = optuna.load_study(study_name="acc", storage=url)
    worker = {WORKER_ATTR: "elsewhere:1/cpu"}
    study.add_trial(_trial(TrialState.FAIL, user_attrs=worker))  # 1: a worker died ...
    study.add_trial(  # 2: ... and its retry finished
        _trial(TrialState.COMPLETE, system_attrs={"failed_trial": 1, "retry_history": [1]})
    )
    interrupted = create_trial(
        state=TrialState.FAIL,
        params={"T": 0.777},
        distributions={"T": FloatDistribution(0.2, 0.9)},
        user_attrs={"fail_reason": INTERRUPTED, **worker},
    )
    study.add_trial(interrupted)  # 3: Ctrl-C; not retried yet
    assert finished_count(study) == 2
    study = run_study(spec, storage=url, progress=False)
    trials = study.get_trials()
    assert finished_count(study) == 4
    # the interrupted trial ran again with its parameters, then one new trial
    assert len(trials) == 6
    retry = next(t for t in trials if t.system_attrs.get("failed_trial") == 3)
    assert retry.state == TrialState.COMPLETE and retry.params == {"T": 0.777}
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 4
