"""``make demo``: start the local service from serve_config.yaml, generate the example over HTTP with a progress
display, save demo.mp4, and stop the service cleanly.

The inputs are sent as data: URIs through the fal queue API (submit, then /progress, then the result), so nothing
but the HTTP API is used.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASE_URL = os.environ.get("DEMO_BASE_URL", "http://127.0.0.1:8000")
APP_ID = "fal-ai/stable-avatar"


def data_uri(path: Path, mime: str) -> str:
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode()


def get_json(url: str, timeout: float = 5.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


def wait_healthy(server: subprocess.Popen, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the service exited early with status {server.returncode}")
        try:
            if get_json(f"{BASE_URL}/health").get("status") == "ok":
                return
        except OSError:
            pass
        time.sleep(1.0)
    raise SystemExit(f"the service did not become healthy within {timeout_s:.0f} s")


def post_json(url: str, body: dict, timeout: float = 60.0) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def follow(request_id: str, timeout_s: float = 1800) -> dict:
    """One progress bar line until the job is done; its log lines are printed above it."""
    shown, deadline = 0, time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = get_json(f"{BASE_URL}/progress/{request_id}")
        for line in state["logs"][shown:]:
            if not line.startswith("denoising step"):
                print(f"\r\033[K  {line}", flush=True)
        shown = len(state["logs"])
        bar = "#" * int(30 * state["progress"])
        print(f"\r\033[K  [{bar:<30}] {state['progress'] * 100:5.1f}% {state['stage']}", end="", flush=True)
        if state["status"] == "COMPLETED":
            print()
            return state
        time.sleep(0.5)
    raise SystemExit(f"the job {request_id} did not finish within {timeout_s:.0f} s")


def generate(out: Path) -> None:
    body = {
        "image_url": data_uri(ROOT / "examples" / "portrait.png", "image/png"),
        "audio_url": data_uri(ROOT / "examples" / "speech.wav", "audio/wav"),
        "prompt": "A person speaking to the camera, neutral background",
        "seed": 42,
    }
    submitted = post_json(f"{BASE_URL}/{APP_ID}", body)  # the queue API: the server issues the request id
    print(f"  request {submitted['request_id']} queued", flush=True)
    follow(submitted["request_id"])
    result = get_json(submitted["response_url"], timeout=60)
    video = result["video"]
    with urllib.request.urlopen(video["url"], timeout=60) as response:
        out.write_bytes(response.read())
    print(f"saved {out} ({video['file_size']} bytes, seed {result['seed']}); the tiny preset's video is noise")


def main() -> int:
    env = dict(os.environ, RAY_AUTH_MODE="disabled", HF_HUB_OFFLINE="1")
    log_path = ROOT / "demo-serve.log"
    log = log_path.open("w")
    server = subprocess.Popen([sys.executable, "-m", "stable_avatar.cli", "serve", "--config", "serve_config.yaml"],
                              cwd=ROOT, env=env, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
    try:
        print(f"starting the service from serve_config.yaml (its log: {log_path.name}) ...", flush=True)
        wait_healthy(server)
        generate(ROOT / "demo.mp4")
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGINT)
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
        log.close()
        print("service stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
