"""The Ray Serve application on a real local Ray cluster (fake GPUs), against the in-process CLI.

For every unit setting (batch-3 or split guidance rows, acceleration none or high) the service's mp4 equals
``stable-avatar generate`` with the same settings, on 1 and 3 Denoiser replicas and after a Denoiser replica died
holding work. The kill is a test hook inside the replica (``STABLE_AVATAR_TEST_CRASH_FILE``): the first replica
that receives the named unit exits, so it always lands on a replica that holds work, and the job's logs must show
the executor's retry. A second hook (``STABLE_AVATAR_TEST_HANG_FILE``) wedges the forward of a named unit instead:
a hung replica, which the unit timeout bypasses and Serve's health check replaces.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error

import pytest
import ray
import yaml
from ray import serve

from deployments.config import APP_NAME
from deployments.contracts import rank_slot
from deployments.workers.denoiser import CRASH_FILE_ENV, HANG_FILE_ENV
from deployments.workers.placement import place_units
from pipeline.schema import StableAvatarInput, StableAvatarOutput
from stable_avatar.cli import main as cli_main
from testing.http import http_bytes, http_json, queued_video
from testing.media import EXAMPLE_IMAGE, data_uri, probe, synthetic_speech

STEPS, SEED = 3, 5
# Split rows and a step cache that skips on the tiny preset: its random time embedder moves e0 far outside
# TeaCache's fitted range, so the guard would compute every step; unguarded, "high" over 6 steps is C C S S S C.
CACHED_STEPS = 6
CACHED_PIPELINE = {"split_guidance_rows": True,
                   "step_cache": {"always_compute_first": 2, "guard_fitted_range": False}}
APP = "fal-ai/stable-avatar"


@pytest.fixture(scope="module")
def crash_file(tmp_path_factory):
    return tmp_path_factory.mktemp("hooks") / "crash.json"


@pytest.fixture(scope="module")
def hang_file(tmp_path_factory):
    return tmp_path_factory.mktemp("hooks") / "hang.json"


@pytest.fixture(scope="module")
def cluster(serve_cluster, seaweedfs, crash_file, hang_file):
    """The shared cluster's base URL. Every deployment of this module gives its replicas' environment the S3
    credentials (never in the config) and the hooks' file names."""
    _service.update(cluster=serve_cluster, env=seaweedfs.env() | {CRASH_FILE_ENV: str(crash_file),
                                                                  HANG_FILE_ENV: str(hang_file)})
    yield serve_cluster.base
    _deployed.clear()
    _service.clear()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inputs")
    return {"short": synthetic_speech(folder / "short.wav", 9.0), "long": synthetic_speech(folder / "long.wav", 24.0)}


_references: dict[tuple, bytes] = {}


def cli_reference(tmp_path, audio, steps=STEPS, seed=SEED, pipeline: dict | None = None,
                  acceleration: str | None = None) -> bytes:
    """``stable-avatar generate`` with the service's ``pipeline:`` block (``--pipeline-config``); memoised."""
    key = (str(audio), steps, seed, json.dumps(pipeline, sort_keys=True), acceleration)
    if key not in _references:
        out = tmp_path / f"cli-{len(_references)}.mp4"
        argv = ["generate", "--image", str(EXAMPLE_IMAGE), "--audio", str(audio), "--prompt", "talking",
                "--steps", str(steps), "--seed", str(seed), "--aspect-ratio", "1:1", "--quiet", "-o", str(out)]
        if pipeline is not None:
            config = tmp_path / f"pipeline-{len(_references)}.yaml"
            config.write_text(yaml.safe_dump(pipeline))
            argv += ["--pipeline-config", str(config)]
        if acceleration is not None:
            argv += ["--acceleration", acceleration]
        assert cli_main(argv) == 0
        _references[key] = out.read_bytes()
    return _references[key]


_deployed: list[str] = []
_service: dict = {}  # "cluster": the RayServeCluster, "env": the replicas' environment


def deploy(base_url: str, root, denoisers: int, storage: dict | None = None, pipeline: dict | None = None,
           timeouts: dict | None = None, health_check_period_s: float | None = None) -> None:
    """Deploy (or keep) the app with this Denoiser count, storage, pipeline and timeouts blocks (and the Denoisers'
    health-check period); redeploys only on change. Jobs live in SQLite under ``root`` (with S3 storage too: one
    machine)."""
    key = f"{denoisers}/{storage}/{pipeline}/{timeouts}/{health_check_period_s}"
    if _deployed and _deployed[-1] == key:
        return
    _deployed.append(key)
    _service["cluster"].deploy({
        "device": "cpu",
        "storage": storage or {"kind": "local", "root": str(root), "public_base_url": base_url},
        "jobs": {"kind": "sqlite", "path": str(root / "jobs.sqlite3")},
        "dispatch": {"lease_s": 10, "heartbeat_s": 1, "poll_interval_s": 0.2},
        "denoiser": {"num_replicas": denoisers, "num_gpus": 1, "health_check_period_s": health_check_period_s},
        "pipeline": pipeline or {},
        "timeouts": timeouts or {},
    }, env=_service["env"])
    status = serve.status().applications[APP_NAME].deployments["Denoiser"].replica_states
    assert status.get("RUNNING") == denoisers, status


def body_for(audio, steps=STEPS, **extra) -> dict:
    return {"image_url": data_uri(EXAMPLE_IMAGE, "image/png"), "audio_url": data_uri(audio, "audio/wav"),
            "prompt": "talking", "num_inference_steps": steps, "seed": SEED, "aspect_ratio": "1:1", **extra}


def run_sync(cluster, body: dict) -> tuple[bytes, str]:
    """POST /run: (the mp4, the request id)."""
    code, result, headers = http_json("POST", f"{cluster}/run/fal-ai/stable-avatar", body)
    assert code == 200, result
    assert result["seed"] == SEED and result["video"]["content_type"] == "video/mp4"
    video = http_bytes(result["video"]["url"])
    assert len(video) == result["video"]["file_size"]
    return video, {k.lower(): v for k, v in headers.items()}["x-fal-request-id"]


def run_queued(cluster, body: dict) -> tuple[bytes, list[str]]:
    """Through the fal queue: (the mp4, the job's log messages)."""
    return queued_video(cluster, body)


def denoiser_stats(request_id: str, replicas: int) -> dict[str, dict]:
    """Each Denoiser replica's stats for ``request_id`` (``replicas`` consecutive rank slots reach each once)."""
    handle = serve.get_deployment_handle("Denoiser", APP_NAME)
    answers = [handle.stats.remote(request_id, rank_slot(request_id, i)).result(timeout_s=60)
               for i in range(replicas)]
    return {answer["replica"]: answer for answer in answers}


def probe_bytes(tmp_path, data: bytes) -> dict:
    path = tmp_path / "probe.mp4"
    path.write_bytes(data)
    return probe(path)


# -- batch-3 units (the default) ---------------------------------------------------------------------------------
def test_http_output_equals_cli_with_one_denoiser(cluster, inputs, tmp_path):
    deploy(cluster, tmp_path / "data", 1)
    video, _ = run_sync(cluster, body_for(inputs["short"]))
    assert video == cli_reference(tmp_path, inputs["short"])
    info = probe_bytes(tmp_path, video)
    assert {s["codec_name"] for s in info["streams"]} == {"h264", "aac"}
    # acceleration "none" asked for explicitly is the same video: the step cache is never entered
    explicit, _ = run_sync(cluster, body_for(inputs["short"], acceleration="none"))
    assert explicit == video


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
    code, result, _ = http_json("POST", f"{cluster}/run/fal-ai/stable-avatar", dict(body, acceleration="max"))
    assert code == 422 and result["detail"][0]["loc"] == ["body", "acceleration"]
    code, result, _ = http_json("GET", f"{cluster}/health")
    assert code == 200 and result["status"] == "ok"
    code, result, _ = http_json("POST", f"{cluster}/run/fal-ai/stable-avatar", body_for(inputs["short"]))
    assert code == 200
    tampered = result["video"]["url"].replace("sig=", "sig=x")
    with pytest.raises(urllib.error.HTTPError) as err:
        http_bytes(tampered)
    assert err.value.code == 403


def test_http_output_equals_cli_with_three_denoisers_that_all_worked(cluster, inputs, tmp_path):
    deploy(cluster, tmp_path / "data", 3)
    video, request_id = run_sync(cluster, body_for(inputs["short"]))
    assert video == cli_reference(tmp_path, inputs["short"])
    stats = denoiser_stats(request_id, 3)
    assert len(stats) == 3
    # 9 s: 5 windows, one unit each per step, placed by the router's rule (rendezvous, load cap) at every step
    placement = place_units(request_id, 5, sorted(stats))
    expected = {replica: STEPS * placement.count(replica) for replica in sorted(stats)}
    assert {replica: s["units"] for replica, s in stats.items()} == expected
    assert sorted(expected.values()) == [STEPS, 2 * STEPS, 2 * STEPS]
    assert all(request_id not in s["conditioning_cached"] for s in stats.values())  # freed when it finished


def test_killed_denoiser_replica_is_retried_and_does_not_change_the_result(cluster, inputs, tmp_path, crash_file):
    deploy(cluster, tmp_path / "data", 3)
    crash_file.write_text(json.dumps({"step": 2, "window": 1}))  # the replica holding that unit exits
    video, logs = run_queued(cluster, body_for(inputs["long"], steps=6))
    assert not crash_file.exists() and crash_file.with_suffix(".claimed").exists()  # a replica did exit
    crash_file.with_suffix(".claimed").unlink()
    retries = [m for m in logs if "the Denoiser replica failed" in m and "running it again" in m]
    assert any(m.startswith("window 1 step 3 ") for m in retries), logs
    assert video == cli_reference(tmp_path, inputs["long"], steps=6)


def denoiser_replicas() -> set[str]:
    prefix = f"SERVE_REPLICA::{APP_NAME}#Denoiser#"
    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)}


def test_a_hung_denoiser_replica_is_bypassed_and_replaced(cluster, inputs, tmp_path, hang_file):
    """A replica whose forward never returns (a wedged GPU) is not dead: the unit is cancelled after
    ``timeouts.unit_s`` and sent to the next replica, the video does not change, and the hung replica's health
    check fails until Serve replaces it."""
    unit_s = 20.0
    deploy(cluster, tmp_path / "data", 2, timeouts={"unit_s": unit_s}, health_check_period_s=3)
    before = denoiser_replicas()
    assert len(before) == 2
    hang_file.write_text(json.dumps({"step": 1, "window": 1, "hang_s": 600}))
    video, logs = run_queued(cluster, body_for(inputs["short"]))
    assert not hang_file.exists() and hang_file.with_suffix(".claimed").exists()  # a replica did hang
    hang_file.with_suffix(".claimed").unlink()
    assert any(m.startswith("window 1 step 2 ") and "overran its timeout" in m for m in logs), logs
    assert video == cli_reference(tmp_path, inputs["short"])
    deadline = time.monotonic() + 240  # 3 failed health checks 3 s apart, a graceful stop, a new replica
    while True:
        now = denoiser_replicas()
        status = serve.status().applications[APP_NAME].deployments["Denoiser"].replica_states
        if len(before - now) == 1 and status.get("RUNNING") == 2:
            break
        assert time.monotonic() < deadline, (before, now, status)
        time.sleep(2)


def test_s3_storage_serves_a_presigned_mp4(cluster, seaweedfs, inputs, tmp_path):
    deploy(cluster, tmp_path / "data", 1, storage={
        "kind": "s3", "bucket": seaweedfs.bucket, "prefix": "svc", "endpoint_url": seaweedfs.endpoint_url,
        "url_expiry_s": 600})
    code, result, _ = http_json("POST", f"{cluster}/run/fal-ai/stable-avatar", body_for(inputs["short"]))
    assert code == 200, result
    url = result["video"]["url"]
    assert url.startswith(seaweedfs.endpoint_url) and "X-Amz-Signature" in url
    assert http_bytes(url) == cli_reference(tmp_path, inputs["short"])


# -- split guidance rows and the step cache ----------------------------------------------------------------------
_cached_videos: dict[str, bytes] = {}


def check_split_and_cached_runs(cluster, inputs, tmp_path, denoisers: int) -> dict[str, dict]:
    """Split rows with acceleration none and high on ``denoisers`` replicas; each equals the CLI with the same
    settings. Returns the replicas' stats for the cached run."""
    deploy(cluster, tmp_path / "data", denoisers, pipeline=CACHED_PIPELINE)
    plain, _ = run_sync(cluster, body_for(inputs["short"], steps=CACHED_STEPS))
    assert plain == cli_reference(tmp_path, inputs["short"], CACHED_STEPS, pipeline=CACHED_PIPELINE)
    before = denoiser_stats("stats", denoisers)
    cached, request_id = run_sync(cluster, body_for(inputs["short"], steps=CACHED_STEPS, acceleration="high"))
    assert cached == cli_reference(tmp_path, inputs["short"], CACHED_STEPS, pipeline=CACHED_PIPELINE,
                                   acceleration="high")
    assert cached != plain  # steps really reused residuals
    for name, video in (("plain", plain), ("cached", cached)):
        assert _cached_videos.setdefault(name, video) == video  # the same bytes on 1 and 3 replicas
    after = denoiser_stats(request_id, denoisers)
    units = 5 * 3  # 5 windows x 3 rows per step
    reused = sum(a["step_cache"]["reused"] - before[r]["step_cache"]["reused"] for r, a in after.items())
    rebuilt = sum(a["step_cache"]["rebuilt"] - before[r]["step_cache"]["rebuilt"] for r, a in after.items())
    assert (reused, rebuilt) == (3 * units, 0)  # C C S S S C, every unit on its own replica: never rebuilt
    assert sum(a["residuals"] for a in after.values()) == 0  # the last step and the release freed them
    assert sum(a["units"] for a in after.values()) == CACHED_STEPS * units
    return after


# The three-replica tests run back to back: one deployment for both (a change restarts every replica).
def test_split_rows_and_step_cache_equal_the_cli_on_three_denoisers(cluster, inputs, tmp_path):
    stats = check_split_and_cached_runs(cluster, inputs, tmp_path, 3)
    assert sorted(s["units"] for s in stats.values()) == [CACHED_STEPS * 5] * 3  # 15 units per step, 5 each


def test_cached_run_after_a_replica_kill_is_identical(cluster, inputs, tmp_path, crash_file):
    """The kill lands on a skipped step (3 of C C S S S C): the unit's residual died with its replica, so the
    retry rebuilds it from the anchor latents elsewhere, and the video does not change."""
    deploy(cluster, tmp_path / "data", 3, pipeline=CACHED_PIPELINE)
    crash_file.write_text(json.dumps({"step": 3, "window": 2}))
    video, logs = run_queued(cluster, body_for(inputs["short"], steps=CACHED_STEPS, acceleration="high"))
    assert not crash_file.exists()
    crash_file.with_suffix(".claimed").unlink()
    assert any(m.startswith("window 2 step 4 ") and "running it again" in m for m in logs), logs
    assert any("acceleration high: 3 of 6 steps computed" in m for m in logs), logs
    assert video == cli_reference(tmp_path, inputs["short"], CACHED_STEPS, pipeline=CACHED_PIPELINE,
                                  acceleration="high")


def test_split_rows_and_step_cache_are_the_same_on_one_denoiser(cluster, inputs, tmp_path):
    check_split_and_cached_runs(cluster, inputs, tmp_path, 1)
