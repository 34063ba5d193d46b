"""Long videos in segments: the plan, the decoder's temporal reach, segmented decode against the serial stream,
and the stitched mp4 (frame count, duration, one stream, the serial file's audio packets, plays to the end in a
real Chromium).

The tiny Wan VAE has the real decoder's layout (only the widths are smaller), so its reach is the real one;
bench/bench_segments.py measures the same reach on the real widths (docs/long-videos.md).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import itertools
import json
import math
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.simulated import UpsamplingVae
from pipeline.generator import PreparedRequest, StableAvatarPipeline, stitch_segments, video_seconds
from pipeline.loading import load_models
from pipeline.media.audio_track import encode_audio_track, encode_audio_track_async
from pipeline.media.errors import FFmpegError
from pipeline.media.ffmpeg_bin import ffmpeg_path, ffprobe_path
from pipeline.media.stitch import read_video_packets, stitch_videos
from pipeline.media.video import VideoWriter
from pipeline.models.vae import (
    StreamingVaeDecoder,
    build_vae,
    decoder_reach,
    frames_to_uint8,
    preset_decoder_reach,
)
from pipeline.presets import REAL_VAE, TINY_VAE, get_preset
from pipeline.segment_plan import MIN_SEGMENT_LATENTS, DecoderReach, LatentSegment, first_frame, plan_segments
from pipeline.windows import FPS, SAMPLE_RATE, plan_windows
from testing.browser import chromium
from testing.media import synthetic_speech

WAN_REACH = (38, 14, 7)  # latents each stage of the Wan2.1 decoder looks back (latent, 1/2 and 1/4 latent rates)
WIDTH, HEIGHT = 48, 32  # tiny frames: 6x4 latents
VIDEO_S = 9.3  # 59 decoded latents: a 4-replica plan has a segment whose warm-up starts past latent 0


def serial_frames(vae, latents: torch.Tensor, clamp: bool = True) -> torch.Tensor:
    return torch.cat(list(StreamingVaeDecoder(vae).decode(latents, clamp=clamp)), dim=2)


def segment_decode(vae, latents: torch.Tensor, start: int, end: int, reach: DecoderReach | None = None):
    """Frames of latents [start, end) from a stream warmed up on the latents before ``start`` (all of them: the
    decoder keeps only what the reach needs)."""
    decoder = StreamingVaeDecoder(vae)
    decoder.warm_up(latents[:, :, :start], reach)
    return decoder.feed(latents[:, :, start:end])


# -- the plan -------------------------------------------------------------------------------------------------------

WAN = DecoderReach(WAN_REACH, (0.05, 0.2, 0.75))  # 9.55 latents' worth of warm-up
STAND_IN = DecoderReach((1,), (1.0,))


@pytest.mark.parametrize("reach", [WAN, STAND_IN], ids=["wan", "stand-in"])
def test_plan_covers_every_latent_and_frame_once_with_bounded_warm_ups(reach):
    for latents, replicas, minimum in itertools.product([1, 2, 3, 20, 39, 40, 59, 376, 3751],
                                                        [1, 2, 3, 4, 8, 13], [2, 5, 16, 50]):
        for output_frames in {first_frame(latents), max(1, first_frame(latents) - 3)}:
            plan = plan_segments(latents, replicas, minimum, reach, output_frames)
            where = (latents, replicas, minimum, output_frames)
            assert [s.index for s in plan] == list(range(len(plan)))
            assert plan[0].start == 0 and plan[-1].end == latents, where
            assert all(a.end == b.start for a, b in zip(plan, plan[1:], strict=False)), where
            assert plan[0].frame_start == 0 and plan[-1].frame_end == output_frames, where
            assert all(a.frame_end == b.frame_start for a, b in zip(plan, plan[1:], strict=False)), where
            assert sum(s.frames for s in plan) == output_frames and all(s.frames > 0 for s in plan), where
            for s in plan:
                assert s.warm_up_start == max(0, s.start - reach.latents), where
                assert 0 <= s.warm_up <= reach.latents and s.latents == slice(s.warm_up_start, s.end)
                assert s.frame_start == first_frame(s.start)
            assert plan[0].warm_up == 0
            assert 1 <= len(plan) <= replicas
            if len(plan) > 1:
                assert all(s.end - s.start >= minimum for s in plan), where
                assert all(s.frames >= 5 for s in plan), where  # x264's reordering delay is the same in each


def test_plan_size_follows_replicas_and_length_and_balances_the_work():
    cost = WAN.warm_up_cost
    for latents, replicas, minimum, expected in [
        (376, 8, 16, 8),  # 60 s of video, 8 replicas: one segment each
        (376, 8, 50, 7),  # ... but no segment under 50 latents
        (3751, 8, 50, 8),  # 600 s
        (59, 4, 12, 4),
        (59, 4, 20, 2),
        (30, 8, 16, 1),  # short video: one segment
        (3751, 1, 2, 1),  # one replica: one segment
    ]:
        plan = plan_segments(latents, replicas, minimum, WAN)
        assert len(plan) == expected == max(1, min(replicas, math.floor((latents - cost) / minimum)))
        work = [s.end - s.start + (cost if s.warm_up else 0) for s in plan]
        assert max(work) - min(work) < 2, (latents, replicas, work)  # boundaries round by half a latent at most
        if len(plan) > 1:
            assert plan[0].end - plan[0].start > plan[1].end - plan[1].start  # the first has no warm-up


def test_short_video_is_one_segment_without_warm_up():
    (whole,) = plan_segments(30, 8, 16, WAN, output_frames=115)
    assert whole == LatentSegment(index=0, warm_up_start=0, start=0, end=30, frame_start=0, frame_end=115)


def test_plan_rejects_impossible_arguments():
    with pytest.raises(ValueError, match="latent_frames"):
        plan_segments(0, 2, 16, WAN)
    with pytest.raises(ValueError, match="replicas"):
        plan_segments(100, 0, 16, WAN)
    with pytest.raises(ValueError, match="min_segment_latents"):
        plan_segments(100, 2, MIN_SEGMENT_LATENTS - 1, WAN)
    with pytest.raises(ValueError, match="output frames"):
        plan_segments(10, 2, 2, WAN, output_frames=first_frame(10) + 1)
    with pytest.raises(ValueError, match="output frames"):
        plan_segments(10, 2, 2, WAN, output_frames=first_frame(9))
    with pytest.raises(ValueError, match="non-increasing"):
        DecoderReach((7, 14), (0.5, 0.5))
    with pytest.raises(ValueError, match="sum 1"):
        DecoderReach((14, 7), (0.5, 0.6))


# -- the decoder's reach --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    return build_vae(**TINY_VAE)


def test_wan_decoder_reach_is_derived_from_its_architecture(vae):
    tiny = decoder_reach(vae)
    with torch.device("meta"):
        real = decoder_reach(build_vae(**REAL_VAE))
    for reach in (tiny, real):
        assert reach.stage_latents == WAN_REACH
        assert math.isclose(sum(reach.stage_cost), 1.0)
        assert reach.stage_cost[0] < reach.stage_cost[1] < reach.stage_cost[2]  # full resolution costs most
    assert 0.70 < real.stage_cost[2] < 0.80 and 9 < real.warm_up_cost < 11  # instead of 38 latents' decode
    assert decoder_reach(vae) is tiny  # derived once per VAE
    assert decoder_reach(UpsamplingVae()) == DecoderReach((1,), (1.0,))
    with pytest.raises(TypeError, match="no known decoder reach"):
        decoder_reach(torch.nn.Linear(1, 1))


def test_presets_give_their_reach_without_weights():
    assert preset_decoder_reach(get_preset("stableavatar-1.3b")).stage_latents == WAN_REACH
    assert preset_decoder_reach(get_preset("simulated-realsize")) == DecoderReach((1,), (1.0,))


def test_one_latent_changes_exactly_the_frames_within_the_reach(vae):
    """Perturb latent 2: the frames of latents 2..39 change (latent 40's first two frames still look back to it,
    its last two do not), nothing before and nothing after."""
    latents = torch.randn(1, 16, 44, 1, 1, generator=torch.Generator().manual_seed(1))
    perturbed = latents.clone()
    perturbed[:, :, 2] += 1.0
    changed = serial_frames(vae, perturbed, clamp=False) != serial_frames(vae, latents, clamp=False)
    changed = changed.flatten(3).any(-1).any(1)[0]  # per frame
    reach = WAN_REACH[0]
    last_changed = first_frame(2 + reach) + 1  # frames 4t-3 and 4t-2 of latent t = 2 + reach
    assert changed.nonzero().flatten().tolist() == list(range(first_frame(2), last_changed + 1))


def test_warm_up_of_the_reach_is_bit_identical_and_one_latent_less_is_not(vae):
    latents = torch.randn(1, 16, 52, 1, 1, generator=torch.Generator().manual_seed(2))
    serial = serial_frames(vae, latents)
    start, end = 44, 48
    want = serial[:, :, first_frame(start):first_frame(end)]
    reach = decoder_reach(vae)
    assert torch.equal(segment_decode(vae, latents, start, end), want)
    for stage in range(len(WAN_REACH)):
        shorter = list(reach.stage_latents)
        shorter[stage] -= 1
        short = DecoderReach(tuple(shorter), reach.stage_cost)
        assert not torch.equal(segment_decode(vae, latents, start, end, short), want), stage


def test_every_segmentation_decodes_bit_identical_to_the_serial_stream(vae):
    """Segments of one latent whose warm-ups begin at latent 0 (stage by stage) or past it, and some longer cuts;
    the first segment's stream is the serial stream's own start."""
    latents = torch.randn(1, 16, 47, 2, 1, generator=torch.Generator().manual_seed(3))
    serial = serial_frames(vae, latents)
    for start in (0, 1, 2, 7, 8, 14, 15, 37, 38, 39, 46):  # around each stage's warm-up length
        assert torch.equal(segment_decode(vae, latents, start, start + 1),
                           serial[:, :, first_frame(start):first_frame(start + 1)]), start
    for bounds in ([0, 5, 38, 39, 47], [0, 20, 46, 47], [0, 1, 47]):
        pieces = [segment_decode(vae, latents, a, b) for a, b in zip(bounds, bounds[1:], strict=False)]
        assert torch.equal(torch.cat(pieces, dim=2), serial), bounds


def test_stand_in_vae_segments_are_bit_identical_too():
    """The benchmarks' stand-in (bench/simulated.py) declares a one-latent reach; segments agree with it."""
    vae = UpsamplingVae()
    latents = torch.randn(1, 16, 9, 3, 2, generator=torch.Generator().manual_seed(4))
    serial = serial_frames(vae, latents)
    for start in range(9):
        assert torch.equal(segment_decode(vae, latents, start, 9), serial[:, :, first_frame(start):]), start


# -- the pipeline: segment frames, stitched mp4 ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pipeline():
    return StableAvatarPipeline(load_models(get_preset("tiny"), ["vae"]))


def prepared_request(tmp: Path, seconds: float) -> PreparedRequest:
    audio = synthetic_speech(tmp / f"speech-{seconds}.wav", seconds + 0.5)  # longer than the video: cut to it
    plan = plan_windows(round(seconds * SAMPLE_RATE), overlap=10)
    return PreparedRequest(request_id=f"segments-{seconds}", seed=1, width=WIDTH, height=HEIGHT, plan=plan,
                           conditioning=None, audio_bytes=audio.read_bytes(), audio_seconds=seconds)


def latents_for(prepared: PreparedRequest) -> torch.Tensor:
    return torch.randn(prepared.latent_shape, generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def videos(pipeline, tmp_path_factory):
    """A 9.3 s video written serially and in 4 segments (one with a warm-up past latent 0), stitched."""
    tmp = tmp_path_factory.mktemp("segments")
    prepared = prepared_request(tmp, VIDEO_S)
    latents = latents_for(prepared)
    segments = pipeline.plan_segments(prepared, replicas=4, min_segment_latents=12)
    serial = pipeline.finish(prepared, latents, tmp / "serial.mp4")
    stitched = pipeline.finish_in_segments(prepared, latents, tmp / "stitched.mp4", 4, 12)
    track = encode_audio_track(tmp / f"speech-{VIDEO_S}.wav", video_seconds(prepared), tmp / "track.m4a")
    return {"prepared": prepared, "latents": latents, "segments": segments, "serial": serial,
            "stitched": stitched, "track": track, "tmp": tmp}


def test_segment_frames_equal_the_serial_frames(pipeline, videos):
    prepared, latents = videos["prepared"], videos["latents"]
    plan = prepared.plan
    serial = frames_to_uint8(serial_frames(pipeline.models.vae, latents[:, :, : plan.decoded_latent_frames]))
    serial = serial[: plan.output_frames]
    assert len(videos["segments"]) == 4 and videos["segments"][-1].warm_up_start > 0
    last = videos["segments"][-1]
    assert last.frames < 4 * (last.end - last.start)  # the last latent's frames are trimmed to the audio
    for segment in videos["segments"]:  # given the whole latents, or only the segment's
        whole = np.concatenate(list(pipeline.segment_frames(segment, latents)))
        own = np.concatenate(list(pipeline.segment_frames(segment, latents[:, :, segment.latents].clone())))
        want = serial[segment.frame_start:segment.frame_end]
        assert np.array_equal(whole, want) and np.array_equal(own, want), segment
    for t in (0, 1, 40, plan.decoded_latent_frames - 1):  # one-latent segments; the last one trimmed
        segment = LatentSegment(t, max(0, t - WAN_REACH[0]), t, t + 1, first_frame(t),
                                min(first_frame(t + 1), plan.output_frames))
        frames = np.concatenate(list(pipeline.segment_frames(segment, latents)))
        assert np.array_equal(frames, serial[segment.frame_start:segment.frame_end]), segment


def count_frames(path: Path) -> dict:
    out = subprocess.run([ffprobe_path() or "ffprobe", "-v", "error", "-count_frames", "-show_streams",
                          "-show_format", "-of", "json", str(path)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def test_stitched_video_has_the_serial_frames_duration_and_streams(videos):
    serial, stitched = count_frames(videos["serial"].path), count_frames(videos["stitched"].path)
    frames = videos["prepared"].plan.output_frames
    assert videos["stitched"].frames == videos["serial"].frames == frames
    for probe in (serial, stitched):
        assert [s["codec_type"] for s in probe["streams"]] == ["video", "audio"]
    for key in ("codec_name", "profile", "width", "height", "pix_fmt", "r_frame_rate", "nb_frames",
                "nb_read_frames", "duration", "start_time", "color_space"):
        assert stitched["streams"][0][key] == serial["streams"][0][key], key
    assert int(stitched["streams"][0]["nb_read_frames"]) == frames
    assert float(stitched["streams"][0]["duration"]) == pytest.approx(frames / FPS, abs=1e-6)
    assert stitched["streams"][1]["duration"] == serial["streams"][1]["duration"]
    assert stitched["format"]["duration"] == serial["format"]["duration"]
    video = read_video_packets(videos["stitched"].path)
    ticks = video.frame_ticks(FPS)
    assert sorted(p[1] for p in video.packets) == [i * ticks for i in range(frames)]  # every frame, evenly
    dts = [p[0] for p in video.packets]
    assert all(a < b for a, b in zip(dts, dts[1:], strict=False))
    keys = {p[1] // ticks for p in video.packets if p[3]}
    assert {s.frame_start for s in videos["segments"]} <= keys  # each segment starts with a key frame


def audio_packets(path: Path) -> list[str]:
    """The first audio stream's packets as ffmpeg's ``framecrc`` lists them, copied (not decoded): per packet its
    timestamps, duration, size and a checksum of its bytes, after the stream's header (time base, extradata)."""
    out = subprocess.run([ffmpeg_path(), "-v", "error", "-i", str(path), "-map", "0:a:0", "-c", "copy",
                          "-f", "framecrc", "-"], check=True, capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if line and not line.startswith("#software")]


def decoded_audio(path: Path) -> tuple[int, str]:
    """The first audio stream decoded as a player hears it (the encoder's priming cut off, as the mp4 edit list
    says): its sample count per channel and a digest of the samples."""
    pcm = subprocess.run([ffmpeg_path(), "-v", "error", "-i", str(path), "-map", "0:a:0", "-f", "s16le", "-ac", "1",
                          "-"], check=True, capture_output=True).stdout
    return len(pcm) // 2, hashlib.sha256(pcm).hexdigest()


def test_stitched_audio_packets_are_the_serial_files(videos):
    """The audio track, encoded on its own and copied in by the stitch, is packet for packet the audio the serial
    path encodes while it muxes, with the same duration and the same decoded samples."""
    serial, stitched = videos["serial"].path, videos["stitched"].path
    packets = audio_packets(serial)
    assert sum(not line.startswith("#") for line in packets) > 400  # 9.3 s of 1024-sample AAC frames at 48 kHz
    assert audio_packets(stitched) == packets == audio_packets(videos["track"])
    samples, digest = decoded_audio(serial)
    assert samples == round(video_seconds(videos["prepared"]) * 48000)  # cut with -t to the video's duration
    assert decoded_audio(stitched) == (samples, digest)
    probes = [count_frames(path)["streams"][1] for path in (serial, stitched)]
    for key in ("codec_name", "profile", "sample_rate", "channels", "duration", "duration_ts", "start_time",
                "nb_frames", "nb_read_frames"):
        assert probes[0][key] == probes[1][key], key


def test_the_audio_track_encoded_in_an_event_loop_is_the_same_file(videos, tmp_path, monkeypatch):
    """What the Orchestrator encodes while the segments decode (``encode_audio_track_async``) is byte for byte the
    in-process track, and leaves no file behind."""
    prepared = videos["prepared"]
    tempdir = tmp_path / "tmp"
    tempdir.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tempdir))  # where its temporary folder goes
    data = asyncio.run(encode_audio_track_async(prepared.audio_bytes, video_seconds(prepared)))
    assert data == videos["track"].read_bytes()
    assert list(tempdir.iterdir()) == []


def test_one_segment_is_the_serial_path_byte_for_byte(pipeline, videos, tmp_path):
    prepared, latents = videos["prepared"], videos["latents"]
    assert len(pipeline.plan_segments(prepared, 1, 12)) == 1
    one = pipeline.finish_in_segments(prepared, latents, tmp_path / "one.mp4", 1, 12)
    assert one.path.read_bytes() == videos["serial"].path.read_bytes()
    short = prepared_request(tmp_path, 2.0)  # 13 latents: one segment with 8 replicas
    assert len(pipeline.plan_segments(short, 8, 12)) == 1
    a = pipeline.finish(short, latents_for(short), tmp_path / "a.mp4")
    b = pipeline.finish_in_segments(short, latents_for(short), tmp_path / "b.mp4", 8, 12)
    assert a.path.read_bytes() == b.path.read_bytes()


def test_stitch_refuses_segments_that_do_not_fit(pipeline, videos, tmp_path):
    prepared, segments = videos["prepared"], videos["segments"]
    files = [pipeline.finish_segment(s, videos["latents"], WIDTH, HEIGHT, tmp_path / f"s{s.index}.mp4").path
             for s in segments]
    out = tmp_path / "out.mp4"
    track = videos["track"]
    with pytest.raises(ValueError, match="do not cover"):
        stitch_segments(prepared, segments[:-1], files[:-1], track, out)
    with pytest.raises(ValueError, match="do not cover"):
        stitch_segments(prepared, [segments[1], segments[0], *segments[2:]], [files[1], files[0], *files[2:]],
                        track, out)
    other = tmp_path / "other.mp4"  # another size: other SPS/PPS
    with VideoWriter(other, WIDTH + 16, HEIGHT, num_frames=segments[1].frames) as writer:
        writer.write(np.zeros((segments[1].frames, HEIGHT, WIDTH + 16, 3), np.uint8))
    with pytest.raises(FFmpegError, match="other parameters"):
        stitch_segments(prepared, segments, [files[0], other, *files[2:]], track, out)
    wrong_count = dataclasses.replace(segments[1], frame_end=segments[1].frame_end - 1)
    with pytest.raises(FFmpegError, match="presentation times"):
        stitch_videos(files[:2], [segments[0].frames, wrong_count.frames], track, out)
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


PLAY_TO_END = """() => new Promise((resolve, reject) => {
  const video = document.getElementById('video');
  video.addEventListener('error', () => reject(new Error('video error ' + (video.error && video.error.code))));
  video.addEventListener('ended', () => resolve({ended: video.ended, duration: video.duration,
    currentTime: video.currentTime, frames: video.getVideoPlaybackQuality().totalVideoFrames}));
  video.playbackRate = 4;
  video.play().catch(reject);
})"""


def test_stitched_video_plays_to_the_end_in_chromium(videos):
    """Debian's Chromium (as the playground test launches it) loads the stitched mp4 in a <video>, plays it to
    its end and decodes every frame."""
    page_file = videos["tmp"] / "player.html"
    page_file.write_text(f'<video id="video" muted playsinline src="{videos["stitched"].path.name}"></video>')
    frames = videos["prepared"].plan.output_frames
    with chromium("--autoplay-policy=no-user-gesture-required") as browser:
        page = browser.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(page_file.as_uri())
        played = page.evaluate(PLAY_TO_END)
    assert played["ended"] and not errors
    assert played["duration"] == pytest.approx(frames / FPS, abs=0.03)
    assert played["currentTime"] == pytest.approx(played["duration"], abs=0.03)
    assert played["frames"] == frames
