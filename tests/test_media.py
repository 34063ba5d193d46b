"""Media I/O: audio decoding, image loading/sizing, and deterministic mp4 encoding (needs an ffmpeg binary)."""

from __future__ import annotations

import io
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.media import video as video_mod
from pipeline.media.audio import audio_duration_s, decode_audio, write_wav
from pipeline.media.errors import FFmpegError, MediaError, UnreadableAudioError, UnreadableImageError
from pipeline.media.ffmpeg_bin import ffmpeg_path
from pipeline.media.image import choose_size, load_image, resize_cover
from pipeline.media.video import VideoWriter, probe_media

SR = 16000
SIZE_TABLE = {"16:9": (832, 480), "9:16": (480, 832), "1:1": (512, 512)}


def _ffmpeg(*args: str) -> bytes:
    cmd = [ffmpeg_path(), "-hide_banner", "-nostdin", "-loglevel", "error", "-y", *args]
    return subprocess.run(cmd, check=True, capture_output=True).stdout


def _signal(sample_rate: int, seconds: float) -> np.ndarray:
    """Two tones under a slow envelope: distinctive enough for a cross-correlation check after lossy coding."""
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 1.3 * t)
    return (0.4 * envelope * (np.sin(2 * np.pi * 330 * t) + 0.5 * np.sin(2 * np.pi * 1210 * t))).astype(
        np.float32
    )


def _best_correlation(a: np.ndarray, b: np.ndarray, max_lag: int = 1200) -> float:
    n = min(a.size, b.size) - 2 * max_lag
    ref = a[max_lag : max_lag + n]
    best = 0.0
    for lag in range(-max_lag, max_lag + 1, 1):
        seg = b[max_lag + lag : max_lag + lag + n]
        best = max(best, float(np.dot(ref, seg) / (np.linalg.norm(ref) * np.linalg.norm(seg) + 1e-12)))
    return best


@pytest.fixture(scope="module")
def source_wav(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    folder = tmp_path_factory.mktemp("audio")
    sig = _signal(SR, 1.5)
    return write_wav(folder / "src.wav", sig, SR), sig


# -- audio -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ext", "codec_args"),
    [
        ("wav", ["-c:a", "pcm_s16le"]),
        ("mp3", ["-c:a", "libmp3lame", "-b:a", "128k"]),
        ("m4a", ["-c:a", "aac", "-b:a", "128k"]),
        ("ogg", ["-c:a", "libvorbis", "-q:a", "5"]),
        ("opus", ["-c:a", "libopus", "-b:a", "64k"]),
        ("flac", ["-c:a", "flac"]),
    ],
)
def test_decode_formats(tmp_path: Path, source_wav: tuple[Path, np.ndarray], ext: str, codec_args: list[str]):
    src, sig = source_wav
    encoded = tmp_path / f"clip.{ext}"
    _ffmpeg("-i", str(src), "-ar", "44100" if ext != "opus" else "48000", *codec_args, str(encoded))
    from_path = decode_audio(encoded)
    from_bytes = decode_audio(encoded.read_bytes())
    assert from_path.dtype == np.float32 and from_path.ndim == 1
    np.testing.assert_array_equal(from_path, from_bytes)  # deterministic, path and bytes agree
    assert abs(from_path.size - sig.size) <= 0.03 * sig.size
    assert float(np.abs(from_path).max()) <= 1.0
    assert _best_correlation(sig, from_path) > 0.95
    assert audio_duration_s(from_path, SR) == pytest.approx(1.5, abs=0.05)


def test_stereo_44k_downmixed_to_mono_mean(tmp_path: Path):
    t = np.arange(44100) / 44100
    left = 0.5 * np.sin(2 * np.pi * 440 * t)
    stereo = np.stack([left, np.zeros_like(left)], axis=1)
    pcm = np.round(stereo * 32767).astype("<i2").tobytes()
    path = tmp_path / "stereo.wav"
    import wave

    with wave.open(str(path), "wb") as wf:
        wf.setnchannels(2)
        wf.setsampwidth(2)
        wf.setframerate(44100)
        wf.writeframes(pcm)
    out = decode_audio(path)
    assert out.size == pytest.approx(SR, abs=2)
    # mean of (left, silence) -> half amplitude; a sqrt(1/2) or sum mix would give 0.35 / 0.5
    assert float(np.abs(out[200:-200]).max()) == pytest.approx(0.25, abs=0.01)
    assert _best_correlation(_resampled(left), out, max_lag=50) > 0.99


def _resampled(x: np.ndarray) -> np.ndarray:
    idx = np.arange(int(x.size * SR / 44100)) * (44100 / SR)
    return np.interp(idx, np.arange(x.size), x).astype(np.float32)


def test_decode_other_rate(source_wav: tuple[Path, np.ndarray]):
    out = decode_audio(source_wav[0], sample_rate=8000)
    assert out.size == pytest.approx(12000, abs=2)


def _png_bytes(size: tuple[int, int] = (32, 24), mode: str = "RGB", noise: bool = False) -> bytes:
    if noise:
        arr = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        img = Image.fromarray(arr, "RGB")
    else:
        img = Image.new(mode, size, (200, 30, 30, 255)[: len(mode)])
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def video_only_mp4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("vid") / "silent.mp4"
    _ffmpeg("-f", "lavfi", "-i", "testsrc=size=64x48:rate=25:duration=1", "-c:v", "libx264", str(path))
    return path


@pytest.mark.parametrize("kind", ["garbage", "empty", "png", "video_only", "header_only_wav", "text"])
def test_unreadable_audio(kind: str, video_only_mp4: Path, source_wav: tuple[Path, np.ndarray]):
    data = {
        "garbage": bytes(np.random.default_rng(1).integers(0, 256, 4000, dtype=np.uint8)),
        "empty": b"",
        "png": _png_bytes(),
        "video_only": video_only_mp4.read_bytes(),
        "header_only_wav": source_wav[0].read_bytes()[:44],
        "text": b"hello, this is not audio\n" * 20,
    }[kind]
    with pytest.raises(UnreadableAudioError) as info:
        decode_audio(data)
    err = info.value
    assert isinstance(err, MediaError) and isinstance(err, ValueError)
    assert err.field == "audio_url"
    assert str(err).startswith("Could not read the audio")
    assert "Traceback" not in str(err) and "\n" not in str(err)
    if kind == "video_only":
        assert "no audio stream" in str(err)


def test_decode_audio_missing_path(tmp_path: Path):
    with pytest.raises(UnreadableAudioError):
        decode_audio(tmp_path / "nope.wav")


def test_write_wav_roundtrip(tmp_path: Path):
    sig = _signal(SR, 0.5)
    path = write_wav(tmp_path / "x.wav", sig, SR)
    back = decode_audio(path)
    assert back.size == sig.size
    np.testing.assert_allclose(back, sig, atol=0.5 / 32768 + 1e-7)


# -- images ------------------------------------------------------------------------------------------


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_load_image_formats(fmt: str, tmp_path: Path):
    src = Image.new("RGB", (40, 30), (10, 120, 240))
    data = _encode(src, fmt, **({"quality": 95} if fmt != "PNG" else {}))
    for source in (data, tmp_path / f"img.{fmt.lower()}"):
        if isinstance(source, Path):
            source.write_bytes(data)
        img = load_image(source)
        assert img.mode == "RGB" and img.size == (40, 30)
        assert np.abs(np.asarray(img, dtype=int) - (10, 120, 240)).max() <= 6


def test_exif_orientation_applied():
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = (255, 0, 0)  # left half red
    arr[:, 20:] = (0, 0, 255)  # right half blue
    img = Image.fromarray(arr, "RGB")
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display": the left edge becomes the top
    loaded = load_image(_encode(img, "JPEG", quality=95, exif=exif.tobytes()))
    assert loaded.size == (20, 40)
    out = np.asarray(loaded, dtype=int)
    assert out[5, 10, 0] > 200 and out[5, 10, 2] < 60  # top is red
    assert out[35, 10, 2] > 200 and out[35, 10, 0] < 60  # bottom is blue


def test_rgba_flattened_onto_white():
    arr = np.zeros((10, 30, 4), np.uint8)
    arr[:, :10] = (255, 0, 0, 255)  # opaque red
    arr[:, 10:20] = (0, 0, 0, 0)  # fully transparent
    arr[:, 20:] = (255, 0, 0, 128)  # half-transparent red
    loaded = np.asarray(load_image(_encode(Image.fromarray(arr, "RGBA"), "PNG")), dtype=int)
    assert tuple(loaded[5, 5]) == (255, 0, 0)
    assert tuple(loaded[5, 15]) == (255, 255, 255)
    assert loaded[5, 25, 0] == 255 and abs(loaded[5, 25, 1] - 127) <= 2


def test_palette_and_grey_images():
    grey = load_image(_encode(Image.new("L", (8, 8), 77), "PNG"))
    assert grey.mode == "RGB" and tuple(np.asarray(grey)[0, 0]) == (77, 77, 77)
    pal = Image.new("RGB", (8, 8), (0, 200, 0)).convert("P", palette=Image.Palette.ADAPTIVE)
    assert tuple(np.asarray(load_image(_encode(pal, "PNG")))[0, 0]) == (0, 200, 0)


@pytest.mark.parametrize("kind", ["truncated_png", "text", "empty", "wav"])
def test_unreadable_image(kind: str, source_wav: tuple[Path, np.ndarray]):
    data = {
        "truncated_png": _png_bytes((64, 64), noise=True)[:2000],
        "text": b"<html>not an image</html>",
        "empty": b"",
        "wav": source_wav[0].read_bytes(),
    }[kind]
    with pytest.raises(UnreadableImageError) as info:
        load_image(data)
    assert info.value.field == "image_url"
    assert str(info.value).startswith("Could not read the image") and "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("ratio", "w", "h", "expected"),
    [
        ("16:9", 100, 100, (832, 480)),
        ("9:16", 1920, 1080, (480, 832)),
        ("1:1", 1080, 1920, (512, 512)),
        ("auto", 1920, 1080, (832, 480)),
        ("auto", 1080, 1920, (480, 832)),
        ("auto", 700, 700, (512, 512)),
        ("auto", 1250, 1000, (512, 512)),  # 5:4 is nearer square in log space
        ("auto", 1400, 1000, (832, 480)),  # 1.4 is past the geometric midpoint sqrt(832/480) ~ 1.317
        ("auto", 1000, 1250, (512, 512)),
        ("auto", 1000, 1400, (480, 832)),
    ],
)
def test_choose_size(ratio: str, w: int, h: int, expected: tuple[int, int]):
    assert choose_size(ratio, w, h, SIZE_TABLE) == expected


def test_choose_size_rejects_unknown():
    with pytest.raises(ValueError):
        choose_size("4:3", 100, 100, SIZE_TABLE)
    with pytest.raises(ValueError):
        choose_size("auto", 0, 100, SIZE_TABLE)


def test_resize_cover_crops_instead_of_stretching():
    arr = np.zeros((100, 300, 3), np.uint8)
    arr[:] = (0, 255, 0)
    arr[:, :60] = (255, 0, 0)  # red stripe on the left
    out = resize_cover(Image.fromarray(arr, "RGB"), 100, 100)
    assert out.shape == (100, 100, 3) and out.dtype == np.uint8
    assert out[:, :, 0].max() < 10  # the stripe was cropped away, not squeezed in
    tall = resize_cover(Image.fromarray(arr, "RGB"), 64, 128)
    assert tall.shape == (128, 64, 3)
    wide = resize_cover(Image.new("RGB", (50, 200), (9, 9, 9)), 832, 480)
    assert wide.shape == (480, 832, 3)


# -- video -------------------------------------------------------------------------------------------

FPS = 25
N_FRAMES = 83  # 3.32 s at 25 fps, for a 3.3 s audio track


@pytest.fixture(scope="module")
def av_case(tmp_path_factory: pytest.TempPathFactory) -> dict:
    folder = tmp_path_factory.mktemp("av")
    wav = write_wav(folder / "speech.wav", _signal(SR, 3.3), SR)
    frames = np.random.default_rng(7).integers(0, 256, (N_FRAMES, 48, 64, 3), dtype=np.uint8)
    outs = []
    for i in range(2):
        out = folder / f"out{i}.mp4"
        with VideoWriter(out, 64, 48, fps=FPS, audio_path=wav, num_frames=N_FRAMES) as writer:
            for start in range(0, N_FRAMES, 20):
                writer.write(frames[start : start + 20])
        outs.append(out)
    return {"folder": folder, "wav": wav, "frames": frames, "outs": outs}


def _top_level_atoms(data: bytes) -> list[str]:
    atoms, pos = [], 0
    while pos + 8 <= len(data):
        size = int.from_bytes(data[pos : pos + 4], "big")
        kind = data[pos + 4 : pos + 8].decode("latin-1")
        if size == 1:
            size = int.from_bytes(data[pos + 8 : pos + 16], "big")
        atoms.append(kind)
        if size < 8:
            break
        pos += size
    return atoms


def test_video_writer_streams_and_duration(av_case: dict):
    info = probe_media(av_case["outs"][0])
    streams = {s["codec_type"]: s for s in info["streams"]}
    v, a = streams["video"], streams["audio"]
    assert v["codec_name"] == "h264" and v["pix_fmt"] == "yuv420p"
    assert (v["width"], v["height"]) == (64, 48)
    assert v["r_frame_rate"] == "25/1" and int(v["nb_frames"]) == N_FRAMES
    assert a["codec_name"] == "aac"
    assert abs(float(info["format"]["duration"]) - 3.3) <= 0.04
    assert abs(float(a["duration"]) - 3.3) <= 0.04
    assert "encoder" not in info["format"].get("tags", {})  # bitexact: no version strings


def test_video_writer_faststart(av_case: dict):
    atoms = _top_level_atoms(av_case["outs"][0].read_bytes())
    assert atoms.index("moov") < atoms.index("mdat")


def test_video_writer_deterministic(av_case: dict):
    first, second = (p.read_bytes() for p in av_case["outs"])
    assert first == second  # whole file, not only the video stream
    leftovers = [p.name for p in av_case["folder"].iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_video_writer_audio_longer_than_video_is_cut(av_case: dict, tmp_path: Path):
    out = tmp_path / "short.mp4"
    with VideoWriter(out, 64, 48, audio_path=av_case["wav"]) as writer:
        writer.write(av_case["frames"][:25])
    info = probe_media(out)
    assert abs(float(info["format"]["duration"]) - 1.0) <= 0.04
    audio = decode_audio(out)
    assert abs(audio.size / SR - 1.0) <= 0.04


def test_video_writer_without_audio(av_case: dict, tmp_path: Path):
    out = tmp_path / "silent.mp4"
    with VideoWriter(out, 64, 48) as writer:
        writer.write(av_case["frames"][0])  # a single [H, W, 3] frame is accepted
        writer.write(av_case["frames"][1:10])
    assert writer.frames_written == 10
    info = probe_media(out)
    assert [s["codec_type"] for s in info["streams"]] == ["video"]
    assert float(info["format"]["duration"]) == pytest.approx(0.4, abs=0.01)
    with pytest.raises(UnreadableAudioError, match="no audio stream"):
        decode_audio(out)


def test_probe_without_ffprobe(av_case: dict, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(video_mod, "ffprobe_path", lambda: None)
    info = probe_media(av_case["outs"][0])
    assert info["format"]["probed_with"] == "ffmpeg"
    assert float(info["format"]["duration"]) == pytest.approx(3.32, abs=0.011)
    v = next(s for s in info["streams"] if s["codec_type"] == "video")
    assert (v["codec_name"], v["width"], v["height"], v["pix_fmt"]) == ("h264", 64, 48, "yuv420p")
    json.dumps(info)


def test_video_writer_abort_and_errors(av_case: dict, tmp_path: Path):
    out = tmp_path / "boom.mp4"
    with pytest.raises(RuntimeError, match="boom"), VideoWriter(out, 64, 48, audio_path=av_case["wav"]) as w:
        w.write(av_case["frames"][:5])
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []

    with pytest.raises(ValueError, match="promised 10"), VideoWriter(out, 64, 48, num_frames=10) as w:
        w.write(av_case["frames"][:4])
    assert list(tmp_path.iterdir()) == []

    with pytest.raises(ValueError, match="even"):
        VideoWriter(out, 63, 48)
    with VideoWriter(out, 64, 48) as w:
        with pytest.raises(ValueError):
            w.write(av_case["frames"][:, :40])
        with pytest.raises(TypeError):
            w.write(av_case["frames"][:2].astype(np.float32))
        w.abort()
    assert list(tmp_path.iterdir()) == []


def test_video_writer_ffmpeg_failure_reports_stderr(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    writer = VideoWriter(tmp_path / "x.mp4", 64, 48, preset="no-such-preset")
    with pytest.raises(FFmpegError) as info:
        writer.write(np.zeros((50, 48, 64, 3), np.uint8))
        writer.close()
    assert "preset" in str(info.value).lower() or info.value.stderr_tail
    assert list(tmp_path.iterdir()) == []


def test_examples_are_usable():
    examples = Path(__file__).resolve().parents[1] / "examples"
    img = load_image(examples / "portrait.png")
    assert img.size == (384, 512)
    speech = decode_audio(examples / "speech.wav")
    # The file is 16 kHz mono PCM (90,934 samples): decoding at 16 kHz must neither add nor drop a sample.
    assert speech.shape == (90_934,) and audio_duration_s(speech, SR) == 90_934 / 16_000
    assert float(np.abs(speech).max()) > 0.3
