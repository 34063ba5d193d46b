"""Command-line options shared by several commands."""

from __future__ import annotations

import argparse


def add_generation_inputs(p: argparse.ArgumentParser, where: str, seed_help: str) -> None:
    """The fal input fields, shared by ``generate`` (in process) and ``submit`` (to a server)."""
    p.add_argument("--image", required=True, help=f"reference image: {where}, http(s) URL or data URI")
    p.add_argument("--audio", required=True, help=f"speech audio: {where}, http(s) URL or data URI")
    p.add_argument("--prompt", required=True)
    p.add_argument("--aspect-ratio", default="auto", choices=["auto", "16:9", "9:16", "1:1"])
    p.add_argument("--steps", type=int, default=50, help="denoising steps, 1-100 (default 50)")
    p.add_argument("--guidance-scale", type=float, default=5.0, help="text guidance, 0-20 (default 5)")
    p.add_argument("--audio-guidance-scale", type=float, default=4.0, help="audio guidance, 0-20 (default 4)")
    p.add_argument("--seed", type=int, default=None, help=seed_help)


def add_acceleration(p: argparse.ArgumentParser, help_text: str) -> None:
    """``--acceleration``: the request's step-cache level (fal's ``acceleration`` field)."""
    p.add_argument("--acceleration", default=None, choices=["none", "regular", "high"], help=help_text)
