"""The Orchestrator's side of segmented post-processing without a cluster: the plan it makes from the settings, a
segment whose replica died is sent again (a WARN line per retry), and one that keeps failing is the job's error
after its retries, with the other segments cancelled and nothing handed on to be stitched. The audio track is
encoded (real ffmpeg) while the segments are in flight and handed to the stitch; an audio track that cannot be
encoded fails the job before anything is uploaded, and a cancelled job leaves no ffmpeg and no file behind, even
when it is cancelled again while it cleans up.

The Postprocessor handle is a stand-in that mimics ``handle.options(...).finish_segment.remote(...)``: the call's
``_to_object_ref()`` and the reference's ``await``; its segments may wait for a gate to open before answering.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
from ray.exceptions import RayActorError

from deployments.contracts import PostprocessResult, SegmentVideo
from deployments.orchestrator.segments import PostprocessError, SegmentedFinish
from pipeline.generator import PreparedRequest, video_seconds
from pipeline.media import audio_track
from pipeline.media.audio_track import encode_audio_track, encode_audio_track_async
from pipeline.presets import get_preset
from pipeline.windows import SAMPLE_RATE, plan_windows
from testing.media import synthetic_speech


class Ref:
    def __init__(self, outcome, gate: asyncio.Event | None = None, events: list | None = None):
        self.outcome, self.gate, self.events = outcome, gate, events

    def __await__(self):
        async def resolve():
            await asyncio.sleep(0.01)
            if self.gate is not None:
                await self.gate.wait()
            if isinstance(self.outcome, BaseException):
                raise self.outcome
            if self.events is not None:
                self.events.append(("answered", self.outcome.index))
            return self.outcome

        return resolve().__await__()


class Response:
    def __init__(self, ref: Ref):
        self.ref = ref

    async def _to_object_ref(self) -> Ref:
        return self.ref


class Stitch:
    def __init__(self, events: list):
        self.events, self.calls = events, []

    async def _stitched(self, key: str) -> PostprocessResult:
        return PostprocessResult(key=key, file_size=1, frames=1, encode_s=0.0)

    def remote(self, prepared, segments, videos, audio_track, key):
        self.events.append(("stitch",))
        self.calls.append((list(videos), audio_track))  # the caller empties its list afterwards
        return self._stitched(key)


class PostprocessorHandle:
    """``failures[i]``: how many calls of segment ``i`` die (``None``: every one); ``gate``: what every segment's
    answer waits for; ``events``: ("sent", i), ("answered", i) and ("stitch",), in order."""

    def __init__(self, failures: dict[int, int | None], gate: asyncio.Event | None = None):
        self.failures, self.calls, self.finished, self.gate, self.events = dict(failures), [], [], gate, []
        self.finish_segment = self
        self.stitch = Stitch(self.events)

    def options(self, **options):
        assert options == {"_by_reference": True}  # answers stay objects the Orchestrator owns
        return self

    def remote(self, request_id, segment, latents, width, height):
        self.calls.append(segment.index)
        self.events.append(("sent", segment.index))
        left = self.failures.get(segment.index, 0)
        if left is None or left > 0:
            if left is not None:
                self.failures[segment.index] = left - 1
            return Response(Ref(RayActorError()))
        self.finished.append(segment.index)
        return Response(Ref(SegmentVideo(segment.index, segment.frames, b"mp4", 0.1, "replica-x"), self.gate,
                            self.events))


def prepared(seconds: float, audio: bytes = b"") -> PreparedRequest:
    plan = plan_windows(round(seconds * SAMPLE_RATE), overlap=10)
    return PreparedRequest(request_id="r", seed=1, width=64, height=64, plan=plan, conditioning=None,
                           audio_bytes=audio, audio_seconds=seconds)


def finisher(handle, replicas: int = 4, retries: int = 2) -> SegmentedFinish:
    return SegmentedFinish(handle, get_preset("tiny"), replicas=replicas, min_segment_latents=20, retries=retries)


class Log:
    """The job's log lines; ``events`` gets ("log", message) in order, and ``opens`` is set on a line that starts
    with ``opens_on``."""

    def __init__(self, events: list | None = None, opens: asyncio.Event | None = None, opens_on: str = ""):
        self.lines: list[tuple[str, str]] = []
        self.events, self.opens, self.opens_on = events, opens, opens_on

    async def __call__(self, stage=None, message=None, level="INFO"):
        self.lines.append((level, message))
        if self.events is not None:
            self.events.append(("log", message))
        if self.opens is not None and message and message.startswith(self.opens_on):
            self.opens.set()


def test_the_plan_follows_the_replicas_the_minimum_and_the_decoders_reach():
    long = prepared(60.0)  # 376 latents
    segments = finisher(PostprocessorHandle({})).plan(long)
    assert len(segments) == 4 and segments[-1].frame_end == long.plan.output_frames
    assert [s.warm_up for s in segments] == [0, 38, 38, 38]  # the tiny preset's Wan VAE: a reach of 38
    assert len(finisher(PostprocessorHandle({})).plan(prepared(4.0))) == 1  # 26 latents: one segment of at least 20 is all there is
    assert len(finisher(PostprocessorHandle({}), replicas=1).plan(long)) == 1  # one replica: the serial path


def test_a_segment_whose_replica_died_is_sent_again_and_logged():
    handle, log = PostprocessorHandle({1: 1, 2: 2}), Log()
    long = prepared(60.0)
    segments = finisher(handle).plan(long)
    refs = asyncio.run(finisher(handle).encode("r", long, segments, [object()], log))
    assert [r.outcome.index for r in refs] == [0, 1, 2, 3]  # references to each segment's answer, in order
    assert sorted(handle.calls) == [0, 1, 1, 2, 2, 2, 3]
    warnings = [m for level, m in log.lines if level == "WARN"]
    assert sorted(warnings) == [
        "segment 2/4 (frames 401-768): the Postprocessor replica failed (RayActorError); running it again on "
        "another replica (retry 1)",
        "segment 3/4 (frames 769-1132): the Postprocessor replica failed (RayActorError); running it again on "
        "another replica (retry 1)",
        "segment 3/4 (frames 769-1132): the Postprocessor replica failed (RayActorError); running it again on "
        "another replica (retry 2)"]


def test_a_segment_that_keeps_failing_fails_the_job_and_stops_the_others():
    handle, log = PostprocessorHandle({0: None}), Log()
    long = prepared(60.0)
    segments = finisher(handle, retries=2).plan(long)
    with pytest.raises(PostprocessError, match=r"segment 1/4 \(frames 0-400\) failed on 3 Postprocessor replicas"):
        asyncio.run(finisher(handle, retries=2).encode("r", long, segments, [object()], log))
    assert handle.calls.count(0) == 3
    assert [m for level, m in log.lines if level == "ERROR"] == [
        "segment 1/4 (frames 0-400): the Postprocessor replica failed (RayActorError) 3 times; giving up"]


# -- the audio track: encoded once, beside the segments ----------------------------------------------------------------

class Uploads:
    """``SegmentedFinish.finish``'s ``uploading()``: counts the times an upload was let through."""

    def __init__(self):
        self.entered = 0

    @contextlib.asynccontextmanager
    async def __call__(self):
        self.entered += 1
        yield


def ffmpeg_children() -> list[int]:
    """The ffmpeg processes this test process started and has not reaped."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # gone meanwhile
            continue
        comm, fields = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:].split()
        if comm == "ffmpeg" and int(fields[1]) == os.getpid():
            found.append(int(entry.name))
    return found


@pytest.fixture
def tempdir(tmp_path, monkeypatch) -> Path:
    """Where the audio encode's temporary folder goes (to see that none is left)."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def test_the_audio_track_is_encoded_while_the_segments_are_in_flight(tmp_path, tempdir):
    """The segments' answers wait until the audio track has been encoded: a finish stage that encoded the audio only
    after the segments would never get them (the bound below ends the test instead). The stitch gets the segments
    and the serial path's audio encode of the video's duration."""
    long = prepared(60.0, synthetic_speech(tmp_path / "speech.wav", 61.0).read_bytes())
    async def run():
        gate = asyncio.Event()
        handle = PostprocessorHandle({}, gate)
        log = Log(handle.events, gate, "audio track encoded")
        result = await asyncio.wait_for(finisher(handle).finish("r", long, [object()], "result-key", log,
                                                                uploading=Uploads()), 120)
        return handle, result

    handle, result = asyncio.run(run())
    assert result.key == "result-key"
    events = handle.events
    encoding = events.index(("log", "encoding the audio track (60.00 s) while the 4 segments decode"))
    encoded = next(i for i, e in enumerate(events) if e[0] == "log" and e[1].startswith("audio track encoded"))
    sent = [events.index(("sent", i)) for i in range(4)]
    answered = [events.index(("answered", i)) for i in range(4)]
    assert max(sent) < encoded < min(answered)  # encoded while every segment was in flight
    assert encoding < encoded and events[-1] == ("stitch",)
    ((videos, track),) = handle.stitch.calls
    assert [v.outcome.index for v in videos] == [0, 1, 2, 3]
    assert video_seconds(long) == 60.0
    expected = encode_audio_track(tmp_path / "speech.wav", video_seconds(long), tmp_path / "track.m4a")
    assert isinstance(track, np.ndarray) and track.tobytes() == expected.read_bytes()
    assert ffmpeg_children() == [] and list(tempdir.iterdir()) == []


def test_an_audio_track_that_cannot_be_encoded_fails_the_job_and_uploads_nothing(tempdir):
    """Audio ffmpeg cannot read: the job's error names the audio track, an ERROR line says why, the segments in
    flight are cancelled, and nothing is stitched or uploaded."""
    handle, uploads = PostprocessorHandle({}, asyncio.Event()), Uploads()  # the segments never answer
    log = Log()
    with pytest.raises(PostprocessError, match="the audio track could not be encoded: audio: Invalid data found"):
        asyncio.run(asyncio.wait_for(finisher(handle).finish("r", prepared(60.0, b"not audio"), [object()], "key",
                                                             log, uploading=uploads), 300))
    assert [m for level, m in log.lines if level == "ERROR"] == [
        "the audio track could not be encoded: audio: Invalid data found when processing input"]
    assert sorted(handle.calls) == [0, 1, 2, 3] and ("answered", 0) not in handle.events
    assert handle.stitch.calls == [] and uploads.entered == 0
    assert ffmpeg_children() == [] and list(tempdir.iterdir()) == []


def test_cancelling_the_job_kills_the_audio_encode_and_removes_its_files(tmp_path, tempdir):
    """The job is cancelled while ffmpeg encodes ten minutes of audio: when the finish stage has ended, no ffmpeg is
    left and no file of the encode."""
    long = prepared(600.0, synthetic_speech(tmp_path / "speech.wav", 601.0).read_bytes())
    handle = PostprocessorHandle({}, asyncio.Event())  # the segments never answer

    async def run() -> list[int]:
        task = asyncio.ensure_future(finisher(handle).finish("r", long, [object()], "key", Log(),
                                                             uploading=Uploads()))
        for _ in range(3000):  # until the encode's ffmpeg runs (a bound, not a timing: it starts at once)
            if running := ffmpeg_children():
                break
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return running

    running = asyncio.run(run())
    assert running and handle.stitch.calls == []
    assert ffmpeg_children() == [] and list(tempdir.iterdir()) == []


def test_a_cancel_while_ffmpeg_starts_leaves_no_ffmpeg_and_no_file(tmp_path, tempdir, monkeypatch):
    """The cancel arrives after ffmpeg was started but before the encode has its handle (the event loop is slow to
    come back to it on a loaded machine): the encode still kills and reaps it and removes its files."""
    started_ffmpeg = asyncio.create_subprocess_exec
    started = []

    async def slow_to_return(*args, **kwargs):
        proc = await started_ffmpeg(*args, **kwargs)
        started.append(proc.pid)
        await asyncio.sleep(2)  # the loop comes back late: ffmpeg runs, nobody holds its handle yet
        return proc

    monkeypatch.setattr(asyncio, "create_subprocess_exec", slow_to_return)

    async def run() -> None:
        task = asyncio.ensure_future(encode_audio_track_async(synthetic_speech(tmp_path / "s.wav", 601.0)
                                                              .read_bytes(), 600.0))
        for _ in range(3000):  # until ffmpeg was started (a bound, not a timing)
            if started:
                break
            await asyncio.sleep(0.01)
        assert ffmpeg_children() == started
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(run())
    assert ffmpeg_children() == [] and list(tempdir.iterdir()) == []


def test_a_second_cancel_while_ffmpeg_is_killed_still_waits_for_it_and_its_files(tmp_path, tempdir, monkeypatch):
    """A caller cancelled again while the encode cleans up (a gather that ends on its first cancelled child, then
    cancels the rest once more) still gets control back only once ffmpeg is killed and reaped and its folder gone:
    the kill is slow here, as on a loaded machine."""
    kill_and_reap = audio_track._kill_and_reap

    async def slow_kill_and_reap(proc) -> None:
        await asyncio.sleep(0.5)
        await kill_and_reap(proc)

    monkeypatch.setattr(audio_track, "_kill_and_reap", slow_kill_and_reap)

    async def run() -> None:
        task = asyncio.ensure_future(encode_audio_track_async(synthetic_speech(tmp_path / "s.wav", 601.0)
                                                              .read_bytes(), 600.0))
        for _ in range(3000):  # until the encode's ffmpeg runs (a bound, not a timing)
            if ffmpeg_children():
                break
            await asyncio.sleep(0.01)
        task.cancel()
        for _ in range(3):
            await asyncio.sleep(0)  # the encode is in its cleanup now, killing ffmpeg
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert ffmpeg_children() == [] and list(tempdir.iterdir()) == []  # before its caller goes on

    asyncio.run(run())
