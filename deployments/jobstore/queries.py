"""The store's SQL: named queries read once, at import, from ``queries.sql`` (procrastinate's layout).

A block starts with ``-- name: <name>``; the comment lines after it say what the query does. Parameters are
named (``:request_id``). Where SQLite and PostgreSQL differ, the differing lines end in ``-- sqlite`` or
``-- postgres`` and belong to that dialect only (row locks, index hints, list parameters, JSON functions); a query
whose lines all belong to one dialect does nothing on the other (``NOTIFY`` on SQLite). ``{view_columns}`` and
``{claim_columns}`` stand for the column lists of :class:`JobView` and :class:`ClaimedJob` (:mod:`.columns`).
``jobs_now()`` is the database's clock in epoch seconds on both backends (a function each backend provides).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deployments.jobstore.backend import Cursor, Dialect
from deployments.jobstore.columns import TEMPLATES

DIALECTS: tuple[Dialect, ...] = ("sqlite", "postgres")
QUERY_FILE = Path(__file__).with_name("queries.sql")

_NAME = re.compile(r"--\s*name:\s*(\S+)\s*$")
_VALID_NAME = re.compile(r"[a-z][a-z0-9_]*")
_DIALECT_TAG = re.compile(r"\s*--\s*(sqlite|postgres)\s*$")
_PARAM = re.compile(r"(?<![:\w]):([a-z_][a-z0-9_]*)")
_TEMPLATE = re.compile(r"\{([a-z_]+)\}")


class QueryFileError(ValueError):
    """``queries.sql`` is malformed (raised at import: the store never runs with a broken query file)."""


@dataclass(frozen=True)
class Query:
    name: str
    doc: str
    text: Mapping[Dialect, str]  # '' where the query does nothing on that dialect
    params: frozenset[str]


def _render(body: list[str], dialect: Dialect, name: str) -> str:
    lines = []
    for line in body:
        tag = _DIALECT_TAG.search(line)
        if tag is not None:
            if tag.group(1) != dialect:
                continue
            line = line[:tag.start()]
        lines.append(line.rstrip())
    text = "\n".join(lines).strip()

    def fill(match: re.Match[str]) -> str:
        if match.group(1) not in TEMPLATES:
            raise QueryFileError(f"query {name}: unknown template {{{match.group(1)}}}")
        return TEMPLATES[match.group(1)]

    return _TEMPLATE.sub(fill, text)


def parse(source: str) -> dict[str, Query]:
    """Every query of ``source``; raises QueryFileError for text outside a block, a bad or repeated name, an
    empty query, or a ``?`` placeholder."""
    blocks: list[tuple[str, list[str], list[str]]] = []
    for number, line in enumerate(source.splitlines(), 1):
        if (named := _NAME.match(line)) is not None:
            name = named.group(1)
            if not _VALID_NAME.fullmatch(name):
                raise QueryFileError(f"line {number}: query name {name!r} is not lowercase snake_case")
            blocks.append((name, [], []))
        elif line.lstrip().startswith("--") and not _DIALECT_TAG.search(line):
            if blocks and not blocks[-1][2]:  # comments before the SQL: the query's description
                blocks[-1][1].append(line.lstrip()[2:].strip())
        elif line.strip():
            if not blocks:
                raise QueryFileError(f"line {number}: SQL before the first '-- name:'")
            blocks[-1][2].append(line)
    queries: dict[str, Query] = {}
    for name, doc, body in blocks:
        if name in queries:
            raise QueryFileError(f"query {name} is defined twice")
        text = {dialect: _render(body, dialect, name) for dialect in DIALECTS}
        if not any(text.values()):
            raise QueryFileError(f"query {name} has no SQL")
        if any("?" in t for t in text.values()):
            raise QueryFileError(f"query {name}: use named parameters (:name), not '?'")
        params = frozenset(p for t in text.values() for p in _PARAM.findall(t))
        queries[name] = Query(name, " ".join(doc), text, params)
    return queries


QUERIES: dict[str, Query] = parse(QUERY_FILE.read_text())


def _driver_text(text: str, dialect: Dialect) -> str:
    """The query in the driver's placeholder style: ``:name`` for sqlite3, ``%(name)s`` for psycopg."""
    if dialect == "sqlite":
        return text
    return _PARAM.sub(r"%(\1)s", text.replace("%", "%%"))


class Statements:
    """The named queries of one dialect, ready for its driver; every store operation runs SQL through these."""

    def __init__(self, dialect: Dialect):
        self.dialect = dialect
        self.text = {name: _driver_text(q.text[dialect], dialect) for name, q in QUERIES.items()}

    def run(self, cur: Cursor, name: str, /, **params: Any) -> Cursor | None:
        """Execute ``name``; None where the query does nothing on this dialect."""
        text = self.text[name]
        if not text:
            return None
        cur.execute(text, params)
        return cur

    def one(self, cur: Cursor, name: str, /, **params: Any) -> dict[str, Any] | None:
        ran = self.run(cur, name, **params)
        return None if ran is None else ran.fetchone()

    def all(self, cur: Cursor, name: str, /, **params: Any) -> list[dict[str, Any]]:
        ran = self.run(cur, name, **params)
        return [] if ran is None else ran.fetchall()

    def count(self, cur: Cursor, name: str, /, **params: Any) -> int:
        """A query answering one row with a column ``n``."""
        row = self.one(cur, name, **params)
        assert row is not None, name
        return int(row["n"])

    def rowcount(self, cur: Cursor, name: str, /, **params: Any) -> int:
        ran = self.run(cur, name, **params)
        return 0 if ran is None else ran.rowcount

    def many(self, cur: Cursor, name: str, rows: list[dict[str, Any]]) -> None:
        """Execute ``name`` once per parameter set, in one driver call."""
        if rows and self.text[name]:
            cur.executemany(self.text[name], rows)
