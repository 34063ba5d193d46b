"""Example inputs, synthetic speech and ffprobe summaries."""

from __future__ import annotations

import base64
import json
import subprocess
from pathlib import Path

import numpy as np

from pipeline.media.audio import write_wav
from pipeline.media.ffmpeg_bin import ffprobe_path

REPO_ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_IMAGE = REPO_ROOT / "examples" / "portrait.png"
EXAMPLE_AUDIO = REPO_ROOT / "examples" / "speech.wav"


def synthetic_speech(path: Path, seconds: float, sample_rate: int = 16000) -> Path:
    """Amplitude-modulated harmonics: deterministic and speech-shaped."""
    t = np.arange(int(round(seconds * sample_rate))) / sample_rate
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 3.0 * t)
    wave = sum(np.sin(2 * np.pi * f * t) / k for k, f in enumerate((140, 280, 420, 900), start=1))
    return write_wav(path, (0.2 * envelope * wave).astype(np.float32), sample_rate)


def data_uri(path: Path, mime: str) -> str:
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode()


def probe(path: Path) -> dict:
    """ffprobe's streams and format as a dict."""
    out = subprocess.run(
        [ffprobe_path() or "ffprobe", "-v", "error", "-show_streams", "-show_format", "-of", "json", str(path)],
        check=True, capture_output=True, text=True,
    )
    return json.loads(out.stdout)
