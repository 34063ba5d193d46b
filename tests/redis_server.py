"""A real Redis server for tests: a throw-away ``redis-server`` from Debian's package on 127.0.0.1.

``run_redis()`` is a context manager; ``redis_server`` is the module-scoped pytest fixture built on it. The server
gets a fresh temp dir, a free port, a random password (``requirepass``, passed in a config file of mode 600 as the
dev overlay's Redis gets it, not on the command line) and no persistence (a test's cluster state dies with it); it is
stopped and the dir removed at the end, and dies with the test process if that is killed. A missing ``redis-server`` or ``redis-cli`` fails loudly with the command
that installs them: the tests never skip.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from testing.http import free_port

START_TIMEOUT_S = 30.0
INSTALL_HINT = ("redis-server/redis-cli not found: install Debian's package as root with 'apt-get update && "
                "apt-get install -y redis-server' (make setup does, through make redis-deps)")


@dataclass(frozen=True)
class Redis:
    """A running server: where it listens and its password."""

    host: str
    port: int
    password: str
    pid: int

    @property
    def address(self) -> str:
        """``host:port``, the form of ``RAY_REDIS_ADDRESS`` and KubeRay's ``redisAddress``."""
        return f"{self.host}:{self.port}"

    def cli(self, *args: str) -> str:
        """One ``redis-cli`` command's reply (the password goes through ``REDISCLI_AUTH``, never argv)."""
        done = subprocess.run(["redis-cli", "-h", self.host, "-p", str(self.port), *args], capture_output=True,
                              text=True, timeout=10, env={**os.environ, "REDISCLI_AUTH": self.password})
        if done.returncode != 0:
            raise RuntimeError(f"redis-cli {' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}")
        return done.stdout.strip()

    def keys(self, pattern: str = "*") -> list[str]:
        return [k for k in self.cli("--scan", "--pattern", pattern).splitlines() if k]


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when its parent dies, so a killed run leaves no server behind. Linux ties
    this to the starting *thread*: start the server from a thread that lives as long as it (the fixture does)."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG (Linux)


def _missing_binaries() -> list[str]:
    return [name for name in ("redis-server", "redis-cli") if shutil.which(name) is None]


@contextlib.contextmanager
def run_redis(timeout: float = START_TIMEOUT_S) -> Iterator[Redis]:
    """Start ``redis-server`` in a temp dir, yield it once it answers PING with the password, stop it."""
    if _missing_binaries():
        raise FileNotFoundError(INSTALL_HINT)
    root = Path(tempfile.mkdtemp(prefix="redistest-"))
    password = secrets.token_hex(16)
    conf = root / "redis.conf"
    conf.touch(mode=0o600)
    conf.write_text(f"requirepass {password}\n")
    proc = None
    try:
        for attempt in range(3):  # the free port can be taken before the server binds it
            port = free_port()
            log = root / f"server-{attempt}.log"
            proc = subprocess.Popen(
                ["redis-server", str(conf), "--bind", "127.0.0.1", "--port", str(port), "--dir", str(root),
                 "--save", "", "--appendonly", "no", "--daemonize", "no", "--logfile", str(log)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent)
            server = Redis("127.0.0.1", port, password, proc.pid)
            if _wait_ready(server, proc, time.monotonic() + timeout):
                break
            _stop(proc)
            if attempt == 2:
                tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                raise RuntimeError(f"redis-server did not start on 127.0.0.1:{port}:\n{tail}")
        yield server
    finally:
        if proc is not None:
            _stop(proc)
        shutil.rmtree(root, ignore_errors=True)


def _wait_ready(server: Redis, proc: subprocess.Popen, deadline: float) -> bool:
    while time.monotonic() < deadline and proc.poll() is None:
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            if server.cli("PING") == "PONG":
                return True
        time.sleep(0.1)
    return False


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture(scope="module")
def redis_server() -> Iterator[Redis]:
    """A password-protected Redis for one test module. Fails (never skips) when the binaries are missing."""
    missing = _missing_binaries()
    if missing:
        pytest.fail(f"{', '.join(missing)}: {INSTALL_HINT}")
    with run_redis() as server:
        yield server
