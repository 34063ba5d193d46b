"""``stable-avatar submit/status/result/cancel`` against a live service, run as a user runs them (a subprocess),
and ``stable-avatar serve`` listening where it is told (``--host/--port``), over HTTPS when its config says so.

The server requires an API key here, so the key handling (``FAL_KEY``, ``--key``, 401/403 messages) is checked
along the way. Ctrl-C is checked both without a terminal (no question: the job keeps running and the command
says how to come back) and on a pseudo-terminal (it asks, and ``y`` cancels the job).
"""

from __future__ import annotations

import http.client
import json
import os
import pty
import re
import selectors
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from testing.http import free_port, http_json
from testing.media import EXAMPLE_IMAGE, REPO_ROOT, data_uri, probe, synthetic_speech
from testing.processes import RAY_START_TIMED_OUT, as_from_a_shell, signal_group, stop_process_group
from tests.cli_probe import run_cli
from tests.tls import make_certificates

API_KEY = "cli-test-key"
AUDIO_S = 2.0
APP = "fal-ai/stable-avatar"
REQUEST_ID = re.compile(r"request id: ([0-9a-f]+)")


@contextmanager
def cli_serve(config: dict, folder: Path, *options: str) -> Iterator[list[str]]:
    """``stable-avatar serve --config`` (a file in ``folder`` holding ``config``) in its own Ray instance, until it
    says it is listening; yields its output lines, then stops it with Ctrl-C (it must exit cleanly)."""
    path = folder / "serve_config.yaml"
    path.write_text(yaml.safe_dump(config))
    argv = as_from_a_shell([sys.executable, "-m", "stable_avatar.cli", "serve", "--config", str(path), *options])
    server, lines = start_listening(argv)
    try:
        yield lines
    finally:
        stopped = stop_process_group(server)
    assert stopped == 0


def start_listening(argv: list[str]) -> tuple[subprocess.Popen, list[str]]:
    """``argv`` (a ``serve``) once it says it is listening, with its output lines so far (they go on growing); a
    second try where Ray's own start timed out."""
    env = cli_env() | {"RAY_ADDRESS": "local"}  # its own Ray instance, never another one on this machine
    for attempt in range(2):
        server = subprocess.Popen(argv, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True, start_new_session=True)
        lines: list[str] = []
        reader = threading.Thread(target=lines.extend, args=(server.stdout,), daemon=True)
        reader.start()
        deadline = time.monotonic() + 180
        while not any("is listening on" in line for line in lines):  # printed once Serve has started
            if server.poll() is not None:
                break
            if time.monotonic() > deadline:
                stop_process_group(server)
                pytest.fail("not listening within 180 s:\n" + "".join(lines[-30:]))
            time.sleep(0.2)
        else:
            return server, lines
        reader.join(timeout=30)  # the rest of what it printed
        signal_group(server, signal.SIGKILL)  # what its Ray start left running
        if attempt == 1 or RAY_START_TIMED_OUT not in "".join(lines):
            pytest.fail(f"exited with {server.returncode}:\n" + "".join(lines[-30:]))
    raise AssertionError("unreachable")


def test_serve_listens_on_the_host_and_port_it_is_given(tmp_path):
    """The options reach Serve's http_options: the proxy answers on the given port, not the config's."""
    port = free_port()
    config = {"http_options": {"host": "127.0.0.1", "port": 8000}, "applications": []}
    with cli_serve(config, tmp_path, "--host", "127.0.0.1", "--port", str(port)) as lines:
        assert any(f"is listening on http://127.0.0.1:{port} " in line for line in lines), "".join(lines)
        # Serve's proxy answers there; with no application its route table stays empty, which it says
        code, answer, _ = http_json("GET", f"http://127.0.0.1:{port}/-/routes")
        assert (code, answer) == (503, {"raw": "Route table is not populated yet."})


def test_serve_passes_the_configs_tls_files_to_serve(tmp_path):
    """``http_options.ssl_keyfile``/``ssl_certfile`` reach Serve's proxy: it speaks HTTPS with the config's
    certificate (verified against the test CA), plain HTTP gets no answer, and the printed URL says https."""
    ca, key, cert = make_certificates(tmp_path)
    port = free_port()
    config = {"http_options": {"host": "127.0.0.1", "port": port, "ssl_keyfile": str(key),
                               "ssl_certfile": str(cert)}, "applications": []}
    with cli_serve(config, tmp_path) as lines:
        assert any(f"is listening on https://127.0.0.1:{port} " in line for line in lines), "".join(lines)
        context = ssl.create_default_context(cafile=str(ca))
        with pytest.raises(urllib.error.HTTPError) as answer:
            urllib.request.urlopen(f"https://127.0.0.1:{port}/-/routes", context=context, timeout=30)
        assert answer.value.code == 503 and answer.value.read() == b"Route table is not populated yet."
        with pytest.raises((ConnectionError, http.client.HTTPException, urllib.error.URLError)):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/-/routes", timeout=30)


@pytest.fixture(scope="module")
def service(tmp_path_factory, serve_cluster):
    root = tmp_path_factory.mktemp("cli-data")
    keys = root.parent / "cli-keys.txt"
    keys.write_text(API_KEY + "\n")
    serve_cluster.deploy({
        "device": "cpu", "max_running_jobs": 1, "auth": {"keys_file": str(keys)},
        "storage": serve_cluster.local_storage(root, public=False),
        "denoiser": {"num_replicas": 1, "max_ongoing_requests": 1},
    })
    return serve_cluster.base


@pytest.fixture(scope="module")
def audio(tmp_path_factory) -> Path:
    return synthetic_speech(tmp_path_factory.mktemp("cli-audio") / "speech.wav", AUDIO_S)


def cli_env(key: str | None = API_KEY) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("FAL_KEY", "STABLE_AVATAR_SERVER")}
    return env | ({"FAL_KEY": key} if key else {})


def cli(*args: str, key: str | None = API_KEY, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stable_avatar.cli", *args], cwd=REPO_ROOT, env=cli_env(key),
                          capture_output=True, text=True, timeout=timeout)


def submit_args(server: str, audio: Path, *extra: str, image: Path = EXAMPLE_IMAGE) -> list[str]:
    return ["submit", "--server", server, "--image", str(image), "--audio", str(audio),
            "--prompt", "a person talking", "--aspect-ratio", "1:1", *extra]


def test_submit_status_result(service, audio, tmp_path):
    out = tmp_path / "out.mp4"
    run = cli(*submit_args(service, audio, "--steps", "2", "--seed", "5", "--acceleration", "regular",
                           "-o", str(out)))
    assert run.returncode == 0, run.stderr
    request_id = REQUEST_ID.search(run.stdout).group(1)
    assert f"wrote {out}" in run.stdout and "seed 5" in run.stdout
    assert "acceleration regular: 2 of 2 steps computed" in run.stderr  # the field reached the Denoisers' plan
    assert "uploading" in run.stderr and "100%" in run.stderr  # the tqdm bar reached the end
    assert "denoising step 2/2" in run.stderr and "completed in" in run.stderr  # server log lines
    info = probe(out)
    assert {s["codec_name"] for s in info["streams"]} == {"h264", "aac"}
    assert abs(float(info["format"]["duration"]) - AUDIO_S) < 0.1

    status = cli("status", request_id, "--server", service, "--key", API_KEY, key=None)
    assert status.returncode == 0, status.stderr
    assert "COMPLETED" in status.stdout and "completed" in status.stdout and "100%" in status.stdout
    assert "denoising step 2/2" in status.stdout

    as_json = run_cli(["status", request_id, "--json", "--server", service], REPO_ROOT, cli_env())
    assert as_json.exit_code == 0 and as_json.model_libraries == [], as_json.stderr
    _, body, _ = http_json("GET", f"{service}/{APP}/requests/{request_id}/status?logs=1",
                           headers={"authorization": f"Key {API_KEY}"})
    assert json.loads(as_json.stdout) == body and body["status"] == "COMPLETED"
    assert json.loads(cli("status", request_id, "--server", service, "--json", "--logs", "0").stdout)["logs"] is None

    again = tmp_path / "other.mp4"
    result = cli("result", request_id, "--server", service, "-o", str(again))
    assert result.returncode == 0, result.stderr
    assert again.read_bytes() == out.read_bytes()


def test_invalid_input_names_the_field(service, audio, tmp_path):
    run = cli(*submit_args(service, audio, "--steps", "0"))
    assert run.returncode == 2 and "num_inference_steps (--steps)" in run.stderr, run.stderr
    assert "uploading" not in run.stderr  # checked before anything is sent

    run = cli(*submit_args(service, tmp_path / "missing.wav"))
    assert run.returncode == 2 and "--audio: no such file" in run.stderr

    # Only the server can tell this is no image: the job fails and its error names the field.
    fake = tmp_path / "portrait.png"
    fake.write_bytes(b"this is not an image")
    run = cli(*submit_args(service, audio, "--steps", "2", image=fake))
    assert run.returncode == 2 and "image_url (--image)" in run.stderr, run.stderr


def test_missing_or_wrong_key(service, audio):
    run = cli(*submit_args(service, audio), key=None)
    assert run.returncode == 3 and "API key is missing" in run.stderr, run.stderr
    run = cli("status", "0" * 32, "--server", service, "--key", "nope", key=None)
    assert run.returncode == 3 and "API key is wrong" in run.stderr, run.stderr


def _start(args: list[str], **popen) -> tuple[subprocess.Popen, str]:
    """Start ``stable-avatar`` as from a shell and return it once it printed the request id."""
    proc = subprocess.Popen(as_from_a_shell([sys.executable, "-m", "stable_avatar.cli", *args]), cwd=REPO_ROOT, env=cli_env(),
                            stdout=subprocess.PIPE, text=True, **popen)
    with selectors.DefaultSelector() as selector:  # a CLI that never prints fails the test instead of hanging it
        selector.register(proc.stdout, selectors.EVENT_READ)
        if not selector.select(timeout=120):
            proc.kill()
            pytest.fail(f"the CLI printed nothing in 120 s: {' '.join(args)}")
    line = proc.stdout.readline()
    match = REQUEST_ID.search(line)
    assert match, line
    return proc, match.group(1)


def test_ctrl_c_without_a_terminal_leaves_the_job_running(service, audio, tmp_path):
    proc, request_id = _start(submit_args(service, audio, "--steps", "6"), stdin=subprocess.DEVNULL,
                              stderr=subprocess.PIPE)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Cancel the job?" not in err and f"stable-avatar status {request_id}" in err
    assert f"stable-avatar result {request_id}" in err

    out = tmp_path / "later.mp4"
    run = cli("result", request_id, "--server", service, "-o", str(out))  # waits for the job, then downloads
    assert run.returncode == 0, run.stderr
    assert abs(float(probe(out)["format"]["duration"]) - AUDIO_S) < 0.1


def test_ctrl_c_on_a_terminal_asks_and_cancels(service, audio):
    primary, secondary = pty.openpty()
    stderr: list[str] = []
    try:
        proc, request_id = _start(submit_args(service, audio, "--steps", "100"), stdin=secondary,
                                  stderr=subprocess.PIPE)
        # raw reads: the question has no newline, so readline() would wait for the answer
        reader = threading.Thread(target=lambda: stderr.extend(
            chunk.decode(errors="replace") for chunk in iter(lambda: os.read(proc.stderr.fileno(), 4096), b"")),
            daemon=True)
        reader.start()
        proc.send_signal(signal.SIGINT)
        deadline = time.monotonic() + 30
        while "Cancel the job? [y/N]" not in "".join(stderr):
            assert time.monotonic() < deadline and proc.poll() is None, "".join(stderr)
            time.sleep(0.05)
        os.write(primary, b"y\n")
        assert proc.wait(timeout=60) == 130
        reader.join(timeout=10)
    finally:
        os.close(primary)
        os.close(secondary)
    assert "cancellation requested" in "".join(stderr)
    deadline = time.monotonic() + 60
    while True:
        _, body, _ = http_json("GET", f"{service}/{APP}/requests/{request_id}/status",
                               headers={"authorization": f"Key {API_KEY}"})
        if body["status"] == "COMPLETED":
            break
        assert time.monotonic() < deadline, body
        time.sleep(0.1)
    assert body["error_type"] == "client_cancelled"


def test_cancel_stops_a_running_job_and_says_when_there_is_nothing_to_cancel(service, audio):
    headers = {"authorization": f"Key {API_KEY}"}
    body = {"image_url": data_uri(EXAMPLE_IMAGE, "image/png"), "audio_url": data_uri(audio, "audio/wav"),
            "prompt": "a person talking", "num_inference_steps": 100, "aspect_ratio": "1:1"}
    code, submitted, _ = http_json("POST", f"{service}/{APP}", body, headers=headers)
    assert code == 200, submitted
    request_id = submitted["request_id"]
    deadline = time.monotonic() + 120
    while http_json("GET", f"{service}/{APP}/requests/{request_id}/status", headers=headers)[1]["status"] \
            != "IN_PROGRESS":
        assert time.monotonic() < deadline, "the job did not start"
        time.sleep(0.1)

    run = run_cli(["cancel", request_id, "--server", service], REPO_ROOT, cli_env())
    assert run.exit_code == 0 and run.stdout.strip() == f"cancellation requested for {request_id}", run.stderr
    assert run.model_libraries == []
    deadline = time.monotonic() + 60
    while True:
        _, state, _ = http_json("GET", f"{service}/{APP}/requests/{request_id}/status", headers=headers)
        if state["status"] == "COMPLETED":
            break
        assert time.monotonic() < deadline, state
        time.sleep(0.1)
    assert state["error_type"] == "client_cancelled"

    again = cli("cancel", request_id, "--server", service)
    assert again.returncode == 1 and f"request {request_id} had already finished" in again.stderr, again.stderr
    unknown = cli("cancel", "0" * 32, "--server", service)
    assert unknown.returncode == 1 and f"no request {'0' * 32}" in unknown.stderr, unknown.stderr
    assert cli("cancel", request_id, "--server", service, key="nope").returncode == 3
