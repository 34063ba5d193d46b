"""Join H.264 segment files into one mp4 without re-encoding, with the video's audio track copied in.

Each segment is a video-only mp4 from :class:`~pipeline.media.video.VideoWriter`, all with the same x264
settings: every segment starts with an IDR frame and x264's GOPs are closed, so no frame refers across a seam.
ffmpeg's concat demuxer reads the segments back to back, shifting each one's timestamps by the frames before it
(given exactly, as ``duration`` lines), and the packets are copied, not decoded. The audio comes already encoded
(:mod:`pipeline.media.audio_track`: cut to the video's length and encoded as ``VideoWriter`` does for a serial
video, while the segments were made) and is copied too, so a stitched file has the serial file's frame count,
duration, streams and audio packets; only the H.264 bytes near the seams differ (each segment's rate control starts
afresh).

Before and after joining, the packets are read with ffmpeg's ``framecrc`` muxer (nothing is decoded; no ffprobe
needed): every segment must have the codec parameters of the first (extradata, time base, size) and its promised
frame count, and the joined stream's presentation times must be exactly 0, 1, ..., N-1 frames, with strictly
increasing decode times and a key frame where each segment starts.
"""

from __future__ import annotations

import itertools
import os
import re
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import ffmpeg

from pipeline.media._proc import stderr_tail
from pipeline.media.errors import FFmpegError
from pipeline.media.ffmpeg_bin import ffmpeg_path
from pipeline.media.rates import FPS
from pipeline.media.video import MUX_TIMEOUT_S, copy_streams

_HEADER = re.compile(r"^#(\w+) 0: *(.*)$")
_PACKET = re.compile(r"^0, *(-?\d+), *(-?\d+), *(\d+), *(\d+), *0x[0-9a-fA-F]+(?:, *F=(0x[0-9a-fA-F]+))?")


@dataclass(frozen=True)
class VideoPackets:
    """A file's first video stream as its packets: codec parameters and, per packet, (dts, pts, duration, key)."""

    codec: str
    dimensions: str
    time_base: Fraction
    extradata: str  # "size, crc" of the codec's extradata (SPS/PPS for H.264)
    packets: tuple[tuple[int, int, int, bool], ...]

    @property
    def parameters(self) -> tuple[str, str, Fraction, str]:
        return self.codec, self.dimensions, self.time_base, self.extradata

    def frame_ticks(self, fps: int) -> int:
        """One frame's duration in time-base ticks (the mp4 muxer picks a base that makes it whole)."""
        ticks = 1 / (fps * self.time_base)
        if ticks.denominator != 1:
            raise FFmpegError(f"time base {self.time_base} does not hold whole frames at {fps} fps")
        return int(ticks)


def read_video_packets(path: Path) -> VideoPackets:
    """The packets of ``path``'s first video stream, copied through ffmpeg's ``framecrc`` muxer (not decoded)."""
    cmd = [ffmpeg_path(), "-hide_banner", "-nostdin", "-loglevel", "error", "-i", str(path),
           "-map", "0:v:0", "-c", "copy", "-f", "framecrc", "-"]
    proc = subprocess.run(cmd, capture_output=True, timeout=MUX_TIMEOUT_S, check=False)
    if proc.returncode != 0:
        raise FFmpegError(f"ffmpeg could not read the video packets of {path.name}", stderr_tail(proc.stderr))
    header: dict[str, str] = {}
    packets = []
    for line in proc.stdout.decode("utf-8", "replace").splitlines():
        if match := _HEADER.match(line):
            header[match.group(1)] = match.group(2).strip()
        elif match := _PACKET.match(line):
            dts, pts, duration, _size, flags = match.groups()
            key = flags is None or int(flags, 16) & 1 == 1  # framecrc prints F= only for flags other than "key"
            packets.append((int(dts), int(pts), int(duration), key))
    if "codec_id" not in header or "tb" not in header:
        raise FFmpegError(f"{path.name} has no video stream")
    return VideoPackets(header["codec_id"], header.get("dimensions", ""), Fraction(header["tb"]),
                        header.get("extradata", ""), tuple(packets))


def check_continuous(video: VideoPackets, fps: int, frames: int, key_frames: Sequence[int] = (0,)) -> None:
    """Raise unless ``video`` is ``frames`` frames presented at exactly 0, 1, ... frame durations, decoded in
    strictly increasing order, with key frames at ``key_frames``."""
    ticks = video.frame_ticks(fps)
    dts = [p[0] for p in video.packets]
    pts = sorted(p[1] for p in video.packets)
    if pts != [i * ticks for i in range(frames)]:
        raise FFmpegError(f"stitched video: {len(pts)} frames with presentation times that are not 0..{frames - 1} "
                          f"frames apart evenly")
    if any(a >= b for a, b in zip(dts, dts[1:], strict=False)):
        raise FFmpegError("stitched video: decode timestamps do not strictly increase")
    keys = {p[1] // ticks for p in video.packets if p[3]}
    if missing := sorted(set(key_frames) - keys):
        raise FFmpegError(f"stitched video: no key frame at frames {missing[:5]}")


def _concat_list(parts: Sequence[Path], frames: Sequence[int], fps: int) -> str:
    """The concat demuxer's script: each file with its exact duration, so the next starts right after it."""
    def quoted(path: Path) -> str:
        return "'" + str(path.resolve()).replace("'", "'\\''") + "'"

    return "ffconcat version 1.0\n" + "".join(
        f"file {quoted(p)}\nduration {n / fps:.6f}\n" for p, n in zip(parts, frames, strict=True))


def stitch_videos(parts: Sequence[Path], frames: Sequence[int], audio_track: Path, out_path: Path,
                  fps: int = FPS) -> Path:
    """Join the video-only H.264 mp4 ``parts`` (in order; ``frames[i]`` frames each) into ``out_path``, with the
    first audio stream of ``audio_track`` (an mp4, :func:`~pipeline.media.audio_track.encode_audio_track` of the
    video's duration) copied beside it. Written to a hidden partial file and renamed into place only once checked:
    ``out_path`` never holds a partial or inconsistent video."""
    if not parts or len(parts) != len(frames):
        raise ValueError(f"need one frame count per part, got {len(parts)} parts and {len(frames)} counts")
    first = read_video_packets(parts[0])
    for i, (path, count) in enumerate(zip(parts, frames, strict=True)):
        video = read_video_packets(path) if i else first
        if video.parameters != first.parameters:
            raise FFmpegError(f"segment {path.name} was encoded with other parameters than {parts[0].name}: "
                              f"{video.parameters} != {first.parameters}")
        check_continuous(video, fps, count)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    partial = out_path.with_name(f".{out_path.name}.partial")
    script = out_path.with_name(f".{out_path.name}.concat")
    total = sum(frames)
    try:
        script.write_text(_concat_list(parts, frames, fps))
        copy_streams([ffmpeg.input(str(script), format="concat", safe=0)["v:0"],
                      ffmpeg.input(str(audio_track))["a:0"]], partial)
        starts = [0, *itertools.accumulate(frames[:-1])]
        check_continuous(read_video_packets(partial), fps, total, starts)
        os.replace(partial, out_path)
    finally:
        partial.unlink(missing_ok=True)
        script.unlink(missing_ok=True)
    return out_path

