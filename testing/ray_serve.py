"""Local Ray clusters with Serve's proxy on a free loopback port, for tests and benchmarks.

A process is the driver of one Ray cluster at a time, so there is one cluster at a time here too:

- :func:`shared_cluster`: the cluster the Serve tests share (fake GPUs, a metrics port), started on first use and
  kept until the last test that uses it (``testing.fixtures``). Each test module deploys its applications under
  their own names, with what their replicas read from the environment passed per application
  (:func:`with_env_vars`), and deletes them at its end (:func:`delete_applications`). Starting Ray and Serve
  takes tens of seconds on a loaded 2-core machine: paid once, not per module.
- :func:`ray_serve_cluster`: a cluster of one's own, for what is set for a whole cluster: an HTTPS proxy, an
  object store size a benchmark measures against. It stops the shared cluster first.
- :func:`ray_serve_multinode_cluster`: a head node and worker nodes with fake GPUs (the soak), likewise.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from testing.ray_env import use_test_cluster_env

use_test_cluster_env()

import ray  # noqa: E402
from ray import serve  # noqa: E402
from ray.serve import Application  # noqa: E402

from deployments.app import build_app  # noqa: E402
from deployments.config import APP_NAME, AppArgs  # noqa: E402
from testing.http import free_port  # noqa: E402

# The shared cluster's shape: enough fake GPUs for the largest Denoiser count a module deploys (4, the segments
# benchmark's end-to-end part), CPUs for the replicas that ask for some, and Prometheus metrics for the modules
# that read them.
SHARED_SHAPE: dict[str, Any] = {"num_cpus": 4, "num_gpus": 4, "metrics": True}


def with_env_vars(app: Application, env_vars: dict[str, str]) -> Application:
    """``app`` with ``env_vars`` in every deployment's ``runtime_env``: what its replicas read from their environment
    (credentials, a DSN, API keys, TMPDIR, a test hook) without setting it for the whole cluster.

    Serve's config file takes a ``runtime_env`` per application; its Python API only per deployment, so this walks
    the application's bound deployments (``Application._bound_deployment``, what Serve's own builder reads)."""
    seen: set[int] = set()

    def visit(node: Application) -> None:
        if id(node) in seen:
            return
        seen.add(id(node))
        bound = node._bound_deployment
        actor = dict(bound.ray_actor_options or {})
        runtime_env = dict(actor.get("runtime_env") or {})
        runtime_env["env_vars"] = {**runtime_env.get("env_vars", {}), **env_vars}
        node._bound_deployment = bound.options(ray_actor_options={**actor, "runtime_env": runtime_env})
        for arg in (*bound.init_args, *bound.init_kwargs.values()):
            if isinstance(arg, Application):
                visit(arg)

    visit(app)
    return app


def delete_applications() -> list[str]:
    """Delete every Serve application on the cluster (each waits for its replicas to stop); returns their names."""
    names = list(serve.status().applications)
    for name in names:
        serve.delete(name)
    return names


def replica_processes(app: str = APP_NAME) -> dict[str, list[int]]:
    """Deployment name -> pids of the application's replica processes, among this process's descendants only
    (other Ray clusters on the machine run replicas with the same titles)."""
    import psutil

    found: dict[str, list[int]] = {}
    for proc in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            match = re.search(rf"ServeReplica:{re.escape(app)}:(\w+)", " ".join(proc.cmdline()))
            if match:
                found.setdefault(match.group(1), []).append(proc.pid)
    return {name: sorted(pids) for name, pids in found.items()}


def object_store_stats() -> dict[str, int]:
    """The raylet's object-store counters of the cluster this process is the driver of."""
    from ray._private.internal_api import get_memory_info_reply, get_state_from_address

    stats = get_memory_info_reply(get_state_from_address(ray.get_runtime_context().gcs_address)).store_stats
    return {"created": stats.cumulative_created_bytes, "used": stats.object_store_bytes_used,
            "spilled": stats.spilled_bytes_total, "fallback": stats.object_store_bytes_fallback}


@dataclass
class RayServeCluster:
    """A running cluster: ``base`` is the proxy's URL (``http(s)://127.0.0.1:<port>``); ``nodes`` is the
    ``ray.cluster_utils.Cluster`` of a multi-node cluster (``add_node``/``remove_node``), else None."""

    base: str
    metrics_url: str | None = None
    nodes: Any = None
    worker_args: dict[str, Any] | None = None  # what a multi-node cluster's worker nodes are started with

    def deploy(self, config: dict[str, Any] | AppArgs, name: str = APP_NAME, route_prefix: str = "/",
               env: dict[str, str] | None = None) -> AppArgs:
        """Validate ``config`` as the app args and (re)deploy the application, its replicas started with ``env``
        in their environment; returns the args."""
        args = AppArgs.model_validate(config)
        self.run(build_app(args), name, route_prefix, env)
        return args

    def run(self, app: Application, name: str, route_prefix: str | None = "/",
            env: dict[str, str] | None = None) -> Any:
        """``serve.run`` with ``env`` in the replicas' environment; returns the ingress handle."""
        return serve.run(with_env_vars(app, env) if env else app, name=name, route_prefix=route_prefix)

    def local_storage(self, root: Path, public: bool = True) -> dict[str, Any]:
        """A local ``storage:`` block whose links point at this cluster (``public``) or are relative."""
        return {"kind": "local", "root": str(root)} | ({"public_base_url": self.base} if public else {})


@contextmanager
def _local_cluster(num_cpus: int = 4, num_gpus: int = 0, object_store_mb: int = 400, metrics: bool = False,
                   ssl_files: tuple[Path, Path] | None = None) -> Iterator[RayServeCluster]:
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


class _Shared:
    """The shared cluster while it runs: the cluster and what stops it."""

    cluster: RayServeCluster | None = None
    stack: ExitStack | None = None


def shared_cluster() -> RayServeCluster:
    """The shared cluster (:data:`SHARED_SHAPE`), started if it is not running."""
    if _Shared.cluster is None:
        stack = ExitStack()
        _Shared.cluster = stack.enter_context(_local_cluster(**SHARED_SHAPE))
        _Shared.stack = stack
    return _Shared.cluster


@contextmanager
def shared_cluster_for_a_module() -> Iterator[RayServeCluster]:
    """The shared cluster, emptied of every application when the block ends (if it still runs)."""
    cluster = shared_cluster()
    try:
        yield cluster
    finally:
        if _Shared.cluster is cluster:
            delete_applications()


def stop_shared_cluster() -> None:
    """Stop the shared cluster if it runs (a later :func:`shared_cluster` starts a new one)."""
    stack, _Shared.stack, _Shared.cluster = _Shared.stack, None, None
    if stack is not None:
        stack.close()


@contextmanager
def ray_serve_cluster(num_cpus: int = 4, num_gpus: int = 0, object_store_mb: int = 400,
                      metrics: bool = False, ssl_files: tuple[Path, Path] | None = None) -> Iterator[RayServeCluster]:
    """A cluster of one's own: Ray (``num_gpus`` fake GPUs) and Serve's proxy; ``ssl_files`` = (key, cert) makes it
    speak HTTPS; ``metrics`` exports Prometheus metrics on a free port (``metrics_url``)."""
    stop_shared_cluster()
    with _local_cluster(num_cpus, num_gpus, object_store_mb, metrics, ssl_files) as cluster:
        yield cluster


@contextmanager
def ray_serve_multinode_cluster(head_cpus: int = 8, workers: int = 2, worker_gpus: int = 2,
                                object_store_mb: int = 200) -> Iterator[RayServeCluster]:
    """A head node (CPUs, no GPUs: the CPU deployments land here) and ``workers`` nodes with ``worker_gpus`` fake
    GPUs and no CPUs (only GPU deployments fit there), all on this machine, as Ray's own tests build one
    (``ray.cluster_utils.Cluster``). ``nodes.add_node(**worker_args)``/``nodes.remove_node(node)`` add and
    lose a worker node like a GPU pod of a KubeRay cluster. Serve's proxy runs on the head only (one port)."""
    from ray.cluster_utils import Cluster

    stop_shared_cluster()
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
