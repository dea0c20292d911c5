"""The study lock waits a bounded time: a lock held elsewhere (or a stuck database) ends in a
storage error, which a worker waits out as an outage, instead of hanging a Ctrl-C."""

from __future__ import annotations

import time
import uuid

import pytest
import sqlalchemy
from worker_spec import PG_URL, needs_pg

from bound_tuner.execution.lock import StudyLock
from bound_tuner.storage.database import connection_lost


@needs_pg
def test_the_study_lock_gives_up_after_its_timeout():
    name = f"lock-{uuid.uuid4().hex[:8]}"
    holder, waiter = StudyLock(PG_URL, name), StudyLock(PG_URL, name)
    try:
        with holder():
            began = time.monotonic()
            with pytest.raises(sqlalchemy.exc.OperationalError) as e:
                with waiter(timeout=1.0):
                    pass
            waited = time.monotonic() - began
        assert 0.9 <= waited < 10, waited
        assert "lock timeout" in str(e.value).lower()
        assert connection_lost(e.value)  # waited out like an outage, bounded by outage_seconds
        with waiter(timeout=1.0):  # free again once the holder's transaction ended
            pass
    finally:
        holder.close()
        waiter.close()
