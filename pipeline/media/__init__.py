"""Media I/O: decode request audio/images, pick output sizes, and encode the final mp4 with ffmpeg."""

from pipeline.media.errors import MediaError, UnreadableAudioError, UnreadableImageError
from pipeline.media.ffmpeg_bin import ffmpeg_path, ffprobe_path

__all__ = [
    "MediaError",
    "UnreadableAudioError",
    "UnreadableImageError",
    "ffmpeg_path",
    "ffprobe_path",
]
