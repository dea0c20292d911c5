"""The artifact folder of a storage: where trial notes' images and trained weights are kept
(beside a SQLite file, or ``$BOUND_TUNER_ARTIFACTS``)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import BinaryIO

from optuna.artifacts import FileSystemArtifactStore

from bound_tuner.storage.database import is_grpc, normalize_url, resolve_url

ARTIFACTS_ENV = "BOUND_TUNER_ARTIFACTS"


def artifact_dir_for(storage_url: str | None = None) -> Path:
    """Where a study's artifacts go by default: $BOUND_TUNER_ARTIFACTS, else
    ``<db name>_artifacts`` next to a SQLite file, else a folder of the working directory named
    after the database server, ``<backend>_<host>_<port>_<database>_artifacts``
    (``grpc_<host>_<port>_artifacts`` for a storage proxy), so that a PostgreSQL study and a SQLite
    study of one name never share a folder. A run records the absolute folder in its study
    (user attr ``bound_tuner.artifacts``), and each trial the folder of its weights."""
    env = os.environ.get(ARTIFACTS_ENV)
    if env:
        return Path(env).expanduser()
    url = resolve_url(storage_url)
    if is_grpc(url):
        host, _, port = url.strip()[len("grpc://") :].partition(":")
        parts = ["grpc", host, port.strip("/")]
    else:
        u = normalize_url(url)
        if u.get_backend_name() == "sqlite" and u.database and u.database != ":memory:":
            db = Path(u.database).expanduser()
            return db.with_name(f"{db.stem}_artifacts")
        parts = [u.get_backend_name(), u.host or "local", str(u.port or ""), u.database or ""]
    tag = "_".join(p for p in parts if p)
    return Path(re.sub(r"[^A-Za-z0-9._\-]+", "-", tag) + "_artifacts")


class FolderArtifactStore(FileSystemArtifactStore):
    """A FileSystemArtifactStore that creates its folder on the first write (not before, so a
    study that never starts leaves no folder behind)."""

    def __init__(self, base_path: str | Path) -> None:
        super().__init__(Path(base_path))
        self.path = Path(base_path)

    def write(self, artifact_id: str, content_body: BinaryIO) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        super().write(artifact_id, content_body)


def artifact_store_for(storage_url: str | None = None) -> FolderArtifactStore:
    """The file-system artifact store of a storage URL (folder: see ``artifact_dir_for``)."""
    return FolderArtifactStore(artifact_dir_for(storage_url))
