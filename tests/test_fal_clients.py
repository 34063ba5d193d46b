"""The OFFICIAL fal clients against the service over plain HTTP: Python ``fal-client`` 1.0.3 (patched module
globals) and JS ``@fal-ai/client`` 1.10.1 (``requestMiddleware``). They run as subprocesses, exactly as a user
would run them, and print what they saw; the assertions here hold the protocol to what the clients need.

The HTTPS variant (environment-only Python set-up, self-signed certificate) is tests/test_fal_clients_https.py;
it reuses the helpers below. This module runs on the shared cluster; the HTTPS one starts a cluster of its own
(Serve has one proxy per cluster, and the two need different ``http_options``).
"""

from __future__ import annotations

import json
import os
import shutil
import ssl
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from testing.media import EXAMPLE_IMAGE, REPO_ROOT, probe, synthetic_speech
from testing.ray_serve import RayServeCluster

APP = "fal-ai/stable-avatar"
PY_CHECK = REPO_ROOT / "tests" / "fal_python_client_check.py"
JS_DIR = REPO_ROOT / "tests" / "js"
JS_CHECK = JS_DIR / "fal_client_check.mjs"
SCRIPT_TIMEOUT_S = 240


# -- shared with test_fal_clients_https.py -------------------------------------------------------------------------
def deploy_service(cluster: RayServeCluster, storage_root: Path, scheme: str = "http") -> str:
    """The app (tiny preset, CPU, one job at a time so a queue forms) on ``cluster``; returns the base URL."""
    assert cluster.base.startswith(scheme + "://")
    cluster.deploy({
        "device": "cpu", "max_running_jobs": 1, "short_job_slots": 0,  # later jobs stay queued
        "storage": cluster.local_storage(storage_root),
        "denoiser": {"num_replicas": 1, "max_ongoing_requests": 1},
    })
    return cluster.base


def make_media(folder: Path) -> dict[str, Path]:
    """A portrait and one second of speech (each job takes a few seconds on CPU), and twenty seconds of speech for
    a job that must outlast what another scenario does meanwhile however loaded the machine is (it is cancelled
    then)."""
    image = folder / "portrait.png"
    shutil.copyfile(EXAMPLE_IMAGE, image)
    return {"image": image, "audio": synthetic_speech(folder / "speech.wav", 1.0),
            "long_audio": synthetic_speech(folder / "long_speech.wav", 20.0)}


def parse_lines(stdout: str) -> dict[str, dict[str, Any]]:
    return {line["scenario"]: line for line in map(json.loads, filter(None, stdout.splitlines()))}


def run_script(command: list[str], scenario: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run one client scenario; a failed scenario fails the test with the script's own report."""
    proc = subprocess.run(command, capture_output=True, text=True, timeout=SCRIPT_TIMEOUT_S,
                          env={**os.environ, **(env or {})}, cwd=REPO_ROOT)
    try:
        line = parse_lines(proc.stdout)[scenario]
    except (KeyError, ValueError):
        pytest.fail(f"{command[1]} {scenario}: exit {proc.returncode}\nstdout:\n{proc.stdout}\n"
                    f"stderr:\n{proc.stderr[-4000:]}")
    assert line["ok"] and proc.returncode == 0, json.dumps(line, indent=1)[:6000] + "\n" + proc.stderr[-2000:]
    return line


def run_python_client(scenario: str, media: dict[str, Path], env: dict[str, str], *extra: str) -> dict[str, Any]:
    command = [sys.executable, str(PY_CHECK), scenario, "--image", str(media["image"]),
               "--audio", str(media["audio"]), "--long-audio", str(media["long_audio"]), *extra]
    return run_script(command, scenario, {"FAL_KEY": "anything", **env})


def download(url: str, context: ssl.SSLContext | None = None) -> bytes:
    with urllib.request.urlopen(url, timeout=60, context=context) as response:
        return response.read()


def assert_video(output: dict[str, Any], base: str, tmp_path: Path, context: ssl.SSLContext | None = None) -> None:
    """fal's File object for the video; its URL (absolute, on the server's scheme/host) downloads as h264+aac."""
    video = output["video"]
    assert video["content_type"] == "video/mp4" and video["url"].startswith(f"{base}/"), video
    data = download(video["url"], context)
    assert len(data) == video["file_size"]
    path = tmp_path / "out.mp4"
    path.write_bytes(data)
    assert {s["codec_name"] for s in probe(path)["streams"]} == {"h264", "aac"}


def same_output(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Equal outputs, ignoring the video URL (its signature carries a fresh expiry each time it is read)."""
    def strip(output: dict[str, Any]) -> dict[str, Any]:
        return {**output, "video": {k: v for k, v in output["video"].items() if k != "url"}}

    return strip(a) == strip(b)


def assert_subscribe_updates(types: list[str]) -> None:
    """Python on_queue_update types: some Queued/InProgress, then exactly one Completed, last."""
    assert types and types[-1] == "Completed" and types.count("Completed") == 1, types
    assert {"Queued", "InProgress"} & set(types[:-1]), types


def assert_field_error(outcome: dict[str, Any], field: str) -> None:
    """Python: FalClientHTTPError 422 whose message is fal's ``detail`` list naming the field."""
    assert outcome["raised"] == "FalClientHTTPError" and outcome["status_code"] == 422, outcome
    assert isinstance(outcome["message"], list), outcome
    assert any(err["loc"] == ["body", field] for err in outcome["message"]), outcome


# -- plain HTTP: the Python client with patched module globals -----------------------------------------------------
@pytest.fixture(scope="module")
def server(tmp_path_factory, serve_cluster) -> str:
    return deploy_service(serve_cluster, tmp_path_factory.mktemp("storage"))


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, Path]:
    return make_media(tmp_path_factory.mktemp("media"))


def python_http(scenario: str, media: dict[str, Path], base: str) -> dict[str, Any]:
    return run_python_client(scenario, media, {}, "--queue-base", base, "--rest-base", base)


def test_python_client_subscribe_over_http(server, media, tmp_path):
    line = python_http("subscribe", media, server)
    assert_subscribe_updates(line["types"])
    assert len(line["enqueued"]) == 1
    assert_video(line["result"], server, tmp_path)


def test_python_client_upload_file_over_http(server, media, tmp_path):
    line = python_http("upload", media, server)
    for url in line["urls"].values():
        assert url.startswith(f"{server}/files/uploads/"), line["urls"]
    assert line["round_trip_equal"]
    assert_video(line["result"], server, tmp_path)


def test_python_client_submit_status_result_over_http(server, media, tmp_path):
    line = python_http("queue", media, server)
    assert line["status_url"] == f"{server}/{APP}/requests/{line['request_id']}/status"
    assert line["rebuilt_equal"] and line["status_by_id"] == "Completed"
    assert all(p["logs"] is None for p in line["polled"] if p["type"] != "Queued"), line["polled"]
    assert line["with_logs"]["logs"] > 0 and line["with_logs"]["metrics"]["inference_time"] > 0
    assert same_output(line["result"], line["result_by_id"])
    assert_video(line["result"], server, tmp_path)


# -- plain HTTP: the JS client --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def node() -> str:
    """node plus the pinned @fal-ai/client; missing deps are a failure, not a skip."""
    binary = shutil.which("node")
    if binary is None:
        pytest.fail("node (>= 18) is not installed; install Node.js, then run `make js-deps`")
    if not (JS_DIR / "node_modules" / "@fal-ai" / "client" / "package.json").is_file():
        pytest.fail("tests/js/node_modules is missing @fal-ai/client: run `make js-deps`")
    return binary


def run_js(node: str, base: str, scenario: str, media: dict[str, Path]) -> dict[str, Any]:
    return run_script([node, str(JS_CHECK), base, scenario, "--image", str(media["image"]),
                       "--audio", str(media["audio"]), "--long-audio", str(media["long_audio"])], scenario)


def test_js_subscribe_polling(server, node, media, tmp_path):
    line = run_js(node, server, "subscribe", media)
    statuses = line["statuses"]
    # Polled every 100 ms, a job of several seconds is always seen running, with the log lines it wrote so far.
    assert statuses[-1] == "COMPLETED" and statuses.count("COMPLETED") == 1, statuses
    assert "IN_PROGRESS" in statuses and line["in_progress_logs"] > 0, line
    assert line["request_id"] == line["enqueued"]  # from the result's x-fal-request-id header
    assert_video(line["data"], server, tmp_path)


def test_js_subscribe_streaming_accumulates_logs(server, node, media, tmp_path):
    line = run_js(node, server, "streaming", media)
    assert line["statuses"][-1] == "COMPLETED", line["events"]
    counts = line["log_counts"]
    assert counts == sorted(counts) and counts[-1] > 1, counts
    # Each SSE event carries only new lines, so what the client accumulated equals the job's full log.
    assert counts[-1] == line["final_log_count"], line
    assert_video(line["data"], server, tmp_path)


def test_js_queue_submit_status_result(server, node, media, tmp_path):
    line = run_js(node, server, "queue", media)
    submitted = line["submitted"]
    assert submitted["status"] == "IN_QUEUE" and isinstance(submitted["queue_position"], int)
    assert submitted["status_url"] == f"{server}/{APP}/requests/{submitted['request_id']}/status"
    assert line["first_status"] in ("IN_QUEUE", "IN_PROGRESS", "COMPLETED")
    assert line["completed"]["status"] == "COMPLETED" and line["completed"]["log_count"] > 0
    assert line["completed"]["metrics"]["inference_time"] > 0
    assert line["completed_without_logs"] == {"status": "COMPLETED", "logs": None}
    assert line["result_request_id"] == submitted["request_id"]
    assert_video(line["data"], server, tmp_path)


def test_js_cancel_of_a_queued_request(server, node, media):
    line = run_js(node, server, "cancel", media)
    # The first job runs (one at a time), so the middle one is next and the last one has the middle one ahead.
    assert line["first_running"] == "IN_PROGRESS", line
    assert line["middle_before"] == {"status": "IN_QUEUE", "queue_position": 0}, line
    assert line["last_position_before"] == 1, line
    assert line["cancel"] == {"rejected": False}
    assert line["middle_after"] == {"status": "COMPLETED", "error": "Request cancelled",
                                    "error_type": "client_cancelled"}
    assert line["last_after"] == {"status": "IN_QUEUE", "queue_position": 0}, line
    rejected = line["cancelled_result"]
    assert rejected["rejected"] and rejected["api_error"] and rejected["status"] == 499, rejected
    assert line["cancel_running"] == {"rejected": False}, line
    assert line["first_final"] == {"status": "COMPLETED", "error_type": "client_cancelled"}, line
    completed = line["cancel_completed"]
    assert completed["status"] == 400 and completed["body"] == {"status": "ALREADY_COMPLETED"}, completed
    assert line["last_result_has_video"]


def test_js_blob_inputs_are_uploaded(server, node, media, tmp_path):
    line = run_js(node, server, "upload", media)
    assert line["round_trip_equal"], line["stored_url"]
    methods = [(method, url.split("?")[0]) for method, url in line["upload_requests"]]
    assert methods[0] == ("POST", f"{server}/storage/upload/initiate"), methods
    assert methods[1][0] == "PUT" and methods[1][1].startswith(f"{server}/storage/upload/put/"), methods
    for url in line["submitted_urls"].values():  # transformInput replaced both Blobs by our file URLs
        assert url.startswith(f"{server}/files/uploads/"), line["submitted_urls"]
    assert_video(line["data"], server, tmp_path)


def test_js_validation_error_has_field_errors(server, node, media):
    line = run_js(node, server, "validation", media)
    for key, field in (("zero_steps", "num_inference_steps"), ("missing_prompt", "prompt")):
        outcome = line[key]
        assert outcome["validation_error"] and outcome["status"] == 422, outcome
        assert any(err["loc"] == ["body", field] for err in outcome["field_errors"]), outcome


def test_js_run_sync(server, node, media, tmp_path):
    line = run_js(node, server, "run", media)
    assert line["request_id"]
    assert_video(line["data"], server, tmp_path)

