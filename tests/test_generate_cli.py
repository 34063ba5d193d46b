"""``stable-avatar generate`` end to end with the tiny preset: real ffmpeg, real mp4s checked with ffprobe."""

from __future__ import annotations

import subprocess
import sys
from fractions import Fraction

import pytest

from pipeline.presets import TINY_RESOLUTIONS
from stable_avatar.cli import main
from tests.helpers import EXAMPLE_AUDIO, EXAMPLE_IMAGE, probe, synthetic_speech


@pytest.mark.parametrize("seconds", [1.0, 3.3, 5.0, 12.0])
@pytest.mark.parametrize("aspect_ratio", ["16:9", "9:16", "1:1"])
def test_generate_makes_a_valid_mp4(tmp_path, seconds, aspect_ratio):
    audio = synthetic_speech(tmp_path / "speech.wav", seconds)
    out = tmp_path / "out.mp4"
    code = main(["generate", "--image", str(EXAMPLE_IMAGE), "--audio", str(audio), "--prompt", "a person talking",
                 "--aspect-ratio", aspect_ratio, "--steps", "2", "--seed", "3", "--quiet", "-o", str(out)])
    assert code == 0
    info = probe(out)
    video = next(s for s in info["streams"] if s["codec_type"] == "video")
    audio_stream = next(s for s in info["streams"] if s["codec_type"] == "audio")
    assert video["codec_name"] == "h264" and video["pix_fmt"] == "yuv420p"
    assert audio_stream["codec_name"] == "aac"
    assert Fraction(video["avg_frame_rate"]) == 25
    assert (video["width"], video["height"]) == TINY_RESOLUTIONS[aspect_ratio]
    assert abs(float(video["duration"]) - seconds) <= 0.04
    assert abs(float(info["format"]["duration"]) - seconds) <= 0.04


def test_auto_aspect_ratio_follows_the_image(tmp_path):
    out = tmp_path / "out.mp4"
    assert main(["generate", "--image", str(EXAMPLE_IMAGE), "--audio", str(EXAMPLE_AUDIO), "--prompt", "hi",
                 "--steps", "1", "--quiet", "-o", str(out)]) == 0
    video = next(s for s in probe(out)["streams"] if s["codec_type"] == "video")
    assert (video["width"], video["height"]) == TINY_RESOLUTIONS["9:16"]  # the portrait is 384x512


@pytest.mark.parametrize("flag,content,field", [
    ("--image", b"this is not an image", "image_url"),
    ("--audio", b"\x00\x01garbage audio bytes" * 10, "audio_url"),
])
def test_unreadable_input_is_a_clear_error(tmp_path, flag, content, field):
    bad = tmp_path / "bad.bin"
    bad.write_bytes(content)
    args = {"--image": str(EXAMPLE_IMAGE), "--audio": str(EXAMPLE_AUDIO)} | {flag: str(bad)}
    proc = subprocess.run(
        [sys.executable, "-m", "stable_avatar.cli", "generate", *sum(([k, v] for k, v in args.items()), []),
         "--prompt", "x", "--steps", "1", "-o", str(tmp_path / "o.mp4")],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2
    assert f"error: {field}:" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "o.mp4").exists()


def test_out_of_range_number_is_a_clear_error(tmp_path, capsys):
    code = main(["generate", "--image", str(EXAMPLE_IMAGE), "--audio", str(EXAMPLE_AUDIO), "--prompt", "x",
                 "--steps", "500", "-o", str(tmp_path / "o.mp4")])
    assert code == 2
    assert "num_inference_steps" in capsys.readouterr().err
