"""The ``jobs:`` block of the app args: which database holds job state. Secrets never live in it.

``{kind: sqlite}`` (the default) keeps a file, by default under the local storage root; ``{kind: postgres}``
reads the DSN (password included) from the environment variable named by ``dsn_env`` or from ``dsn_file`` (a
mounted Kubernetes Secret); ``<dsn_env>_FILE`` in the environment also names such a file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

DEFAULT_DSN_ENV = "STABLE_AVATAR_JOBS_DSN"
DEFAULT_SQLITE_NAME = "jobs.sqlite3"


class SqliteJobsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["sqlite"] = "sqlite"
    path: Path | None = Field(None, description="database file (default: chosen by the app, beside local storage)")
    busy_timeout_s: float = Field(30.0, gt=0, le=600, description="how long a writer waits for the write lock")
    synchronous: Literal["FULL", "NORMAL"] = Field(
        "FULL", description="FULL: a committed job survives power loss; NORMAL: only a process crash")
    max_connections: int = Field(8, ge=1, le=64, description="pooled connections (= concurrent calls)")


class PostgresJobsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["postgres"] = "postgres"
    dsn_env: str = Field(DEFAULT_DSN_ENV, min_length=1, description="environment variable holding the DSN")
    dsn_file: Path | None = Field(None, description="file holding the DSN (a mounted Secret); wins over dsn_env")
    pool_min_size: int = Field(1, ge=0, le=100)
    pool_max_size: int = Field(8, ge=1, le=100, description="connections per process (= concurrent calls)")
    connect_timeout_s: float = Field(30.0, gt=0, le=600, description="wait for the database at start / a connection")
    application_name: str = Field("stable-avatar-jobs", max_length=63)

    @model_validator(mode="after")
    def _sizes(self) -> PostgresJobsConfig:
        if self.pool_min_size > self.pool_max_size:
            raise ValueError("pool_min_size must not exceed pool_max_size")
        return self

    def dsn(self) -> str:
        """The DSN from ``dsn_file``, ``$<dsn_env>_FILE`` or ``$<dsn_env>``; never logged or shown."""
        file = self.dsn_file or (Path(p) if (p := os.environ.get(self.dsn_env + "_FILE")) else None)
        if file is not None:
            try:
                text = Path(file).read_text().strip()
            except OSError as exc:
                raise ValueError(f"jobs.dsn_file {str(file)!r} cannot be read: {exc.strerror}") from exc
            if not text:
                raise ValueError(f"jobs.dsn_file {str(file)!r} is empty")
            return text
        text = os.environ.get(self.dsn_env, "").strip()
        if not text:
            raise ValueError(f"jobs.kind is postgres but the environment variable {self.dsn_env} (the DSN, e.g. "
                             f"'postgresql://user:password@host:5432/db') is not set, and no jobs.dsn_file is given")
        return text


JobsConfig = Annotated[SqliteJobsConfig | PostgresJobsConfig, Field(discriminator="kind")]
