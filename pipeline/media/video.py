"""Encode generated frames plus the request audio into a streaming-friendly, reproducible mp4.

Frames are streamed as raw rgb24 into an ffmpeg subprocess, so the whole video never sits in memory. With
audio, encoding is two-step: frames -> video-only H.264 mp4 next to the target, then on ``close()`` a cheap
stream-copy remux adds the AAC audio trimmed with ``-t`` to exactly ``frames_written / fps``. Trimming by
the real frame count (not a promise) keeps container duration == video duration within one AAC frame, and
``-shortest`` is avoided because its interleaving buffer makes the cut imprecise. Output goes to a hidden
``.partial`` file that is renamed into place only on success, so readers never see a half-written mp4.

Reproducibility: x264 runs with a fixed thread count, preset and CRF, and the muxers get
``+bitexact``/``-map_metadata -1`` (no encoder version strings, zero creation times), so identical frames and
audio give identical bytes *for the same ffmpeg/x264 build* (different builds may differ).
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import re
import subprocess
import threading
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

import ffmpeg
import numpy as np

from pipeline.media._proc import stderr_tail
from pipeline.media.errors import FFmpegError
from pipeline.media.ffmpeg_bin import ffmpeg_path, ffprobe_path
from pipeline.media.rates import FPS

MUX_TIMEOUT_S = 600.0
ENCODE_WAIT_S = 600.0
AUDIO_BITRATE, AUDIO_SAMPLE_RATE = "128k", 48000  # AAC
BITEXACT = {"fflags": "+bitexact", "map_metadata": "-1"}
_BT709 = {"color_primaries": "bt709", "color_trc": "bt709", "colorspace": "bt709"}


class VideoWriter:
    """Stream RGB frames into an H.264/AAC mp4 at ``path``.

    Use as a context manager; an exception inside the ``with`` block aborts (kills ffmpeg, deletes partial
    files). ``num_frames``, when given, is the number of frames the caller promises to write; ``close()``
    raises ``ValueError`` if a different number arrived, because the audio cut would then be wrong.
    Width and height must be even (yuv420p chroma subsampling).
    """

    def __init__(
        self,
        path: Path | str,
        width: int,
        height: int,
        fps: int = FPS,
        audio_path: Path | str | None = None,
        num_frames: int | None = None,
        *,
        crf: int = 18,
        preset: str = "medium",
        x264_threads: int = 4,
        audio_bitrate: str = AUDIO_BITRATE,
        audio_sample_rate: int = AUDIO_SAMPLE_RATE,
    ):
        if width <= 0 or height <= 0 or width % 2 or height % 2:
            raise ValueError(f"width and height must be positive and even for yuv420p, got {width}x{height}")
        if fps <= 0:
            raise ValueError(f"fps must be positive, got {fps}")
        if num_frames is not None and num_frames <= 0:
            raise ValueError(f"num_frames must be positive, got {num_frames}")
        self.path = Path(path)
        self.width, self.height, self.fps = int(width), int(height), fps
        self.audio_path = Path(audio_path) if audio_path is not None else None
        if self.audio_path is not None and not self.audio_path.is_file():
            raise FileNotFoundError(f"audio file not found: {self.audio_path}")
        self.num_frames = num_frames
        self.frames_written = 0
        self._crf, self._preset, self._threads = crf, preset, x264_threads
        self._audio_bitrate, self._audio_rate = audio_bitrate, audio_sample_rate
        self._partial = self.path.with_name(f".{self.path.name}.partial")
        self._video_only = self.path.with_name(f".{self.path.name}.video.partial")
        self._closed = False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._proc = self._start_encoder()
        self._stderr: collections.deque[str] = collections.deque(maxlen=40)
        self._stderr_thread = threading.Thread(target=self._drain_stderr, daemon=True)
        self._stderr_thread.start()

    # -- lifecycle -------------------------------------------------------------------------------------

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def __del__(self) -> None:  # last resort: never leave an ffmpeg process or partial file behind
        with contextlib.suppress(Exception):
            if not self._closed:
                self.abort()

    def _encode_target(self) -> Path:
        return self._video_only if self.audio_path is not None else self._partial

    def _start_encoder(self) -> subprocess.Popen[bytes]:
        frames = ffmpeg.input(
            "pipe:", format="rawvideo", pix_fmt="rgb24", s=f"{self.width}x{self.height}", framerate=self.fps
        )
        # Explicit BT.709 conversion + tags so players do not guess (and shift colours).
        video = frames.filter("scale", out_color_matrix="bt709", out_range="tv", flags="accurate_rnd")
        out_kwargs: dict[str, Any] = {
            "format": "mp4",
            "vcodec": "libx264",
            "pix_fmt": "yuv420p",
            "preset": self._preset,
            "crf": self._crf,
            "threads": self._threads,
            "r": self.fps,
            "flags:v": "+bitexact",
            **_BT709,
            **BITEXACT,
        }
        if self.audio_path is None:
            out_kwargs["movflags"] = "+faststart"
        cmd = (
            video.output(str(self._encode_target()), **out_kwargs)
            .global_args("-hide_banner", "-loglevel", "error")
            .overwrite_output()
            .compile(cmd=ffmpeg_path())
        )
        return subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def _drain_stderr(self) -> None:
        stream: BinaryIO | None = self._proc.stderr
        if stream is None:
            return
        for raw in iter(stream.readline, b""):
            self._stderr.append(raw.decode("utf-8", "replace").rstrip())

    def _stderr_text(self) -> str:
        self._stderr_thread.join(timeout=5)
        return stderr_tail("\n".join(self._stderr))

    # -- writing ---------------------------------------------------------------------------------------

    def write(self, frames: np.ndarray) -> None:
        """Append frames: uint8 array [f, H, W, 3] (or a single [H, W, 3] frame)."""
        if self._closed:
            raise RuntimeError("VideoWriter is closed")
        arr = np.asarray(frames)
        if arr.ndim == 3:
            arr = arr[None]
        if arr.dtype != np.uint8:
            raise TypeError(f"frames must be uint8, got {arr.dtype}")
        if arr.ndim != 4 or arr.shape[1:] != (self.height, self.width, 3):
            raise ValueError(f"frames must be [f, {self.height}, {self.width}, 3], got {list(arr.shape)}")
        if arr.shape[0] == 0:
            return
        stdin = self._proc.stdin
        assert stdin is not None
        try:
            stdin.write(np.ascontiguousarray(arr).data)
        except (BrokenPipeError, OSError) as exc:
            self._proc.wait()
            tail = self._stderr_text()
            self.abort()
            raise FFmpegError("ffmpeg stopped while receiving frames", tail) from exc
        self.frames_written += arr.shape[0]

    def close(self) -> Path:
        """Finish encoding, mux audio, move the file into place, and return its path."""
        if self._closed:
            return self.path
        stdin = self._proc.stdin
        if stdin is not None:
            with contextlib.suppress(BrokenPipeError, OSError):
                stdin.close()
        try:
            rc = self._proc.wait(timeout=ENCODE_WAIT_S)
        except subprocess.TimeoutExpired as exc:
            self.abort()
            raise FFmpegError("ffmpeg did not finish encoding in time") from exc
        if rc != 0:
            tail = self._stderr_text()
            self.abort()
            raise FFmpegError(f"ffmpeg failed encoding video (exit code {rc})", tail)
        if self.frames_written == 0:
            self.abort()
            raise ValueError("no frames were written")
        if self.num_frames is not None and self.frames_written != self.num_frames:
            written = self.frames_written
            self.abort()
            raise ValueError(f"promised {self.num_frames} frames but {written} were written")
        try:
            if self.audio_path is not None:
                self._mux_audio()
            os.replace(self._partial, self.path)
        except BaseException:
            self.abort()
            raise
        finally:
            self._video_only.unlink(missing_ok=True)
        self._closed = True
        return self.path

    def _mux_audio(self) -> None:
        assert self.audio_path is not None
        video = ffmpeg.input(str(self._video_only))["v:0"]
        mux_audio(video, self.audio_path, self.frames_written / self.fps, self._partial,
                  self._audio_bitrate, self._audio_rate)

    def abort(self) -> None:
        """Kill ffmpeg and delete partial output; the target path is left untouched. Idempotent."""
        self._closed = True
        if self._proc.poll() is None:
            self._proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=10)
        for pipe in (self._proc.stdin, self._proc.stderr):
            with contextlib.suppress(Exception):
                if pipe is not None:
                    pipe.close()
        self._partial.unlink(missing_ok=True)
        self._video_only.unlink(missing_ok=True)


def cut_audio(audio_path: Path, duration: float) -> Any:
    """``audio_path``'s first audio stream cut to ``duration`` seconds (``-t`` on the input: an exact cut, where
    ``-shortest`` would not be), as an ffmpeg-python stream."""
    return ffmpeg.input(str(audio_path), t=f"{duration:.6f}")["a:0"]


def aac_options(bitrate: str = AUDIO_BITRATE, sample_rate: int = AUDIO_SAMPLE_RATE) -> dict[str, Any]:
    """The output options of every AAC encode: the serial path's and a stitched video's audio track are the same."""
    return {"c:a": "aac", "b:a": bitrate, "flags:a": "+bitexact", "ar": sample_rate}


def ffmpeg_command(output: Any) -> list[str]:
    """The command line of an ffmpeg-python output: quiet, no stdin, overwriting."""
    return (output.global_args("-hide_banner", "-nostdin", "-loglevel", "error")
            .overwrite_output().compile(cmd=ffmpeg_path()))


def run_ffmpeg(output: Any, action: str) -> None:
    """Run an ffmpeg-python output to its end (at most ``MUX_TIMEOUT_S``); :class:`FFmpegError` says which
    ``action`` failed, with ffmpeg's last lines."""
    proc = subprocess.run(ffmpeg_command(output), capture_output=True, timeout=MUX_TIMEOUT_S, check=False)
    if proc.returncode != 0:
        raise FFmpegError(f"ffmpeg failed {action} (exit code {proc.returncode})", stderr_tail(proc.stderr))


def mux_audio(video: Any, audio_path: Path, duration: float, out: Path, audio_bitrate: str = AUDIO_BITRATE,
              audio_sample_rate: int = AUDIO_SAMPLE_RATE) -> None:
    """Write ``out`` (mp4): the H.264 ``video`` (an ffmpeg-python input stream) copied, plus ``audio_path`` cut to
    ``duration`` seconds and encoded to AAC; ``+faststart``, bit-exact muxers."""
    run_ffmpeg(ffmpeg.output(video, cut_audio(audio_path, duration), str(out), format="mp4", **{"c:v": "copy"},
                             **aac_options(audio_bitrate, audio_sample_rate), movflags="+faststart", **BITEXACT),
               "muxing audio")


def copy_streams(streams: Sequence[Any], out: Path) -> None:
    """Write ``out`` (mp4): ``streams`` (ffmpeg-python input streams: H.264 video, AAC audio) copied, not
    re-encoded; ``+faststart``, bit-exact muxer."""
    run_ffmpeg(ffmpeg.output(*streams, str(out), format="mp4", c="copy", movflags="+faststart", **BITEXACT),
               "copying streams")


# -- probing -------------------------------------------------------------------------------------------


def probe_media(path: Path | str) -> dict[str, Any]:
    """Return ffprobe's JSON (``streams`` + ``format``) for ``path``.

    Without ffprobe (imageio-ffmpeg only) a best-effort dict with the same key names is parsed from
    ``ffmpeg -i`` stderr (durations to 10 ms; ``"probed_with": "ffmpeg"`` marks it).
    """
    probe = ffprobe_path()
    if probe is None:
        return _probe_with_ffmpeg(Path(path))
    cmd = [probe, "-v", "error", "-print_format", "json", "-show_streams", "-show_format", str(path)]
    proc = subprocess.run(cmd, capture_output=True, timeout=60, check=False)
    if proc.returncode != 0:
        raise FFmpegError(f"ffprobe failed on {Path(path).name}", stderr_tail(proc.stderr))
    return json.loads(proc.stdout)


_DURATION = re.compile(r"Duration: (\d+):(\d+):(\d+(?:\.\d+)?)")
_STREAM = re.compile(r"Stream #\d+:(\d+)\S*: (Video|Audio|Subtitle|Data): (\w+)(.*)")
_INPUT = re.compile(r"Input #0, ([\w,]+), from")


def _probe_with_ffmpeg(path: Path) -> dict[str, Any]:
    proc = subprocess.run(
        [ffmpeg_path(), "-hide_banner", "-nostdin", "-i", str(path)],
        capture_output=True,
        timeout=60,
        check=False,
    )
    text = proc.stderr.decode("utf-8", "replace")
    fmt_match = _INPUT.search(text)
    if fmt_match is None:
        raise FFmpegError(f"ffmpeg could not read {path.name}", stderr_tail(text))
    fmt: dict[str, Any] = {"filename": str(path), "format_name": fmt_match.group(1), "probed_with": "ffmpeg"}
    if dur := _DURATION.search(text):
        hours, minutes, seconds = dur.groups()
        fmt["duration"] = f"{int(hours) * 3600 + int(minutes) * 60 + float(seconds):.6f}"
    streams = []
    for match in _STREAM.finditer(text):
        index, kind, codec, rest = match.groups()
        stream: dict[str, Any] = {"index": int(index), "codec_type": kind.lower(), "codec_name": codec}
        if kind == "Video":
            if size := re.search(r",\s*(\d+)x(\d+)", rest):
                stream["width"], stream["height"] = int(size.group(1)), int(size.group(2))
            if pix := re.match(r"[^,]*,\s*([a-z0-9_]+)", rest):
                stream["pix_fmt"] = pix.group(1)
            if rate := re.search(r"([\d.]+) fps", rest):
                stream["r_frame_rate"] = rate.group(1)
        elif kind == "Audio" and (rate := re.search(r"(\d+) Hz", rest)):
            stream["sample_rate"] = rate.group(1)
        streams.append(stream)
    return {"streams": streams, "format": fmt}
