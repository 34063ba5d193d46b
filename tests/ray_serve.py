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
    """A running cluster: ``base`` is the proxy's URL (``http(s)://127.0.0.1:<port>``); ``nodes`` is the
    ``ray.cluster_utils.Cluster`` of a multi-node cluster (``add_node``/``remove_node``), else None."""

    base: str
    metrics_url: str | None = None
    nodes: Any = None
    worker_args: dict[str, Any] | None = None  # what a multi-node cluster's worker nodes are started with

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


@contextmanager
def ray_serve_multinode_cluster(head_cpus: int = 8, workers: int = 2, worker_gpus: int = 2,
                                object_store_mb: int = 200) -> Iterator[RayServeCluster]:
    """A head node (CPUs, no GPUs: the CPU deployments land here) and ``workers`` nodes with ``worker_gpus`` fake
    GPUs and no CPUs (only GPU deployments fit there), all on this machine, as Ray's own tests build one
    (``ray.cluster_utils.Cluster``). ``nodes.add_node(**worker_args)``/``nodes.remove_node(node)`` add and
    lose a worker node like a GPU pod of a KubeRay cluster. Serve's proxy runs on the head only (one port)."""
    from ray.cluster_utils import Cluster

    worker_args = {"num_cpus": 0, "num_gpus": worker_gpus, "object_store_memory": object_store_mb * 2**20}
    nodes = Cluster(initialize_head=True, head_node_args={
        "num_cpus": head_cpus, "num_gpus": 0, "object_store_memory": object_store_mb * 2**20,
        "include_dashboard": False})
    try:
        for _ in range(workers):
            nodes.add_node(**worker_args)
        nodes.wait_for_nodes()
        ray.init(address=nodes.address, log_to_driver=False)
        try:
            port = free_port()
            serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
            yield RayServeCluster(f"http://127.0.0.1:{port}", nodes=nodes, worker_args=worker_args)
        finally:
            serve.shutdown()
            ray.shutdown()
    finally:
        nodes.shutdown()
