"""What differs between SQLite and PostgreSQL beyond the SQL text: connections, transactions, locks, values.

The SQL itself lives in ``queries.sql`` (per-dialect lines where the two differ). On SQLite a write transaction is
``BEGIN IMMEDIATE`` and holds the database's single write lock, so every write is serialized and row locks are
not needed; PostgreSQL locks rows (``FOR UPDATE [SKIP LOCKED]``) and takes advisory locks for limits that span rows.
"""

from __future__ import annotations

import asyncio
import functools
import time
from abc import ABC, abstractmethod
from contextlib import AbstractContextManager
from typing import Any, Literal, Protocol

Dialect = Literal["sqlite", "postgres"]


class Cursor(Protocol):
    """The DB-API subset the store uses; rows come back as dicts on both backends."""

    rowcount: int

    def execute(self, sql: str, params: Any = ...) -> Any: ...
    def executemany(self, sql: str, params_seq: Any) -> Any: ...
    def fetchone(self) -> dict[str, Any] | None: ...
    def fetchall(self) -> list[dict[str, Any]]: ...


class Backend(ABC):
    """Connections, transactions, locks and value conversions of one database."""

    name: Dialect
    placeholder: str = "?"

    def sql(self, text: str) -> str:
        """Ad-hoc SQL written with ``?`` placeholders (tests, tools) in this driver's style."""
        return _placeholders(text, self.placeholder)

    def is_disconnect(self, exc: BaseException) -> bool:
        """Whether ``exc`` means the connection was lost (so an idempotent read may run again)."""
        return False

    def wait_for_job(self, model_fingerprint: str, timeout_s: float) -> bool:
        """Block until a job of ``model_fingerprint`` may have been queued (True) or ``timeout_s`` passed (False).
        Without notifications (SQLite) it is a pause between polls."""
        time.sleep(timeout_s)
        return False

    async def wait_for_job_async(self, model_fingerprint: str, timeout_s: float) -> bool:
        await asyncio.sleep(timeout_s)
        return False

    @abstractmethod
    def read(self) -> AbstractContextManager[Cursor]:
        """A cursor for reads (a consistent snapshot on SQLite; statement-level on PostgreSQL)."""

    @abstractmethod
    def write(self) -> AbstractContextManager[Cursor]:
        """A cursor inside one write transaction: committed on exit, rolled back on an exception."""

    @abstractmethod
    def single(self) -> AbstractContextManager[Cursor]:
        """A cursor for one write statement, atomic on its own (no BEGIN/COMMIT round trips)."""

    @abstractmethod
    def lock(self, cur: Cursor, name: str, wait: bool = True) -> bool:
        """Serialize this transaction with every other one that locks ``name``, until commit. With ``wait=False``
        returns False at once instead of waiting when another transaction holds it."""

    @abstractmethod
    def list_in(self, values: list[str]) -> Any:
        """A list of strings as one query parameter (no per-item placeholders, no limit on their number)."""

    @abstractmethod
    def json_in(self, value: Any) -> Any:
        """A Python value as a parameter for a JSON column."""

    @abstractmethod
    def json_out(self, value: Any) -> Any:
        """A JSON column's value as a Python value."""

    @abstractmethod
    def migrate(self) -> list[int]:
        """Apply the migrations this database lacks; returns the versions applied now."""

    @abstractmethod
    def close(self) -> None: ...

    @property
    @abstractmethod
    def max_connections(self) -> int:
        """How many operations can run at once (the async facade sizes its thread pool by it)."""


@functools.lru_cache(maxsize=256)
def _placeholders(text: str, placeholder: str) -> str:
    return text if placeholder == "?" else text.replace("?", placeholder)
