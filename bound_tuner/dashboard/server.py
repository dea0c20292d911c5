"""optuna-dashboard on a study storage, with its artifact folder."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

from optuna.artifacts import FileSystemArtifactStore

from bound_tuner.storage.database import (
    STUDY_ARTIFACTS_ATTR,
    make_storage,
    require_database,
    resolve_url,
)
from bound_tuner.storage.folders import ARTIFACTS_ENV, artifact_dir_for

_log = logging.getLogger(__name__)


def served_artifact_dir(storage: Any, url: str, artifact_dir: str | Path | None) -> Path:
    """The artifact folder to serve: ``artifact_dir`` if given, else $BOUND_TUNER_ARTIFACTS,
    else the one folder that the storage's studies recorded when they ran (user attr
    ``bound_tuner.artifacts``; so a dashboard started in another directory finds them), else
    ``artifact_dir_for(url)``."""
    if artifact_dir is not None:
        return Path(artifact_dir)
    if os.environ.get(ARTIFACTS_ENV):
        return artifact_dir_for(url)
    recorded = {s.user_attrs.get(STUDY_ARTIFACTS_ATTR) for s in storage.get_all_studies()}
    recorded.discard(None)
    if len(recorded) == 1:
        return Path(recorded.pop())
    if len(recorded) > 1:
        _log.warning(
            "the studies of this storage keep their artifacts in %d folders; serving %s "
            "(give --artifacts DIR for another)",
            len(recorded),
            artifact_dir_for(url),
        )
    return artifact_dir_for(url)


def dashboard_app(storage_url: str | None = None, *, artifact_dir: str | Path | None = None):
    """The optuna-dashboard WSGI app on a study storage and its artifact store."""
    from optuna_dashboard import wsgi

    url = resolve_url(storage_url)
    require_database(url)
    store = make_storage(url)
    path = served_artifact_dir(store, url, artifact_dir)
    return wsgi(store, artifact_store=FileSystemArtifactStore(path))


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def host_warning(host: str) -> str | None:
    """The warning for a dashboard listening beyond this machine, or None on loopback."""
    import ipaddress

    try:
        loopback = ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        loopback = host in LOOPBACK
    if loopback:
        return None
    return (
        f"bound-tuner: warning: --host {host} lets anyone who can reach this address open the "
        "dashboard; optuna-dashboard has no login, and its users can change notes and delete "
        "studies. Serve on 127.0.0.1 and tunnel (ssh -L 8080:127.0.0.1:8080 host) instead"
    )


def serve(
    storage_url: str | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    artifact_dir: str | Path | None = None,
) -> None:
    """Serve optuna-dashboard on a study storage with its artifact store (blocks).

    ``storage_url`` defaults to $BOUND_TUNER_STORAGE or sqlite:///bound_tuner.db; ``artifact_dir``
    to ``artifact_dir_for(storage_url)``.
    """
    from optuna_dashboard import run_server

    warning = host_warning(host)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    url = resolve_url(storage_url)
    require_database(url)
    store = make_storage(url)
    path = served_artifact_dir(store, url, artifact_dir)
    print(f"optuna-dashboard on http://{host}:{port}/dashboard/ (artifacts in {path})", flush=True)
    run_server(store, host=host, port=port, artifact_store=FileSystemArtifactStore(path))
