"""The one Ray test cluster: a local Ray instance with Serve's proxy on a free loopback port.

Every service test builds on :func:`ray_serve_cluster` (module-scoped fixtures wrap it), so the cluster's shape
(fake GPUs, object store size, metrics port, HTTPS) is set in one place and torn down the same way.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import ray  # noqa: E402
from ray import serve  # noqa: E402

from deployments.app import build_app  # noqa: E402
from deployments.config import APP_NAME, AppArgs  # noqa: E402
from tests.helpers import free_port  # noqa: E402


@dataclass
class RayServeCluster:
    """A running cluster: ``base`` is the proxy's URL (``http(s)://127.0.0.1:<port>``)."""

    base: str
    metrics_url: str | None = None

    def deploy(self, config: dict[str, Any], name: str = APP_NAME, route_prefix: str = "/") -> AppArgs:
        """Validate ``config`` as the app args and (re)deploy the application; returns the args."""
        args = AppArgs.model_validate(config)
        serve.run(build_app(args), name=name, route_prefix=route_prefix)
        return args

    def local_storage(self, root: Path, public: bool = True) -> dict[str, Any]:
        """A local ``storage:`` block whose links point at this cluster (``public``) or are relative."""
        return {"kind": "local", "root": str(root)} | ({"public_base_url": self.base} if public else {})


@contextmanager
def ray_serve_cluster(num_cpus: int = 4, num_gpus: int = 0, object_store_mb: int = 400,
                      metrics: bool = False, ssl_files: tuple[Path, Path] | None = None) -> Iterator[RayServeCluster]:
    """Start Ray (``num_gpus`` fake GPUs) and Serve's proxy; ``ssl_files`` = (key, cert) makes it speak HTTPS;
    ``metrics`` exports Prometheus metrics on a free port (``metrics_url``)."""
    metrics_port = free_port() if metrics else None
    extra = {"_metrics_export_port": metrics_port} if metrics_port else {}
    # address="local": always a new cluster of our own, even where another one on this machine (a `ray start`, a
    # multi-node test's cluster) would otherwise be found through /tmp/ray/ray_current_cluster and joined.
    ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False, log_to_driver=False,
             object_store_memory=object_store_mb * 2**20, **extra)
    try:
        port = free_port()
        http_options: dict[str, Any] = {"host": "127.0.0.1", "port": port}
        if ssl_files:
            http_options |= {"ssl_keyfile": str(ssl_files[0]), "ssl_certfile": str(ssl_files[1])}
        serve.start(http_options=http_options)
        yield RayServeCluster(f"{'https' if ssl_files else 'http'}://127.0.0.1:{port}",
                              f"http://127.0.0.1:{metrics_port}/metrics" if metrics_port else None)
    finally:
        serve.shutdown()
        ray.shutdown()
