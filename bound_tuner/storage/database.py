"""Storage URLs -> Optuna storages with settings suited to one process or many workers.

The default is a SQLite file bound_tuner.db in the working directory; ``--storage`` or the
BOUND_TUNER_STORAGE variable overrides it. PostgreSQL URLs use psycopg (v3): ``postgresql://``
is read as ``postgresql+psycopg://``. ``grpc://host:port`` reaches a study database through Optuna's
gRPC storage proxy (``serve_proxy``, ``bound-tuner storage-proxy``): many workers, one set of
database connections. Every problem raises StorageError with one line, before any study is created.
"""

from __future__ import annotations

import os
import re
import sqlite3
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import optuna
import sqlalchemy
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, OperationalError

DEFAULT_STORAGE = "sqlite:///bound_tuner.db"
ENV_VAR = "BOUND_TUNER_STORAGE"
GRPC_EXTRA = 'pip install "bound_tuner[grpc]"'
PROXY_WAIT_S = 5.0  # how long a client waits for the gRPC proxy to answer
DEFAULT_HEARTBEAT_INTERVAL = 10  # seconds between a running trial's heartbeats
# seconds a worker waits for a database server that went away (a restart, a failover, a managed
# database's maintenance) before it gives up: [storage] outage_seconds
DEFAULT_OUTAGE_SECONDS = 180
# study user attr: the absolute artifact folder (trained weights, images) of the study's runs
STUDY_ARTIFACTS_ATTR = "bound_tuner.artifacts"


def default_grace_period(heartbeat_interval: int) -> int:
    """Seconds without a heartbeat before a trial counts as dead, unless a spec or option says
    otherwise: three heartbeats, and never under 30 s. The one definition of this default."""
    return max(30, 3 * heartbeat_interval)


SQLITE_HEADER = b"SQLite format 3\x00"
# tables of a study database (Optuna's RDB schema); a SQLite file with other tables and none of
# these belongs to another program
OPTUNA_TABLES = frozenset({"studies", "trials", "version_info", "alembic_version"})


class StorageError(ValueError):
    """A storage URL that is malformed, unreachable or unwritable; one line with the mend.

    Its message never contains the password of a storage URL (see ``redact``).
    """


_USERINFO = re.compile(
    r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<user>[^:/@\s]*):[^\s/?#]*@"
)  # the password runs to the last "@" before the host: an unencoded "@" in it is masked too
_LOOSE = re.compile(r"(?P<user>[^:/@\s]*):(?!//)[^@\s]*@")  # user:password@ without a scheme


def _passwords(url: str) -> list[str]:
    """The password of ``url`` as written and decoded (empty if it has none).

    With a scheme (``scheme://user:password@host``) only the user info before the host counts,
    so ``scheme://user@host`` has no password; without one, ``user:password@host``."""
    url = url.strip()
    scheme = re.match(r"[A-Za-z][A-Za-z0-9+.\-]*://", url)
    if scheme:
        rest = url[scheme.end() :].split("?", 1)[0]  # a query may hold "@" too
        userinfo = rest[: rest.rfind("@")] if "@" in rest else ""
        raw = userinfo.split(":", 1)[1] if ":" in userinfo else ""
    else:
        m = re.search(r"[^:/@\s]*:(?P<pw>[^@\s/]*)@", url)
        raw = m.group("pw") if m else ""
    if not raw:
        return []
    return sorted({raw, unquote(raw)} - {""}, key=len, reverse=True)


def redact(url: str) -> str:
    """``url`` with its password replaced by ``***``; safe to print, log or store."""
    text = str(url)
    out = _USERINFO.sub(lambda m: f"{m.group('scheme')}{m.group('user')}:***@", text)
    if out == text:  # no scheme://user:password@: mask anything shaped like user:password@
        out = _LOOSE.sub(lambda m: f"{m.group('user')}:***@", text)
    return out


def scrub(text: str, *urls: str | None) -> str:
    """``text`` with every password of ``urls`` (and of $BOUND_TUNER_STORAGE) masked."""
    out = redact(str(text))
    for url in (*urls, os.environ.get(ENV_VAR)):
        for pw in _passwords(url or ""):
            if pw:
                out = out.replace(pw, "***")
    return out


def resolve_url(url: str | None = None) -> str:
    """The storage URL to use: the argument, else $BOUND_TUNER_STORAGE, else the SQLite default."""
    return url or os.environ.get(ENV_VAR) or DEFAULT_STORAGE


def normalize_url(url: str) -> URL:
    """Parse a SQLAlchemy URL, choosing psycopg for a bare postgresql:// URL."""
    if url.startswith(("redis://", "rediss://", "file:")) or url.endswith(".log"):
        raise StorageError(
            f"storage {redact(url)!r} is a journal storage; bound_tuner takes a SQLAlchemy URL such as "
            "sqlite:///bound_tuner.db or postgresql://user@host/db"
        )
    try:
        u = make_url(url)
    except (ArgumentError, ValueError, TypeError):
        raise StorageError(
            f"malformed storage URL {redact(url)!r}; use e.g. sqlite:///bound_tuner.db or "
            "postgresql://user@host:5432/dbname"
        ) from None
    if u.drivername in ("postgresql", "postgres"):
        u = u.set(drivername="postgresql+psycopg")
    return u


def is_sqlite(url: str) -> bool:
    return normalize_url(url).get_backend_name() == "sqlite"


def is_grpc(url: str) -> bool:
    """Whether ``url`` names Optuna's gRPC storage proxy (``grpc://host:port``)."""
    return url.strip().startswith("grpc://")


def _grpc_address(url: str) -> tuple[str, int]:
    u = normalize_url(url)
    if not u.host or u.port is None or u.database or u.username:
        raise StorageError(
            f"storage {redact(url)!r}: a gRPC proxy URL is grpc://host:port, e.g. "
            "grpc://127.0.0.1:13000"
        )
    return u.host, u.port


def _grpc_proxy(url: str, *, wait: float = PROXY_WAIT_S) -> optuna.storages.BaseStorage:
    """A GrpcStorageProxy client of ``url``, once the proxy answers."""
    host, port = _grpc_address(url)
    try:
        import grpc  # noqa: F401 - Optuna's client needs it
    except ImportError:
        raise StorageError(
            f"storage {url} needs gRPC, which is not installed; {GRPC_EXTRA}"
        ) from None
    with warnings.catch_warnings():  # the proxy is marked experimental in Optuna
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        proxy = optuna.storages.GrpcStorageProxy(host=host, port=port)
    try:
        proxy.wait_server_ready(timeout=wait)
    except (ConnectionError, OSError):  # Optuna's timeout; a name that does not resolve
        proxy.close()
        raise StorageError(
            f"cannot reach the storage proxy at {url} (no answer within {wait:g} s); start it "
            f"with `bound-tuner storage-proxy --storage postgresql://... --port {port}` or "
            "check the address"
        ) from None
    return proxy


def check_sqlite_file(path: Path) -> None:
    """Refuse an existing file that is not a usable study database, without changing it.

    Garbage bytes, a truncated or damaged SQLite file and the SQLite database of another program
    each raise StorageError. An empty file is an empty database, which Optuna fills.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            header = f.read(100)
    except OSError as e:
        raise StorageError(
            f"cannot read database {path}: {e.strerror or e}; check its permissions"
        ) from None
    if size == 0:
        return
    mend = "move it away or choose another --storage path"
    if len(header) < 100 or not header.startswith(SQLITE_HEADER):
        raise StorageError(
            f"{path} is not a SQLite database (its first bytes are not SQLite's); {mend}"
        )
    page_size = int.from_bytes(header[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    pages = int.from_bytes(header[28:32], "big")
    if page_size < 512 or (pages and size < page_size * pages) or size % page_size:
        raise StorageError(
            f"{path} is a truncated or damaged SQLite database ({size} bytes, expected "
            f"{page_size * pages}); restore it from a copy or {mend}"
        )
    try:  # read-only: the file is not touched
        con = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)
        try:
            tables = {
                r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")
            }
            check = con.execute("PRAGMA quick_check(1)").fetchone()
        finally:
            con.close()
    except sqlite3.DatabaseError as e:
        raise StorageError(f"{path} is not a usable SQLite database ({e}); {mend}") from None
    if check is None or check[0] != "ok":
        raise StorageError(
            f"{path} is a damaged SQLite database ({check[0] if check else 'no check result'}); "
            f"restore it from a copy or {mend}"
        )
    if tables and not tables & OPTUNA_TABLES:
        shown = ", ".join(sorted(tables)[:5])
        raise StorageError(
            f"{path} is a SQLite database of another program (tables: {shown}), not a study "
            f"database; {mend}"
        )


def storage_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean the study database failed (unreachable, full, read-only,
    refused a write), as opposed to an error of a trial's own code: SQLAlchemy's errors (which
    wrap the drivers' own, SQLite's 'database or disk is full' among them), Optuna's storage
    error and, with the gRPC extra, the proxy's RpcError. An OSError is not one of them: the
    database reports its own file's errors through SQLAlchemy."""
    kinds: list[type[BaseException]] = [
        sqlalchemy.exc.SQLAlchemyError,
        optuna.exceptions.StorageInternalError,
    ]
    try:
        import grpc
    except ImportError:
        pass  # no gRPC extra: no proxy, no RpcError
    else:
        kinds.append(grpc.RpcError)
    return tuple(kinds)


def connection_lost(e: BaseException | None) -> bool:
    """Whether ``e`` (or what it was raised from or during) says that a database server could
    not be reached or dropped the connection: a restart, a failover, a network cut, a lock or
    statement timeout. Such an outage is waited out (``[storage] outage_seconds``); a SQLite
    error (a full disk, a read-only file) is not one: it does not heal by waiting."""
    seen = 0
    while e is not None and seen < 10:
        if isinstance(e, sqlalchemy.exc.DBAPIError) and e.connection_invalidated:
            return True
        if isinstance(e, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError)):
            orig = getattr(e, "orig", None)
            if orig is not None and type(orig).__module__.startswith("psycopg"):
                return True
        if type(e).__module__.startswith("psycopg") and type(e).__name__ in (
            "OperationalError",
            "InterfaceError",
        ):
            return True
        code = getattr(e, "code", None)
        if callable(code) and type(e).__module__.startswith("grpc"):
            try:
                if getattr(code(), "name", "") in ("UNAVAILABLE", "DEADLINE_EXCEEDED"):
                    return True
            except Exception:  # an RpcError without a status
                pass
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


def require_database(url: str) -> None:
    """For read-only commands (report, export, sample, dashboard): refuse a SQLite file that does
    not exist, with one line, instead of creating an empty database."""
    if is_grpc(url):
        return
    u = normalize_url(url)
    if u.get_backend_name() == "sqlite" and u.database and u.database != ":memory:":
        path = Path(u.database).expanduser()
        if path.is_dir():
            raise StorageError(f"database path {path} is a folder, not a study database")
        if not path.exists():
            raise StorageError(
                f"no study database at {path}; run `bound-tuner run SPEC --storage {redact(url)}` "
                "first or give the right --storage"
            )


def check_storage(url: str) -> str:
    """Check that a storage URL can be used, without creating any study; return it normalized."""
    if is_grpc(url):
        _grpc_proxy(url).close()
        return url.strip()
    u = normalize_url(url)
    backend = u.get_backend_name()
    if backend == "sqlite":
        db = u.database
        if not db or db == ":memory:":
            raise StorageError(
                f"storage {redact(url)!r} is an in-memory SQLite database that forgets the study; "
                "give a file such as sqlite:///bound_tuner.db"
            )
        path = Path(db).expanduser().resolve()
        parent = path.parent
        if not parent.is_dir():
            raise StorageError(
                f"cannot create database {path}: folder {parent} does not "
                "exist; create it or choose another --storage path"
            )
        if path.is_dir():
            raise StorageError(
                f"database path {path} is a folder; give a file such as {path}/bound_tuner.db"
            )
        if path.exists():
            check_sqlite_file(path)
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
            f"storage {redact(url)!r} names driver {u.drivername!r}, which is not "
            "installed; use postgresql:// (psycopg) or sqlite:///file.db"
        ) from None
    except (ArgumentError, ImportError) as e:
        raise StorageError(
            f"storage {redact(url)!r} cannot be used ({scrub(e, url)}); check the URL"
        ) from None
    try:
        with engine.connect():
            pass
    except (OperationalError, sqlalchemy.exc.InterfaceError, sqlalchemy.exc.DBAPIError) as e:
        first = (str(e.orig).strip() or str(e)).splitlines()[0] if e.orig else str(e)
        first = scrub(first.splitlines()[0] if first else type(e).__name__, url)
        raise StorageError(
            f"cannot reach storage {u.render_as_string(hide_password=True)}: "
            f"{first}; check that the server runs and the URL is right"
        ) from None
    finally:
        engine.dispose()
    return u.render_as_string(hide_password=False)


class WalConnection(sqlite3.Connection):
    """A SQLite connection in write-ahead-log mode with ``synchronous=NORMAL``: a commit appends
    to the log without syncing the file (SQLite's default syncs it on every commit, and a trial
    commits dozens of times: about 400 ms of a tiny trial's overhead on a 2-core machine,
    docs/benchmarks.md). A crash of the process loses nothing committed; a power cut or an
    operating-system crash may lose the last commits. The log needs a local file system (not
    NFS); a database that cannot switch (read-only) keeps its journal."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        try:
            self.execute("PRAGMA journal_mode=WAL")
            self.execute("PRAGMA synchronous=NORMAL")
        except sqlite3.DatabaseError:
            pass  # read-only or in memory: SQLite's defaults


def make_storage(
    url: str | None = None,
    *,
    heartbeat_interval: int | None = None,
    grace_period: int | None = None,
    retry_failed: int | None = None,
    pool_size: int = 2,
) -> optuna.storages.BaseStorage:
    """An RDBStorage for ``url`` (checked first), tuned for its backend.

    SQLite runs in write-ahead-log mode (``WalConnection``). PostgreSQL gets a small connection
    pool per process with pool_pre_ping. A heartbeat
    (``heartbeat_interval`` seconds, stale after ``grace_period``) lets a crashed worker's trial
    be failed and, with ``retry_failed``, re-queued by RetryHeartbeatStaleTrialCallback.

    ``grpc://host:port`` gives a GrpcStorageProxy instead. Optuna's proxy client carries no
    heartbeat (it is not a heartbeat storage), so the heartbeat settings do not apply there.
    """
    url = resolve_url(url)
    if is_grpc(url):
        return _grpc_proxy(url)
    url = check_storage(url)
    engine_kwargs: dict = {"connect_args": {"factory": WalConnection}}
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
        kwargs["grace_period"] = grace_period or default_grace_period(heartbeat_interval)
        if retry_failed:
            kwargs["heartbeat_stale_trial_callback"] = (
                optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=retry_failed)
            )
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, **kwargs)
    except sqlalchemy.exc.SQLAlchemyError as e:
        first = str(getattr(e, "orig", None) or e).strip().splitlines()
        raise StorageError(
            f"cannot open storage {redact(url)}: {scrub(first[0] if first else e, url)}; "
            "check the database"
        ) from None


def serve_proxy(
    url: str | None,
    *,
    host: str = "127.0.0.1",
    port: int = 13000,
    threads: int = 10,
    announce: Callable[[str], None] | None = None,
) -> None:
    """Serve the study database ``url`` through Optuna's gRPC storage proxy until interrupted.

    Workers then use ``grpc://host:port`` as their storage: the database sees this one process
    and its pool of ``threads`` connections, however many workers there are. SQLite is refused
    (one process at a time; the proxy answers from several threads). ``announce`` gets one line
    once the checks have passed, just before the server starts.
    """
    from concurrent.futures import ThreadPoolExecutor

    url = resolve_url(url)
    if is_grpc(url):
        raise StorageError(f"--storage {url} is itself a proxy; give the database URL")
    if is_sqlite(url):
        raise StorageError(
            f"storage {redact(url)} is SQLite, which serves one process; the proxy needs "
            "PostgreSQL (--storage postgresql://user@host:5432/dbname)"
        )
    if threads < 1:
        raise StorageError(f"--threads {threads} must be at least 1")
    try:
        import grpc  # noqa: F401
    except ImportError:
        raise StorageError(
            f"the storage proxy needs gRPC, which is not installed; {GRPC_EXTRA}"
        ) from None
    storage = make_storage(url, pool_size=threads)
    if announce is not None:
        announce(f"serving {redact(url)} at grpc://{host}:{port} ({threads} threads)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        try:
            optuna.storages.run_grpc_proxy_server(
                optuna.storages.get_storage(storage),  # with Optuna's in-process cache
                host=host,
                port=port,
                thread_pool=ThreadPoolExecutor(max_workers=threads),
            )
        except RuntimeError as e:  # grpc cannot bind the address
            raise StorageError(
                f"cannot listen on {host}:{port} ({e}); choose another --port or --host"
            ) from None
