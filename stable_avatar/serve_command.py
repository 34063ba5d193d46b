"""``stable-avatar serve``: the service on a local Ray cluster, from a Serve config file.

The config is read and every application's ``args`` validated before Ray starts, so a typo stops the command at
once with the field's name instead of after a cluster start; so are Serve's own options (``http_options``: TLS files
included) and, since the replicas run on this machine, the checkpoint files a real-weights preset reads.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Any

from stable_avatar.arguments import add_command, port_number
from stable_avatar.errors import print_error, print_validation_error
from stable_avatar.exit_codes import EXIT_BAD_INPUT

DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 8000  # deployments.launcher's defaults when http_options omits them
WILDCARD_HOSTS = ("0.0.0.0", "::", "")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "serve", "run the service locally (Ray Serve) from a Serve config file",
                    "Start a local Ray cluster and deploy the applications of a Serve config file (Ray Serve's "
                    "format: http_options and applications with their args). Ctrl-C stops it. The default config "
                    "is the tiny preset on the CPU with local storage and SQLite: a working service with no set-up.",
                    ["stable-avatar serve                                   # ./serve_config.yaml on 127.0.0.1:8000",
                     "stable-avatar serve --port 9000",
                     "stable-avatar serve --config examples/serve_config.one-gpu.yaml   # one GPU, real weights",
                     "stable-avatar serve --config examples/serve_config.gpu.yaml --host 0.0.0.0"])
    p.set_defaults(handler=run)
    p.add_argument("--config", type=Path, default=Path("serve_config.yaml"),
                   help="Serve config file (YAML); its applications' args are checked before Ray starts")
    p.add_argument("--host", default=None,
                   help=f"address to listen on; 0.0.0.0 for every interface (default: the config's "
                        f"http_options.host, else {DEFAULT_HOST})")
    p.add_argument("--port", type=port_number, default=None,
                   help=f"port to listen on (default: the config's http_options.port, else {DEFAULT_PORT})")


def listen_on(config: dict[str, Any], host: str | None, port: int | None) -> dict[str, Any]:
    """``config`` with its ``http_options`` host and port replaced (``None``: keep the config's). A local storage
    whose ``public_base_url`` named the config's own address moves with it, so signed ``/files/`` links and upload
    URLs keep reaching this server."""
    config = copy.deepcopy(config)
    http = config["http_options"] = dict(config.get("http_options") or {})
    before = _link_base(http)
    if host is not None:
        http["host"] = host
    if port is not None:
        http["port"] = port
    after = _link_base(http)
    for app in config.get("applications") or []:
        storage = (app.get("args") or {}).get("storage") or {}
        if storage.get("kind", "local") == "local" and str(storage.get("public_base_url") or "").rstrip("/") == before:
            storage["public_base_url"] = after
    return config


def _link_base(http: dict[str, Any]) -> str:
    """The URL a browser on this machine uses for a server listening as ``http`` says (https with a certificate)."""
    host = str(http.get("host", DEFAULT_HOST))
    host = DEFAULT_HOST if host in WILDCARD_HOSTS else f"[{host}]" if ":" in host else host
    scheme = "https" if http.get("ssl_certfile") else "http"
    return f"{scheme}://{host}:{int(http.get('port', DEFAULT_PORT))}"


def load_config(path: Path) -> dict[str, Any]:
    """The Serve config as a mapping (``ValueError`` names the file and what is wrong with it)."""
    import yaml

    try:
        config = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ValueError(f"--config {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"--config {path}: not valid YAML: {exc}") from None
    if not isinstance(config, dict) or not isinstance(config.get("applications", []), list):
        raise ValueError(f"--config {path}: expected a Serve config (a mapping with an 'applications' list)")
    return config


def run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from deployments.config import AppArgs

    try:
        config = listen_on(load_config(args.config), args.host, args.port)
    except ValueError as exc:
        print_error(str(exc))
        return EXIT_BAD_INPUT
    apps = {}
    for app in config.get("applications") or []:
        try:
            apps[app.get("name")] = AppArgs.model_validate(app.get("args") or {})
        except ValidationError as exc:
            print_validation_error(exc, f"--config {args.config}: application {app.get('name')!r}: args.")
            return EXIT_BAD_INPUT

    from deployments.launcher import deploy_config, serve_start_options

    try:
        serve_start_options(config)
    except ValidationError as exc:
        print_validation_error(exc, f"--config {args.config}: ")
        return EXIT_BAD_INPUT
    for name, app_args in apps.items():
        if missing := missing_weights(app_args):
            print_error(f"--config {args.config}: application {name!r}: args.checkpoints: {missing}")
            return EXIT_BAD_INPUT
    deploy_config(config, blocking=True)
    return 0


def missing_weights(args: Any) -> str | None:
    """Why the checkpoint files of ``args`` (``AppArgs``) cannot be read here, or ``None`` (none needed, or all
    present): otherwise every model replica would fail to start, after Ray and Serve had."""
    if args.checkpoints is None:
        return None
    from pipeline.loading import CheckpointLayout, CheckpointNotFoundError

    layout = CheckpointLayout(args.checkpoints.resolve(), args.variant)
    try:
        layout.transformer_base_files()
        layout.require(layout.transformer_audio, layout.vae, layout.text_encoder, layout.tokenizer,
                       layout.image_encoder, layout.audio_encoder)
    except CheckpointNotFoundError as exc:
        return str(exc)
    return None
