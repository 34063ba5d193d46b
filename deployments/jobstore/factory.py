"""Opening a store from the ``jobs:`` block of the app args (blocking: it connects and migrates, so call it at
start, from a replica's ``__init__``)."""

from __future__ import annotations

from pathlib import Path

from deployments.jobstore.config import PostgresJobsConfig, SqliteJobsConfig
from deployments.jobstore.models import JobLimits
from deployments.jobstore.store import JobStore, SyncJobStore


def make_sync_job_store(config: SqliteJobsConfig | PostgresJobsConfig | None, default_sqlite_path: Path,
                        limits: JobLimits | None = None) -> SyncJobStore:
    """Open the configured database (SQLite at ``config.path or default_sqlite_path`` when no config is given)
    and apply its migrations."""
    config = config or SqliteJobsConfig()
    if isinstance(config, SqliteJobsConfig):
        from deployments.jobstore.sqlite import SqliteBackend

        backend = SqliteBackend(config.path or Path(default_sqlite_path), config.busy_timeout_s, config.synchronous,
                                config.max_connections)
    else:
        from deployments.jobstore.postgres import PostgresBackend

        backend = PostgresBackend(config.dsn(), config.pool_min_size, config.pool_max_size,
                                  config.connect_timeout_s, config.application_name)
    try:
        return SyncJobStore(backend, limits)
    except BaseException:
        backend.close()
        raise


def make_job_store(config: SqliteJobsConfig | PostgresJobsConfig | None, default_sqlite_path: Path,
                   limits: JobLimits | None = None) -> JobStore:
    """The async store for Ray Serve replicas."""
    return JobStore(make_sync_job_store(config, default_sqlite_path, limits))
