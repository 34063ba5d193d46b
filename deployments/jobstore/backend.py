"""What differs between SQLite and PostgreSQL, behind one small interface the SQL core is written against.

The core writes SQL once, with ``?`` placeholders and these tokens: ``{now}`` (the database's clock in epoch
seconds), ``{for_update}`` (lock the selected rows), ``{skip_locked}`` (lock them, skipping rows another
transaction holds), ``{least}``/``{greatest}`` (two-argument min/max). On SQLite the locking tokens are empty: a write transaction is ``BEGIN IMMEDIATE`` and holds
the database's single write lock, so every write is serialized anyway.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import Any, Protocol


class Cursor(Protocol):
    """The DB-API subset the core uses; rows come back as dicts on both backends."""

    rowcount: int

    def execute(self, sql: str, params: Any = ...) -> Any: ...
    def fetchone(self) -> dict[str, Any] | None: ...
    def fetchall(self) -> list[dict[str, Any]]: ...


class Backend(ABC):
    """Connections, transactions, locks and value conversions of one database."""

    name: str
    tokens: dict[str, str]
    placeholder: str = "?"

    def sql(self, text: str) -> str:
        """The core's SQL in this backend's dialect."""
        return _render(text, tuple(sorted(self.tokens.items())), self.placeholder)

    def is_disconnect(self, exc: BaseException) -> bool:
        """Whether ``exc`` means the connection was lost (so an idempotent read may run again)."""
        return False

    def index_hint(self, index: str) -> str:
        """SQL placed after ``FROM jobs`` to use ``index`` where a planner without statistics would not."""
        return ""

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
    def json_elements(self, column: str, alias: str) -> str:
        """A FROM item expanding the JSON array of strings in ``column`` into rows with a text ``<alias>.value``."""

    @abstractmethod
    def json_strings(self, column: str, alias: str) -> tuple[str, str, str]:
        """Every string anywhere in the JSON document ``column``, as (a FROM item, its text value expression, the
        condition that keeps strings only)."""

    @abstractmethod
    def text_list_rows(self) -> str:
        """A SELECT yielding one row (column ``value``) per string of one list parameter (:meth:`text_list_in`)."""

    @abstractmethod
    def text_list_in(self, values: list[str]) -> Any:
        """A list of strings as the parameter of :meth:`text_list_rows` (no per-item placeholder limit)."""

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


@functools.lru_cache(maxsize=1024)  # the core has a few dozen distinct statements
def _render(text: str, tokens: tuple[tuple[str, str], ...], placeholder: str) -> str:
    rendered = text.format(**dict(tokens))
    return rendered if placeholder == "?" else rendered.replace("?", placeholder)


def chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]
