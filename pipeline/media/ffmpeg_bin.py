"""Locate the ffmpeg/ffprobe executables.

The service must run with a system ffmpeg, an explicitly configured one, or only the static binary shipped
in the ``imageio-ffmpeg`` wheel (which has no ffprobe), so every caller goes through these two functions.
Lookups are not cached: they are cheap and tests change the environment.
"""

from __future__ import annotations

import os
import shutil


def ffmpeg_path() -> str:
    """Return the ffmpeg executable: ``$FFMPEG_BINARY``, else ``ffmpeg`` on PATH, else imageio-ffmpeg's."""
    configured = os.environ.get("FFMPEG_BINARY")
    if configured:
        return configured
    found = shutil.which("ffmpeg")
    if found:
        return found
    try:
        import imageio_ffmpeg
    except ImportError as exc:  # pragma: no cover - imageio-ffmpeg is a hard dependency
        raise RuntimeError("ffmpeg not found: install ffmpeg or the imageio-ffmpeg package") from exc
    return imageio_ffmpeg.get_ffmpeg_exe()


def ffprobe_path() -> str | None:
    """Return the ffprobe executable (``$FFPROBE_BINARY`` or PATH), or None when only ffmpeg is available."""
    configured = os.environ.get("FFPROBE_BINARY")
    if configured:
        return configured
    return shutil.which("ffprobe")
