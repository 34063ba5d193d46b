"""The job store tests' world: one real database per test, SQLite (a file) or PostgreSQL (a database of the
session's throw-away cluster), and the small helpers every store test uses."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from deployments.jobstore import (
    DEFAULT_DSN_ENV,
    JobLimits,
    PostgresJobsConfig,
    SqliteJobsConfig,
    SyncJobStore,
    make_sync_job_store,
)
from testing.postgres import Postgres

BACKENDS = ["sqlite", "postgres"]
INPUT = {"image_url": "uploads/k1/face.png", "audio_url": "https://example.invalid/a.wav", "prompt": "hi"}


@dataclass
class Env:
    """One backend for one test: opens store instances ("applications") on the same database."""

    kind: str
    config: SqliteJobsConfig | PostgresJobsConfig
    default_path: Path
    postgres: Postgres | None = None
    stores: list[SyncJobStore] = field(default_factory=list)
    databases: list[str] = field(default_factory=list)

    def open(self, config: Any = None, **limits: Any) -> SyncJobStore:
        store = make_sync_job_store(config or self.config, self.default_path, JobLimits(**limits))
        self.stores.append(store)
        return store

    def location(self) -> str:
        """What a child process needs to open the same database."""
        return str(self.default_path) if self.kind == "sqlite" else os.environ[DEFAULT_DSN_ENV]

    def fresh_config(self, tmp: Path) -> SqliteJobsConfig | PostgresJobsConfig:
        """A config naming a new, empty database."""
        if self.kind == "sqlite":
            return SqliteJobsConfig(path=tmp / f"fresh-{len(self.databases)}.sqlite3", synchronous="NORMAL")
        assert self.postgres is not None
        dsn = self.postgres.create_database("fresh")
        self.databases.append(dsn)
        file = tmp / f"dsn-{len(self.databases)}"
        file.write_text(dsn + "\n")
        return PostgresJobsConfig(dsn_file=file, pool_max_size=2)


@pytest.fixture(params=BACKENDS, name="env")
def env_fixture(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Env]:
    yield from open_env(request.param, request, tmp_path, monkeypatch)


@pytest.fixture(name="pg_env")
def pg_env_fixture(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                   ) -> Iterator[Env]:
    """The PostgreSQL world alone, for what only PostgreSQL has (LISTEN/NOTIFY)."""
    yield from open_env("postgres", request, tmp_path, monkeypatch)


def open_env(kind: str, request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
             ) -> Iterator[Env]:
    if kind == "sqlite":
        # path=None: the default path (beside local storage, chosen by the caller) is used
        e = Env("sqlite", SqliteJobsConfig(synchronous="NORMAL"), tmp_path / "jobs.sqlite3")
    else:
        pg: Postgres = request.getfixturevalue("postgres")
        dsn = pg.create_database()
        monkeypatch.setenv(DEFAULT_DSN_ENV, dsn)  # the variable PostgresJobsConfig reads
        e = Env("postgres", PostgresJobsConfig(pool_max_size=4), tmp_path / "unused.sqlite3", pg, databases=[dsn])
    yield e
    for store in e.stores:
        store.close()
    for dsn in e.databases:
        e.postgres.drop_database(dsn)


def submit(store: SyncJobStore, owner: str = "k1", **kwargs: Any) -> str:
    kwargs.setdefault("rate_limited", False)
    return store.submit(app_id="fal-ai/stable-avatar", input=INPUT, seed=7, owner=owner, **kwargs).request_id


def sql(store: SyncJobStore, text: str, params: tuple = ()) -> list[dict[str, Any]]:
    with store.backend.read() as cur:
        cur.execute(store.backend.sql(text), params)
        return cur.fetchall()


def log_messages(store: SyncJobStore, request_id: str, owner: str = "k1") -> list[str]:
    page = store.logs(request_id, owner)
    assert page is not None
    return [line.message for line in page.lines]


def together(n: int, fn: Callable[[int], Any]) -> list[Any]:
    """Run ``fn(i)`` in ``n`` threads released at once; returns results or the exceptions raised."""
    barrier, out = threading.Barrier(n), [None] * n

    def run(i: int) -> None:
        barrier.wait()
        try:
            out[i] = fn(i)
        except Exception as exc:  # noqa: BLE001 - returned to the test
            out[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out
