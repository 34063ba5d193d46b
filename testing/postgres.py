"""A real PostgreSQL server for tests and benchmarks: a throw-away cluster from Debian's ``postgresql`` package on
127.0.0.1.

``run_postgres()`` is a context manager; ``postgres`` (:mod:`testing.fixtures`) is the session-scoped pytest fixture
built on it. The cluster
is made with ``initdb`` in a fresh temp dir, listens on 127.0.0.1 and a free port (its Unix socket stays in that
dir), trusts the test user, and is stopped and removed at the end. PostgreSQL refuses to run as root, so as root
``initdb``/``pg_ctl`` run as the ``postgres`` system user through ``runuser``; otherwise as the current user.
A missing ``initdb`` fails loudly with the command that installs it: the store tests never skip.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from testing.http import free_port

DSN_ENV = "STABLE_AVATAR_JOBS_DSN"  # the variable PostgresJobsConfig reads by default
START_TIMEOUT_S = 60.0
SUPERUSER = "app"
INSTALL_HINT = ("PostgreSQL server binaries (initdb, pg_ctl) not found in /usr/lib/postgresql/*/bin: install "
                "Debian's package as root with 'apt-get update && apt-get install -y postgresql' (make setup does)")
# Durability off: a throw-away test cluster trades crash safety for speed (bench/ runs its own with defaults).
FAST_SETTINGS = ("-c fsync=off -c synchronous_commit=off -c full_page_writes=off")


@dataclass(frozen=True)
class Postgres:
    """A running cluster: where it listens and how to reach its databases."""

    host: str
    port: int
    user: str
    data_dir: Path
    startup_s: float

    def dsn(self, dbname: str = "postgres") -> str:
        return f"host={self.host} port={self.port} user={self.user} dbname={dbname} connect_timeout=10"

    def create_database(self, prefix: str = "t") -> str:
        """A new empty database; returns its DSN."""
        import psycopg

        name = f"{prefix}_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.dsn(name)

    def drop_database(self, dsn: str) -> None:
        import psycopg

        name = dict(part.split("=", 1) for part in dsn.split())["dbname"]
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def find_pg_bin() -> Path | None:
    """The newest ``/usr/lib/postgresql/<ver>/bin`` that has ``initdb`` (Debian does not put it on PATH)."""
    found = [Path(p).parent for p in glob.glob("/usr/lib/postgresql/*/bin/initdb")]
    if not found:
        on_path = shutil.which("initdb")
        return Path(on_path).parent if on_path else None
    return max(found, key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0)


def _as_server_user(args: list[str]) -> list[str]:
    """As root, run as ``postgres`` (which the Debian package creates); otherwise as ourselves."""
    if os.geteuid() != 0:
        return args
    try:
        pwd.getpwnam("postgres")
    except KeyError as exc:
        raise RuntimeError("running as root but there is no 'postgres' user to run the server as; "
                           "install Debian's postgresql package (it creates the user)") from exc
    return ["runuser", "-u", "postgres", "--", *args]


def _run(args: list[str], what: str, log: Path | None = None) -> None:
    proc = subprocess.run(_as_server_user(args), capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        tail = ""
        if log is not None:
            with contextlib.suppress(OSError):
                tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise RuntimeError(f"{what} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}\n{tail}")


def _wait_ready(server: Postgres, deadline: float) -> None:
    import psycopg

    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            with psycopg.connect(server.dsn(), connect_timeout=2) as conn:
                conn.execute("SELECT 1")
            return
        except psycopg.OperationalError as exc:
            last = exc
            time.sleep(0.1)
    raise TimeoutError(f"PostgreSQL did not accept connections in time (last error: {last!r})")


@contextlib.contextmanager
def run_postgres(fast: bool = True, timeout: float = START_TIMEOUT_S) -> Iterator[Postgres]:
    """initdb + start a cluster in a temp dir, yield it, stop it and remove the dir."""
    pg_bin = find_pg_bin()
    if pg_bin is None:
        raise FileNotFoundError(INSTALL_HINT)
    root = Path(tempfile.mkdtemp(prefix="pgtest-"))
    data, log = root / "data", root / "server.log"
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
    started = time.monotonic()
    running = False
    try:
        _run([str(pg_bin / "initdb"), "-D", str(data), "-U", SUPERUSER, "--auth=trust", "-E", "UTF8",
              "--no-instructions"], "initdb")
        for attempt in range(3):  # the free port can be taken before the server binds it
            port = free_port()
            options = f"-c listen_addresses=127.0.0.1 -p {port} -k {root} -c max_connections=200"
            if fast:
                options += " " + FAST_SETTINGS
            try:
                _run([str(pg_bin / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(log), "-w", "-t",
                      str(int(timeout)), "start"], "pg_ctl start", log)
            except RuntimeError:
                if attempt == 2:
                    raise
                continue
            running = True
            break
        server = Postgres("127.0.0.1", port, SUPERUSER, data, 0.0)
        _wait_ready(server, started + timeout)
        yield Postgres("127.0.0.1", port, SUPERUSER, data, time.monotonic() - started)
    finally:
        if running:
            with contextlib.suppress(RuntimeError):
                _run([str(pg_bin / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"], "pg_ctl stop", log)
        shutil.rmtree(root, ignore_errors=True)
