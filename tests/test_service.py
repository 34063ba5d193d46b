"""The Ray Serve application on a real local Ray cluster (fake GPUs), against the in-process CLI."""

from __future__ import annotations

import os
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
    out = tmp_path / f"cli-{audio.stem}.mp4"
    assert cli_main(["generate", "--image", str(EXAMPLE_IMAGE), "--audio", str(audio), "--prompt", "talking",
                     "--steps", str(steps), "--seed", str(seed), "--aspect-ratio", "1:1", "--quiet",
                     "-o", str(out)]) == 0
    return out.read_bytes()


_deployed: list[str] = []


def deploy(base_url: str, root, denoisers: int, storage: dict | None = None) -> None:
    """Deploy (or keep) the app with this Denoiser count and storage; redeploys only when they change."""
    key = f"{denoisers}/{storage}"
    if _deployed and _deployed[-1] == key:
        return
    _deployed.append(key)
    args = AppArgs.model_validate({
        "device": "cpu",
        "storage": storage or {"kind": "local", "root": str(root), "public_base_url": base_url},
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


def check_http_equals_cli(cluster, inputs, tmp_path, denoisers: int) -> None:
    deploy(cluster, tmp_path / "data", denoisers)
    status = serve.status().applications[APP_NAME].deployments["Denoiser"].replica_states
    assert status.get("RUNNING") == denoisers
    code, result, headers = http_json("POST", f"{cluster}/run/fal-ai/stable-avatar", body_for(inputs["short"]))
    assert code == 200, result
    assert result["seed"] == SEED and result["video"]["content_type"] == "video/mp4"
    assert "x-fal-request-id" in {k.lower() for k in headers}
    video = http_bytes(result["video"]["url"])
    assert len(video) == result["video"]["file_size"]
    assert video == cli_reference(tmp_path, inputs["short"])
    info = probe_bytes(tmp_path, video)
    assert {s["codec_name"] for s in info["streams"]} == {"h264", "aac"}


def test_http_output_equals_cli_with_one_denoiser(cluster, inputs, tmp_path):
    check_http_equals_cli(cluster, inputs, tmp_path, 1)


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
    check_http_equals_cli(cluster, inputs, tmp_path, 3)


def test_killed_denoiser_replica_does_not_change_the_result(cluster, inputs, tmp_path):
    deploy(cluster, tmp_path / "data", 3)
    orchestrator = serve.get_deployment_handle("Orchestrator", APP_NAME)
    request_id = "kill-test"
    body = dict(body_for(inputs["long"]), num_inference_steps=6)
    response = orchestrator.generate.remote(StableAvatarInput(**body), request_id)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        state = orchestrator.get_progress.remote(request_id).result()
        if state and state["stage"] == "denoising" and state["step"] >= 1:
            break
        time.sleep(0.02)
    else:
        pytest.fail("the job never reached the denoising stage")
    replicas = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                if a["name"].startswith("SERVE_REPLICA::") and "#Denoiser#" in a["name"]]
    assert len(replicas) == 3
    ray.kill(ray.get_actor(replicas[0], namespace="serve"), no_restart=True)
    output = response.result(timeout_s=300)
    # The dead replica's in-flight window-step was re-run elsewhere (by Serve's router or our executor's retry).
    alive = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)}
    assert replicas[0] not in alive
    assert http_bytes(output.video.url) == cli_reference(tmp_path, inputs["long"], steps=6)


def test_s3_storage_serves_a_presigned_mp4(cluster, seaweedfs, inputs, tmp_path):
    deploy(cluster, tmp_path / "data", 1, storage={
        "kind": "s3", "bucket": seaweedfs.bucket, "prefix": "svc", "endpoint_url": seaweedfs.endpoint_url,
        "url_expiry_s": 600})
    code, result, _ = http_json("POST", f"{cluster}/run/fal-ai/stable-avatar", body_for(inputs["short"]))
    assert code == 200, result
    url = result["video"]["url"]
    assert url.startswith(seaweedfs.endpoint_url) and "X-Amz-Signature" in url
    assert http_bytes(url) == cli_reference(tmp_path, inputs["short"])
