"""How every ``stable-avatar`` command is declared: one help line, a description, worked examples (the epilog),
and the options several commands share."""

from __future__ import annotations

import argparse

EXAMPLES_HEADING = "examples:"


class HelpFormatter(argparse.HelpFormatter):
    """Wraps descriptions, keeps the examples' lines as written, and shows each option's default where its help
    does not state it."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if text.startswith(EXAMPLES_HEADING):
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS) or action.option_strings == []:
            return text
        return text + " (default: %(default)s)"


def add_command(sub: argparse._SubParsersAction, name: str, summary: str, description: str,
                examples: list[str]) -> argparse.ArgumentParser:
    """A sub-command with its one-line ``summary`` (in ``stable-avatar --help``), a ``description`` and examples."""
    epilog = EXAMPLES_HEADING + "\n" + "\n".join(f"  {line}" for line in examples)
    return sub.add_parser(name, help=summary, description=description, epilog=epilog,
                          formatter_class=HelpFormatter)


def port_number(text: str) -> int:
    """An argparse type: a TCP port, 1-65535."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 1-65535, got {port}")
    return port


def add_generation_inputs(p: argparse.ArgumentParser, where: str, seed_help: str) -> None:
    """The fal input fields, shared by ``generate`` (in process) and ``submit`` (to a server)."""
    p.add_argument("--image", required=True, metavar="IMAGE",
                   help=f"reference image (the face to animate): {where}, http(s) URL or data: URI")
    p.add_argument("--audio", required=True, metavar="AUDIO",
                   help=f"speech audio (any format ffmpeg reads; sets the video's length): {where}, http(s) URL "
                        "or data: URI")
    p.add_argument("--prompt", required=True, help="what the video shows, e.g. 'A woman talking in a studio'")
    p.add_argument("--aspect-ratio", default="auto", choices=["auto", "16:9", "9:16", "1:1"],
                   help="16:9 is 832x480, 9:16 480x832, 1:1 512x512; auto picks the one nearest the image's "
                        "(default: auto)")
    p.add_argument("--steps", type=int, default=50, help="denoising steps, 1-100 (default 50)")
    p.add_argument("--guidance-scale", type=float, default=5.0, help="text guidance, 0-20 (default 5)")
    p.add_argument("--audio-guidance-scale", type=float, default=4.0, help="audio guidance, 0-20 (default 4)")
    p.add_argument("--seed", type=int, default=None, help=seed_help)


def add_acceleration(p: argparse.ArgumentParser, help_text: str) -> None:
    """``--acceleration``: the request's step-cache level (fal's ``acceleration`` field)."""
    p.add_argument("--acceleration", default=None, choices=["none", "regular", "high"], help=help_text)
