"""``stable-avatar serve``: start a local Ray cluster and deploy the applications of a Serve config file."""

from __future__ import annotations

import importlib
import os
import signal
import threading
from pathlib import Path
from typing import Any

import yaml

from deployments.config import AppArgs


def _import(path: str) -> Any:
    """``module:attr`` or ``module.attr``, as Serve's ``import_path``."""
    module, sep, attr = path.partition(":")
    if not sep:
        module, _, attr = path.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def deploy_config(config: dict[str, Any], blocking: bool = True, ray_init: dict[str, Any] | None = None) -> str:
    """Deploy every application of ``config``; returns the base URL. Blocks until SIGINT/SIGTERM when asked."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from ray import serve

    http = config.get("http_options") or {}
    host, port = http.get("host", "127.0.0.1"), int(http.get("port", 8000))
    if not ray.is_initialized():
        ray.init(include_dashboard=False, **(ray_init or {}))
    serve.start(http_options={"host": host, "port": port, "request_timeout_s": http.get("request_timeout_s")})
    names = []
    for app in config.get("applications", []):
        builder = _import(app["import_path"])
        serve.run(builder(AppArgs.model_validate(app.get("args") or {})), name=app["name"],
                  route_prefix=app.get("route_prefix", "/"))
        names.append(app["name"])
    url = f"http://{host}:{port}"
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


def serve_main(config_path: Path) -> int:
    config = yaml.safe_load(config_path.read_text())
    deploy_config(config, blocking=True)
    return 0
