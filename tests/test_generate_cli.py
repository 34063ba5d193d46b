"""``stable-avatar generate`` end to end with the tiny preset: real ffmpeg, real mp4s checked with ffprobe."""

from __future__ import annotations

import re
import subprocess
import sys
from fractions import Fraction

import pytest

from pipeline.presets import TINY_RESOLUTIONS
from stable_avatar.cli import main
from testing.media import EXAMPLE_AUDIO, EXAMPLE_IMAGE, probe, synthetic_speech

pytestmark = pytest.mark.long  # some 30 tiny generations, a minute or more in all


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


def test_pipeline_config_and_unit_flags_make_the_settings(tmp_path):
    """``--pipeline-config`` takes the service's ``pipeline:`` block; flags given on the command line win."""
    from stable_avatar.cli import build_parser
    from stable_avatar.generate_commands import pipeline_settings

    config = tmp_path / "pipeline.yaml"
    config.write_text("overlap: 6\nsplit_guidance_rows: true\nacceleration: regular\n"
                      "step_cache: {always_compute_first: 2, guard_fitted_range: false}\n")
    base = ["generate", "--image", "i", "--audio", "a", "--prompt", "p", "-o", "o.mp4"]
    settings = pipeline_settings(build_parser().parse_args([*base, "--pipeline-config", str(config)]))
    assert (settings.overlap, settings.split_guidance_rows, settings.acceleration) == (6, True, "regular")
    assert (settings.step_cache.always_compute_first, settings.step_cache.guard_fitted_range) == (2, False)
    assert settings.compile is False
    flags = pipeline_settings(build_parser().parse_args([*base, "--pipeline-config", str(config), "--overlap", "8",
                                                         "--compile"]))
    assert (flags.overlap, flags.split_guidance_rows, flags.compile) == (8, True, True)
    assert pipeline_settings(build_parser().parse_args(base)) == pipeline_settings(
        build_parser().parse_args(base))  # no file, no flags: the defaults
    assert pipeline_settings(build_parser().parse_args([*base, "--split-guidance-rows"])).split_guidance_rows


@pytest.mark.parametrize("content,message", [
    ("- a list\n", "expected a mapping of pipeline settings"),
    ("overlap: 1\n", "overlap"),
    ("acceleration: max\n", "acceleration"),
])
def test_a_bad_pipeline_config_is_a_clear_error(tmp_path, capsys, content, message):
    config = tmp_path / "pipeline.yaml"
    config.write_text(content)
    code = main(["generate", "--image", str(EXAMPLE_IMAGE), "--audio", str(EXAMPLE_AUDIO), "--prompt", "x",
                 "--steps", "1", "--pipeline-config", str(config), "-o", str(tmp_path / "o.mp4")])
    assert code == 2
    assert message in capsys.readouterr().err


def test_acceleration_changes_the_video_and_none_does_not(tmp_path):
    """The request level reaches the step cache: unguarded "high" on the tiny preset skips steps (a different
    video); "none" is the default video byte for byte."""
    config = tmp_path / "pipeline.yaml"
    config.write_text("step_cache: {always_compute_first: 2, guard_fitted_range: false}\n")
    audio = synthetic_speech(tmp_path / "speech.wav", 2.0)
    videos = {}
    for name, extra in (("default", []), ("none", ["--acceleration", "none"]), ("high", ["--acceleration", "high"])):
        out = tmp_path / f"{name}.mp4"
        assert main(["generate", "--image", str(EXAMPLE_IMAGE), "--audio", str(audio), "--prompt", "x",
                     "--steps", "5", "--seed", "2", "--quiet", "--pipeline-config", str(config), *extra,
                     "-o", str(out)]) == 0
        videos[name] = out.read_bytes()
    assert videos["none"] == videos["default"]
    assert videos["high"] != videos["default"]


def test_memory_modes_from_the_command_line(tmp_path):
    """An offload mode makes the default video byte for byte; fp8 weights make a slightly different one."""
    audio = synthetic_speech(tmp_path / "speech.wav", 2.0)
    videos = {}
    for name, extra in (("full", []), ("block_offload", ["--memory-mode", "block_offload"]),
                        ("model_offload", ["--memory-mode", "model_offload", "--text-encoder-device", "cpu"]),
                        ("fp8", ["--memory-mode", "model_offload+fp8_weights"])):
        out = tmp_path / f"{name}.mp4"
        assert main(["generate", "--image", str(EXAMPLE_IMAGE), "--audio", str(audio), "--prompt", "x",
                     "--steps", "2", "--seed", "2", "--quiet", *extra, "-o", str(out)]) == 0
        videos[name] = out.read_bytes()
    assert videos["block_offload"] == videos["full"] == videos["model_offload"]
    assert videos["fp8"] != videos["full"]


def test_memory_flags_override_the_config_block(tmp_path):
    from stable_avatar.cli import build_parser
    from stable_avatar.generate_commands import pipeline_settings

    config = tmp_path / "pipeline.yaml"
    config.write_text("memory: {mode: block_offload, blocks_per_group: 2}\nprompt_cache_bytes: 1024\n")
    base = ["generate", "--image", "i", "--audio", "a", "--prompt", "p", "-o", "o.mp4", "--pipeline-config",
            str(config)]
    settings = pipeline_settings(build_parser().parse_args(base))
    assert (settings.memory.mode, settings.memory.blocks_per_group, settings.prompt_cache_bytes) == (
        "block_offload", 2, 1024)
    flags = pipeline_settings(build_parser().parse_args([*base, "--memory-mode", "block_offload+fp8_weights",
                                                         "--text-encoder-device", "cpu"]))
    assert (flags.memory.mode, flags.memory.blocks_per_group, flags.memory.text_encoder_device) == (
        "block_offload+fp8_weights", 2, "cpu")


@pytest.mark.parametrize("mode,message", [
    ("turbo", "memory.mode: Value error, unknown memory mode 'turbo'"),
    ("model_offload+block_offload", "exclude each other"),
])
def test_a_bad_memory_mode_is_a_clear_error(tmp_path, capsys, mode, message):
    code = main(["generate", "--image", str(EXAMPLE_IMAGE), "--audio", str(EXAMPLE_AUDIO), "--prompt", "x",
                 "--memory-mode", mode, "-o", str(tmp_path / "o.mp4")])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o.mp4").exists()


def test_checkpoints_select_the_real_preset_and_a_random_preset_refuses_them(tmp_path, capsys):
    args = ["generate", "--image", str(EXAMPLE_IMAGE), "--audio", str(EXAMPLE_AUDIO), "--prompt", "x",
            "--checkpoints", str(tmp_path), "-o", str(tmp_path / "o.mp4")]
    assert main(args) == 2  # the real preset, which finds no files in an empty folder
    err = capsys.readouterr().err
    assert "using preset stableavatar-1.3b" in err and "checkpoint files not found" in err
    assert main([*args, "--preset", "tiny"]) == 2
    err = capsys.readouterr().err
    assert "preset 'tiny' has random weights and reads no checkpoints" in err
    assert not (tmp_path / "o.mp4").exists()


def test_generate_help_states_each_modes_memory():
    from pipeline.settings import MEMORY_MODE_PEAKS_GB

    proc = subprocess.run([sys.executable, "-m", "stable_avatar.cli", "generate", "--help"], capture_output=True,
                          text=True, check=True)
    help_text = " ".join(proc.stdout.split())
    assert set(MEMORY_MODE_PEAKS_GB) >= {"full", "model_offload", "block_offload", "block_offload+fp8_weights"}
    for mode, gb in MEMORY_MODE_PEAKS_GB.items():
        assert re.search(rf"[ ,:]{re.escape(mode)} {gb:.1f} GB", help_text), mode
