"""User-facing media errors.

They subclass ``ValueError`` so the API layer can map them to a 4xx response naming the offending request
field (``error.field``). ``str(error)`` is a short human sentence without the field name or any traceback;
ffmpeg/PIL diagnostics go to ``error.detail`` for logs only (they may contain temporary paths).
"""

from __future__ import annotations


class MediaError(ValueError):
    """A request input could not be used. ``field`` names the request field ("image_url"/"audio_url")."""

    field: str = "input"
    status_code: int = 422  # 413 too large, 415 unsupported type, 422 otherwise (subclasses override)
    error_type: str | None = None  # fal-style ``type`` of the detail entry

    def __init__(self, message: str, *, field: str | None = None, detail: str = ""):
        super().__init__(message)
        if field is not None:
            self.field = field
        self.message = message
        self.detail = detail


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
