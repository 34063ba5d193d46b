"""A video's audio as an AAC track of its own (an audio-only mp4), for a stitched video to stream-copy.

The serial path (:func:`~pipeline.media.video.mux_audio`) cuts the request's audio with ``-t`` to the video's
duration and encodes it to AAC in the ffmpeg run that copies the video in. :func:`encode_audio_track` runs exactly
that audio half (the same input cut, :func:`~pipeline.media.video.aac_options`, bit-exact muxer) on its own, so it
can run while a long video's segments decode, and the stitch only copies its packets: they are the serial file's
audio packets, byte for byte (tests/test_segments.py). Only the maximum bitrate the mp4 header declares differs:
ffmpeg takes it from the encoder's settings when it encodes, from the packets when it copies.

:func:`encode_audio_track_async` is the same encode for an event loop: ffmpeg runs as an asyncio subprocess, and
cancelling the coroutine kills it and removes its files.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import ffmpeg

from pipeline.media._proc import stderr_tail
from pipeline.media.errors import FFmpegError
from pipeline.media.video import BITEXACT, aac_options, cut_audio, ffmpeg_command, run_ffmpeg
from pipeline.to_the_end import to_the_end


def audio_track_output(audio_path: Path, duration: float, out: Path) -> Any:
    """The ffmpeg-python output writing ``audio_path`` cut to ``duration`` seconds as an AAC audio-only mp4 ``out``,
    with the serial path's audio settings."""
    return ffmpeg.output(cut_audio(audio_path, duration), str(out), format="mp4", **aac_options(),
                         movflags="+faststart", **BITEXACT)


def encode_audio_track(audio_path: Path, duration: float, out: Path) -> Path:
    """Encode ``audio_path`` cut to ``duration`` seconds into the audio-only mp4 ``out`` (blocking)."""
    run_ffmpeg(audio_track_output(audio_path, duration, Path(out)), "encoding the audio track")
    return Path(out)


async def encode_audio_track_async(audio: bytes, duration: float) -> bytes:
    """The audio-only mp4 of ``audio`` (an audio file's bytes) cut to ``duration`` seconds. Its files live in a
    temporary folder removed however this ends; cancelled, it kills ffmpeg first."""
    tmp = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix="stable-avatar-audio-"))
    try:
        source, out = Path("audio"), Path("track.m4a")  # in ``tmp``: ffmpeg's messages name no temporary path
        await asyncio.to_thread((tmp / source).write_bytes, audio)
        proc = await _spawned(asyncio.create_subprocess_exec(
            *ffmpeg_command(audio_track_output(source, duration, out)), cwd=tmp, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE))
        try:
            _, stderr = await proc.communicate()
        finally:
            if proc.returncode is None:  # cancelled (or the wait failed): no ffmpeg outlives its caller
                await to_the_end(_kill_and_reap(proc))
        if proc.returncode != 0:
            raise FFmpegError(f"ffmpeg failed encoding the audio track (exit code {proc.returncode})",
                              stderr_tail(stderr))
        return await asyncio.to_thread((tmp / out).read_bytes)
    finally:  # to the end, however often the caller is cancelled meanwhile: no folder is left behind
        await to_the_end(asyncio.to_thread(shutil.rmtree, tmp, True))


async def _spawned(spawn: Awaitable[asyncio.subprocess.Process]) -> asyncio.subprocess.Process:
    """The started process. A cancel that arrives while it is being started (ffmpeg may run already, before the
    caller has its handle) waits for the start, kills the process and reaps it before it goes on."""
    starting = asyncio.ensure_future(spawn)
    try:
        return await asyncio.shield(starting)
    except asyncio.CancelledError:
        await to_the_end(_kill_if_started(starting))
        raise


async def _kill_if_started(starting: asyncio.Future[asyncio.subprocess.Process]) -> None:
    with contextlib.suppress(Exception):  # a start that failed left nothing to kill
        await _kill_and_reap(await starting)


async def _kill_and_reap(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError):  # it exited meanwhile: only reaping is left
        proc.kill()
    await proc.wait()
