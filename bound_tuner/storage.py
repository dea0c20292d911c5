"""Storage URLs -> Optuna storages with settings suited to one process or many workers.

The default is a SQLite file bound_tuner.db in the working directory; ``--storage`` or the
BOUND_TUNER_STORAGE variable overrides it. PostgreSQL URLs use psycopg (v3): ``postgresql://``
is read as ``postgresql+psycopg://``. Every problem raises StorageError with one line, before any
study is created.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import optuna
import sqlalchemy
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, OperationalError

DEFAULT_STORAGE = "sqlite:///bound_tuner.db"
ENV_VAR = "BOUND_TUNER_STORAGE"


class StorageError(ValueError):
    """A storage URL that is malformed, unreachable or unwritable; one line with the mend."""


def resolve_url(url: str | None = None) -> str:
    """The storage URL to use: the argument, else $BOUND_TUNER_STORAGE, else the SQLite default."""
    return url or os.environ.get(ENV_VAR) or DEFAULT_STORAGE


def normalize_url(url: str) -> URL:
    """Parse a SQLAlchemy URL, choosing psycopg for a bare postgresql:// URL."""
    if url.startswith(("redis://", "file:")) or url.endswith(".log"):
        raise StorageError(
            f"storage {url!r} is a journal storage; bound_tuner takes a SQLAlchemy URL such as "
            "sqlite:///bound_tuner.db or postgresql://user@host/db"
        )
    try:
        u = make_url(url)
    except ArgumentError:
        raise StorageError(
            f"malformed storage URL {url!r}; use e.g. sqlite:///bound_tuner.db or "
            "postgresql://user@host:5432/dbname"
        ) from None
    if u.drivername in ("postgresql", "postgres"):
        u = u.set(drivername="postgresql+psycopg")
    return u


def is_sqlite(url: str) -> bool:
    return normalize_url(url).get_backend_name() == "sqlite"


def check_storage(url: str) -> str:
    """Check that a storage URL can be used, without creating any study; return it normalized."""
    u = normalize_url(url)
    backend = u.get_backend_name()
    if backend == "sqlite":
        db = u.database
        if not db or db == ":memory:":
            raise StorageError(
                f"storage {url!r} is an in-memory SQLite database that forgets the study; "
                "give a file such as sqlite:///bound_tuner.db"
            )
        path = Path(db).expanduser().resolve()
        parent = path.parent
        if not parent.is_dir():
            raise StorageError(
                f"cannot create database {path}: folder {parent} does not "
                "exist; create it or choose another --storage path"
            )
        try:  # a real write, which also catches read-only file systems and root on /proc
            if path.exists():
                with open(path, "ab"):
                    pass
            else:
                with tempfile.NamedTemporaryFile(dir=parent, prefix=".bound_tuner_check"):
                    pass
        except OSError as e:
            raise StorageError(
                f"cannot write database {path}: {e.strerror or e}; choose a writable --storage path"
            ) from None
        return u.render_as_string(hide_password=False)
    try:
        engine = sqlalchemy.create_engine(
            u, connect_args={"connect_timeout": 5} if backend == "postgresql" else {}
        )
    except NoSuchModuleError:
        raise StorageError(
            f"storage {url!r} names driver {u.drivername!r}, which is not "
            "installed; use postgresql:// (psycopg) or sqlite:///file.db"
        ) from None
    except (ArgumentError, ImportError) as e:
        raise StorageError(f"storage {url!r} cannot be used ({e}); check the URL") from None
    try:
        with engine.connect():
            pass
    except OperationalError as e:
        first = str(e.orig).strip().splitlines()[0] if e.orig else str(e).splitlines()[0]
        raise StorageError(
            f"cannot reach storage {u.render_as_string(hide_password=True)}: "
            f"{first}; check that the server runs and the URL is right"
        ) from None
    finally:
        engine.dispose()
    return u.render_as_string(hide_password=False)


def make_storage(
    url: str | None = None,
    *,
    heartbeat_interval: int | None = None,
    grace_period: int | None = None,
    retry_failed: int | None = None,
    pool_size: int = 2,
) -> optuna.storages.RDBStorage:
    """An RDBStorage for ``url`` (checked first), tuned for its backend.

    PostgreSQL gets a small connection pool per process with pool_pre_ping. A heartbeat
    (``heartbeat_interval`` seconds, stale after ``grace_period``) lets a crashed worker's trial
    be failed and, with ``retry_failed``, re-queued by RetryHeartbeatStaleTrialCallback.
    """
    url = check_storage(resolve_url(url))
    engine_kwargs: dict = {}
    if not is_sqlite(url):
        engine_kwargs = {
            "pool_size": pool_size,
            "max_overflow": 2,
            "pool_pre_ping": True,
            "connect_args": {"connect_timeout": 10},
        }
    kwargs: dict = {}
    if heartbeat_interval:
        kwargs["heartbeat_interval"] = heartbeat_interval
        kwargs["grace_period"] = grace_period or 4 * heartbeat_interval
        if retry_failed:
            kwargs["heartbeat_stale_trial_callback"] = (
                optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=retry_failed)
            )
    return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, **kwargs)
