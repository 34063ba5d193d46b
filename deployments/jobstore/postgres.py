"""PostgreSQL backend (psycopg 3 + psycopg-pool): job state shared by many Gateways, dispatchers and clusters.

Claims lock rows with ``SELECT ... FOR UPDATE SKIP LOCKED`` so concurrent dispatchers never wait on each other's
candidates; limits that span rows (queue caps, per-key running caps, the running total) are made exact with
transaction-scoped advisory locks (``pg_advisory_xact_lock``), which also serialize migrations at start. The
queue caps serialize submits (one lock held for a few milliseconds, commit included): hundreds of submits per
second, far above what a GPU service queues. Every
time is the database server's ``clock_timestamp()``, so nodes with skewed clocks agree on leases. Connections
are autocommit; a write is one explicit transaction. Pooled connections are not pinged before use (a round trip
per call); a read that finds its connection dropped by a restart runs again on a fresh one, a write raises
``psycopg.OperationalError`` once and its caller answers 503.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from deployments.jobstore.backend import Backend
from deployments.jobstore.schema import apply_migrations
from deployments.jobstore.wakeup import Listener

ADVISORY_NAMESPACE = 0x6A6F6273  # 'jobs': the first key of every advisory lock this store takes


class PostgresBackend(Backend):
    name = "postgres"
    placeholder = "%s"

    def __init__(self, dsn: str, min_size: int = 1, max_size: int = 8, timeout_s: float = 30.0,
                 application_name: str = "stable-avatar-jobs"):
        from psycopg.rows import dict_row
        from psycopg_pool import ConnectionPool

        self._max = max_size
        self.pool = ConnectionPool(
            dsn, min_size=min_size, max_size=max_size, timeout=timeout_s, open=False, name="jobstore",
            kwargs={"autocommit": True, "row_factory": dict_row, "application_name": application_name},
            max_idle=300.0,
        )
        self.pool.open(wait=True, timeout=timeout_s)  # fail at start, not at the first request
        self.listener = Listener(dsn, timeout_s)  # connects on the first wait only (runners; Gateways never wait)

    @property
    def max_connections(self) -> int:
        return self._max

    @contextmanager
    def _checked(self) -> Iterator[None]:
        """A dropped connection usually means all of them were (restart, failover): replace every idle one now,
        so only the call that found out fails (or, for a read, runs again)."""
        import psycopg

        try:
            yield
        except psycopg.OperationalError:
            self.pool.check()
            raise

    @contextmanager
    def read(self) -> Iterator[Any]:
        with self._checked(), self.pool.connection() as conn, conn.cursor() as cur:
            yield cur

    @contextmanager
    def write(self) -> Iterator[Any]:
        with self._checked(), self.pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
            yield cur

    @contextmanager
    def single(self) -> Iterator[Any]:
        with self._checked(), self.pool.connection() as conn, conn.cursor() as cur:
            yield cur  # autocommit: the statement is its own transaction

    def is_disconnect(self, exc: BaseException) -> bool:
        import psycopg

        return isinstance(exc, psycopg.OperationalError)

    def lock(self, cur: Any, name: str, wait: bool = True) -> bool:
        if wait:
            cur.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (ADVISORY_NAMESPACE, name))
            return True
        cur.execute("SELECT pg_try_advisory_xact_lock(%s, hashtext(%s)) AS ok", (ADVISORY_NAMESPACE, name))
        return bool(cur.fetchone()["ok"])

    def list_in(self, values: list[str]) -> Any:
        return list(values)  # a text[] parameter

    def json_in(self, value: Any) -> Any:
        from psycopg.types.json import Jsonb

        return None if value is None else Jsonb(value)

    def json_out(self, value: Any) -> Any:
        return value  # psycopg decodes jsonb

    def migrate(self) -> list[int]:
        with self.write() as cur:
            self.lock(cur, "migrate")  # a second process starting now waits here, then finds them applied
            return apply_migrations(self, cur)

    def wait_for_job(self, model_fingerprint: str, timeout_s: float) -> bool:
        return self.listener.wait(model_fingerprint, timeout_s)

    async def wait_for_job_async(self, model_fingerprint: str, timeout_s: float) -> bool:
        return await self.listener.wait_async(model_fingerprint, timeout_s)

    def close(self) -> None:
        self.listener.close()
        self.pool.close()
