"""A long video's decode + encode in segments on two Postprocessor replicas, through the real service (a local Ray
cluster, the tiny preset, SQLite, local storage), against the CLI and the in-process pipeline.

With ``min_segment_latents: 2`` a 12 s clip (76 latents) is cut into two segments, the second warming up from
latent 5. The service's mp4 must be byte for byte what the in-process pipeline makes of the same latents in the
same segments (``StableAvatarPipeline.finish_in_segments``: frames bit-identical to the serial stream, audio
packets the serial file's, tests/test_segments.py; the audio track encoded once, by the Orchestrator), and have the frame count, durations and streams of ``stable-avatar generate``'s serial
mp4, whose decoded frames it matches up to the H.264 coding of two separately rate-controlled streams. A
Postprocessor replica killed while it holds a segment (the test hook ``STABLE_AVATAR_TEST_POSTPROCESSOR_CRASH_FILE``)
is retried elsewhere, logged, and the video does not change. A short clip stays one segment: the CLI's bytes.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from deployments.config import AppArgs
from deployments.workers.postprocessor import CRASH_FILE_ENV
from pipeline.generator import GenerationParams, StableAvatarPipeline
from pipeline.loading import load_models
from pipeline.media.ffmpeg_bin import ffmpeg_path
from pipeline.presets import get_preset
from stable_avatar.cli import main as cli_main
from testing.http import queued_video
from testing.media import EXAMPLE_IMAGE, data_uri, probe, synthetic_speech

STEPS, SEED, PROMPT = 2, 7, "talking"
LONG_S, SHORT_S = 12.0, 1.5
SIZE = 64  # 1:1 at the tiny preset's resolutions


@pytest.fixture(scope="module")
def crash_file(tmp_path_factory):
    return tmp_path_factory.mktemp("hooks") / "postprocessor-crash.json"


@pytest.fixture(scope="module")
def service(tmp_path_factory, crash_file, serve_cluster):
    root = tmp_path_factory.mktemp("data")
    serve_cluster.deploy({
        "device": "cpu", "storage": serve_cluster.local_storage(root),
        "jobs": {"kind": "sqlite", "path": str(root / "jobs.sqlite3")},
        "dispatch": {"lease_s": 10, "heartbeat_s": 1, "poll_interval_s": 0.2},
        "denoiser": {"num_replicas": 1, "num_gpus": 1},
        "postprocessor": {"num_replicas": 2}, "min_segment_latents": 2,
    }, env={CRASH_FILE_ENV: str(crash_file)})
    return serve_cluster.base


@pytest.fixture(scope="module")
def audio(tmp_path_factory):
    folder = tmp_path_factory.mktemp("audio")
    return {"long": synthetic_speech(folder / "long.wav", LONG_S), "short": synthetic_speech(folder / "short.wav",
                                                                                             SHORT_S)}


def run_queued(base: str, audio_path: Path) -> tuple[bytes, list[str]]:
    body = {"image_url": data_uri(EXAMPLE_IMAGE, "image/png"), "audio_url": data_uri(audio_path, "audio/wav"),
            "prompt": PROMPT, "num_inference_steps": STEPS, "seed": SEED, "aspect_ratio": "1:1"}
    return queued_video(base, body, timeout_s=900)


@pytest.fixture(scope="module")
def references(tmp_path_factory, audio):
    """``stable-avatar generate`` (serial) and the in-process pipeline in the service's two segments, same inputs."""
    tmp = tmp_path_factory.mktemp("references")
    out: dict[str, bytes] = {}
    for name, path in audio.items():
        mp4 = tmp / f"cli-{name}.mp4"
        assert cli_main(["generate", "--image", str(EXAMPLE_IMAGE), "--audio", str(path), "--prompt", PROMPT,
                         "--steps", str(STEPS), "--seed", str(SEED), "--aspect-ratio", "1:1", "--quiet",
                         "-o", str(mp4)]) == 0
        out[f"cli-{name}"] = mp4.read_bytes()
    args = AppArgs(device="cpu")
    pipeline = StableAvatarPipeline(load_models(get_preset("tiny")), args.pipeline)
    prepared = pipeline.prepare(EXAMPLE_IMAGE, audio["long"], GenerationParams(
        prompt=PROMPT, aspect_ratio="1:1", num_inference_steps=STEPS, seed=SEED))
    latents = asyncio.run(pipeline.denoise(prepared))
    segments = pipeline.plan_segments(prepared, 2, 2)
    assert len(segments) == 2 and segments[1].warm_up_start > 0, segments
    pipeline.finish_in_segments(prepared, latents, tmp / "segmented.mp4", 2, 2)
    out["segmented-long"] = (tmp / "segmented.mp4").read_bytes()
    return out


def decoded_frames(data: bytes, tmp: Path, name: str) -> np.ndarray:
    path = tmp / f"{name}.mp4"
    path.write_bytes(data)
    raw = subprocess.run([ffmpeg_path(), "-v", "error", "-i", str(path), "-f", "rawvideo", "-pix_fmt", "rgb24", "-"],
                         capture_output=True, check=True).stdout
    return np.frombuffer(raw, np.uint8).reshape(-1, SIZE, SIZE, 3)


_videos: dict[str, bytes] = {}


def test_a_long_video_is_made_in_segments_on_two_replicas_like_the_serial_one(service, audio, references, tmp_path):
    video, logs = run_queued(service, audio["long"])
    _videos["long"] = video
    assert any(m.startswith("decoding and encoding in 2 segments") for m in logs), logs
    done = [m for m in logs if m.startswith("segment ") and "decoded and encoded on" in m]
    assert len(done) == 2 and len({m.split(" on ")[1].split(" in ")[0] for m in done}) == 2, done  # two replicas
    encoding = [i for i, m in enumerate(logs) if m == "encoding the audio track (12.00 s) while the 2 segments decode"]
    encoded = [i for i, m in enumerate(logs) if m.startswith("audio track encoded (")]
    assert len(encoding) == len(encoded) == 1 and encoding[0] < encoded[0], logs  # once, by the Orchestrator
    assert video == references["segmented-long"]  # the in-process segments' bytes
    cli = references["cli-long"]
    assert video != cli  # segments: H.264 bytes differ at the seam
    ours, theirs = probe_bytes(tmp_path, video, "ours"), probe_bytes(tmp_path, cli, "cli")
    assert [s["codec_name"] for s in ours["streams"]] == [s["codec_name"] for s in theirs["streams"]] == ["h264",
                                                                                                          "aac"]
    for key in ("nb_frames", "duration", "width", "height", "pix_fmt", "r_frame_rate"):
        assert ours["streams"][0][key] == theirs["streams"][0][key], key
    assert ours["streams"][1]["duration"] == theirs["streams"][1]["duration"]
    assert ours["format"]["duration"] == theirs["format"]["duration"]
    a, b = decoded_frames(video, tmp_path, "ours"), decoded_frames(cli, tmp_path, "cli")
    assert a.shape == b.shape
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    print("decoded frames vs the CLI's: mean |d|", diff.mean(), "max", diff.max())
    assert diff.mean() < 2.0  # the same frames through two CRF-18 encodes of differently cut streams


def test_a_killed_postprocessor_replica_is_retried_and_the_video_does_not_change(service, audio, references,
                                                                                 crash_file):
    crash_file.write_text(json.dumps({"segment": 1}))  # the replica that receives segment 2 exits holding it
    video, logs = run_queued(service, audio["long"])
    assert not crash_file.exists() and crash_file.with_suffix(".claimed").exists()  # a replica did exit
    crash_file.with_suffix(".claimed").unlink()
    retried = [m for m in logs if m.startswith("segment 2/2 ") and "running it again on another replica" in m]
    assert retried, logs
    assert video == references["segmented-long"]


def test_a_short_video_is_one_segment_with_the_clis_bytes(service, audio, references):
    video, logs = run_queued(service, audio["short"])
    assert "decoding and encoding the video" in logs and not any("segments" in m for m in logs), logs
    assert video == references["cli-short"]


def probe_bytes(tmp: Path, data: bytes, name: str) -> dict:
    path = tmp / f"{name}-probe.mp4"
    path.write_bytes(data)
    return probe(path)
