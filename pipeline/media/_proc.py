"""Small helpers shared by the ffmpeg-driving modules."""

from __future__ import annotations

import re

_NOISE = re.compile(r"^\s*(Last message repeated|\[.*\] *$)")


def stderr_tail(stderr: bytes | str, max_lines: int = 12) -> str:
    """Last non-empty lines of an ffmpeg stderr, for error messages and logs."""
    text = stderr.decode("utf-8", "replace") if isinstance(stderr, bytes) else stderr
    lines = [ln.rstrip() for ln in text.splitlines() if ln.strip() and not _NOISE.match(ln)]
    return "\n".join(lines[-max_lines:])
