"""API keys and one set of rules for every route: unit checks, then a real service with two keys.

The service runs one job at a time with tight per-key limits (burst 3 with almost no refill, 2 queued, 1
running), so each 429 can be provoked on purpose and must name its limit; uploads must land under the caller's
own prefix; the signing secret must be one value shared by the Gateway replicas and kept out of storage.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from deployments.gateway.auth import ApiKeys, AuthConfig, fingerprint

KEY_A, KEY_B = "key-alpha-0123456789", "key-bravo-9876543210"
KEY_C = "key-charlie-5555555555"  # its submit tokens untouched by the limit tests
APP = "fal-ai/stable-avatar"


def test_keys_from_env_and_file(tmp_path, monkeypatch):
    secret = tmp_path / "keys"
    secret.write_text("# mounted secret\nfile-key-1\n\nfile-key-2\n")
    monkeypatch.setenv("TEST_KEYS", "env-key-1, env-key-2")
    keys = ApiKeys(AuthConfig(keys_env="TEST_KEYS", keys_file=secret))
    assert keys.enabled
    for key in ("env-key-1", "env-key-2", "file-key-1", "file-key-2"):
        assert keys.check(f"Key {key}").owner == fingerprint(key)
    assert keys.check("Bearer env-key-1").owner == fingerprint("env-key-1")
    assert keys.check(None).status == 401 and keys.check("Key").status == 401
    assert keys.check("Key nope").status == 403
    assert "env-key-1" not in repr(keys.__dict__)  # only digests are kept


def test_open_server_without_keys(monkeypatch):
    monkeypatch.delenv("NO_SUCH_KEYS", raising=False)
    keys = ApiKeys(AuthConfig(keys_env="NO_SUCH_KEYS"))
    assert not keys.enabled and keys.check(None).owner == ""


@pytest.fixture(scope="module")
def service(tmp_path_factory, serve_cluster):
    from deployments.jobstore import SqliteJobsConfig, make_sync_job_store

    root = tmp_path_factory.mktemp("auth-data")
    serve_cluster.deploy({
        "device": "cpu", "max_running_jobs": 1, "short_job_slots": 0,  # one runner: later jobs stay queued
        "auth": {"keys_env": "STABLE_AVATAR_TEST_KEYS", "submit_burst": 3, "submit_rate_per_minute": 0.1,
                 "max_queued_per_key": 2, "max_running_per_key": 1},
        "dispatch": {"lease_s": 10, "heartbeat_s": 1, "poll_interval_s": 0.2},
        "storage": serve_cluster.local_storage(root),
        "gateway": {"num_replicas": 2},
        "denoiser": {"num_replicas": 1, "num_gpus": 1, "max_ongoing_requests": 1},
    }, env={"STABLE_AVATAR_TEST_KEYS": f"{KEY_A},{KEY_B},{KEY_C}"})
    store = make_sync_job_store(SqliteJobsConfig(path=root / "jobs.sqlite3"), root / "unused")
    try:
        yield {"base": serve_cluster.base, "root": root, "store": store}
    finally:
        store.close()


@pytest.fixture(scope="module")
def long_audio(tmp_path_factory) -> Path:
    from testing.media import synthetic_speech

    return synthetic_speech(tmp_path_factory.mktemp("auth-audio") / "long.wav", 24.0)


A, B = {"authorization": f"Key {KEY_A}"}, {"authorization": f"Key {KEY_B}"}


def body(audio=None, steps: int = 1) -> dict:
    from testing.media import EXAMPLE_AUDIO, EXAMPLE_IMAGE, data_uri

    return {"image_url": data_uri(EXAMPLE_IMAGE, "image/png"), "audio_url": data_uri(audio or EXAMPLE_AUDIO,
                                                                                     "audio/wav"),
            "prompt": "talking", "num_inference_steps": steps}


def wait_running(base: str, rid: str, key: dict) -> None:
    from testing.http import http_json

    deadline = time.monotonic() + 120
    while http_json("GET", f"{base}/{APP}/requests/{rid}/status", headers=key)[1]["status"] != "IN_PROGRESS":
        assert time.monotonic() < deadline
        time.sleep(0.1)


def refused(response: tuple[int, dict, dict], error_type: str) -> str:
    code, answer, headers = response
    assert code == 429 and answer["error_type"] == error_type, answer
    assert headers["x-fal-error-type"] == error_type and int(headers["retry-after"]) >= 1
    return answer["detail"]


def test_every_route_needs_the_key_and_hides_other_keys_jobs(service):
    from testing.http import http_json

    base = service["base"]
    code, health, _ = http_json("GET", f"{base}/health")
    assert code == 200 and health["auth_required"] is True
    assert http_json("POST", f"{base}/{APP}", body())[0] == 401
    assert http_json("POST", f"{base}/{APP}", body(), {"authorization": "Key wrong"})[0] == 403
    assert http_json("POST", f"{base}/run/{APP}", body())[0] == 401
    code, submitted, _ = http_json("POST", f"{base}/{APP}", body(), A)  # A: 2 of its 3 tokens left
    assert code == 200
    rid = submitted["request_id"]
    deadline = time.monotonic() + 120
    while http_json("GET", f"{base}/{APP}/requests/{rid}/status", headers=A)[1]["status"] != "COMPLETED":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert http_json("GET", f"{base}/progress/{rid}", headers=A)[1]["status"] == "COMPLETED"
    for method, path in (("GET", f"/{APP}/requests/{rid}/status"), ("GET", f"/{APP}/requests/{rid}"),
                         ("GET", f"/{APP}/requests/{rid}/status/stream"), ("PUT", f"/{APP}/requests/{rid}/cancel"),
                         ("GET", f"/progress/{rid}")):
        assert http_json(method, base + path, headers=B)[0] == 404, path
        assert http_json(method, base + path)[0] == 401, path
    assert http_json("GET", f"{base}/{APP}/requests/{rid}", headers=A)[0] == 200  # unharmed by B's attempts


def test_each_429_names_the_limit_it_hit(service, long_audio):
    """Queued cap, running cap (queued jobs and sync requests count as running) and the rate limit that submit
    and /run share: each refusal says which one, and a refusal by a cap costs no token."""
    from testing.http import http_json

    base, store = service["base"], service["store"]
    submit = lambda key: http_json("POST", f"{base}/{APP}", body(), key)  # noqa: E731
    run = lambda key: http_json("POST", f"{base}/run/{APP}", body(), key)  # noqa: E731
    # Key A (2 tokens left): a long running job, one queued job, then no token is left.
    code, running, _ = http_json("POST", f"{base}/{APP}", body(long_audio, steps=30), A)
    assert code == 200, running
    wait_running(base, running["request_id"], A)
    code, queued_a, _ = submit(A)
    assert code == 200
    assert "running jobs (limit 1)" in refused(run(A), "key_running_cap")  # its queued job holds the slot
    assert "too many requests" in refused(submit(A), "rate_limited")  # 1 queued, below the cap: the rate
    # Key B (3 tokens): a sync request holds B's running slot, so a second one is refused by the running cap.
    outcome: dict = {}
    sync = threading.Thread(target=lambda: outcome.update(answer=http_json(
        "POST", f"{base}/run/{APP}", body(steps=3), {**B, "x-fal-request-id": "my-own-id"})))
    sync.start()
    deadline = time.monotonic() + 120
    while store.running_count(fingerprint(KEY_B)) == 0:
        assert time.monotonic() < deadline and sync.is_alive()
        time.sleep(0.05)
    assert "running jobs (limit 1)" in refused(run(B), "key_running_cap")
    sync.join(timeout=300)
    code, output, headers = outcome["answer"]
    assert code == 200, output
    sync_id = headers["x-fal-request-id"]
    assert sync_id != "my-own-id" and len(sync_id) == 32  # server-issued
    # The sync request is a job of B's like any other: status, logs and result by its id; 404 for A.
    code, state, _ = http_json("GET", f"{base}/{APP}/requests/{sync_id}/status?logs=1", headers=B)
    assert code == 200 and state["status"] == "COMPLETED" and len(state["logs"]) > 3
    assert http_json("GET", f"{base}/{APP}/requests/{sync_id}", headers=B)[1]["video"]["file_size"] > 0
    assert http_json("GET", f"{base}/progress/{sync_id}", headers=A)[0] == 404
    # B (2 tokens left): two queued jobs (behind A's, one runner) fill B's queued cap; the third is refused by the
    # cap, not by the rate limit.
    queued_b = [submit(B) for _ in range(2)]
    assert [c for c, _, _ in queued_b] == [200, 200]
    assert "queued jobs (limit 2)" in refused(submit(B), "key_queue_cap")
    assert store.running_count(fingerprint(KEY_B)) == 0
    # No token left: /run is refused by the same rate limit as submit, and so is a submit below the cap.
    assert "too many requests" in refused(run(B), "rate_limited")
    http_json("PUT", f"{base}/{APP}/requests/{queued_b[0][1]['request_id']}/cancel", headers=B)
    assert "too many requests" in refused(submit(B), "rate_limited")
    for key, rid in ((A, running["request_id"]), (A, queued_a["request_id"]), (B, queued_b[1][1]["request_id"])):
        code, answer, _ = http_json("PUT", f"{base}/{APP}/requests/{rid}/cancel", headers=key)
        finished = http_json("GET", f"{base}/{APP}/requests/{rid}/status", headers=key)[1]["status"] == "COMPLETED"
        assert code == 202 or (code == 400 and finished), answer  # on an idle box the long job may be done by now


def test_uploads_land_only_under_the_callers_prefix(service):
    from deployments.storage.signing import SECRET_NAME, Signer
    from testing.http import http_json
    from testing.media import EXAMPLE_IMAGE

    base, root, store = service["base"], service["root"], service["store"]
    mine, theirs = fingerprint(KEY_A), fingerprint(KEY_B)
    code, init, _ = http_json("POST", f"{base}/storage/upload/initiate", {"content_type": "image/png",
                                                                         "file_name": "a.png"}, A)
    assert code == 200 and f"/storage/upload/put/uploads/{mine}/" in init["upload_url"]

    def put(url: str) -> int:
        request = urllib.request.Request(url, data=EXAMPLE_IMAGE.read_bytes(), method="PUT")
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status
        except urllib.error.HTTPError as err:
            return err.code

    assert put(init["upload_url"].replace(f"uploads/{mine}/", f"uploads/{theirs}/")) == 403  # signature breaks
    # Even a correctly signed URL (made here with the service's secret) cannot name a key outside the owner's
    # prefix: the PUT route checks the prefix, not only the signature.
    signer, exp = Signer(store.shared_secret(SECRET_NAME).encode()), int(time.time()) + 600
    outside = f"uploads/{theirs}/x/evil.png"
    signature = signer.sign("put", mine + "\n" + outside, exp)
    forged = f"{base}/storage/upload/put/{outside}?owner={mine}&exp={exp}&sig={signature}"
    assert put(forged) == 403 and not (root / outside).exists()
    assert put(init["upload_url"]) == 200
    # Token route: the key is built from the token's owner; a hostile file name stays one segment inside it.
    token = http_json("POST", f"{base}/storage/auth/token", {}, A)[1]["token"]
    upload = urllib.request.Request(f"{base}/files/upload", data=b"abc", method="POST", headers={
        "authorization": f"Bearer {token}", "x-fal-file-name": f"../../uploads/{theirs}/evil.png"})
    with urllib.request.urlopen(upload, timeout=30) as response:
        access_url = json.loads(response.read())["access_url"]
    key = access_url.split("/files/")[1].split("?")[0]
    assert key.startswith(f"uploads/{mine}/") and key.count("/") == 3, key
    assert not (root / "uploads" / theirs).exists()
    forged_token = f"{exp}.{theirs}.{signer.sign('upload-token', mine, exp)}"  # A's signature, B's prefix
    assert http_json("POST", f"{base}/files/upload", None, {"authorization": f"Bearer {forged_token}"})[0] == 401
    # A's upload is not an input for another key: refused at submit, naming the field. (A submit takes its token
    # before its body is read, and A and B spent theirs above: C asks.)
    code, answer, _ = http_json("POST", f"{base}/{APP}", dict(body(), image_url=init["file_url"]),
                                {"authorization": f"Key {KEY_C}"})
    assert code == 422 and answer["detail"][0]["loc"] == ["body", "image_url"], answer
    assert answer["detail"][0]["type"] == "file_not_found"


def test_signing_secret_is_shared_by_gateway_replicas_and_kept_out_of_storage(service):
    from ray import serve

    from deployments.config import APP_NAME
    from deployments.runtime.service_state import secret_fingerprint
    from deployments.storage.signing import SECRET_NAME

    handle = serve.get_deployment_handle("Gateway", APP_NAME)
    seen: dict[str, str] = {}
    deadline = time.monotonic() + 60
    while len(seen) < 2:
        answer = handle.ready.remote().result(timeout_s=30)
        seen[answer["replica"]] = answer["secret_fingerprint"]
        assert time.monotonic() < deadline, seen
    secret = service["store"].shared_secret(SECRET_NAME).encode()  # created once, in the jobs database
    assert set(seen.values()) == {secret_fingerprint(secret)}
    files = [p for p in service["root"].rglob("*") if p.is_file() and not p.name.startswith("jobs.sqlite3")]
    assert files and not any(secret in p.read_bytes() for p in files)
