"""``stable-avatar``: parses the command line and dispatches to the module that owns the command."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from stable_avatar import client_commands, generate_commands, serve_command
from stable_avatar.exit_codes import EXIT_BAD_INPUT

LOG_LEVEL_ENV = "STABLE_AVATAR_LOG_LEVEL"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stable-avatar", description="StableAvatar talking-avatar videos")
    sub = parser.add_subparsers(dest="command", required=True)
    generate_commands.add_parsers(sub)
    client_commands.add_parsers(sub)
    serve_command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=os.environ.get(LOG_LEVEL_ENV, "WARNING"))
    args = build_parser().parse_args(argv)
    if args.command in client_commands.COMMANDS:
        return client_commands.run(args)  # before the imports below: they pull in torch, which a client does not need

    from pydantic import ValidationError

    from guarded_fetch import InputError
    from pipeline.keymaps import CheckpointKeyError
    from pipeline.loading import CheckpointNotFoundError

    handler = serve_command.run if args.command == "serve" else generate_commands.HANDLERS[args.command]
    try:
        return handler(args)
    except InputError as exc:
        print(f"error: {exc.field}: {exc}", file=sys.stderr)
    except ValidationError as exc:
        for err in exc.errors():
            print(f"error: {'.'.join(str(p) for p in err['loc'])}: {err['msg']}", file=sys.stderr)
    except (CheckpointNotFoundError, CheckpointKeyError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
    return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
