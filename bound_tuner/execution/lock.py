"""The study lock under which workers claim trials (a PostgreSQL advisory lock), so that a study
never gets more than ``n_trials`` trials however many workers race for the last ones."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator

from bound_tuner.storage.database import normalize_url

LOCK_TIMEOUT_S = 30.0  # longest wait for the lock (or a stuck server) before a storage error
CONNECT_TIMEOUT_S = 10  # seconds to reach the server


class StudyLock:
    """A lock shared by every process of one study: a PostgreSQL advisory lock on the study name.

    Waiting for it is bounded (``timeout``, default ``LOCK_TIMEOUT_S``: PostgreSQL's
    lock_timeout, and a connect timeout): a stuck database raises a storage error instead of
    hanging. Other backends get no lock (SQLite serves one process; elsewhere the count may
    overshoot by up to the number of workers minus one).
    """

    def __init__(self, url: str, study_name: str) -> None:
        u = normalize_url(url)
        self._engine = None
        if u.get_backend_name() == "postgresql":
            import sqlalchemy

            self._engine = sqlalchemy.create_engine(
                u,
                pool_size=1,
                max_overflow=0,
                pool_pre_ping=True,
                connect_args={"connect_timeout": CONNECT_TIMEOUT_S},
            )
        digest = hashlib.blake2b(f"bound_tuner:{study_name}".encode(), digest_size=8).digest()
        self._key = int.from_bytes(digest, "big", signed=True)

    @property
    def exclusive(self) -> bool:
        """Whether holding the lock keeps every other process of the study from claiming."""
        return self._engine is not None

    @contextlib.contextmanager
    def __call__(self, *, timeout: float = LOCK_TIMEOUT_S) -> Iterator[None]:
        if self._engine is None:
            yield
            return
        import sqlalchemy

        with self._engine.begin() as conn:  # the lock ends with the transaction
            ms = max(1, int(timeout * 1000))
            conn.execute(sqlalchemy.text(f"SET LOCAL lock_timeout = {ms}"))
            conn.execute(sqlalchemy.text("SELECT pg_advisory_xact_lock(:k)"), {"k": self._key})
            yield

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()
