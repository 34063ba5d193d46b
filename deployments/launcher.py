"""``stable-avatar serve``: start a local Ray cluster and deploy the applications of a Serve config file.

Serve is started with every cluster-wide option of the file, as ``serve run`` does (``proxy_location``, all of
``http_options``: TLS files, timeouts, root path; ``grpc_options``, ``logging_config``), validated by Serve's own
schema; only the listening address defaults to the loopback interface instead of Serve's 0.0.0.0.
"""

from __future__ import annotations

import importlib
import os
import signal
import threading
from typing import Any

from deployments.config import AppArgs

DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 8000  # when http_options omits them: this machine only


def _import(path: str) -> Any:
    """``module:attr`` or ``module.attr``, as Serve's ``import_path``."""
    module, sep, attr = path.partition(":")
    if not sep:
        module, _, attr = path.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def serve_start_options(config: dict[str, Any]) -> dict[str, Any]:
    """``serve.start``'s keyword arguments from a Serve config (``ValidationError`` names a bad option)."""
    from ray.serve.config import gRPCOptions
    from ray.serve.schema import ServeDeploySchema

    http = {"host": DEFAULT_HOST, "port": DEFAULT_PORT} | (config.get("http_options") or {})
    schema = ServeDeploySchema.model_validate({**config, "http_options": http, "applications": []})
    options: dict[str, Any] = {"proxy_location": schema.proxy_location,
                               "http_options": schema.http_options.model_dump(),
                               "grpc_options": gRPCOptions(**schema.grpc_options.model_dump())}
    if schema.logging_config is not None:
        options["logging_config"] = schema.logging_config
    return options


def base_url(http_options: dict[str, Any]) -> str:
    """Where the proxy answers: https when a certificate is configured."""
    scheme = "https" if http_options.get("ssl_certfile") else "http"
    return f"{scheme}://{http_options['host']}:{http_options['port']}"


def deploy_config(config: dict[str, Any], blocking: bool = True, ray_init: dict[str, Any] | None = None) -> str:
    """Deploy every application of ``config``; returns the base URL. Blocks until SIGINT/SIGTERM when asked."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from ray import serve

    options = serve_start_options(config)
    if not ray.is_initialized():
        ray.init(include_dashboard=False, **(ray_init or {}))
    serve.start(**options)
    names = []
    for app in config.get("applications", []):
        builder = _import(app["import_path"])
        serve.run(builder(AppArgs.model_validate(app.get("args") or {})), name=app["name"],
                  route_prefix=app.get("route_prefix", "/"))
        names.append(app["name"])
    url = base_url(options["http_options"])
    print(f"stable-avatar-serve is listening on {url} (applications: {', '.join(names)}); Ctrl-C stops it",
          flush=True)
    if blocking:
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        stop.wait()
        print("stopping ...", flush=True)
        serve.shutdown()
        ray.shutdown()
    return url
