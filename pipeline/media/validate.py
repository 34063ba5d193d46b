"""Validate request media before any model sees it: cheap refusals first, with messages a client can act on.

Images: the bytes are sniffed (an HTML error page or an SVG gets "received an HTML page, not an image"), only
PNG/JPEG/WebP/BMP/GIF (first frame)/TIFF are opened (``Image.open(formats=...)``: no EPS/Ghostscript or other
exotic decoders), and the size declared in the header is checked *before* decoding, so a decompression bomb (a
tiny PNG declaring 30000x30000) costs a header read. Decoding, EXIF orientation and alpha flattening are
:func:`pipeline.media.image.load_image`'s.

Audio: text is refused before ffmpeg ever sees it (a playlist such as ``#EXTM3U`` would make ffmpeg open other
files or URLs), ffprobe (or the ``ffmpeg -i`` fallback) checks the container against an allow-list, that an
audio stream exists and the declared duration; then the audio is decoded once with a cap of
``max_audio_s`` (a header can lie about the duration; the decoded sample count cannot), so an hour-long or
header-forged file never costs more than ``max_audio_s`` of decoding. A video file is accepted when it has an
audio track (its audio drives the avatar, its pictures are ignored); a video without audio is refused.

Errors are ``UnreadableImageError``/``UnreadableAudioError`` subclasses (so they name ``image_url``/``audio_url``)
with a ``status_code`` hint: 415 unsupported type, 413 too large, 422 otherwise.
"""

from __future__ import annotations

import codecs
import io
import subprocess
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipeline.media.audio import decode_audio
from pipeline.media.errors import FFmpegError, UnreadableAudioError, UnreadableImageError
from pipeline.media.image import MAX_PIXELS, load_image
from pipeline.media.rates import SAMPLE_RATE
from pipeline.media.video import probe_media

IMAGE_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "MPO", "WEBP", "BMP", "GIF", "TIFF")
IMAGE_FORMATS_TEXT = "PNG, JPEG, WebP, BMP, GIF or TIFF"
# ffprobe format names (a container may list several, e.g. "mov,mp4,m4a,3gp,3g2,mj2"). Playlist and
# protocol-like demuxers (hls, concat, sdp, ...) are deliberately absent.
AUDIO_CONTAINERS = frozenset({
    "wav", "w64", "mp3", "ogg", "flac", "mov", "mp4", "m4a", "3gp", "3g2", "mj2", "matroska", "webm", "aac",
    "aiff", "asf", "amr", "caf", "avi", "au", "ac3", "eac3", "mpeg", "mpegts", "wv", "ape", "mp2", "opus",
})
PROBE_PREFIX = "stable-avatar-probe-"


class MediaLimits(BaseModel):
    """What a usable reference image and driving audio look like (the ``inputs.media`` block)."""

    model_config = ConfigDict(extra="forbid")

    max_image_pixels: int = Field(40_000_000, ge=1, le=MAX_PIXELS, description="width x height, checked "
                                  "from the header before decoding")
    min_image_side: int = Field(64, ge=1, le=4096)
    max_image_side: int = Field(8192, ge=1, le=65535)
    min_audio_s: float = Field(0.2, ge=0.0)
    max_audio_s: float = Field(600.0, gt=0.0, le=24 * 3600.0)

    @model_validator(mode="after")
    def _ordered(self) -> MediaLimits:
        if self.min_image_side > self.max_image_side:
            raise ValueError("min_image_side must not exceed max_image_side")
        if self.min_audio_s >= self.max_audio_s:
            raise ValueError("min_audio_s must be below max_audio_s")
        return self


class UnsupportedImageError(UnreadableImageError):
    """Not one of the accepted image formats (HTML, SVG, text, ICO, ...). ``error_type`` follows fal's names."""

    status_code = 415
    error_type = "unsupported_image_format"


class ImageTooLargeError(UnreadableImageError):
    status_code = 413
    error_type = "image_too_large"


class InvalidImageError(UnreadableImageError):
    """A supported format that cannot be decoded (truncated, corrupt, empty)."""

    status_code = 422
    error_type = "image_load_error"


class ImageTooSmallError(InvalidImageError):
    error_type = "image_too_small"


class UnsupportedAudioError(UnreadableAudioError):
    status_code = 415
    error_type = "unsupported_audio_format"


class InvalidAudioError(UnreadableAudioError):
    """Recognised but unusable audio (no audio stream, undecodable, empty)."""

    status_code = 422
    error_type = "audio_load_error"


class AudioTooLongError(InvalidAudioError):
    error_type = "audio_duration_too_long"


class AudioTooShortError(InvalidAudioError):
    error_type = "audio_duration_too_short"


# -- sniffing -------------------------------------------------------------------------------------------------


def sniff_text(data: bytes) -> str | None:
    """What a text payload is ("an HTML page", "an SVG image", ...), or None for binary data.

    Real images and audio have binary bytes (NUL, high bytes that are not UTF-8) within their first 512 bytes,
    so an all-text head means an error page, markup or a playlist.
    """
    head = data[:512]
    low = head.lstrip(b"\xef\xbb\xbf").lstrip().lower()
    if low.startswith(b"<svg") or (low.startswith((b"<?xml", b"<!doctype svg")) and b"<svg" in low):
        return "an SVG image"
    if low.startswith((b"<!doctype html", b"<html", b"<head", b"<body")) or b"<html" in low[:256]:
        return "an HTML page"
    if not head or b"\x00" in head:
        return None
    try:
        text = codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError:
        return None
    if not all(c.isprintable() or c in "\t\r\n\f" for c in text):
        return None
    if low.startswith((b"<?xml", b"<")):
        return "an XML document"
    if low.startswith((b"{", b"[")):
        return "JSON"
    if low.startswith(b"#extm3u"):
        return "a playlist"
    return "text"


# -- images ---------------------------------------------------------------------------------------------------


def validate_image(data: bytes, limits: MediaLimits) -> Image.Image:
    """Check and decode the reference image: an RGB ``PIL.Image`` (EXIF-rotated, alpha flattened)."""
    if not data:
        raise InvalidImageError("Could not read the image: the file is empty.")
    width, height = _image_size(data)
    pixels = width * height
    if pixels > limits.max_image_pixels:
        raise ImageTooLargeError(
            f"The image is too large: {width}x{height} pixels ({pixels / 1e6:.1f} MP); the limit is "
            f"{limits.max_image_pixels / 1e6:g} MP."
        )
    if max(width, height) > limits.max_image_side:
        raise ImageTooLargeError(
            f"The image is too large: {width}x{height} pixels; the longest side may be at most "
            f"{limits.max_image_side} px."
        )
    if min(width, height) < limits.min_image_side:
        raise ImageTooSmallError(
            f"The image is too small: {width}x{height} pixels; each side needs at least "
            f"{limits.min_image_side} px."
        )
    try:
        return load_image(data)
    except UnreadableImageError as exc:
        raise InvalidImageError(str(exc), detail=exc.detail) from None


def _image_size(data: bytes) -> tuple[int, int]:
    """Identify the format and read the declared size from the header only (nothing is decoded here)."""
    Image.init()  # register every plugin (MPO, WebP, ...) so the allow-list below can name them
    formats = [name for name in IMAGE_FORMATS if name in Image.OPEN]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=formats) as img:
                return img.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLargeError(
            "The image is too large: it declares more pixels than allowed (decompression bomb).",
            detail=str(exc),
        ) from None
    except UnidentifiedImageError as exc:
        kind = sniff_text(data)
        if kind is not None:
            what = "an SVG (vector) image, which is not supported" if kind == "an SVG image" \
                else f"{kind}, not an image"
            raise UnsupportedImageError(
                f"Expected an image ({IMAGE_FORMATS_TEXT}) but received {what}.", detail=str(exc)
            ) from None
        found = _other_image_format(data)
        what = f"a {found} image, which is not supported" if found else "data that is not a recognised image"
        raise UnsupportedImageError(
            f"Expected an image ({IMAGE_FORMATS_TEXT}) but received {what}.", detail=str(exc)
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InvalidImageError("Could not read the image: the file is truncated or corrupt.",
                                detail=str(exc)) from None


def _other_image_format(data: bytes) -> str | None:
    """Name a known-but-refused format by its magic bytes (for the message only; never decoded)."""
    magics = {b"%!PS": "PostScript", b"\x00\x00\x01\x00": "ICO", b"8BPS": "PSD", b"%PDF": "PDF",
              b"\x00\x00\x00\x0cjP": "JPEG 2000", b"\xff\x4f\xff\x51": "JPEG 2000"}
    if data[4:12] in (b"ftypheic", b"ftypheix", b"ftypmif1", b"ftypavif"):  # iPhone photos, AVIF
        return "HEIC/AVIF"
    return next((name for magic, name in magics.items() if data.startswith(magic)), None)


# -- audio ----------------------------------------------------------------------------------------------------


@dataclass
class AudioCheck:
    """A validated audio input: its duration and the mono float32 samples at ``SAMPLE_RATE``."""

    duration_s: float
    samples: np.ndarray


def validate_audio(data: bytes, limits: MediaLimits) -> float:
    """Check the driving audio; its duration in seconds (from the decoded samples, not the header)."""
    return check_audio(data, limits).duration_s


def check_audio(data: bytes, limits: MediaLimits, sample_rate: int = SAMPLE_RATE) -> AudioCheck:
    """Probe, then decode at most ``max_audio_s`` (+0.5 s to tell "too long"); see the module docstring."""
    if not data:
        raise InvalidAudioError("Could not read the audio: the file is empty.")
    kind = sniff_text(data)
    if kind is not None:
        raise UnsupportedAudioError(f"Expected an audio file but received {kind}, not audio.")
    cap_s = limits.max_audio_s + 0.5
    with tempfile.NamedTemporaryFile(prefix=PROBE_PREFIX, suffix=".bin") as tmp:
        tmp.write(data)
        tmp.flush()
        declared = _probe_audio(Path(tmp.name))
        if declared is not None and declared > limits.max_audio_s + 0.5:
            raise AudioTooLongError(_too_long(declared, limits))
        try:
            samples = decode_audio(Path(tmp.name), sample_rate, max_duration_s=cap_s)
        except UnreadableAudioError as exc:
            raise InvalidAudioError(str(exc), detail=exc.detail) from None
    duration = len(samples) / sample_rate
    if duration > limits.max_audio_s:  # decoding stopped at the cap: the file is at least this long
        raise AudioTooLongError(_too_long(max(duration, declared or 0.0), limits))
    if duration < limits.min_audio_s:
        raise AudioTooShortError(
            f"The audio is too short: {duration:.2f} s; at least {limits.min_audio_s:g} s is needed."
        )
    return AudioCheck(duration, samples)


def _probe_audio(path: Path) -> float | None:
    """Container and stream checks; the declared duration in seconds when the container states one."""
    try:
        info = probe_media(path)
    except FFmpegError as exc:
        raise UnsupportedAudioError(
            "Expected an audio file but received data that is not a recognised audio format (or is corrupt).",
            detail=exc.stderr_tail,
        ) from None
    except subprocess.TimeoutExpired:
        raise InvalidAudioError("Could not read the audio: probing the file took too long.") from None
    fmt = info.get("format", {})
    names = {name.strip() for name in str(fmt.get("format_name", "")).split(",")}
    if not names & AUDIO_CONTAINERS:
        detected = ", ".join(sorted(n for n in names if n)) or "unknown"
        is_image = any(n.endswith("_pipe") or n == "image2" for n in names)
        what = "an image, not audio" if is_image else "data that is not a recognised audio format"
        raise UnsupportedAudioError(f"Expected an audio file but received {what}.",
                                    detail=f"ffmpeg format: {detected}")
    kinds = [stream.get("codec_type") for stream in info.get("streams", [])]
    if "audio" not in kinds:
        if "video" in kinds:
            raise InvalidAudioError("The audio file is a video without an audio track: there is nothing to "
                                    "drive the avatar with.")
        raise InvalidAudioError("Could not read the audio: the file contains no audio stream.")
    try:
        duration = float(fmt.get("duration"))
    except (TypeError, ValueError):
        return None  # e.g. WebM from a browser's MediaRecorder: the decode below measures it
    return duration if duration == duration and duration >= 0 else None


def _too_long(duration: float, limits: MediaLimits) -> str:
    return f"The audio is too long: {_human(duration)}; the limit is {_human(limits.max_audio_s)}."


def _human(seconds: float) -> str:
    """``7200.0 s (2:00:00)``: exact seconds, plus a clock reading for anything over a minute."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    total = int(round(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    clock = f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
    return f"{seconds:.1f} s ({clock})"
