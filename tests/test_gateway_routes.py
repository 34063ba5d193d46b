"""The Gateway's routes in process: its FastAPI app over a real SQLite jobs database and real local storage in a
temporary folder, with a fake Orchestrator (an object with the Orchestrator's async ``run_sync``), called through
an ASGI client. No Ray: authentication, the 4xx answers, uploads, signed links, the SSE stream and the limits are
checked here in seconds; the service tests (tests/test_queue.py, tests/test_auth.py, ...) check the same routes
behind Serve's proxy with every deployment running.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from deployments.config import AppArgs
from deployments.contracts import JobCancelled, StoredResult, StoredVideo
from deployments.gateway.app import build_api
from deployments.gateway.auth import fingerprint
from deployments.gateway.service import GatewayService
from deployments.jobs import JobError
from deployments.jobstore import KeyRunningCapError
from deployments.runtime.service_state import open_service_state
from deployments.storage import keys
from guarded_fetch import InputError
from pipeline.schema import StableAvatarInput
from tests.helpers import EXAMPLE_AUDIO, EXAMPLE_IMAGE, data_uri

pytestmark = pytest.mark.anyio
APP = "fal-ai/stable-avatar"
KEYS_ENV = "STABLE_AVATAR_GATEWAY_TEST_KEYS"
KEY_A, KEY_B = "gateway-key-alpha-0123", "gateway-key-bravo-4567"
A, B = {"authorization": f"Key {KEY_A}"}, {"authorization": f"Key {KEY_B}"}
VIDEO = b"\x00\x00\x00\x18ftypmp42 not really a video, but bytes to serve"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def job_body(**extra: Any) -> dict[str, Any]:
    return {"image_url": data_uri(EXAMPLE_IMAGE, "image/png"), "audio_url": data_uri(EXAMPLE_AUDIO, "audio/wav"),
            "prompt": "a person talking", "num_inference_steps": 1, "seed": 5, **extra}


@dataclass
class FakeOrchestrator:
    """The Orchestrator's ``run_sync`` without a model: the sync row is created (and refused at its limits) by
    the real store, a video object is written and the job completed, as a runner would; ``fail`` raises instead."""

    service: GatewayService | None = None
    fail: BaseException | None = None
    calls: list[dict[str, Any]] = field(default_factory=list)

    async def run_sync(self, request_id: str, job_input: dict[str, Any], seed: int, owner: str,
                       input_keys: list[str], **options: Any) -> StoredResult:
        self.calls.append({"request_id": request_id, "owner": owner, "input_keys": input_keys, **options})
        assert self.service is not None
        store = self.service.store
        claimed = await store.create_sync(app_id=APP, input=job_input, seed=seed, runner_id="fake", lease_s=30,
                                          owner=owner, input_keys=input_keys, request_id=request_id, **options)
        if self.fail is not None:
            await store.complete(request_id, claimed.epoch, error=JobError(
                status_code=500, detail="failed", message="failed"))
            raise self.fail
        return await finish_job(self.service, request_id, claimed.epoch, seed)


async def finish_job(service: GatewayService, request_id: str, epoch: int, seed: int = 5) -> StoredResult:
    key = keys.result_key(request_id, epoch)
    await asyncio.to_thread(service.storage.put_bytes, key, VIDEO, "video/mp4")
    result = StoredResult(video=StoredVideo(key=key, file_size=len(VIDEO)), seed=seed)
    await service.store.complete(request_id, epoch, result=result.model_dump(), result_keys=[key])
    return result


@dataclass
class Harness:
    service: GatewayService
    client: httpx.AsyncClient
    orchestrator: FakeOrchestrator
    root: Path

    def stored(self, prefix: str) -> list[str]:
        return self.service.storage.list_keys(prefix)


@pytest.fixture
def make_gateway(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable:
    """``async with make_gateway(config, keys=True) as gw``: a Gateway app on a fresh database and storage."""

    @asynccontextmanager
    async def make(config: dict[str, Any] | None = None, with_keys: bool = True,
                   readiness: dict[str, Any] | None = None) -> AsyncIterator[Harness]:
        monkeypatch.setenv(KEYS_ENV, f"{KEY_A} {KEY_B}" if with_keys else "")
        root = tmp_path / "data"
        args = AppArgs.model_validate({"storage": {"kind": "local", "root": str(root)},
                                       "auth": {"keys_env": KEYS_ENV}} | (config or {}))
        state = open_service_state(args)
        orchestrator = FakeOrchestrator()
        service = GatewayService(args, state, orchestrator, readiness or {}, "gateway-test")
        orchestrator.service = service
        transport = httpx.ASGITransport(build_api(service))
        try:
            async with httpx.AsyncClient(transport=transport, base_url="http://gateway.test") as client:
                yield Harness(service, client, orchestrator, root)
        finally:
            await asyncio.to_thread(state.store.close)

    return make


async def submit(gw: Harness, key: dict[str, str] = A, **extra: Any) -> str:
    response = await gw.client.post(f"/{APP}", json=job_body(**extra), headers=key)
    assert response.status_code == 200, response.text
    return response.json()["request_id"]


def assert_fal_error(response: httpx.Response, status: int, error_type: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert "detail" in body, body
    if error_type is not None:
        assert body["error_type"] == error_type and response.headers["x-fal-error-type"] == error_type, body
    return body


def field_of(response: httpx.Response, status: int = 422) -> list[str]:
    """The ``loc`` of the first field error in a fal 4xx answer."""
    body = assert_fal_error(response, status)
    assert isinstance(body["detail"], list), body
    return body["detail"][0]["loc"]


# -- authentication ------------------------------------------------------------------------------------------
KEYED_ROUTES = [("POST", f"/{APP}"), ("POST", f"/run/{APP}"), ("GET", f"/{APP}/requests/{'0' * 32}/status"),
                ("GET", f"/{APP}/requests/{'0' * 32}/status/stream"), ("GET", f"/{APP}/requests/{'0' * 32}"),
                ("PUT", f"/{APP}/requests/{'0' * 32}/cancel"), ("GET", f"/progress/{'0' * 32}"),
                ("POST", "/storage/upload/initiate"), ("POST", "/storage/auth/token")]


async def test_every_keyed_route_answers_401_without_a_key_and_403_with_a_wrong_one(make_gateway):
    async with make_gateway() as gw:
        for method, path in KEYED_ROUTES:
            missing = await gw.client.request(method, path, json=job_body())
            body = assert_fal_error(missing, 401)
            assert "Authorization: Key" in body["detail"] and missing.headers["www-authenticate"] == "Key", path
            wrong = await gw.client.request(method, path, json=job_body(), headers={"authorization": "Key nope"})
            assert assert_fal_error(wrong, 403)["detail"] == "invalid API key", path
        assert gw.stored("") == [] and await gw.service.store.queue_length() == 0  # nothing was done
        health = await gw.client.get("/health")  # readiness and the playground need no key
        assert health.status_code == 200 and health.json()["auth_required"] is True
        assert (await gw.client.get("/")).status_code == 200


async def test_another_keys_job_is_a_404_on_every_route(make_gateway):
    async with make_gateway() as gw:
        rid = await submit(gw, A)
        root = f"/{APP}/requests/{rid}"
        for method, path in (("GET", f"{root}/status"), ("GET", root), ("GET", f"{root}/status/stream"),
                             ("GET", f"/progress/{rid}")):
            answer = await gw.client.request(method, path, headers=B)
            assert assert_fal_error(answer, 404)["detail"] == "Request not found", path
            assert answer.headers["x-fal-request-id"] == rid
        cancel = await gw.client.put(f"{root}/cancel", headers=B)
        assert (cancel.status_code, cancel.json()) == (404, {"status": "NOT_FOUND"})
        mine = await gw.client.get(f"{root}/status", headers=A)
        assert mine.status_code == 202 and mine.json()["status"] == "IN_QUEUE"  # unharmed by B's attempts


# -- 4xx answers name the field ------------------------------------------------------------------------------
async def test_bad_submits_are_refused_naming_the_field_and_leave_nothing_behind(make_gateway):
    async with make_gateway({"max_request_body_mb": 1}) as gw:
        post = lambda **kw: gw.client.post(f"/{APP}", headers={**A, **kw.pop("headers", {})}, **kw)  # noqa: E731
        assert field_of(await post(content=b'{"image_url": ')) == ["body"]
        assert field_of(await post(json={"image_url": "x", "audio_url": "y"})) == ["body", "prompt"]
        assert field_of(await post(json=job_body(num_inference_steps=0))) == ["body", "num_inference_steps"]
        assert field_of(await post(json=job_body(image_url="data:image/png;base64,not base64!"))) == [
            "body", "image_url"]
        assert field_of(await post(json=job_body(), headers={"x-fal-queue-priority": "urgent"})) == [
            "header", "x-fal-queue-priority"]
        assert field_of(await post(json=job_body(), headers={"x-fal-request-timeout": "0.5"})) == ["header"]
        webhook = await gw.client.post(f"/{APP}?fal_webhook=http://169.254.169.254/x", json=job_body(), headers=A)
        assert field_of(webhook) == ["query", "fal_webhook"]
        huge = json.dumps(job_body(prompt="x" * (2 << 20))).encode()
        assert "larger than 1048576 bytes" in assert_fal_error(await post(content=huge), 413)["detail"]

        async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: refused once it passes the limit
            for _ in range(3):
                yield b" " * (1 << 19)

        assert_fal_error(await post(content=chunks()), 413)
        unknown = await gw.client.post("/someone/else", json=job_body(), headers=A)
        assert assert_fal_error(unknown, 404)["detail"] == "unknown application someone/else"
        assert await gw.service.store.queue_length() == 0 and gw.stored("inputs/") == []


async def test_a_submit_stores_data_inputs_once_under_the_job_and_answers_fal_urls(make_gateway):
    async with make_gateway() as gw:
        answer = await gw.client.post(f"/{APP}", json=job_body(), headers={**A, "x-fal-request-id": "mine"})
        assert answer.status_code == 200
        submitted = answer.json()
        rid = submitted["request_id"]
        assert rid != "mine" and answer.headers["x-fal-request-id"] == rid
        base = f"http://gateway.test/{APP}/requests/{rid}"
        assert (submitted["status_url"], submitted["response_url"], submitted["cancel_url"]) == (
            f"{base}/status", base, f"{base}/cancel")
        assert submitted["status"] == "IN_QUEUE" and submitted["queue_position"] == 0
        owner = fingerprint(KEY_A)
        assert gw.stored("inputs/") == [f"inputs/{owner}/{rid}/audio.wav", f"inputs/{owner}/{rid}/image.png"]
        assert (gw.root / f"inputs/{owner}/{rid}/image.png").read_bytes() == EXAMPLE_IMAGE.read_bytes()
        second = await submit(gw, A, **{"x": 1})
        status = await gw.client.get(f"/{APP}/requests/{second}/status", headers=A)
        assert status.json()["queue_position"] == 1 and status.json()["logs"] is None


# -- the queue: status, result, SSE ----------------------------------------------------------------------------
async def test_status_and_result_follow_the_job_to_its_output(make_gateway):
    async with make_gateway() as gw:
        rid = await submit(gw)
        status_url = f"/{APP}/requests/{rid}/status"
        early = await gw.client.get(f"/{APP}/requests/{rid}", headers=A)
        assert early.status_code == 202 and early.json()["status"] == "IN_QUEUE"
        claimed = await gw.service.store.claim("runner", 30)
        assert claimed is not None and claimed.request_id == rid
        await gw.service.store.log(rid, claimed.epoch, "denoising step 1/1")
        running = await gw.client.get(status_url + "?logs=true", headers=A)
        assert running.status_code == 202 and running.json()["status"] == "IN_PROGRESS"
        assert [line["message"] for line in running.json()["logs"]][-1] == "denoising step 1/1"
        await finish_job(gw.service, rid, claimed.epoch)
        done = await gw.client.get(status_url + "?logs=0", headers=A)
        assert done.status_code == 200 and done.json()["status"] == "COMPLETED" and done.json()["logs"] is None
        output = await gw.client.get(f"/{APP}/requests/{rid}", headers=A)
        assert output.status_code == 200 and output.headers["x-fal-request-id"] == rid
        video = output.json()["video"]
        assert video["url"].startswith("http://gateway.test/files/results/") and video["file_size"] == len(VIDEO)
        assert (await gw.client.get(video["url"])).content == VIDEO
        progress = await gw.client.get(f"/progress/{rid}", headers=A)
        assert progress.json()["status"] == "COMPLETED" and "denoising step 1/1" in progress.json()["logs"]


async def test_cancel_answers_each_outcome(make_gateway):
    async with make_gateway() as gw:
        rid = await submit(gw)
        cancel = lambda: gw.client.put(f"/{APP}/requests/{rid}/cancel", headers=A)  # noqa: E731
        assert ((first := await cancel()).status_code, first.json()) == (202, {"status": "CANCELLATION_REQUESTED"})
        assert ((again := await cancel()).status_code, again.json()) == (400, {"status": "ALREADY_COMPLETED"})
        result = await gw.client.get(f"/{APP}/requests/{rid}", headers=A)
        assert assert_fal_error(result, 499, "client_cancelled")


def sse_events(text: str) -> list[dict[str, Any]]:
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ")]


async def test_the_status_stream_sends_only_new_log_lines_and_closes_at_completed(make_gateway):
    async with make_gateway() as gw:
        rid = await submit(gw)
        stream = asyncio.create_task(gw.client.get(f"/{APP}/requests/{rid}/status/stream?logs=1", headers=A))
        await asyncio.sleep(0.4)
        claimed = await gw.service.store.claim("runner", 30)
        assert claimed is not None
        for step in (1, 2):
            await asyncio.sleep(0.4)
            await gw.service.store.log(rid, claimed.epoch, f"denoising step {step}/2")
        await asyncio.sleep(0.4)
        await finish_job(gw.service, rid, claimed.epoch)
        response = await asyncio.wait_for(stream, 30)
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response.text)
        assert events[0]["status"] == "IN_QUEUE" and events[-1]["status"] == "COMPLETED"
        sent = [line["message"] for event in events for line in event["logs"]]
        final = (await gw.client.get(f"/{APP}/requests/{rid}/status?logs=1", headers=A)).json()["logs"]
        assert sent == [line["message"] for line in final]  # each line once: events carry only new lines
        assert len(sent) == len(set(sent)) and "denoising step 2/2" in sent


# -- the sync route and the Python handle ----------------------------------------------------------------------
async def test_run_answers_the_output_and_maps_each_failure(make_gateway):
    async with make_gateway() as gw:
        answer = await gw.client.post(f"/run/{APP}", json=job_body(), headers=A)
        assert answer.status_code == 200, answer.text
        rid = answer.headers["x-fal-request-id"]
        assert answer.json()["seed"] == 5 and answer.json()["video"]["url"].startswith("http://gateway.test/files/")
        assert (await gw.client.get(answer.json()["video"]["url"])).content == VIDEO
        assert gw.orchestrator.calls[-1]["owner"] == fingerprint(KEY_A)
        status = await gw.client.get(f"/{APP}/requests/{rid}/status", headers=A)  # a job like any other
        assert status.json()["status"] == "COMPLETED"
        assert assert_fal_error(await gw.client.post("/run/other/app", json=job_body(), headers=A), 404)
        for failure, status_code, error_type in ((JobCancelled(), 499, "client_cancelled"),
                                                 (InputError("image_url is not an image", field="image_url"),
                                                  422, None)):
            gw.orchestrator.fail = failure
            refused = await gw.client.post(f"/run/{APP}", json=job_body(), headers=A)
            body = assert_fal_error(refused, status_code, error_type)
            assert refused.headers["x-fal-request-id"] == gw.orchestrator.calls[-1]["request_id"]
            if error_type is None:
                assert body["detail"][0]["loc"] == ["body", "image_url"]
        gw.orchestrator.fail = None  # the Python handle: the same row and rules, the storage's own link
        output = await gw.service.generate(StableAvatarInput.model_validate(job_body()))
        assert output.video.url.startswith("/files/results/") and output.seed == 5
        assert gw.orchestrator.calls[-1]["owner"] == ""


async def test_a_sync_request_refused_by_the_orchestrator_leaves_no_inputs(make_gateway):
    async with make_gateway() as gw:
        original = gw.orchestrator.run_sync

        async def refuse(request_id: str, job_input: dict[str, Any], seed: int, owner: str, input_keys: list[str],
                         **options: Any) -> StoredResult:
            assert input_keys and all(gw.service.storage.exists(k) for k in input_keys)  # stored before the call
            raise KeyRunningCapError("this API key already has 4 running jobs (limit 4)")

        gw.orchestrator.run_sync = refuse  # type: ignore[method-assign]
        refused = await gw.client.post(f"/run/{APP}", json=job_body(), headers=A)
        assert "running jobs (limit 4)" in assert_fal_error(refused, 429, "key_running_cap")["detail"]
        assert int(refused.headers["retry-after"]) >= 1 and gw.stored("inputs/") == []
        gw.orchestrator.run_sync = original  # type: ignore[method-assign]


# -- uploads and signed links ----------------------------------------------------------------------------------
async def test_js_and_python_uploads_land_under_the_callers_prefix_and_serve_back(make_gateway):
    async with make_gateway() as gw:
        mine, theirs = fingerprint(KEY_A), fingerprint(KEY_B)
        init = (await gw.client.post("/storage/upload/initiate?storage_type=fal-cdn-v3",
                                     json={"content_type": "image/png", "file_name": "../a b.png"}, headers=A)).json()
        assert f"/storage/upload/put/uploads/{mine}/" in init["upload_url"]
        forged = init["upload_url"].replace(f"uploads/{mine}/", f"uploads/{theirs}/")
        assert assert_fal_error(await gw.client.put(forged, content=b"x"), 403)["detail"] == \
            "invalid or expired upload URL"
        put = await gw.client.put(init["upload_url"], content=EXAMPLE_IMAGE.read_bytes(),
                                  headers={"content-type": "image/png"})
        assert put.json() == {"status": "ok", "file_size": EXAMPLE_IMAGE.stat().st_size}
        assert (await gw.client.get(init["file_url"])).content == EXAMPLE_IMAGE.read_bytes()
        (key,) = gw.stored("uploads/")
        assert key.startswith(f"uploads/{mine}/") and key.endswith("/_a_b.png") and key.count("/") == 3
        token = (await gw.client.post("/storage/auth/token", json={}, headers=A)).json()
        assert token["token_type"] == "Bearer" and token["base_url"] == "http://gateway.test"
        upload = await gw.client.post("/files/upload", content=b"abc", headers={
            "authorization": f"Bearer {token['token']}", "x-fal-file-name": f"../../uploads/{theirs}/evil.png"})
        access_url = upload.json()["access_url"]
        assert (await gw.client.get(access_url)).content == b"abc"
        assert not any(k.startswith(f"uploads/{theirs}/") for k in gw.stored("uploads/"))
        bad = await gw.client.post("/files/upload", content=b"x", headers={"authorization": "Bearer 1.forged"})
        assert_fal_error(bad, 401)
        # A's upload is an input for A, not for B.
        assert await submit(gw, A, image_url=init["file_url"], audio_url=access_url)
        refused = await gw.client.post(f"/{APP}", json=job_body(image_url=init["file_url"]), headers=B)
        assert field_of(refused) == ["body", "image_url"] and refused.json()["detail"][0]["type"] == "file_not_found"


async def test_signed_links_serve_only_their_own_file_until_they_expire(make_gateway):
    async with make_gateway() as gw:
        storage = gw.service.storage
        storage.put_bytes("results/r1/e1/output.mp4", VIDEO, "video/mp4")
        storage.put_bytes("results/r2/e1/output.mp4", b"other", "video/mp4")
        link = storage.url("results/r1/e1/output.mp4")
        assert (await gw.client.get(link)).content == VIDEO
        swapped = link.replace("/r1/", "/r2/")
        assert (await gw.client.get(swapped)).status_code == 403
        expired = storage.url("results/r1/e1/output.mp4", expires_s=1)
        time.sleep(2.1)
        assert (await gw.client.get(expired)).status_code == 403
        assert (await gw.client.get("/files/jobs.sqlite3?exp=9999999999&sig=x")).status_code in (403, 404)
        gone = storage.url("results/r2/e1/output.mp4")
        storage.delete("results/r2/e1/output.mp4")
        assert (await gw.client.get(gone)).json() == {"detail": "not found"}


# -- readiness -------------------------------------------------------------------------------------------------
async def test_health_names_the_check_that_failed(make_gateway):
    async def broken() -> None:
        raise ConnectionError("replica gone\nsecond line")

    async def fine() -> dict[str, str]:
        return {}

    async with make_gateway(readiness={"Orchestrator": fine, "Denoiser": "on_demand", "Postprocessor": broken}) as gw:
        answer = await gw.client.get("/health")
        assert answer.status_code == 503 and answer.json()["failed"] == {
            "Postprocessor": "ConnectionError: replica gone"}
        assert answer.json()["checks"] == {"storage": "ok", "jobs": "ok", "Orchestrator": "ok",
                                           "Denoiser": "on_demand"}
