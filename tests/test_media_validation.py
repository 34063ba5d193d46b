"""Media validation: every refusal is cheap, names its field, carries the right status, and leaves no temp file."""

from __future__ import annotations

import contextlib
import io
import os
import struct
import subprocess
import tempfile
import time
import zlib
from pathlib import Path

import pytest
from PIL import Image

from pipeline.media.ffmpeg_bin import ffmpeg_path
from pipeline.media.validate import (
    PROBE_PREFIX,
    MediaLimits,
    check_audio,
    sniff_text,
    validate_audio,
    validate_image,
)
from testing.media import EXAMPLE_AUDIO, EXAMPLE_IMAGE

LIMITS = MediaLimits()


# -- media makers (shared with tests/test_bad_inputs.py) ------------------------------------------------------


def png_declaring(width: int, height: int) -> bytes:
    """A tiny, valid-looking PNG whose header declares ``width`` x ``height`` (a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def encoded(size: tuple[int, int], fmt: str, **kw) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 120, 90)).save(buffer, fmt, **kw)
    return buffer.getvalue()


def ffmpeg(args: list[str], out: Path) -> bytes:
    subprocess.run([ffmpeg_path(), "-v", "error", "-y", *args, str(out)], check=True, capture_output=True)
    return out.read_bytes()


def forge_mp3_frames(mp3: bytes, seconds: float, sample_rate: int = 8000) -> bytes:
    """Rewrite the Xing/Info frame count, so the header claims ``seconds`` (576 samples per MPEG-2.5 frame)."""
    data = bytearray(mp3)
    at = max(data.find(b"Xing"), data.find(b"Info"))
    assert at > 0 and struct.unpack(">I", data[at + 4:at + 8])[0] & 1, "no Xing frame count"
    data[at + 8:at + 12] = struct.pack(">I", int(seconds * sample_rate / 576))
    return bytes(data)


def make_media(folder: Path) -> dict[str, bytes]:
    """Audio/video samples made with ffmpeg in well under a second."""
    lavfi = ["-f", "lavfi", "-i"]
    one_s = ffmpeg([*lavfi, "anullsrc=r=8000:cl=mono", "-t", "1", "-b:a", "8k"], folder / "one.mp3")
    return {
        "good_mp3": ffmpeg([*lavfi, "sine=f=220:r=16000:d=1"], folder / "good.mp3"),
        "short_wav": ffmpeg([*lavfi, "anullsrc=r=16000:cl=mono", "-t", "0.1"], folder / "short.wav"),
        "two_hours_mp3": forge_mp3_frames(one_s, 2 * 3600),
        "corrupt_mp3": b"ID3\x03\x00\x00\x00\x00\x00\x00" + bytes(range(256)) * 20,
        "video_no_audio": ffmpeg([*lavfi, "testsrc=s=64x64:d=0.5", "-pix_fmt", "yuv420p"], folder / "v.mp4"),
        "video_with_audio": ffmpeg([*lavfi, "testsrc=s=64x64:d=0.6", *lavfi, "sine=d=0.6", "-shortest",
                                    "-pix_fmt", "yuv420p"], folder / "av.mp4"),
        "three_s_claiming_1s": forge_mp3_frames(
            ffmpeg([*lavfi, "sine=f=300:r=8000:d=3", "-ac", "1", "-b:a", "8k"], folder / "three.mp3"), 1.0),
    }


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, bytes]:
    return make_media(tmp_path_factory.mktemp("media"))


def refused(call, *args) -> Exception:
    started = time.monotonic()
    with pytest.raises(ValueError) as err:
        call(*args)
    assert time.monotonic() - started < 2.0
    return err.value


# -- images ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt,kw", [("PNG", {}), ("JPEG", {"quality": 80}), ("WEBP", {}), ("BMP", {}),
                                    ("TIFF", {}), ("GIF", {})])
def test_good_images(fmt, kw):
    image = validate_image(encoded((96, 80), fmt, **kw), LIMITS)
    assert image.mode == "RGB" and image.size == (96, 80)


def test_example_portrait_and_transparency():
    assert validate_image(EXAMPLE_IMAGE.read_bytes(), LIMITS).size == (384, 512)
    buffer = io.BytesIO()
    Image.new("RGBA", (64, 64), (0, 0, 0, 0)).save(buffer, "PNG")
    flat = validate_image(buffer.getvalue(), LIMITS)
    assert flat.mode == "RGB" and flat.getpixel((0, 0)) == (255, 255, 255)  # flattened onto white


def test_animated_gif_gives_its_first_frame():
    frames = [Image.new("RGB", (64, 64), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:])
    first = validate_image(buffer.getvalue(), LIMITS)
    assert first.getpixel((10, 10))[0] > 200


@pytest.mark.parametrize("data,status,text", [
    (b"\x00\x01binary garbage\xff" * 20, 415, "not a recognised image"),
    (b"", 422, "empty"),
    (b"just some words", 415, "received text"),
    (b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"/>', 415, "SVG"),
    (b"<svg viewBox='0 0 10 10'><script>alert(1)</script></svg>", 415, "SVG"),
    (b"\n<!DOCTYPE html>\n<html><body><h1>404 Not Found</h1></body></html>", 415,
     "received an HTML page, not an image"),
    (b"\x00\x00\x01\x00\x01\x00\x10\x10" + b"\x00" * 200, 415, "ICO image, which is not supported"),
    (b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n" + b"\x00" * 100, 415, "PDF image"),
])
def test_refused_image_types(data, status, text):
    err = refused(validate_image, data, LIMITS)
    assert err.field == "image_url" and err.status_code == status and text in str(err)


def test_truncated_and_tiny_images():
    png = EXAMPLE_IMAGE.read_bytes()
    err = refused(validate_image, png[: len(png) // 2], LIMITS)
    assert err.status_code == 422 and "truncated or corrupt" in str(err)
    err = refused(validate_image, encoded((1, 1), "PNG"), LIMITS)
    assert err.status_code == 422 and "1x1 pixels" in str(err) and "at least 64 px" in str(err)
    err = refused(validate_image, encoded((200, 20), "PNG"), LIMITS)
    assert "200x20" in str(err)


@pytest.mark.parametrize("size,text", [((30000, 30000), "decompression bomb"),  # PIL's own hard limit
                                       ((10000, 10000), "decompression bomb"),  # PIL's warning, made an error
                                       ((7000, 7000), "49.0 MP"),  # our 40 MP limit
                                       ((9000, 100), "longest side")])
def test_decompression_bombs_are_refused_from_the_header(size, text):
    bomb = png_declaring(*size)
    assert len(bomb) < 100
    err = refused(validate_image, bomb, LIMITS)
    assert err.status_code == 413 and err.field == "image_url" and text in str(err)


def test_limits_are_configurable():
    small = MediaLimits(max_image_pixels=100 * 100, min_image_side=8)
    assert validate_image(encoded((10, 10), "PNG"), small).size == (10, 10)
    assert refused(validate_image, encoded((101, 100), "PNG"), small).status_code == 413
    with pytest.raises(ValueError):
        MediaLimits(min_audio_s=5, max_audio_s=1)
    with pytest.raises(ValueError):
        MediaLimits(unknown=1)


def test_sniffing():
    assert sniff_text(b"\xef\xbb\xbf  <!doctype HTML><html>") == "an HTML page"
    assert sniff_text(b"#EXTM3U\n#EXTINF:1,\nfile:///etc/passwd\n") == "a playlist"
    assert sniff_text(b'{"error": "denied"}') == "JSON"
    assert sniff_text(EXAMPLE_IMAGE.read_bytes()) is None
    assert sniff_text(EXAMPLE_AUDIO.read_bytes()) is None


# -- audio ----------------------------------------------------------------------------------------------------


def test_good_audio(media):
    assert abs(validate_audio(EXAMPLE_AUDIO.read_bytes(), LIMITS) - 5.68) < 0.05
    assert 0.9 < validate_audio(media["good_mp3"], LIMITS) < 1.2
    checked = check_audio(EXAMPLE_AUDIO.read_bytes(), LIMITS)
    assert checked.samples.dtype.name == "float32" and len(checked.samples) == round(checked.duration_s * 16000)


def test_video_with_an_audio_track_is_accepted(media):
    assert 0.5 < validate_audio(media["video_with_audio"], LIMITS) < 0.7


@pytest.mark.parametrize("name,status,text", [
    ("short_wav", 422, "too short: 0.10 s; at least 0.2 s"),
    ("two_hours_mp3", 422, "too long: 7200.0 s (2:00:00); the limit is 600.0 s (10:00)"),
    ("corrupt_mp3", 415, "not a recognised audio format"),
    ("video_no_audio", 422, "a video without an audio track"),
])
def test_refused_audio(media, name, status, text):
    err = refused(validate_audio, media[name], LIMITS)
    assert err.field == "audio_url" and err.status_code == status and text in str(err), str(err)


@pytest.mark.parametrize("data,status,text", [
    (b"", 422, "empty"),
    (b"#EXTM3U\n#EXTINF:1,\nhttp://169.254.169.254/latest\n", 415, "received a playlist, not audio"),
    (b"<html><body>502 Bad Gateway</body></html>", 415, "received an HTML page, not audio"),
    (b"\x00\x01\x02\x03" * 300, 415, "not a recognised audio format"),
])
def test_refused_audio_bytes(data, status, text):
    err = refused(validate_audio, data, LIMITS)
    assert err.field == "audio_url" and err.status_code == status and text in str(err), str(err)


def test_an_image_is_not_audio():
    err = refused(validate_audio, EXAMPLE_IMAGE.read_bytes(), LIMITS)
    assert err.field == "audio_url" and err.status_code == 415 and "received an image, not audio" in str(err)


def test_a_header_lying_short_is_measured_by_decoding(media):
    """The header says 1 s, the data holds 3 s: the decode (capped) decides, so the lie cannot bypass the cap."""
    err = refused(validate_audio, media["three_s_claiming_1s"], MediaLimits(max_audio_s=2.0))
    assert "too long" in str(err) and err.status_code == 422


def test_no_temporary_files_are_left_behind(media, tmp_path, monkeypatch):
    """Validation writes each upload to a temporary file for ffmpeg and removes it, refused or not. The test
    gives this process a temporary folder of its own, so files other processes make in /tmp meanwhile (the
    service's replicas, other test workers) cannot be mistaken for ours."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    made: list[str] = []
    real = tempfile.NamedTemporaryFile

    def recording(*args, **kwargs):
        handle = real(*args, **kwargs)
        made.append(handle.name)
        return handle

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", recording)
    for name in ("short_wav", "two_hours_mp3", "corrupt_mp3", "video_no_audio", "good_mp3"):
        with contextlib.suppress(ValueError):
            validate_audio(media[name], LIMITS)
    assert len(made) == 5 and all(Path(n).name.startswith(PROBE_PREFIX) and Path(n).parent == tmp_path
                                  for n in made), made
    assert os.listdir(tmp_path) == []
