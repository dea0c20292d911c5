"""The storage URL's password stays out of worker arguments and every printed line, and the
"next:" commands printed after a run work when pasted."""

from __future__ import annotations

import pickle
import shlex
import uuid

import optuna
import pytest
from worker_spec import PG_URL, needs_pg, pg_storage, write_worker_spec

import bound_tuner.execution.loop as loop
from bound_tuner.cli import main
from bound_tuner.config.spec import load_spec
from bound_tuner.execution.plan import RunOptions
from bound_tuner.storage.database import ENV_VAR

SECRET = "s3cret-pw"


def _with_password(url: str) -> str:
    """PG_URL with a password (the test server trusts every local connection, so it works)."""
    scheme, rest = url.split("://", 1)
    user, host = rest.split("@", 1)
    return f"{scheme}://{user.split(':')[0]}:{SECRET}@{host}"


def test_a_worker_reads_the_url_from_the_environment_and_prints_it_masked(
    tmp_path, monkeypatch, capsys
):
    """``work`` (every pool process and Ray task) takes no URL argument: it reads
    $BOUND_TUNER_STORAGE; an unexpected error's traceback and its one line are scrubbed."""
    url = f"postgresql://user:{SECRET}@db.invalid:5432/study"
    monkeypatch.setenv(ENV_VAR, url)
    seen = {}

    def broken(spec, *, storage, **kw):
        seen["storage"] = storage
        raise RuntimeError(f"could not use {storage}")

    monkeypatch.setattr(loop, "run_worker", broken)
    spec = load_spec(write_worker_spec(tmp_path / "s.toml", "sec", n_trials=1, steps=5))
    line = loop.work(0, "cpu", pickle.dumps(spec), RunOptions())
    err = capsys.readouterr().err
    assert seen["storage"] == url
    assert "Traceback" in err and SECRET not in err and "user:***@db.invalid" in err
    assert SECRET not in line and line.startswith("RuntimeError: could not use ")


@needs_pg
def test_next_commands_with_a_password_url_use_the_environment_variable(tmp_path, capsys):
    name = f"sec-{uuid.uuid4().hex[:8]}"
    url = _with_password(PG_URL)
    spec = write_worker_spec(tmp_path / "s.toml", name, n_trials=1, steps=5)
    try:
        argv = ["run", str(spec), "--storage", url, "--quiet", "--device", "cpu"]
        assert main(argv) == 0
        out = capsys.readouterr().out
        assert SECRET not in out and "***" not in out.split("next:")[1]
        assert f'bound-tuner report --study {name} --storage "${ENV_VAR}"' in out
        assert f"set {ENV_VAR} to the storage URL" in out
    finally:
        optuna.delete_study(study_name=name, storage=pg_storage())


def test_next_commands_paste_as_printed(tmp_path, capsys, monkeypatch):
    """A URL without a password is printed as given (quoted for the shell); one taken from
    $BOUND_TUNER_STORAGE is left out, since the commands read it too."""
    db = tmp_path / "with space.db"
    url = f"sqlite:///{db}"
    spec = write_worker_spec(tmp_path / "s.toml", "paste", n_trials=1, steps=5)
    assert main(["run", str(spec), "--storage", url, "--quiet", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    report = next(line for line in out.splitlines() if "bound-tuner report" in line)
    argv = shlex.split(report.split("#")[0])
    assert argv[argv.index("--storage") + 1] == url
    assert main(argv[1:]) == 0  # pasted as printed
    capsys.readouterr()

    monkeypatch.setenv(ENV_VAR, url)
    assert main(["run", str(spec), "--quiet", "--device", "cpu", "--n-trials", "2"]) == 0
    out = capsys.readouterr().out
    assert "--storage" not in out.split("next:")[1]


@pytest.mark.parametrize("storage", ["sqlite:///x.db"])
def test_options_are_one_typed_object(storage):
    opts = RunOptions(n_trials=3, dashboard=True)
    assert opts.for_worker(0).dashboard_charts and not opts.for_worker(1).dashboard_charts
    assert opts.replace(outage_seconds=5).outage_seconds == 5 and opts.outage_seconds is None
    with pytest.raises(TypeError):
        RunOptions(storage=storage)  # the URL is not an option: it travels in the environment
