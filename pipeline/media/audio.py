"""Decode request audio to the mono float waveform the audio encoder expects, and write WAVs for muxing.

ffmpeg does all decoding so every common container/codec (wav, mp3, m4a/aac, ogg/vorbis/opus, flac, audio
tracks of videos) works the same way. Byte inputs are spooled to a temporary file rather than piped because
mp4/m4a files with the ``moov`` atom at the end cannot be demuxed from a non-seekable pipe.
"""

from __future__ import annotations

import subprocess
import tempfile
import wave
from pathlib import Path

import ffmpeg
import numpy as np

from pipeline.media._proc import stderr_tail
from pipeline.media.errors import UnreadableAudioError
from pipeline.media.ffmpeg_bin import ffmpeg_path

DECODE_TIMEOUT_S = 300.0


def decode_audio(
    source: bytes | Path | str,
    sample_rate: int = 16000,
    *,
    max_duration_s: float | None = None,
) -> np.ndarray:
    """Decode ``source`` (encoded bytes or a file path) to float32 mono samples in [-1, 1] at ``sample_rate``.

    Channels are averaged (``rematrix_maxval=1`` makes swresample normalise the downmix, i.e. the channel
    mean for stereo, matching librosa's ``to_mono``), so a loud stereo file cannot clip. The first audio
    stream is used. Output is deterministic for a given ffmpeg build. ``max_duration_s`` stops decoding early
    (guards memory against hour-long uploads). Raises ``UnreadableAudioError`` for anything that yields no
    samples.
    """
    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be positive, got {sample_rate}")
    if isinstance(source, bytes | bytearray | memoryview):
        data = bytes(source)
        if not data:
            raise UnreadableAudioError(_msg("the file is empty"))
        with tempfile.NamedTemporaryFile(prefix="sa-audio-", suffix=".bin") as tmp:
            tmp.write(data)
            tmp.flush()
            return _decode_file(Path(tmp.name), sample_rate, max_duration_s)
    path = Path(source)
    if not path.is_file():
        raise UnreadableAudioError(_msg(f"file not found: {path.name}"))
    if path.stat().st_size == 0:
        raise UnreadableAudioError(_msg("the file is empty"))
    return _decode_file(path, sample_rate, max_duration_s)


def _decode_file(path: Path, sample_rate: int, max_duration_s: float | None) -> np.ndarray:
    out_kwargs: dict[str, object] = {"format": "f32le", "acodec": "pcm_f32le"}
    if max_duration_s is not None:
        out_kwargs["t"] = f"{max_duration_s:.6f}"
    stream = (
        ffmpeg.input(str(path))["a:0"]
        .filter("aresample", sample_rate, ochl="mono", rematrix_maxval=1.0)
        .filter("aformat", sample_fmts="flt")
        .output("pipe:", **out_kwargs)
        .global_args("-hide_banner", "-nostdin", "-loglevel", "error")
    )
    cmd = stream.compile(cmd=ffmpeg_path())
    try:
        proc = subprocess.run(cmd, capture_output=True, timeout=DECODE_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as exc:
        raise UnreadableAudioError(_msg("decoding took too long")) from exc
    if proc.returncode != 0:
        detail = stderr_tail(proc.stderr)
        raise UnreadableAudioError(_msg(_explain(detail)), detail=detail)
    samples = np.frombuffer(proc.stdout, dtype="<f4")
    if samples.size == 0:
        raise UnreadableAudioError(
            _msg("the file contains no decodable audio samples"), detail=stderr_tail(proc.stderr)
        )
    if not np.all(np.isfinite(samples)):
        samples = np.nan_to_num(samples, nan=0.0, posinf=1.0, neginf=-1.0)
    return np.clip(samples, -1.0, 1.0).astype(np.float32, copy=False)


def _msg(reason: str) -> str:
    return f"Could not read the audio: {reason}."


def _explain(stderr: str) -> str:
    """Turn ffmpeg's diagnostics into a sentence a client can act on."""
    low = stderr.lower()
    if "matches no streams" in low or "does not contain any stream" in low:
        return "the file contains no audio stream"
    if "invalid data found" in low or "could not find codec" in low or "unknown format" in low:
        return "the file is not a recognised audio format"
    if "decoder" in low and "not found" in low:
        return "its codec is not supported"
    return "the data is corrupt or in an unsupported format"


def audio_duration_s(samples: np.ndarray, sample_rate: int) -> float:
    """Duration in seconds of a mono sample array (the last axis is time)."""
    return float(samples.shape[-1]) / float(sample_rate)


def write_wav(path: Path | str, samples: np.ndarray, sample_rate: int) -> Path:
    """Write mono float samples in [-1, 1] (or int16) as a 16-bit PCM WAV; used to hand audio to the muxer."""
    arr = np.asarray(samples)
    if arr.ndim != 1:
        raise ValueError(f"write_wav expects mono 1-D samples, got shape {arr.shape}")
    if arr.dtype != np.int16:
        # x * 32768 (clipped) is the inverse of ffmpeg's s16 -> float (/32768), so round trips are exact.
        arr = np.clip(np.round(arr.astype(np.float64) * 32768.0), -32768, 32767).astype(np.int16)
    path = Path(path)
    with wave.open(str(path), "wb") as wf:
        wf.setnchannels(1)
        wf.setsampwidth(2)
        wf.setframerate(int(sample_rate))
        wf.writeframes(arr.astype("<i2").tobytes())
    return path
