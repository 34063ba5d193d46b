"""User-facing media errors.

They subclass :class:`guarded_fetch.InputError` (a ``ValueError``) so the API layer maps them, like fetch errors,
to a 4xx response naming the offending request field (``error.field``). ``str(error)`` is a short human sentence without the field name or any traceback;
ffmpeg/PIL diagnostics go to ``error.detail`` for logs only (they may contain temporary paths).
"""

from __future__ import annotations

from guarded_fetch import InputError


class MediaError(InputError):
    """A media input (image or audio) could not be used: undecodable, too small or large, the wrong kind."""


class UnreadableAudioError(MediaError):
    """The audio input is not decodable audio (garbage, empty, no audio stream, zero samples)."""

    field = "audio_url"


class UnreadableImageError(MediaError):
    """The image input is not a decodable still image (garbage, truncated, unsupported)."""

    field = "image_url"


class FFmpegError(RuntimeError):
    """ffmpeg failed while encoding/muxing output (a server-side fault, not a bad request)."""

    def __init__(self, message: str, stderr_tail: str = ""):
        super().__init__(f"{message}\n{stderr_tail}" if stderr_tail else message)
        self.stderr_tail = stderr_tail
