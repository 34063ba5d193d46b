"""``serve run serve_config.yaml`` as a new user runs it: the app gets healthy, the sync route returns an mp4 URL.

Only the port and the data folder are changed (a copy of the file), so the test does not collide with anything.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from testing.http import free_port, http_bytes, http_json
from testing.media import EXAMPLE_AUDIO, EXAMPLE_IMAGE, REPO_ROOT, data_uri, probe
from testing.processes import RAY_START_TIMED_OUT, as_from_a_shell, signal_group, stop_process_group

pytestmark = pytest.mark.serve  # `serve run` starts a cluster of its own in a subprocess


def healthy(server: subprocess.Popen, log_path: Path, base: str) -> bool:
    """Wait until ``serve run`` answers healthy (True) or exited because Ray's own start timed out (False); any
    other exit, a failed import or 240 s without health fails the test."""
    deadline = time.monotonic() + 240
    while True:
        output = log_path.read_text()
        if server.poll() is not None and RAY_START_TIMED_OUT in output:
            signal_group(server, signal.SIGKILL)  # what its Ray start left running
            return False
        if server.poll() is not None or "Exception importing application" in output or time.monotonic() > deadline:
            stop_process_group(server)
            late = server.poll() is None and "Exception importing application" not in output
            pytest.fail(("not healthy in time:\n" if late else "") + output[-3000:])
        with contextlib.suppress(OSError):
            code, body, _ = http_json("GET", f"{base}/health", timeout=5)
            if code == 200 and body["status"] == "ok":
                return True
        time.sleep(1)


def start_serve_run(config_path: Path, log_path: Path, base: str, env: dict[str, str]) -> subprocess.Popen:
    """``serve run`` as a user starts it, once healthy (a second try where Ray's own start timed out)."""
    argv = as_from_a_shell([str(Path(sys.executable).with_name("serve")), "run", str(config_path)])
    for _ in range(2):
        with log_path.open("w") as log:
            server = subprocess.Popen(argv, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True)
        if healthy(server, log_path, base):
            return server
    pytest.fail(f"Ray's own start timed out twice:\n{log_path.read_text()[-3000:]}")


def test_serve_run_with_the_shipped_config(tmp_path):
    config = yaml.safe_load((REPO_ROOT / "serve_config.yaml").read_text())
    port = free_port()
    config["http_options"]["port"] = port
    storage = config["applications"][0]["args"]["storage"]
    storage.update(root=str(tmp_path / "data"), public_base_url=f"http://127.0.0.1:{port}")
    config_path = tmp_path / "serve_config.yaml"
    config_path.write_text(yaml.safe_dump(config))

    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_ADDRESS="local")  # its own cluster, never another one
    base = f"http://127.0.0.1:{port}"
    server = start_serve_run(config_path, tmp_path / "serve.log", base, env)
    try:
        request = {"image_url": data_uri(EXAMPLE_IMAGE, "image/png"), "audio_url": data_uri(EXAMPLE_AUDIO, "audio/wav"),
                   "prompt": "a person talking", "num_inference_steps": 2}
        code, result, _ = http_json("POST", f"{base}/run/fal-ai/stable-avatar", request)
        assert code == 200, result
        assert result["video"]["url"].startswith(f"{base}/files/")
        video = tmp_path / "out.mp4"
        video.write_bytes(http_bytes(result["video"]["url"]))
        info = probe(video)
        assert {s["codec_name"] for s in info["streams"]} == {"h264", "aac"}
        assert abs(float(info["format"]["duration"]) - 5.68) < 0.04
    finally:
        stop_process_group(server)
