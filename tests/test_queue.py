"""The fal queue protocol over plain HTTP on a real local Ray cluster, with job state in a real PostgreSQL
database: queue order, cancel, start deadlines, webhooks, uploads, leases (a killed runner, a restarted
application, two applications on one database and storage) and readiness."""

from __future__ import annotations

import http.server
import json
import re
import shutil
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import ray
from ray import serve

from deployments.config import APP_NAME, AppArgs
from deployments.jobstore import PostgresJobsConfig, SyncJobStore, make_sync_job_store
from stable_avatar.cli import main as cli_main
from testing.http import http_bytes, http_json, scrape
from testing.media import EXAMPLE_AUDIO, EXAMPLE_IMAGE, data_uri, synthetic_speech
from testing.ray_serve import delete_applications
from tests.test_webhook_signing import fal_receiver_accepts

APP = "fal-ai/stable-avatar"
DSN_ENV = "STABLE_AVATAR_TEST_QUEUE_DSN"  # the replicas read the DSN from here (their runtime_env)
SECOND_APP, SECOND_PREFIX = "stable-avatar-b", "/b"
REQUEST_ID = re.compile(r"[0-9a-f]{32}")
# A status read crosses the proxy and the Gateway (its CPU: bench/results/serve_costs.txt): the waits for a job's end
# poll 4 times a second; wait_progress, which must catch a short window, polls faster.
STATUS_POLL_S = 0.25


@pytest.fixture(scope="module")
def service(tmp_path_factory, postgres, serve_cluster):
    root = tmp_path_factory.mktemp("queue-data")
    dsn = postgres.create_database("queue")
    env = {DSN_ENV: dsn}
    try:
        with pytest.MonkeyPatch.context() as patch:  # this process's own store reads it too
            patch.setenv(DSN_ENV, dsn)
            config = {
                "device": "cpu", "max_running_jobs": 1, "short_job_slots": 0, "checkpoint_every_steps": 2, "webhook_first_delay_s": 0.2,
                "jobs": {"kind": "postgres", "dsn_env": DSN_ENV, "pool_max_size": 4, "connect_timeout_s": 5},
                # lease: short enough that the killed runner's job is reclaimed quickly, long enough that a replica
                # starved of CPU on a loaded 2-core machine still renews it in time
                "dispatch": {"lease_s": 10, "heartbeat_s": 1, "poll_interval_s": 0.2},
                "inputs": {"allow_private_hosts": ["127.0.0.1"]},  # the webhook receiver of these tests
                "storage": serve_cluster.local_storage(root),
                "denoiser": {"num_replicas": 2, "num_gpus": 1, "max_ongoing_requests": 1},
            }
            args = serve_cluster.deploy(config, env=env)
            store = make_sync_job_store(PostgresJobsConfig(dsn_env=DSN_ENV, pool_max_size=2), root / "unused")
            try:
                yield {"base": serve_cluster.base, "cluster": serve_cluster, "args": args, "config": config,
                       "env": env, "root": root, "metrics": serve_cluster.metrics_url, "store": store,
                       "postgres": postgres, "dsn": dsn}
            finally:
                store.close()
                delete_applications()  # before their database goes
    finally:
        postgres.drop_database(dsn)


@pytest.fixture(scope="module")
def long_audio(tmp_path_factory):
    return synthetic_speech(tmp_path_factory.mktemp("audio") / "long.wav", 24.0)


@pytest.fixture(scope="module")
def resumable_reference(tmp_path_factory, long_audio) -> bytes:
    """The uninterrupted CLI output of :func:`resumable_body` (the job the lease tests interrupt)."""
    return cli_reference(tmp_path_factory.mktemp("cli"), long_audio, 8, 21)


def job_body(audio=EXAMPLE_AUDIO, steps=2, seed=7, **extra) -> dict:
    return {"image_url": data_uri(EXAMPLE_IMAGE, "image/png"), "audio_url": data_uri(audio, "audio/wav"),
            "prompt": "a person talking", "num_inference_steps": steps, "seed": seed, "aspect_ratio": "1:1",
            **extra}


def resumable_body(long_audio) -> dict:
    return job_body(long_audio, steps=8, seed=21)


def submit(base: str, body: dict, query: str = "", headers: dict | None = None) -> dict:
    code, result, response_headers = http_json("POST", f"{base}/{APP}{query}", body, headers)
    assert code == 200, result
    assert response_headers.get("x-fal-request-id") == result["request_id"]
    assert REQUEST_ID.fullmatch(result["request_id"])  # issued by the server
    return result


def status(base: str, request_id: str, logs: str = "1") -> tuple[int, dict]:
    code, body, _ = http_json("GET", f"{base}/{APP}/requests/{request_id}/status?logs={logs}")
    return code, body


def wait_status(base: str, request_id: str, want=("COMPLETED",), timeout_s: float = 240, **check) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            _, body = status(base, request_id)
        except OSError:  # the proxy restarts its routes while an application is redeployed
            body = {"status": None}
        if body.get("status") in want and all(body.get(k) == v for k, v in check.items()):
            return body
        time.sleep(STATUS_POLL_S)
    raise AssertionError(f"{request_id} did not reach {want}: {body}")


def wait_progress(base: str, request_id: str, min_fraction: float, timeout_s: float = 240) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        _, body = status(base, request_id)
        if body["status"] == "IN_PROGRESS" and body["progress"]["fraction"] >= min_fraction:
            return body
        assert body["status"] != "COMPLETED", body
        time.sleep(0.02)
    raise AssertionError("no progress")


def messages(body: dict) -> list[str]:
    return [entry["message"] for entry in body["logs"]]


def stored_keys(root: Path, prefix: str) -> list[str]:
    folder = root / prefix
    return sorted(str(p.relative_to(root)) for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def assert_only_the_named_checkpoint(service, request_id: str, at_most: bool = False) -> None:
    """The job's checkpoint objects are exactly the one its row names (older ones were pruned as newer ones were
    recorded; the named one is deleted by retention alone)."""
    kept = stored_keys(service["root"], f"checkpoints/{request_id}")
    assert len(kept) <= 1 if at_most else len(kept) == 1, kept
    assert service["store"].named_keys(kept) == set(kept), kept


def test_submit_status_result_roundtrip(service):
    base = service["base"]
    submitted = submit(base, job_body(), headers={"x-fal-request-id": "client-chosen"})
    rid = submitted["request_id"]
    assert submitted["status"] == "IN_QUEUE" and submitted["queue_position"] == 0  # nothing else is queued
    assert submitted["status_url"] == f"{base}/{APP}/requests/{rid}/status"
    assert submitted["response_url"] == f"{base}/{APP}/requests/{rid}"
    assert submitted["cancel_url"] == f"{base}/{APP}/requests/{rid}/cancel"
    assert status(base, "client-chosen")[0] == 404  # the client's header never names a job
    seen = set()
    while True:
        code, body = status(base, rid, logs="true")
        seen.add(body["status"])
        if body["status"] == "COMPLETED":
            assert code == 200
            break
        assert code == 202
        if body["status"] == "IN_QUEUE":
            assert body["queue_position"] == 0
        time.sleep(STATUS_POLL_S)
    assert isinstance(body["logs"], list) and body["metrics"]["inference_time"] > 0 and "error" not in body
    lines = messages(body)
    assert any(m.startswith("downloaded image") for m in lines)
    assert any(m.startswith("denoising step 2/2") and "replica" in m for m in lines)
    assert any(m.startswith("encoded") and "uploaded" in m for m in lines)
    assert any(m.startswith("running on stable-avatar#Orchestrator#") for m in lines)  # the runner is named
    assert {"message", "level", "source", "timestamp"} == set(body["logs"][0])
    for flag in ("0", "false"):
        assert status(base, rid, logs=flag)[1]["logs"] is None
    code, output, headers = http_json("GET", f"{base}/{APP}/requests/{rid}")
    assert code == 200 and headers["x-fal-request-id"] == rid
    assert output["seed"] == 7 and output["video"]["content_type"] == "video/mp4"
    assert len(http_bytes(output["video"]["url"])) == output["video"]["file_size"]
    assert status(base, rid)[0] == 200  # COMPLETED is stable
    # The row holds references: the data: inputs were stored once under the job's own key.
    owner_inputs = stored_keys(service["root"], f"inputs/public/{rid}")
    assert owner_inputs == [f"inputs/public/{rid}/audio.wav", f"inputs/public/{rid}/image.png"]
    assert (service["root"] / owner_inputs[1]).read_bytes() == EXAMPLE_IMAGE.read_bytes()
    row = service["store"].get(rid, "")
    assert row.attempts == 1 and row.epoch == 1 and row.result_keys == [f"results/{rid}/e1/output.mp4"]


def test_metrics_move_with_a_job(service):
    base, url = service["base"], service["metrics"]
    before = scrape(url)
    rid = submit(base, job_body())["request_id"]
    wait_status(base, rid)
    wanted = {"stable_avatar_jobs_total[submitted]", "stable_avatar_jobs_total[completed]",
              "stable_avatar_window_step_seconds_count", "stable_avatar_job_latency_seconds_count",
              "stable_avatar_time_in_queue_seconds_count", "stable_avatar_stage_seconds_count[denoise]",
              "stable_avatar_bytes_total[downloaded]", "stable_avatar_bytes_total[uploaded]",
              "stable_avatar_output_video_seconds_total"}
    deadline = time.monotonic() + 60
    while True:  # replicas push metrics to the node's agent every few seconds
        after = scrape(url)
        moved = {name for name in wanted if after.get(name, 0) > before.get(name, 0)}
        if moved == wanted or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert moved == wanted, wanted - moved
    assert "stable_avatar_queue_length" in after


def test_validation_errors(service):
    base = service["base"]
    code, body, _ = http_json("POST", f"{base}/{APP}", job_body(num_inference_steps=0))
    assert code == 422 and body["detail"][0]["loc"] == ["body", "num_inference_steps"]
    code, body, _ = http_json("POST", f"{base}/{APP}", {"image_url": "x", "audio_url": "y"})
    assert code == 422 and ["body", "prompt"] in [d["loc"] for d in body["detail"]]
    # A data: URI that is not base64 is refused at submit (it is decoded there, once, to be stored).
    code, body, _ = http_json("POST", f"{base}/{APP}", job_body(image_url="data:image/png;base64,not base64!"))
    assert code == 422 and body["detail"][0]["loc"] == ["body", "image_url"]
    # Bad media is found while the job runs: it completes with an error; the result is the 422.
    rid = submit(base, job_body(image_url="data:image/png;base64,bm90IGFuIGltYWdl"))["request_id"]
    done = wait_status(base, rid)
    assert done["error"] and done["error_type"] == "validation_error"
    code, body, _ = http_json("GET", f"{base}/{APP}/requests/{rid}")
    assert code in (415, 422) and body["detail"][0]["loc"] == ["body", "image_url"]  # 415: not an image
    code, body, _ = http_json("GET", f"{base}/{APP}/requests/nope/status")
    assert code == 404


def test_cancel_queued_and_running_and_completed(service, long_audio):
    base = service["base"]
    steps = 40
    running = submit(base, job_body(long_audio, steps=steps))["request_id"]
    queued = submit(base, job_body())["request_id"]
    wait_progress(base, running, 0.02)
    assert status(base, queued)[1]["status"] == "IN_QUEUE"
    code, body, _ = http_json("PUT", f"{base}/{APP}/requests/{queued}/cancel")
    assert (code, body) == (202, {"status": "CANCELLATION_REQUESTED"})
    assert wait_status(base, queued)["error_type"] == "client_cancelled"
    code, body, _ = http_json("PUT", f"{base}/{APP}/requests/{running}/cancel")
    assert code == 202
    cancelled_at = time.monotonic()
    done = wait_status(base, running, timeout_s=60)
    assert done["error_type"] == "client_cancelled"
    # Interrupted, not run out: its last step never ran, and the cancel took effect within a few steps' time
    # (bounded loosely: a loaded machine slows the step in flight, which is not interrupted).
    assert not any(m.startswith(f"denoising step {steps}/{steps}") for m in messages(done)), messages(done)
    assert time.monotonic() - cancelled_at < 30
    assert http_json("GET", f"{base}/{APP}/requests/{running}")[0] == 499
    code, body, _ = http_json("PUT", f"{base}/{APP}/requests/{running}/cancel")
    assert (code, body) == (400, {"status": "ALREADY_COMPLETED"})
    assert http_json("PUT", f"{base}/{APP}/requests/unknown/cancel")[:2] == (404, {"status": "NOT_FOUND"})
    # A cancelled job leaves at most the checkpoint its row names (retention deletes it after checkpoints_s).
    assert_only_the_named_checkpoint(service, running, at_most=True)
    # The Denoiser replicas are free: the next job runs at once.
    started = time.monotonic()
    wait_status(base, submit(base, job_body())["request_id"])
    assert time.monotonic() - started < 60


def test_queue_order_priority_limits_and_start_timeout(service, long_audio):
    base = service["base"]
    blocker = submit(base, job_body(long_audio, steps=30))["request_id"]
    wait_progress(base, blocker, 0.0)
    normal_1 = submit(base, job_body())
    low = submit(base, job_body(), headers={"X-Fal-Queue-Priority": "low"})
    normal_2 = submit(base, job_body())
    # Positions at submit: jobs ahead in dispatch order (normal before low, then first come first served).
    assert (normal_1["queue_position"], low["queue_position"], normal_2["queue_position"]) == (0, 1, 1)
    ids = normal_1["request_id"], normal_2["request_id"], low["request_id"]
    positions = {rid: status(base, rid)[1]["queue_position"] for rid in ids}
    assert positions == dict(zip(ids, (0, 1, 2), strict=True))
    code, body, headers = http_json("POST", f"{base}/{APP}?fal_max_queue_length=3", job_body())
    assert code == 429 and body["error_type"] == "queue_full" and "limit 3" in body["detail"]
    assert int(headers["retry-after"]) >= 1
    timed = submit(base, job_body(), headers={"X-Fal-Request-Timeout": "1.5"})["request_id"]
    done = wait_status(base, timed, timeout_s=30)
    assert done["error_type"] == "request_timeout"
    assert status(base, ids[0])[1]["status"] == "IN_QUEUE"  # the timeout came while the queue was blocked
    code, body, headers = http_json("GET", f"{base}/{APP}/requests/{timed}")
    assert code == 504 and headers.get("x-fal-request-timeout-type") == "user"
    http_json("PUT", f"{base}/{APP}/requests/{blocker}/cancel")
    finished = [wait_status(base, rid) for rid in ids]
    assert all("error" not in f for f in finished)
    # They ran in dispatch order: normal_1, normal_2, then low.
    started = {rid: service["store"].get(rid, "").started_at for rid in ids}
    assert started[ids[0]] < started[ids[1]] < started[ids[2]]


def test_status_stream_sends_new_logs_and_closes(service):
    base = service["base"]
    rid = submit(base, job_body())["request_id"]
    request = urllib.request.Request(f"{base}/{APP}/requests/{rid}/status/stream?logs=1",
                                     headers={"accept": "text/event-stream"})
    events = []
    with urllib.request.urlopen(request, timeout=120) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        for raw in response:
            line = raw.decode().strip()
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    assert events[-1]["status"] == "COMPLETED"
    all_logs = [entry["message"] for event in events for entry in event["logs"]]
    final = status(base, rid)[1]["logs"]
    assert [e["message"] for e in final] == all_logs  # each event carried only the new lines


class WebhookReceiver(http.server.BaseHTTPRequestHandler):
    calls: list[tuple[int, dict]] = []
    signed: list[tuple[dict[str, str], bytes]] = []  # each delivery's headers and raw body
    fail_first = 1

    def do_POST(self):  # noqa: N802 - http.server naming
        raw = self.rfile.read(int(self.headers["content-length"]))
        body = json.loads(raw)
        code = 500 if sum(1 for c, _ in self.calls) < self.fail_first else 200
        self.calls.append((code, body))
        self.signed.append(({k.lower(): v for k, v in self.headers.items()}, raw))
        self.send_response(code)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_webhook_is_retried_then_delivered_once(service):
    base = service["base"]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), WebhookReceiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        hook = f"http://127.0.0.1:{server.server_address[1]}/hook"
        rid = submit(base, job_body(), query=f"?fal_webhook={hook}")["request_id"]
        wait_status(base, rid)
        deadline = time.monotonic() + 30
        while not any(code == 200 for code, _ in WebhookReceiver.calls) and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.5)  # several polls of the outbox later: still exactly one success
        assert [code for code, _ in WebhookReceiver.calls] == [500, 200]
        payload = WebhookReceiver.calls[-1][1]
        assert payload["request_id"] == rid and payload["status"] == "OK" and payload["error"] is None
        assert payload["payload"]["video"]["url"].startswith(base)
        logs = messages(status(base, rid)[1])
        assert any("webhook attempt 1/10 failed (HTTP 500)" in m for m in logs)
        assert any("webhook delivered (attempt 2/10" in m for m in logs)
        # Signed as fal signs: a receiver written for fal verifies each attempt with the keys the Gateway publishes.
        jwks = http_json("GET", f"{base}/.well-known/jwks.json")[1]
        assert all(fal_receiver_accepts(headers, raw, jwks) for headers, raw in WebhookReceiver.signed)
        assert service["store"].webhook_state(rid)["state"] == "delivered"
    finally:
        server.shutdown()


def test_private_webhook_targets_are_refused(service):
    base = service["base"]
    for hook in ("http://169.254.169.254/latest", "http://10.0.0.1/hook", "file:///etc/passwd"):
        code, body, _ = http_json("POST", f"{base}/{APP}?fal_webhook={hook}", job_body())
        assert code == 422 and body["detail"][0]["loc"] == ["query", "fal_webhook"], (hook, body)


def test_uploads_are_usable_as_inputs(service):
    base = service["base"]
    # JS flow: initiate, then PUT to the returned URL (no credentials), then use file_url.
    code, init, _ = http_json("POST", f"{base}/storage/upload/initiate?storage_type=fal-cdn-v3",
                              {"content_type": "image/png", "file_name": "portrait.png"})
    assert code == 200
    put = urllib.request.Request(init["upload_url"], data=EXAMPLE_IMAGE.read_bytes(), method="PUT",
                                 headers={"content-type": "image/png"})
    with urllib.request.urlopen(put, timeout=30) as response:
        assert response.status == 200
    assert http_bytes(init["file_url"]) == EXAMPLE_IMAGE.read_bytes()
    # Python flow: token, then POST the bytes with the token.
    code, token, _ = http_json("POST", f"{base}/storage/auth/token?storage_type=fal-cdn-v3", {})
    assert code == 200 and token["token_type"] == "Bearer"
    upload = urllib.request.Request(f"{base}/files/upload", data=EXAMPLE_AUDIO.read_bytes(), method="POST",
                                    headers={"content-type": "audio/wav", "x-fal-file-name": "speech.wav",
                                             "authorization": f"Bearer {token['token']}"})
    with urllib.request.urlopen(upload, timeout=30) as response:
        access_url = json.loads(response.read())["access_url"]
    bad = urllib.request.Request(f"{base}/files/upload", data=b"x", method="POST",
                                 headers={"authorization": "Bearer 1.forged"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(bad, timeout=30)
    assert err.value.code == 401
    rid = submit(base, job_body(image_url=init["file_url"], audio_url=access_url))["request_id"]
    assert "error" not in wait_status(base, rid)
    assert stored_keys(service["root"], f"inputs/public/{rid}") == []  # uploads are read where they are


def cli_reference(tmp_path, audio, steps, seed) -> bytes:
    out = tmp_path / "cli.mp4"
    assert cli_main(["generate", "--image", str(EXAMPLE_IMAGE), "--audio", str(audio), "--prompt", "a person talking",
                     "--steps", str(steps), "--seed", str(seed), "--aspect-ratio", "1:1", "--quiet",
                     "-o", str(out)]) == 0
    return out.read_bytes()


def runner_of(store: SyncJobStore, request_id: str) -> str:
    job = store.get(request_id, "")
    assert job.status == "IN_PROGRESS" and job.lease_owner, job
    return job.lease_owner


def assert_resumed_once(service, rid: str, reference: bytes, min_step: int) -> list[str]:
    """The job finished without error, resumed from a checkpoint after step >= ``min_step``, produced exactly
    the uninterrupted run's bytes, and left one result object and only the checkpoint its row names."""
    base, root = service["base"], service["root"]
    done = wait_status(base, rid)
    assert "error" not in done, done
    lines = messages(done)
    resumed = [m for m in lines if m.startswith("resumed from the checkpoint after step ")]
    assert len(resumed) == 1, lines
    assert int(resumed[0].split("after step ")[1].split("/")[0]) >= min_step, resumed
    output = http_json("GET", f"{base}/{APP}/requests/{rid}")[1]
    assert http_bytes(output["video"]["url"]) == reference
    job = service["store"].get(rid, "")
    assert job.epoch == 2 and job.result_keys == [f"results/{rid}/e2/output.mp4"]
    assert stored_keys(root, f"results/{rid}") == job.result_keys  # the first runner wrote no result
    assert_only_the_named_checkpoint(service, rid)
    return lines


def test_killed_runner_is_replaced_and_the_job_resumes_from_its_checkpoint(service, long_audio,
                                                                          resumable_reference):
    base = service["base"]
    rid = submit(base, resumable_body(long_audio))["request_id"]
    wait_progress(base, rid, 5 / 8)  # past the checkpoint after step 4
    killed = runner_of(service["store"], rid)
    ray.kill(ray.get_actor(f"SERVE_REPLICA::{killed}", namespace="serve"), no_restart=True)
    lines = assert_resumed_once(service, rid, resumable_reference, min_step=4)
    assert any(f"the runner {killed} stopped renewing its lease" in m for m in lines), lines
    assert any(m.startswith("started again (attempt 2); resuming from the checkpoint after step") for m in lines)
    reran = [m for m in lines if m.startswith("running on ")]
    assert len(reran) == 2 and killed in reran[0] and killed not in reran[1], reran


def test_restarted_application_resumes_running_and_runs_queued_jobs(service, long_audio, resumable_reference):
    base = service["base"]
    running = submit(base, resumable_body(long_audio))["request_id"]
    queued = submit(base, job_body(seed=4))["request_id"]
    wait_progress(base, running, 5 / 8)
    serve.delete(APP_NAME)  # graceful: the runner hands its job back to the queue
    row = service["store"].get(running, "")
    assert row.status == "IN_QUEUE" and row.checkpoint_step >= 4, row
    service["cluster"].deploy(service["args"], env=service["env"])
    lines = assert_resumed_once(service, running, resumable_reference, min_step=4)
    assert any("is shutting down; queued again" in m for m in lines), lines
    done = wait_status(base, queued)
    assert "error" not in done and service["store"].get(queued, "").attempts == 1


def test_two_applications_on_one_database_run_each_job_once(service):
    """Two applications (a RayService upgrade: old and new cluster on one database and bucket) claim from the same
    queue: every job completes once, in one attempt, with one result object."""
    base, root, store = service["base"], service["root"], service["store"]
    second = AppArgs.model_validate(service["config"] | {"denoiser": {"num_replicas": 1, "num_gpus": 0,
                                                                      "max_ongoing_requests": 1}})
    service["cluster"].deploy(second, SECOND_APP, SECOND_PREFIX, env=service["env"])
    try:
        ids = [submit(base if i % 2 else base + SECOND_PREFIX, job_body(seed=100 + i, steps=1))["request_id"]
               for i in range(4)]
        runners = set()
        for rid in ids:
            done = wait_status(base, rid)
            assert "error" not in done, done
            job = store.get(rid, "")
            assert (job.attempts, job.epoch) == (1, 1), messages(done)
            assert stored_keys(root, f"results/{rid}") == [f"results/{rid}/e1/output.mp4"]
            lines = messages(done)
            started = [m for m in lines if m.startswith("running on ")]
            assert len(started) == 1 and sum(m.startswith("completed in ") for m in lines) == 1, lines
            runners.add(started[0].split()[2])
        assert {r.split("#")[0] for r in runners} == {APP_NAME, SECOND_APP}, runners  # both applications worked
    finally:
        serve.delete(SECOND_APP)


def test_an_upgrade_that_changes_the_model_finishes_each_applications_jobs_on_it(service):
    """Two applications on one database whose models differ (another weight scheme changes every video): each
    submit records its application's model fingerprint, and only that application's runners claim it."""
    base, store = service["base"], service["store"]
    second = AppArgs.model_validate(service["config"] | {"pipeline": {"weight_scheme": "log"}, "denoiser": {
        "num_replicas": 1, "num_gpus": 0, "max_ongoing_requests": 1}})  # the first application holds both GPUs
    service["cluster"].deploy(second, SECOND_APP, SECOND_PREFIX, env=service["env"])
    try:
        ids = {app: [submit(prefix, job_body(seed=200 + i, steps=1))["request_id"] for i in range(2)]
               for app, prefix in ((APP_NAME, base), (SECOND_APP, base + SECOND_PREFIX))}
        fingerprints = {app: {store.get(rid, "").model_fingerprint for rid in rids} for app, rids in ids.items()}
        assert all(len(f) == 1 and "" not in f for f in fingerprints.values()), fingerprints
        assert fingerprints[APP_NAME] != fingerprints[SECOND_APP]
        for app, rids in ids.items():
            for rid in rids:
                done = wait_status(base, rid)
                assert "error" not in done, done
                # Every claim, a second one too (a lease that ran out on a loaded box), is by this application.
                started = [m for m in messages(done) if m.startswith("running on ")]
                assert started and all(m.split()[2].split("#")[0] == app for m in started), (app, started)
    finally:
        serve.delete(SECOND_APP)


def test_a_retried_submit_or_run_with_an_idempotency_key_starts_one_job(service):
    """Through the real service: a submit retried with its Idempotency-Key answers the first job; concurrent
    /run retries with one key run one job and both answer its video."""
    base, store = service["base"], service["store"]
    key = {"Idempotency-Key": f"queue-{time.monotonic_ns()}"}
    first = submit(base, job_body(steps=1, seed=31), headers=key)
    assert submit(base, job_body(steps=1, seed=31), headers=key)["request_id"] == first["request_id"]
    code, body, _ = http_json("POST", f"{base}/{APP}", job_body(steps=1, seed=32), key)
    assert code == 422 and body["detail"][0]["loc"] == ["header", "Idempotency-Key"], body
    assert "error" not in wait_status(base, first["request_id"])

    run_key = {"Idempotency-Key": f"run-{time.monotonic_ns()}"}
    answers: list = [None, None]

    def run(i: int) -> None:
        answers[i] = http_json("POST", f"{base}/run/{APP}", job_body(steps=1, seed=33), run_key)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
        time.sleep(0.2)
    for thread in threads:
        thread.join(timeout=300)
    assert [a[0] for a in answers] == [200, 200], answers
    (request_id,) = {a[2]["x-fal-request-id"] for a in answers}
    assert http_bytes(answers[0][1]["video"]["url"]) == http_bytes(answers[1][1]["video"]["url"])
    with store.backend.read() as cur:
        cur.execute(store.backend.sql("SELECT count(*) AS n FROM jobs WHERE seed IN (31, 33)"))
        assert cur.fetchone()["n"] == 2  # one queued job, one sync job
    assert store.get(request_id, "").kind == "sync"


def test_health_names_what_is_not_ready(service):
    base, root, postgres = service["base"], service["root"], service["postgres"]
    code, body, _ = http_json("GET", f"{base}/health")
    assert code == 200 and body["status"] == "ok", body
    assert body["checks"] == {name: "ok" for name in ("storage", "jobs", "Orchestrator", "Preprocessor", "Denoiser",
                                                       "Postprocessor")}
    # The storage root disappears: 503 naming storage, and nothing else.
    moved = root.with_name(root.name + "-away")
    shutil.move(root, moved)
    try:
        code, body, _ = http_json("GET", f"{base}/health")
    finally:
        shutil.move(moved, root)
    assert code == 503 and body["status"] == "unavailable" and set(body["failed"]) == {"storage"}, body
    assert "local storage root" in body["failed"]["storage"]
    # The jobs database stops accepting connections (its existing ones are cut): 503 naming jobs.
    import psycopg

    name = dict(part.split("=", 1) for part in service["dsn"].split())["dbname"]
    with psycopg.connect(postgres.dsn(), autocommit=True) as admin:
        admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
        try:
            code, body, _ = http_json("GET", f"{base}/health")
        finally:
            admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
    assert code == 503 and set(body["failed"]) == {"jobs"}, body
    assert "password" not in json.dumps(body) and service["dsn"] not in json.dumps(body)
    deadline = time.monotonic() + 90  # the pools reconnect by themselves
    while http_json("GET", f"{base}/health")[0] != 200:
        assert time.monotonic() < deadline, "the service did not become ready again"
        time.sleep(1)
    rid = submit(base, job_body(steps=1))["request_id"]
    assert "error" not in wait_status(base, rid)
