"""``stable-avatar serve``: the service on a local Ray cluster, from a Serve config file."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    serve = sub.add_parser("serve", help="run the service locally (Ray Serve) from a Serve config file")
    serve.add_argument("--config", type=Path, default=Path("serve_config.yaml"))


def run(args: argparse.Namespace) -> int:
    from deployments.launcher import serve_main

    return serve_main(args.config)
