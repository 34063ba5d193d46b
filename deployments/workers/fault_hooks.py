"""Test hooks that put a fault on the replica or rank holding a named unit (never set in production).

A hook is a JSON file naming one unit, ``{"step": s, "window": w}`` (and optionally ``"hang_s"``); the first
process that receives that unit renames the file (so exactly one claims it) and then does the fault.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.denoise import WindowStep


def claim_hook(hook: Path | None, work: WindowStep) -> float | None:
    """The hook file's ``hang_s`` (1.0 if absent) when ``work`` is its unit and this process claimed it."""
    if hook is None:
        return None
    try:
        target = json.loads(hook.read_text())
    except (OSError, ValueError):  # none (left), or being written
        return None
    if (work.step, work.window) != (target["step"], target["window"]):
        return None
    try:
        hook.rename(hook.with_suffix(".claimed"))  # exactly one process claims it
    except OSError:
        return None
    return float(target.get("hang_s", 1.0))
