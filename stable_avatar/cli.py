"""``stable-avatar``: parses the command line and hands it to the module that owns the command.

Building the parser imports no model library, so ``--help``, ``--version`` and the client commands start in a
fraction of a second; ``generate`` and ``serve`` import what they need when they run.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from stable_avatar import client_commands, generate_commands, jobs_commands, serve_command
from stable_avatar.arguments import EXAMPLES_HEADING, HelpFormatter

LOG_LEVEL_ENV = "STABLE_AVATAR_LOG_LEVEL"
DISTRIBUTION = "stable-avatar-serve"  # pyproject's [project].name
EXAMPLES = f"""\
{EXAMPLES_HEADING}
  stable-avatar serve                                       # the service on http://127.0.0.1:8000 (tiny preset)
  stable-avatar submit --image face.png --audio speech.wav --prompt 'A person talking' -o out.mp4
  stable-avatar status REQUEST_ID --json
  stable-avatar generate --image face.png --audio speech.wav --prompt 'A person talking' -o out.mp4
  stable-avatar jobs dead-letters                           # operators: jobs that ran out of attempts

`stable-avatar COMMAND --help` describes each command, with examples."""


def package_version() -> str:
    """The installed distribution's version (``pip install -e .`` counts)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:
        return f"unknown ({DISTRIBUTION} is not installed: pip install -e .)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stable-avatar", formatter_class=HelpFormatter, epilog=EXAMPLES,
        description="StableAvatar talking-avatar videos: an image, an audio track and a prompt in, an mp4 out. "
                    "Generate in this process, run the service, or drive a running service over fal's queue API.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    generate_commands.add_parsers(sub)
    serve_command.add_parser(sub)
    client_commands.add_parsers(sub)
    jobs_commands.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=os.environ.get(LOG_LEVEL_ENV, "WARNING"))
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
