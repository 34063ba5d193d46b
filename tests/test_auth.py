"""API keys, per-key isolation and limits: unit checks, then a real service with two keys."""

from __future__ import annotations

import os
import time
import urllib.request

import pytest

from deployments.auth import ApiKeys, AuthConfig, TokenBucket, fingerprint

KEY_A, KEY_B = "key-alpha-0123456789", "key-bravo-9876543210"


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


def test_token_bucket():
    bucket = TokenBucket(rate_per_s=1.0, burst=2)
    assert bucket.take("a") == 0 and bucket.take("a") == 0
    wait = bucket.take("a")
    assert 0 < wait <= 1.0
    assert bucket.take("b") == 0  # per owner
    time.sleep(wait + 0.05)
    assert bucket.take("a") == 0


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    os.environ["STABLE_AVATAR_TEST_KEYS"] = f"{KEY_A},{KEY_B}"
    from tests.ray_serve import ray_serve_cluster

    with ray_serve_cluster(num_gpus=1) as cluster:
        cluster.deploy({
            "device": "cpu", "max_running_jobs": 1,
            "auth": {"keys_env": "STABLE_AVATAR_TEST_KEYS", "submit_burst": 4, "submit_rate_per_minute": 1,
                     "max_queued_per_key": 3},
            "storage": cluster.local_storage(tmp_path_factory.mktemp("auth-data")),
            "denoiser": {"num_replicas": 1, "num_gpus": 1, "max_ongoing_requests": 1},
        })
        yield cluster.base
    del os.environ["STABLE_AVATAR_TEST_KEYS"]


def test_keys_isolation_and_limits(service):
    from tests.helpers import EXAMPLE_AUDIO, EXAMPLE_IMAGE, data_uri, http_json

    base, app = service, "fal-ai/stable-avatar"
    a, b = {"authorization": f"Key {KEY_A}"}, {"authorization": f"Key {KEY_B}"}
    body = {"image_url": data_uri(EXAMPLE_IMAGE, "image/png"), "audio_url": data_uri(EXAMPLE_AUDIO, "audio/wav"),
            "prompt": "talking", "num_inference_steps": 1}
    code, health, _ = http_json("GET", f"{base}/health")
    assert code == 200 and health["auth_required"] is True
    assert http_json("POST", f"{base}/{app}", body)[0] == 401
    assert http_json("POST", f"{base}/{app}", body, {"authorization": "Key wrong"})[0] == 403
    code, submitted, _ = http_json("POST", f"{base}/{app}", body, a)
    assert code == 200
    rid = submitted["request_id"]
    assert http_json("GET", f"{base}/{app}/requests/{rid}/status", headers=a)[0] in (200, 202)
    for method, path in (("GET", f"/{app}/requests/{rid}/status"), ("GET", f"/{app}/requests/{rid}"),
                         ("PUT", f"/{app}/requests/{rid}/cancel")):
        assert http_json(method, base + path, headers=b)[0] == 404, path
        assert http_json(method, base + path)[0] == 401, path
    # An upload made with key A is not an input for key B's jobs.
    code, init, _ = http_json("POST", f"{base}/storage/upload/initiate", {"content_type": "image/png",
                                                                         "file_name": "a.png"}, a)
    put = urllib.request.Request(init["upload_url"], data=EXAMPLE_IMAGE.read_bytes(), method="PUT")
    urllib.request.urlopen(put, timeout=30).close()
    code, other, _ = http_json("POST", f"{base}/{app}", dict(body, image_url=init["file_url"]), b)
    deadline = time.monotonic() + 120
    while True:
        code, state, _ = http_json("GET", f"{base}/{app}/requests/{other['request_id']}/status", headers=b)
        if state["status"] == "COMPLETED" or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert state.get("error") and "not found" in state["error"]
    code, result, _ = http_json("GET", f"{base}/{app}/requests/{other['request_id']}", headers=b)
    assert code == 422 and result["detail"][0]["loc"] == ["body", "image_url"]
    # Rate limit: key A has used 1 of its burst of 4 submits (key B 1 of 4); the 5th within a minute is refused.
    codes = [http_json("POST", f"{base}/{app}", body, a)[0] for _ in range(4)]
    assert codes[-1] == 429, codes
    code, refused, headers = http_json("POST", f"{base}/{app}", body, a)
    assert code == 429 and int(headers["retry-after"]) >= 1
