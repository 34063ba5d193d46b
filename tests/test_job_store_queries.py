"""The store's SQL and schema: every named query (``deployments/jobstore/queries.sql``) is used by an operation,
every name an operation runs exists, every query compiles against the real schema of both databases, and the
migrations carry a database of the release before, jobs in flight included."""

from __future__ import annotations

import ast
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from deployments.jobstore import PostgresJobsConfig, SqliteJobsConfig, make_sync_job_store
from deployments.jobstore.queries import QUERIES, QueryFileError, Statements, parse
from deployments.jobstore.schema import MIGRATIONS, MIGRATIONS_TABLE
from testing.media import REPO_ROOT
from testing.postgres import Postgres
from tests.job_store_env import Env, env_fixture  # noqa: F401

PACKAGE = REPO_ROOT / "deployments" / "jobstore"
RUNNERS = {"run", "one", "all", "count", "rowcount", "many"}


def string_constants(path: Path) -> set[str]:
    return {node.value for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Constant)
            and isinstance(node.value, str)}


def names_run_directly(path: Path) -> set[str]:
    """The literal query names passed to ``self.q.<runner>(cur, "<name>", ...)``."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in RUNNERS
                and isinstance(node.func.value, ast.Attribute) and node.func.value.attr == "q"
                and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant)):
            names.add(node.args[1].value)
    return names


def test_every_query_is_used_and_every_name_run_exists():
    sources = sorted(PACKAGE.rglob("*.py"))
    constants = set().union(*(string_constants(p) for p in sources))
    assert sorted(set(QUERIES) - constants) == [], "queries no operation runs"
    run = set().union(*(names_run_directly(p) for p in sources))
    assert run and sorted(run - set(QUERIES)) == [], "names an operation runs that queries.sql lacks"


def test_each_dialect_gets_its_own_lines_and_named_parameters_in_its_driver_style():
    take = QUERIES["take_rate_token"]
    assert "LEAST(" in take.text["postgres"] and "LEAST(" not in take.text["sqlite"]
    assert "min(" in take.text["sqlite"] and "min(" not in take.text["postgres"]
    assert "-- sqlite" not in take.text["sqlite"] and "-- postgres" not in take.text["postgres"]
    assert "FOR UPDATE" in QUERIES["lock_running_job"].text["postgres"]
    assert "FOR UPDATE" not in QUERIES["lock_running_job"].text["sqlite"]
    assert {"owner", "burst", "rate"} == take.params
    assert "%(owner)s" in Statements("postgres").text["take_rate_token"]
    assert ":owner" in Statements("sqlite").text["take_rate_token"]
    # a view's columns come from the model, not a hand-written list
    assert "log_seq" in QUERIES["get_job"].text["sqlite"] and "{view_columns}" not in QUERIES["get_job"].text["sqlite"]


@pytest.mark.parametrize("source, complaint", [
    ("SELECT 1", "before the first"),
    ("-- name: a\nSELECT 1\n-- name: a\nSELECT 2", "defined twice"),
    ("-- name: Bad\nSELECT 1", "snake_case"),
    ("-- name: a\n-- only a description", "no SQL"),
    ("-- name: a\nSELECT ?", "named parameters"),
    ("-- name: a\nSELECT {nope}", "unknown template"),
])
def test_a_malformed_query_file_is_refused_when_loaded(source: str, complaint: str):
    with pytest.raises(QueryFileError, match=complaint):
        parse(source)


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_every_query_compiles_against_the_migrated_schema(kind: str, tmp_path: Path, request: pytest.FixtureRequest):
    """EXPLAIN parses and plans each statement (with every parameter NULL) without running it."""
    pg: Postgres | None = None
    if kind == "sqlite":
        config: SqliteJobsConfig | PostgresJobsConfig = SqliteJobsConfig(path=tmp_path / "jobs.sqlite3")
    else:
        pg = request.getfixturevalue("postgres")
        dsn = pg.create_database("queries")
        (tmp_path / "dsn").write_text(dsn)
        config = PostgresJobsConfig(dsn_file=tmp_path / "dsn", pool_max_size=1)
    store = make_sync_job_store(config, tmp_path / "unused.sqlite3")
    failures, compiled = {}, 0
    try:
        for name, text in store.q.text.items():
            if not text:
                continue  # this query does nothing on this dialect
            params = dict.fromkeys(QUERIES[name].params)
            try:
                with store.backend.write() as cur:
                    cur.execute("EXPLAIN " + text, params)
                    cur.fetchall()
                compiled += 1
            except Exception as exc:  # noqa: BLE001 - collected and reported together
                failures[name] = f"{type(exc).__name__}: {exc}"
    finally:
        store.close()
        if pg is not None:
            pg.drop_database(dsn)
    assert failures == {}
    assert compiled >= len(QUERIES) - sum(not t for t in store.q.text.values())


def test_a_database_of_the_release_before_upgrades_with_its_jobs_in_flight(env: Env, tmp_path: Path):
    """Schema version 3 (queue, logs, webhooks, secrets, maintenance leases) with a queued and a running job, as
    that release wrote them: the upgrade keeps both working (the running one's completion readable)."""
    config = env.fresh_config(tmp_path)
    old_release = [m for m in MIGRATIONS if m.version <= 3]
    with raw_connection(env, config) as conn:
        conn.execute(MIGRATIONS_TABLE)
        for migration in old_release:
            for statement in migration.render(env.kind):
                conn.execute(statement)
            conn.execute(placeholders(env, "INSERT INTO schema_migrations VALUES (?, ?, 0)"),
                         (migration.version, migration.name))
        for request_id, status, epoch, lease in (("a" * 32, "IN_QUEUE", 0, None), ("b" * 32, "IN_PROGRESS", 1, "r")):
            conn.execute(placeholders(env, "INSERT INTO jobs (request_id, app_id, owner, kind, status, priority, "
                                           "input, input_keys, seed, created_at, started_at, stage, attempts, "
                                           "max_attempts, epoch, lease_owner, lease_expires_at, result_keys) "
                                           "VALUES (?, 'a', 'k1', 'queue', ?, 0, '{}', '[]', 1, 1.0, ?, 'x', ?, 3, "
                                           "?, ?, 4.0e9, '[]')"),
                         (request_id, status, 1.0 if lease else None, epoch, epoch, lease))
    store = env.open(config)
    assert store.migrations_applied == [m.version for m in MIGRATIONS if m.version > 3]
    running = "b" * 32
    store.record_checkpoint(running, 1, f"checkpoints/{running}/e1/s2.pt", 2)
    assert store.complete(running, 1, result={"video": "k"}, result_keys=["k"]).outcome == "succeeded"
    assert store.completion(running, 1) is not None
    claimed = store.claim("new-runner", 30)
    assert (claimed.request_id, claimed.model_fingerprint, claimed.epoch) == ("a" * 32, "", 1)


@contextmanager
def raw_connection(env: Env, config: SqliteJobsConfig | PostgresJobsConfig) -> Iterator[Any]:
    """A driver connection in autocommit, outside the store (to write what an older release wrote)."""
    if env.kind == "sqlite":
        conn = sqlite3.connect(config.path, isolation_level=None)
    else:
        import psycopg

        conn = psycopg.connect(config.dsn(), autocommit=True)
    try:
        yield conn
    finally:
        conn.close()


def placeholders(env: Env, text: str) -> str:
    return text if env.kind == "sqlite" else text.replace("?", "%s")
