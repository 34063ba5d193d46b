"""The Ray Serve application on a real local Ray cluster (fake GPUs), against the in-process CLI."""

from __future__ import annotations

import os
import signal
import threading
import time
import urllib.error

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import ray  # noqa: E402
from ray import serve  # noqa: E402

from deployments.app import build_app  # noqa: E402
from deployments.config import APP_NAME, AppArgs  # noqa: E402
from pipeline.schema import StableAvatarInput, StableAvatarOutput  # noqa: E402
from stable_avatar.cli import main as cli_main  # noqa: E402
from tests.helpers import (  # noqa: E402
    EXAMPLE_IMAGE,
    data_uri,
    http_bytes,
    http_json,
    probe,
    synthetic_speech,
)
from tests.ray_serve import ray_serve_cluster  # noqa: E402

STEPS, SEED = 3, 5
APP = "fal-ai/stable-avatar"


@pytest.fixture(scope="module")
def cluster(seaweedfs):
    # Replicas inherit the driver's environment: that is how S3 credentials reach them (never via the config).
    os.environ.update(AWS_ACCESS_KEY_ID=seaweedfs.access_key, AWS_SECRET_ACCESS_KEY=seaweedfs.secret_key)
    with ray_serve_cluster(num_gpus=3) as cluster:
        yield cluster.base
    _deployed.clear()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inputs")
    return {"short": synthetic_speech(folder / "short.wav", 9.0), "long": synthetic_speech(folder / "long.wav", 24.0)}


def cli_reference(tmp_path, audio, steps=STEPS, seed=SEED) -> bytes:
    out = tmp_path / f"cli-{audio.stem}-{steps}-{seed}.mp4"
    assert cli_main(["generate", "--image", str(EXAMPLE_IMAGE), "--audio", str(audio), "--prompt", "talking",
                     "--steps", str(steps), "--seed", str(seed), "--aspect-ratio", "1:1", "--quiet",
                     "-o", str(out)]) == 0
    return out.read_bytes()


_deployed: list[str] = []


def deploy(base_url: str, root, denoisers: int, storage: dict | None = None) -> None:
    """Deploy (or keep) the app with this Denoiser count and storage; redeploys only when they change. Jobs live
    in SQLite under ``root`` (with S3 storage too: one machine)."""
    key = f"{denoisers}/{storage}"
    if _deployed and _deployed[-1] == key:
        return
    _deployed.append(key)
    args = AppArgs.model_validate({
        "device": "cpu",
        "storage": storage or {"kind": "local", "root": str(root), "public_base_url": base_url},
        "jobs": {"kind": "sqlite", "path": str(root / "jobs.sqlite3")},
        "dispatch": {"lease_s": 10, "heartbeat_s": 1, "poll_interval_s": 0.2},
        "denoiser": {"num_replicas": denoisers, "num_gpus": 1, "max_ongoing_requests": 1},
    })
    serve.run(build_app(args), name=APP_NAME, route_prefix="/")


def body_for(audio) -> dict:
    return {"image_url": data_uri(EXAMPLE_IMAGE, "image/png"), "audio_url": data_uri(audio, "audio/wav"),
            "prompt": "talking", "num_inference_steps": STEPS, "seed": SEED, "aspect_ratio": "1:1"}


def probe_bytes(tmp_path, data: bytes) -> dict:
    path = tmp_path / "probe.mp4"
    path.write_bytes(data)
    return probe(path)


def check_http_equals_cli(cluster, inputs, tmp_path, denoisers: int) -> list[str]:
    """The sync route's video equals the CLI's; returns the request's log lines (kept like any job's)."""
    deploy(cluster, tmp_path / "data", denoisers)
    status = serve.status().applications[APP_NAME].deployments["Denoiser"].replica_states
    assert status.get("RUNNING") == denoisers
    code, result, headers = http_json("POST", f"{cluster}/run/fal-ai/stable-avatar", body_for(inputs["short"]))
    assert code == 200, result
    assert result["seed"] == SEED and result["video"]["content_type"] == "video/mp4"
    request_id = headers["x-fal-request-id"]
    video = http_bytes(result["video"]["url"])
    assert len(video) == result["video"]["file_size"]
    assert video == cli_reference(tmp_path, inputs["short"])
    info = probe_bytes(tmp_path, video)
    assert {s["codec_name"] for s in info["streams"]} == {"h264", "aac"}
    code, state, _ = http_json("GET", f"{cluster}/{APP}/requests/{request_id}/status?logs=1")
    assert code == 200 and state["status"] == "COMPLETED"
    return [entry["message"] for entry in state["logs"]]


def test_http_output_equals_cli_with_one_denoiser(cluster, inputs, tmp_path):
    lines = check_http_equals_cli(cluster, inputs, tmp_path, 1)
    assert f"denoising step {STEPS}/{STEPS}" in "\n".join(lines)


def test_same_client_request_id_never_shares_state(cluster, inputs, tmp_path):
    """Two sync requests with one ``x-fal-request-id`` and different inputs, at the same time: each gets its own
    server id, conditioning and result (equal to its own CLI run), and the first result is not overwritten."""
    deploy(cluster, tmp_path / "data", 1)
    bodies = [body_for(inputs["short"]), dict(body_for(inputs["short"]), seed=SEED + 1)]
    answers: list = [None, None]

    def send(i: int) -> None:
        answers[i] = http_json("POST", f"{cluster}/run/{APP}", bodies[i], {"x-fal-request-id": "same-id"})

    threads = [threading.Thread(target=send, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    ids = [headers["x-fal-request-id"] for _, _, headers in answers]
    assert [code for code, _, _ in answers] == [200, 200], answers
    assert len(set(ids)) == 2 and "same-id" not in ids and all(len(i) == 32 for i in ids)
    references = [cli_reference(tmp_path, inputs["short"]), cli_reference(tmp_path, inputs["short"], seed=SEED + 1)]
    assert references[0] != references[1]
    for (_, result, _), reference in zip(answers, references, strict=True):
        assert http_bytes(result["video"]["url"]) == reference  # read again after both finished
    assert http_json("GET", f"{cluster}/{APP}/requests/same-id/status")[0] == 404


def test_python_handle_returns_the_output_model(cluster, inputs, tmp_path):
    deploy(cluster, tmp_path / "data", 1)
    handle = serve.get_app_handle(APP_NAME)
    output = handle.generate.remote(StableAvatarInput(**body_for(inputs["short"]))).result(timeout_s=300)
    assert isinstance(output, StableAvatarOutput)
    assert output.seed == SEED and output.video.file_size > 0
    assert http_bytes(output.video.url) == cli_reference(tmp_path, inputs["short"])


def test_bad_input_is_a_422_naming_the_field_and_the_service_stays_healthy(cluster, inputs, tmp_path):
    deploy(cluster, tmp_path / "data", 1)
    body = dict(body_for(inputs["short"]), image_url="data:image/png;base64,bm90IGFuIGltYWdl")
    code, result, _ = http_json("POST", f"{cluster}/run/fal-ai/stable-avatar", body)
    assert code in (415, 422) and result["detail"][0]["loc"] == ["body", "image_url"]
    code, result, _ = http_json("POST", f"{cluster}/run/fal-ai/stable-avatar", dict(body, num_inference_steps=0))
    assert code == 422 and "num_inference_steps" in result["detail"][0]["loc"]
    code, result, _ = http_json("GET", f"{cluster}/health")
    assert code == 200 and result["status"] == "ok"
    code, result, _ = http_json("POST", f"{cluster}/run/fal-ai/stable-avatar", body_for(inputs["short"]))
    assert code == 200
    tampered = result["video"]["url"].replace("sig=", "sig=x")
    with pytest.raises(urllib.error.HTTPError) as err:
        http_bytes(tampered)
    assert err.value.code == 403


def test_http_output_equals_cli_with_three_denoisers(cluster, inputs, tmp_path):
    lines = check_http_equals_cli(cluster, inputs, tmp_path, 3)
    # 5 windows, 3 replicas taking one window-step each at a time: every step ran on all three.
    steps = [line for line in lines if line.startswith("denoising step ")]
    assert len(steps) == STEPS and all("5 windows on 3 replicas" in line for line in steps), steps


def test_killed_denoiser_replica_does_not_change_the_result(cluster, inputs, tmp_path):
    """Kill a Denoiser replica while it holds a window-step: the executor runs that step again on another
    replica, the job's log says so, and the video is still the CLI's."""
    deploy(cluster, tmp_path / "data", 3)
    code, submitted, _ = http_json("POST", f"{cluster}/{APP}", dict(body_for(inputs["long"]), num_inference_steps=6))
    assert code == 200, submitted
    rid = submitted["request_id"]
    replicas = [ray.get_actor(a["name"], namespace="serve") for a in ray.util.list_named_actors(all_namespaces=True)
                if a["name"].startswith("SERVE_REPLICA::") and "#Denoiser#" in a["name"]]
    assert len(replicas) == 3
    pids = [ray.get(r.__ray_call__.remote(lambda _replica: os.getpid())) for r in replicas]
    deadline = time.monotonic() + 240
    while True:
        assert time.monotonic() < deadline, "no Denoiser replica was ever seen holding a window-step"
        state = http_json("GET", f"{cluster}/{APP}/requests/{rid}/status")[1]
        assert state["status"] != "COMPLETED", state
        if state["progress"]["stage"] == "denoising" and state["progress"]["fraction"] >= 1 / 6:
            busy = [pid for r, pid in zip(replicas, pids, strict=True)
                    if ray.get(r.get_num_ongoing_requests.remote()) > 0]
            if busy:  # SIGKILL at once (ray.kill is asynchronous: the step in flight could finish first)
                os.kill(busy[0], signal.SIGKILL)
                break
        time.sleep(0.01)
    while (state := http_json("GET", f"{cluster}/{APP}/requests/{rid}/status?logs=1")[1])["status"] != "COMPLETED":
        assert time.monotonic() < deadline + 240, state
        time.sleep(0.1)
    assert "error" not in state, state
    retried = [e for e in state["logs"] if "the Denoiser replica failed" in e["message"]]
    assert retried and all(e["level"] == "WARN" for e in retried), [e["message"] for e in state["logs"]]
    output = http_json("GET", f"{cluster}/{APP}/requests/{rid}")[1]
    assert http_bytes(output["video"]["url"]) == cli_reference(tmp_path, inputs["long"], steps=6)


def test_s3_storage_serves_a_presigned_mp4(cluster, seaweedfs, inputs, tmp_path):
    deploy(cluster, tmp_path / "data", 1, storage={
        "kind": "s3", "bucket": seaweedfs.bucket, "prefix": "svc", "endpoint_url": seaweedfs.endpoint_url,
        "url_expiry_s": 600})
    code, result, _ = http_json("POST", f"{cluster}/run/fal-ai/stable-avatar", body_for(inputs["short"]))
    assert code == 200, result
    url = result["video"]["url"]
    assert url.startswith(seaweedfs.endpoint_url) and "X-Amz-Signature" in url
    assert http_bytes(url) == cli_reference(tmp_path, inputs["short"])
