"""``make demo``: start the local service from serve_config.yaml, generate the example over HTTP with a progress
display, save demo.mp4, and stop the service cleanly.

The inputs are sent as data: URIs, so nothing but the HTTP API is used.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
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


def show_progress(request_id: str, done: threading.Event) -> None:
    """One progress bar line; stage log lines are printed above it (step lines are what the bar shows)."""
    shown = 0
    while not done.wait(0.5):
        try:
            state = get_json(f"{BASE_URL}/progress/{request_id}")
        except OSError:
            continue
        for line in state["logs"][shown:]:
            if not line.startswith("denoising step"):
                print(f"\r\033[K  {line}", flush=True)
        shown = len(state["logs"])
        bar = "#" * int(30 * state["progress"])
        steps = f"step {state['step']}/{state['total_steps']}" if state["total_steps"] else ""
        print(f"\r\033[K  [{bar:<30}] {state['progress'] * 100:5.1f}% {state['stage']} {steps}", end="", flush=True)


def generate(out: Path) -> None:
    request_id = uuid.uuid4().hex
    body = {
        "image_url": data_uri(ROOT / "examples" / "portrait.png", "image/png"),
        "audio_url": data_uri(ROOT / "examples" / "speech.wav", "audio/wav"),
        "prompt": "A person speaking to the camera, neutral background",
        "seed": 42,
    }
    request = urllib.request.Request(
        f"{BASE_URL}/run/{APP_ID}", data=json.dumps(body).encode(), method="POST",
        headers={"content-type": "application/json", "x-fal-request-id": request_id})
    done = threading.Event()
    watcher = threading.Thread(target=show_progress, args=(request_id, done), daemon=True)
    watcher.start()
    try:
        with urllib.request.urlopen(request, timeout=1800) as response:
            result = json.loads(response.read())
    finally:
        done.set()
        watcher.join()
    print()
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
