"""SQLite backend (stdlib ``sqlite3``): the embedded default, one file beside the local storage.

WAL mode lets readers run while one writer commits; every write transaction is ``BEGIN IMMEDIATE``, which takes
the single write lock up front (waiting up to the busy timeout), so a read-then-write transaction can never fail
half-way on a lock upgrade and claims are serialized. Connections are pooled (bounded) and shared across threads
(``check_same_thread=False``; one thread uses a connection at a time). The queries' clock, ``jobs_now()``, is
registered on each connection (SQLite is embedded: the database's clock is this machine's).
"""

from __future__ import annotations

import json
import queue
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from deployments.jobstore.backend import Backend
from deployments.jobstore.schema import apply_migrations


def _dict_row(cursor: sqlite3.Cursor, row: tuple) -> dict[str, Any]:
    return {column[0]: value for column, value in zip(cursor.description, row, strict=True)}


class SqliteBackend(Backend):
    name = "sqlite"

    def __init__(self, path: Path, busy_timeout_s: float = 30.0, synchronous: Literal["FULL", "NORMAL"] = "FULL",
                 max_connections: int = 8):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.busy_timeout_s, self.synchronous = busy_timeout_s, synchronous
        self._max = max_connections
        self._idle: queue.LifoQueue[sqlite3.Connection] = queue.LifoQueue()
        self._all: list[sqlite3.Connection] = []
        self._guard = threading.Lock()
        self._closed = False

    @property
    def max_connections(self) -> int:
        return self._max

    # -- connections ---------------------------------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=self.busy_timeout_s, isolation_level=None,
                               check_same_thread=False)
        conn.row_factory = _dict_row
        # deterministic: read once per statement, like SQLite's own julianday('now'), and usable for index ranges
        conn.create_function("jobs_now", 0, time.time, deterministic=True)
        conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_s * 1000)}")
        self._enable_wal(conn)
        conn.execute(f"PRAGMA synchronous = {self.synchronous}")
        return conn

    def _enable_wal(self, conn: sqlite3.Connection) -> None:
        """WAL is a property of the file; switching to it needs a moment of exclusive access, which another
        process opening the file at the same instant can deny even with a busy timeout: retry until it holds."""
        deadline = time.monotonic() + self.busy_timeout_s
        while True:
            try:
                mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()
                if mode and next(iter(mode.values())).lower() == "wal":
                    return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) and "busy" not in str(exc):
                    raise
            if time.monotonic() > deadline:
                raise sqlite3.OperationalError(f"could not switch {self.path} to WAL mode (database locked)")
            time.sleep(0.01)

    @contextmanager
    def _connection(self) -> Iterator[sqlite3.Connection]:
        if self._closed:
            raise RuntimeError("the job store is closed")
        try:
            conn = self._idle.get_nowait()
        except queue.Empty:
            with self._guard:
                create = len(self._all) < self._max
                if create:
                    conn = self._connect()
                    self._all.append(conn)
            if not create:
                conn = self._idle.get()
        try:
            yield conn
        finally:
            if conn.in_transaction:  # an exception escaped before COMMIT/ROLLBACK
                conn.rollback()
            self._idle.put(conn)

    @contextmanager
    def read(self) -> Iterator[sqlite3.Cursor]:
        with self._connection() as conn:
            cur = conn.cursor()
            cur.execute("BEGIN")  # one snapshot for every statement of the read
            try:
                yield cur
            finally:
                cur.execute("COMMIT")

    @contextmanager
    def write(self) -> Iterator[sqlite3.Cursor]:
        with self._connection() as conn:
            cur = conn.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                yield cur
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            cur.execute("COMMIT")

    @contextmanager
    def single(self) -> Iterator[sqlite3.Cursor]:
        with self._connection() as conn:
            yield conn.cursor()  # autocommit: the statement takes the write lock itself (busy timeout applies)

    def lock(self, cur: Any, name: str, wait: bool = True) -> bool:
        """Nothing to do: the ``BEGIN IMMEDIATE`` transaction already excludes every other writer."""
        return True

    # -- values ---------------------------------------------------------------------------------------------------
    def list_in(self, values: list[str]) -> Any:
        return json.dumps(list(values))  # read with json_each(:param)

    def json_in(self, value: Any) -> Any:
        return None if value is None else json.dumps(value, separators=(",", ":"))

    def json_out(self, value: Any) -> Any:
        return None if value is None else json.loads(value)

    # -- lifecycle ------------------------------------------------------------------------------------------------
    def migrate(self) -> list[int]:
        with self.write() as cur:  # BEGIN IMMEDIATE: a second process starting now waits, then finds them applied
            return apply_migrations(self, cur)

    def close(self) -> None:
        with self._guard:
            self._closed = True
            for conn in self._all:
                conn.close()
            self._all.clear()
