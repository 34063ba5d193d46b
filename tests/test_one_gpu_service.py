"""``examples/serve_config.one-gpu.yaml``'s shape on a real local Ray cluster whose one node has ONE (fake) GPU.

Only what cannot exist here changes: the tiny preset instead of the checkpoints, the storage folder (SQLite follows
it) and the proxy's port. The deployments, their GPU shares, CPU reservations and replica bounds, and the pipeline
block (memory mode ``block_offload``, the prompt cache, the step cache's bound) are the example's. Ray must place
every share on the one GPU; ``device: auto`` finds no CUDA there and runs the replicas on the CPU with the GPU dtypes
(bf16), so the video must equal ``stable-avatar generate --dtype-policy gpu`` with the same pipeline block. A second
request with the same prompt must find its T5 embedding in the Preprocessor's prompt cache (its readiness answer and
the Prometheus metrics say so).
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml
from ray import serve

from deployments.config import APP_NAME
from stable_avatar.cli import main as cli_main
from testing.http import http_bytes, http_json, scrape
from testing.media import EXAMPLE_IMAGE, REPO_ROOT, data_uri, probe, synthetic_speech
from testing.ray_serve import ray_serve_cluster

pytestmark = pytest.mark.serve  # a cluster of its own: one fake GPU, as on the one card

EXAMPLE = REPO_ROOT / "examples" / "serve_config.one-gpu.yaml"
CHANGED = {"preset", "checkpoints", "storage"}  # what the test may not take from the example
STEPS, SEED, AUDIO_S = 2, 11, 2.0
MODEL_DEPLOYMENTS = ("Preprocessor", "Denoiser", "Postprocessor")
BLOCK_OFFLOAD_COMPONENTS = {  # where block_offload puts each model (readiness answers)
    "Preprocessor": {"audio_encoder": "model_offload", "vae": "model_offload", "image_encoder": "model_offload",
                     "text_encoder": "block_offload"},
    "Denoiser": {"transformer": "block_offload"},
    "Postprocessor": {"vae": "model_offload"},
}


def example_args() -> dict[str, Any]:
    return yaml.safe_load(EXAMPLE.read_text())["applications"][0]["args"]


def tiny_shape(example: dict[str, Any], storage: dict[str, Any]) -> dict[str, Any]:
    """The example's args with the tiny preset and this test's storage; everything else as shipped."""
    args = copy.deepcopy(example)
    args.pop("checkpoints")
    args.update(preset="tiny", storage=storage)
    return args


@pytest.fixture(scope="module")
def one_gpu(tmp_path_factory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("one-gpu")
    with ray_serve_cluster(num_cpus=4, num_gpus=1, metrics=True) as cluster:
        args = tiny_shape(example_args(), cluster.local_storage(root / "data"))
        deployed = cluster.deploy(args)
        yield {"base": cluster.base, "metrics": cluster.metrics_url, "args": args, "deployed": deployed,
               "root": root}


@pytest.fixture(scope="module")
def speech(tmp_path_factory) -> Path:
    return synthetic_speech(tmp_path_factory.mktemp("speech") / "speech.wav", AUDIO_S)


def body(speech: Path, prompt: str) -> dict[str, Any]:
    return {"image_url": data_uri(EXAMPLE_IMAGE, "image/png"), "audio_url": data_uri(speech, "audio/wav"),
            "prompt": prompt, "num_inference_steps": STEPS, "seed": SEED, "aspect_ratio": "1:1"}


def run_sync(base: str, request: dict[str, Any]) -> bytes:
    code, result, _ = http_json("POST", f"{base}/run/fal-ai/stable-avatar", request, timeout=600)
    assert code == 200, result
    video = http_bytes(result["video"]["url"])
    assert len(video) == result["video"]["file_size"] and result["seed"] == SEED
    return video


def readiness(deployment: str) -> dict[str, Any]:
    return serve.get_deployment_handle(deployment, APP_NAME).ready.remote().result(timeout_s=60)


def test_only_the_weights_and_the_storage_differ_from_the_example(one_gpu):
    example = example_args()
    differ = {key for key in set(example) | set(one_gpu["args"]) if example.get(key) != one_gpu["args"].get(key)}
    assert differ == CHANGED
    assert one_gpu["deployed"].pipeline.memory.mode == "block_offload"


def test_ray_places_every_model_deployment_on_the_one_gpu(one_gpu):
    """All five deployments run (one replica each: the Denoiser's bounds are 1..1) and the three model
    deployments' shares fill the node's single GPU."""
    deployments = serve.status().applications[APP_NAME].deployments
    assert {name: dict(d.replica_states) for name, d in deployments.items()} == {
        name: {"RUNNING": 1} for name in ("Gateway", "Orchestrator", *MODEL_DEPLOYMENTS)}
    assert ray.cluster_resources()["GPU"] == 1
    deadline = time.monotonic() + 30  # the resource view reaches the driver a moment after the actors start
    while ray.available_resources().get("GPU", 0) > 0 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert ray.available_resources().get("GPU", 0) == 0


@pytest.mark.parametrize("deployment", MODEL_DEPLOYMENTS)
def test_each_model_deployment_reports_its_memory_mode(one_gpu, deployment):
    answer = readiness(deployment)
    assert answer["deployment"] == deployment
    assert answer["memory"]["mode"] == "block_offload" and answer["memory"]["device"] == "cpu"
    assert answer["memory"]["components"] == BLOCK_OFFLOAD_COMPONENTS[deployment]
    assert answer["memory"]["fp8_weights"] == []


def test_a_job_on_the_one_gpu_shape_equals_generate_with_the_same_settings(one_gpu, speech, tmp_path):
    prompt = "a woman talking in a bright studio"
    video = run_sync(one_gpu["base"], body(speech, prompt))
    pipeline_config = tmp_path / "pipeline.yaml"
    pipeline_config.write_text(yaml.safe_dump(one_gpu["args"]["pipeline"]))
    out = tmp_path / "generate.mp4"
    assert cli_main(["generate", "--image", str(EXAMPLE_IMAGE), "--audio", str(speech), "--prompt", prompt,
                     "--steps", str(STEPS), "--seed", str(SEED), "--aspect-ratio", "1:1", "--dtype-policy", "gpu",
                     "--pipeline-config", str(pipeline_config), "--quiet", "-o", str(out)]) == 0
    assert video == out.read_bytes()
    (tmp_path / "service.mp4").write_bytes(video)
    info = probe(tmp_path / "service.mp4")
    assert {s["codec_name"] for s in info["streams"]} == {"h264", "aac"}
    assert abs(float(info["format"]["duration"]) - AUDIO_S) < 0.1


def test_a_repeated_prompt_and_image_are_cache_hits(one_gpu, speech):
    """Per Preprocessor replica (the example has one): the first request with a prompt runs T5 and the first with a
    reference image (at a size) runs the VAE and CLIP on it (misses), the second finds both (hits); the counters and
    gauges of both caches reach Prometheus."""
    caches = ("prompt_cache", "reference_cache")
    before = {cache: readiness("Preprocessor")[cache] for cache in caches}
    prompt = "the same prompt, twice"
    run_sync(one_gpu["base"], body(speech, prompt))
    first = {cache: readiness("Preprocessor")[cache] for cache in caches}
    # the image may have come before this test: then the first request is already a reference-cache hit
    image_new = first["reference_cache"]["misses"] - before["reference_cache"]["misses"]
    assert image_new in (0, 1)
    assert (first["prompt_cache"]["misses"], first["prompt_cache"]["hits"], first["prompt_cache"]["entries"]) == (
        before["prompt_cache"]["misses"] + 1, before["prompt_cache"]["hits"], before["prompt_cache"]["entries"] + 1)
    assert (first["reference_cache"]["hits"], first["reference_cache"]["entries"]) == (
        before["reference_cache"]["hits"] + 1 - image_new, before["reference_cache"]["entries"] + image_new)
    run_sync(one_gpu["base"], body(speech, prompt))
    second = {cache: readiness("Preprocessor")[cache] for cache in caches}
    for cache in caches:
        assert (second[cache]["misses"], second[cache]["hits"], second[cache]["entries"]) == (
            first[cache]["misses"], first[cache]["hits"] + 1, first[cache]["entries"]), cache
    pipeline = one_gpu["deployed"].pipeline
    assert 0 < second["prompt_cache"]["bytes"] <= pipeline.prompt_cache_bytes
    assert 0 < second["reference_cache"]["bytes"] <= pipeline.reference_cache_bytes

    wanted = {f"stable_avatar_{cache}_{name}": second[cache][stat] for cache in caches
              for name, stat in (("hits_total", "hits"), ("misses_total", "misses"), ("entries", "entries"),
                                 ("bytes", "bytes"))}
    deadline = time.monotonic() + 90
    while True:  # replicas push metrics to the node's agent every few seconds
        seen = {name: scrape(one_gpu["metrics"]).get(name) for name in wanted}
        if seen == wanted or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert seen == wanted
