"""Small test utilities: synthetic media and ffprobe summaries."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.media.audio import write_wav
from pipeline.media.ffmpeg_bin import ffprobe_path

REPO_ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_IMAGE = REPO_ROOT / "examples" / "portrait.png"
EXAMPLE_AUDIO = REPO_ROOT / "examples" / "speech.wav"
CHROMIUM = Path(os.environ.get("STABLE_AVATAR_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


# The golden vectors are bit-exact on the CPU that made them. Another CPU family's convolution/matmul kernels
# (MKL/oneDNN AVX2 vs AVX-512 code paths) round differently by a few fp32 ulps: measured max |d| 4.4e-6 (VAE
# decode, values in [-1, 1]) and 1.5e-6 (CLIP tokens up to 6) on an AVX-512 Xeon. Our own code paths against each
# other on one machine stay bit-exact (checked with torch.equal where it matters).
GOLDEN_CROSS_CPU_ATOL = 1e-5


def assert_golden(actual, golden) -> None:
    """``actual`` equals an upstream golden tensor up to cross-CPU rounding (shape and dtype exact)."""
    import torch

    torch.testing.assert_close(actual, golden, atol=GOLDEN_CROSS_CPU_ATOL, rtol=0)


def synthetic_speech(path: Path, seconds: float, sample_rate: int = 16000) -> Path:
    """Amplitude-modulated harmonics: deterministic and speech-shaped."""
    t = np.arange(int(round(seconds * sample_rate))) / sample_rate
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 3.0 * t)
    wave = sum(np.sin(2 * np.pi * f * t) / k for k, f in enumerate((140, 280, 420, 900), start=1))
    return write_wav(path, (0.2 * envelope * wave).astype(np.float32), sample_rate)


def probe(path: Path) -> dict:
    """ffprobe's streams and format as a dict."""
    out = subprocess.run(
        [ffprobe_path() or "ffprobe", "-v", "error", "-show_streams", "-show_format", "-of", "json", str(path)],
        check=True, capture_output=True, text=True,
    )
    return json.loads(out.stdout)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def data_uri(path: Path, mime: str) -> str:
    import base64

    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode()


def http_json(method: str, url: str, body: dict | None = None, headers: dict | None = None,
              timeout: float = 300) -> tuple[int, dict, dict]:
    """(status, json body, headers) without raising on 4xx/5xx."""
    import urllib.error
    import urllib.request

    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"content-type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, _parse(response.read()), dict(response.headers)
    except urllib.error.HTTPError as err:
        return err.code, _parse(err.read()), dict(err.headers)


def _parse(payload: bytes):
    """JSON, or ``{"raw": text}`` for the plain-text answers of a proxy that is still starting."""
    if not payload:
        return None
    try:
        return json.loads(payload)
    except ValueError:
        return {"raw": payload.decode(errors="replace")}


def http_bytes(url: str, timeout: float = 60) -> bytes:
    import urllib.request

    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read()


def stop_process_group(process: subprocess.Popen, timeout_s: float = 60) -> int:
    """Ctrl-C to a server started with ``start_new_session=True`` (its whole group: Ray's processes too), then
    SIGKILL if it has not exited within ``timeout_s``; returns its exit status."""
    import os
    import signal

    os.killpg(process.pid, signal.SIGINT)
    try:
        return process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        return process.wait()


def scrape(url: str) -> dict[str, float]:
    """Our metrics (Ray exports them with a ``ray_`` prefix), summed over tags other than outcome/stage/direction."""
    values: dict[str, float] = {}
    for line in http_bytes(url).decode().splitlines():
        match = re.match(r"^ray_(stable_avatar_\w+?)(\{[^}]*\})? (\S+)$", line)
        if not match:
            continue
        name, labels, value = match.groups()
        keep = re.findall(r'(outcome|stage|direction)="([^"]*)"', labels or "")
        key = name + "".join(f"[{v}]" for _, v in keep)
        values[key] = values.get(key, 0.0) + float(value)
    return values


@contextlib.contextmanager
def chromium(*extra_args: str) -> Iterator[Any]:
    """Debian's headless ``chromium`` driven by Playwright (which never downloads a browser here). Fails, not
    skips, without either: the browser tests are part of what ``make test`` must check."""
    import pytest

    if not CHROMIUM.exists():
        pytest.fail(f"Chromium not found at {CHROMIUM}: run `make browser-deps` (installs Debian's chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the Python package 'playwright' is missing: run `make setup` (it is in the dev extra)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=[*CHROMIUM_ARGS, *extra_args])
        try:
            yield browser
        finally:
            browser.close()
