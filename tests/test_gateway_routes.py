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
from deployments.jobstore import JobError, KeyRunningCapError
from deployments.runtime.service_state import open_service_state
from deployments.storage import keys
from guarded_fetch import InputError
from pipeline.schema import StableAvatarInput
from testing.media import EXAMPLE_AUDIO, EXAMPLE_IMAGE, data_uri

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
    started: list[str] = field(default_factory=list)  # the runs whose row the store created (calls it refused: not)
    fingerprint: str = ""  # the application's model fingerprint (the Gateway records it with every submit)
    hold: asyncio.Event | None = None  # set: runs wait for it before they finish
    before_create: asyncio.Event | None = None  # set: runs wait for it before the store creates their row

    async def model_fingerprint(self) -> str:
        return self.fingerprint

    async def run_sync(self, request_id: str, job_input: dict[str, Any], seed: int, owner: str,
                       input_keys: list[str], **options: Any) -> StoredResult:
        self.calls.append({"request_id": request_id, "owner": owner, "input_keys": input_keys, **options})
        assert self.service is not None
        store = self.service.store
        if self.before_create is not None:
            await self.before_create.wait()
        claimed = await store.create_sync(app_id=APP, input=job_input, seed=seed, runner_id="fake", lease_s=30,
                                          owner=owner, input_keys=input_keys, request_id=request_id, **options)
        self.started.append(request_id)
        if self.fail is not None:
            await store.complete(request_id, claimed.epoch, error=JobError(
                status_code=500, detail="failed", message="failed"))
            raise self.fail
        if self.hold is not None:
            await self.hold.wait()
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
    app: Any

    def stored(self, prefix: str) -> list[str]:
        return self.service.storage.list_keys(prefix)


@pytest.fixture
def make_gateway(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable:
    """``async with make_gateway(config, keys=True) as gw``: a Gateway app on a fresh database and storage."""

    @asynccontextmanager
    async def make(config: dict[str, Any] | None = None, with_keys: bool = True,
                   readiness: dict[str, Any] | None = None, auth: dict[str, Any] | None = None,
                   storage: dict[str, Any] | None = None) -> AsyncIterator[Harness]:
        monkeypatch.setenv(KEYS_ENV, f"{KEY_A} {KEY_B}" if with_keys else "")
        root = tmp_path / "data"
        placement = {"storage": {"kind": "local", "root": str(root)}} if storage is None else {
            "storage": storage, "jobs": {"kind": "sqlite", "path": str(tmp_path / "jobs.sqlite3")}}
        args = AppArgs.model_validate({**placement, "auth": {"keys_env": KEYS_ENV, **(auth or {})}} | (config or {}))
        state = open_service_state(args)
        orchestrator = FakeOrchestrator()
        service = GatewayService(args, state, orchestrator, readiness or {}, "gateway-test")
        orchestrator.service = service
        app = build_api(service)
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://gateway.test") as client:
                yield Harness(service, client, orchestrator, root, app)
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
        malformed = await gw.client.post(f"/{APP}?fal_max_queue_length=--5", json=job_body(), headers=A)
        assert field_of(malformed) == ["header"]
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
        await wait_for(lambda: gw.service.streams.open.get(fingerprint(KEY_A)) == 1)  # the stream is open
        await asyncio.sleep(0.4)  # and has read the queued status (its first read follows at once)
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
        for bad, loc in ((b"{", ["body"]), (b'{"file_name": 5}', ["body", "file_name"])):
            assert field_of(await gw.client.post("/storage/upload/initiate", content=bad, headers=A)) == loc
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


async def test_a_link_to_stored_results_or_inputs_is_an_input_for_their_owner_only(make_gateway):
    """A link to our own storage names an object the submitting key must own: the result of one of its jobs (or its
    upload, above). Another key's result and any job's stored input are refused at submit, naming the field, and
    start no job; the owner's own result is accepted and reaches the job as that result's key."""
    async with make_gateway() as gw:
        rid = await submit(gw, A)
        claimed = await gw.service.store.claim("runner", 30)
        await finish_job(gw.service, rid, claimed.epoch)
        video_url = (await gw.client.get(f"/{APP}/requests/{rid}", headers=A)).json()["video"]["url"]
        input_url = gw.service.storage.url(f"inputs/{fingerprint(KEY_A)}/{rid}/image.png")
        for field, url, key in (("audio_url", video_url, B), ("image_url", input_url, B), ("image_url", input_url, A)):
            refused = await gw.client.post(f"/{APP}", json=job_body(**{field: url}), headers=key)
            assert field_of(refused) == ["body", field], (field, url)
            assert refused.json()["detail"][0]["type"] == "file_not_found"
        assert await gw.service.store.queue_length() == 0
        reuse = await submit(gw, A, audio_url=video_url)
        job = await gw.service.store.claim("runner", 30)
        assert job.request_id == reuse and job.input["stored"]["audio_url"] == keys.result_key(rid, claimed.epoch)


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


# -- limits before work --------------------------------------------------------------------------------------
class WatchedBody:
    """A request body that records whether the server read any of it."""

    def __init__(self, data: bytes, chunk: int = 1 << 16):
        self.data, self.chunk, self.read = data, chunk, False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        self.read = True
        for start in range(0, len(self.data), self.chunk):
            yield self.data[start:start + self.chunk]


def watched_job() -> WatchedBody:
    return WatchedBody(json.dumps(job_body()).encode())


async def test_job_caps_and_the_submit_token_are_checked_before_the_body_is_read(make_gateway):
    """Each refusal names its limit, comes before a byte of the body is read and leaves nothing stored; a refusal
    by a cap costs no token."""
    auth = {"submit_burst": 3, "submit_rate_per_minute": 0.001, "max_queued_per_key": 2, "max_running_per_key": 1}
    async with make_gateway(auth=auth) as gw:
        first, second = await submit(gw, A), await submit(gw, A)  # 1 token left
        body = watched_job()
        refused = await gw.client.post(f"/{APP}", content=body, headers=A)
        assert "queued jobs (limit 2)" in assert_fal_error(refused, 429, "key_queue_cap")["detail"]
        assert not body.read and int(refused.headers["retry-after"]) >= 1
        full = watched_job()
        refused = await gw.client.post(f"/{APP}?fal_max_queue_length=2", content=full, headers=B)
        assert "limit 2" in assert_fal_error(refused, 429, "queue_full")["detail"] and not full.read
        await gw.client.put(f"/{APP}/requests/{first}/cancel", headers=A)
        third = await submit(gw, A)  # the cap refusal above cost no token: this is the third
        await gw.client.put(f"/{APP}/requests/{third}/cancel", headers=A)
        body = watched_job()
        refused = await gw.client.post(f"/{APP}", content=body, headers=A)
        assert "too many requests" in assert_fal_error(refused, 429, "rate_limited")["detail"] and not body.read
        # /run: the running cap (a queued job of A's is running now), before the body and the Orchestrator.
        claimed = await gw.service.store.claim("runner", 30)
        assert claimed is not None and claimed.request_id == second
        body = watched_job()
        refused = await gw.client.post(f"/run/{APP}", content=body, headers=A)
        assert "running jobs (limit 1)" in assert_fal_error(refused, 429, "key_running_cap")["detail"]
        assert not body.read and gw.orchestrator.calls == []
        # Only the admitted jobs stored inputs (a cancelled job keeps them until retention).
        assert {k.split("/")[2] for k in gw.stored(f"inputs/{fingerprint(KEY_A)}/")} == {first, second, third}
        assert gw.stored(f"inputs/{fingerprint(KEY_B)}/") == []
        # B's /run is admitted, and the Orchestrator is told the token was taken already.
        ran = await gw.client.post(f"/run/{APP}", json=job_body(), headers=B)
        assert ran.status_code == 200 and gw.orchestrator.calls[-1]["rate_limited"] is False


async def test_every_other_keyed_route_spends_the_request_budget_not_the_submit_budget(make_gateway):
    async with make_gateway(auth={"request_burst": 4, "request_rate_per_minute": 0.001}) as gw:
        rid = await submit(gw, A)
        status = f"/{APP}/requests/{rid}/status"
        for _ in range(2):
            assert (await gw.client.get(status, headers=A)).status_code == 202
        assert (await gw.client.get(f"/progress/{rid}", headers=A)).status_code == 200
        assert (await gw.client.post("/storage/auth/token", headers=A)).status_code == 200
        for method, path in (("GET", status), ("GET", f"/{APP}/requests/{rid}"), ("PUT", f"/{APP}/requests/{rid}/cancel"),
                             ("GET", f"/progress/{rid}"), ("POST", "/storage/upload/initiate"),
                             ("GET", f"{status}/stream")):
            refused = await gw.client.request(method, path, headers=A)
            assert "too many requests" in assert_fal_error(refused, 429, "rate_limited")["detail"], path
        assert (await gw.client.get(status, headers=B)).status_code == 404  # B's budget is its own
        assert await submit(gw, A)  # job creation has its own budget
        assert (await gw.client.get(status, headers=A)).status_code == 429


async def send_events_then_disconnect(app: Any, path: str, headers: dict[str, str], events: int) -> list[dict]:
    """Drive the ASGI app as a client that hangs up after ``events`` body messages (0: at once)."""
    sent: list[dict] = []
    hang_up = asyncio.Event()
    if events == 0:
        hang_up.set()
    requested = False

    async def receive() -> dict:
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await hang_up.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)
        if sum(m["type"] == "http.response.body" and bool(m.get("body")) for m in sent) >= events:
            hang_up.set()

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": "GET", "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
             "root_path": "", "headers": [(k.encode(), v.encode()) for k, v in headers.items()],
             "client": ("127.0.0.1", 40000), "server": ("gateway.test", 80)}
    await asyncio.wait_for(app(scope, receive, send), 30)
    return sent


async def test_status_streams_per_key_are_capped_and_every_ending_gives_the_slot_back(make_gateway):
    async with make_gateway(auth={"max_streams_per_key": 2}) as gw:
        rid = await submit(gw, A)
        url = f"/{APP}/requests/{rid}/status/stream"
        held = [asyncio.create_task(gw.client.get(url, headers=A)) for _ in range(2)]
        await wait_for(lambda: gw.service.streams.open.get(fingerprint(KEY_A)) == 2)
        refused = await gw.client.get(url, headers=A)
        assert "open status streams" in assert_fal_error(refused, 429, "too_many_streams")["detail"]
        assert gw.service.streams.open == {fingerprint(KEY_A): 2}
        other = await submit(gw, B)
        b_stream = asyncio.create_task(gw.client.get(f"/{APP}/requests/{other}/status/stream", headers=B))
        await wait_for(lambda: fingerprint(KEY_B) in gw.service.streams.open)
        assert gw.service.streams.open[fingerprint(KEY_B)] == 1  # B's streams are counted apart
        claimed = await gw.service.store.claim("runner", 30)
        assert claimed is not None and claimed.request_id == rid
        await finish_job(gw.service, rid, claimed.epoch)
        for task in held:
            assert sse_events((await asyncio.wait_for(task, 30)).text)[-1]["status"] == "COMPLETED"
        assert fingerprint(KEY_A) not in gw.service.streams.open  # finished streams gave their slots back
        await gw.client.put(f"/{APP}/requests/{other}/cancel", headers=B)
        await asyncio.wait_for(b_stream, 30)
        # A client that hangs up, after its first event or before any, gives its slot back too.
        queued = await submit(gw, A)
        for events in (1, 0):
            sent = await send_events_then_disconnect(gw.app, f"/{APP}/requests/{queued}/status/stream", A, events)
            assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 200
            assert gw.service.streams.open == {}, events


# -- uploads: size, quota, streaming, link lifetime --------------------------------------------------------------
async def initiate(gw: Harness, key: dict[str, str] = A) -> dict[str, str]:
    answer = await gw.client.post("/storage/upload/initiate", json={"content_type": "image/png",
                                                                    "file_name": "x.png"}, headers=key)
    assert answer.status_code == 200, answer.text
    return answer.json()


def python_upload(token: str, name: str = "a.wav") -> dict[str, str]:
    return {"authorization": f"Bearer {token}", "x-fal-file-name": name, "content-type": "audio/wav"}


async def test_every_upload_route_bounds_the_size_before_and_while_reading(make_gateway, tmp_path, monkeypatch):
    spool = tmp_path / "spool"
    spool.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(spool))
    async with make_gateway(auth={"max_upload_mb": 1}) as gw:
        limit = 1 << 20
        ticket = await initiate(gw)
        declared = WatchedBody(b"x" * (limit + 1))
        refused = await gw.client.put(ticket["upload_url"], content=declared,
                                      headers={"content-length": str(limit + 1)})
        assert assert_fal_error(refused, 413)["detail"] == f"upload larger than {limit} bytes" and not declared.read
        chunked = WatchedBody(b"x" * (3 * limit))  # no Content-Length: refused once past the bound
        assert_fal_error(await gw.client.put(ticket["upload_url"], content=chunked), 413)
        token = (await gw.client.post("/storage/auth/token", headers=A)).json()["token"]
        too_big = await gw.client.post("/files/upload", content=WatchedBody(b"y" * (limit + 10)),
                                       headers=python_upload(token))
        assert assert_fal_error(too_big, 413)["detail"] == f"upload larger than {limit} bytes"
        assert gw.stored("uploads/") == [] and list(spool.iterdir()) == []  # nothing kept, no temporary file
        exact = await gw.client.put(ticket["upload_url"], content=WatchedBody(b"z" * limit))
        assert exact.json() == {"status": "ok", "file_size": limit}
        assert list(spool.iterdir()) == []


async def test_an_upload_is_written_to_a_temporary_file_as_it_arrives(make_gateway, tmp_path, monkeypatch):
    spool = tmp_path / "spool"
    spool.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(spool))
    seen_on_disk: list[int] = []

    class Probe(WatchedBody):
        async def __aiter__(self) -> AsyncIterator[bytes]:
            for index in range(48):
                if index == 40:  # 2.5 MiB sent: most of it must be on disk already, not in memory
                    seen_on_disk.extend(p.stat().st_size for p in spool.iterdir())
                yield bytes([index]) * (1 << 16)

    async with make_gateway() as gw:
        ticket = await initiate(gw)
        answer = await gw.client.put(ticket["upload_url"], content=Probe(b""))
        assert answer.json()["file_size"] == 48 << 16
        assert len(seen_on_disk) == 1 and seen_on_disk[0] >= 2 << 20, seen_on_disk
        (key,) = gw.stored("uploads/")
        assert gw.service.storage.get_bytes(key) == b"".join(bytes([i]) * (1 << 16) for i in range(48))
        assert list(spool.iterdir()) == []


async def test_the_upload_quota_counts_live_uploads_per_key(make_gateway):
    async with make_gateway({"retention": {"uploads_s": 4}}, auth={"upload_quota_mb": 0.25,
                                                                   "max_uploads_per_key": 3}) as gw:
        quarter = 1 << 18
        ticket = await initiate(gw)
        assert (await gw.client.put(ticket["upload_url"], content=b"a" * (quarter - 100))).status_code == 200
        over = await gw.client.put((await initiate(gw))["upload_url"], content=b"b" * 200,
                                   headers={"content-length": "200"})
        detail = assert_fal_error(over, 413, "upload_quota_exceeded")["detail"]
        assert "1 live uploads hold 0.2 MiB" in detail and "this one" in detail
        chunked = await gw.client.put((await initiate(gw))["upload_url"], content=WatchedBody(b"c" * 200))
        assert_fal_error(chunked, 413, "upload_quota_exceeded")
        assert (await gw.client.put((await initiate(gw))["upload_url"], content=b"d" * 50)).status_code == 200
        assert len(gw.stored(f"uploads/{fingerprint(KEY_A)}/")) == 2
        # B's quota is its own; a count cap refuses at initiate, before the client sends anything.
        for _ in range(3):
            ticket = await initiate(gw, B)
            assert (await gw.client.put(ticket["upload_url"], content=b"e")).status_code == 200
        refused = await gw.client.post("/storage/upload/initiate", json={}, headers=B)
        assert "3 live uploads" in assert_fal_error(refused, 413, "upload_quota_exceeded")["detail"]
        # An upload's bytes count until retention deletes it (uploads_s after it was made): then its room is free.
        await asyncio.sleep(4.2)
        assert (await gw.client.post("/storage/upload/initiate", json={}, headers=B)).status_code == 200


async def test_concurrent_uploads_of_one_key_never_pass_its_quota_together(make_gateway):
    """The room is reserved in the jobs database before a body is read: uploads racing through the Gateway (any
    number of replicas share the count) cannot each see the same free room."""
    async with make_gateway(auth={"upload_quota_mb": 1.0}) as gw:
        tickets = [await initiate(gw) for _ in range(6)]
        quarter = 1 << 18
        answers = await asyncio.gather(*(gw.client.put(t["upload_url"], content=b"u" * (quarter + 1000),
                                                       headers={"content-length": str(quarter + 1000)})
                                         for t in tickets))
        assert sorted(a.status_code for a in answers) == [200, 200, 200, 413, 413, 413]
        assert sum(len(gw.service.storage.get_bytes(k)) for k in gw.stored("uploads/")) <= 1 << 20
        usage = await gw.service.store.upload_usage(fingerprint(KEY_A))
        assert (usage.uploads, usage.bytes) == (3, 3 * (quarter + 1000))  # settled to what was stored


def link_lifetime(url: str) -> float:
    from urllib.parse import parse_qs, urlsplit

    query = parse_qs(urlsplit(url).query)
    if "exp" in query:
        return int(query["exp"][0]) - time.time()
    return float(query["X-Amz-Expires"][0])


async def test_upload_links_expire_no_later_than_the_uploads(make_gateway):
    async with make_gateway({"retention": {"uploads_s": 1800}}) as gw:
        ticket = await initiate(gw)
        assert 1790 <= link_lifetime(ticket["file_url"]) <= 1800
        await gw.client.put(ticket["upload_url"], content=b"png")
        token = (await gw.client.post("/storage/auth/token", headers=A)).json()["token"]
        access = (await gw.client.post("/files/upload", content=b"wav", headers=python_upload(token))).json()
        assert 1790 <= link_lifetime(access["access_url"]) <= 1800


async def test_s3_uploads_go_through_the_gateway_bounded_and_counted(make_gateway, s3_env):
    storage = s3_env.storage_config().model_dump() | {"url_expiry_s": 3600}
    async with make_gateway({"retention": {"uploads_s": 600}}, storage=storage,
                            auth={"max_upload_mb": 0.5, "upload_quota_mb": 0.75}) as gw:
        ticket = await initiate(gw)
        assert ticket["upload_url"].startswith("http://gateway.test/storage/upload/put/uploads/")  # not the bucket
        assert ticket["file_url"].startswith(s3_env.endpoint_url) and link_lifetime(ticket["file_url"]) == 600
        half = 1 << 19
        too_big = await gw.client.put(ticket["upload_url"], content=WatchedBody(b"x" * (half + 1)))
        assert_fal_error(too_big, 413)
        assert gw.stored("uploads/") == []  # nothing reached the bucket
        assert (await gw.client.put(ticket["upload_url"], content=b"p" * half)).status_code == 200
        (key,) = gw.stored("uploads/")
        listed = s3_env.client().list_objects_v2(Bucket=s3_env.bucket, Prefix=gw.service.storage.prefix)
        assert [(o["Key"], o["Size"]) for o in listed["Contents"]] == [(gw.service.storage.prefix + key, half)]
        assert httpx.get(ticket["file_url"]).content == b"p" * half  # the presigned GET serves it
        over = await gw.client.put((await initiate(gw))["upload_url"], content=b"q" * half,
                                   headers={"content-length": str(half)})
        assert_fal_error(over, 413, "upload_quota_exceeded")  # counted in the jobs database
        assert len(gw.stored("uploads/")) == 1


# -- small parts -------------------------------------------------------------------------------------------------
def test_token_buckets_refill_at_their_rate_and_stay_bounded():
    from deployments.gateway import limits

    now = [0.0]
    buckets = limits.TokenBuckets(rate_per_s=2.0, burst=3, clock=lambda: now[0])
    assert [buckets.take("k") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert buckets.take("k") == pytest.approx(0.5)  # refused: nothing spent
    now[0] = 0.5
    assert buckets.take("k") == 0.0 and buckets.take("k") == pytest.approx(0.5)
    now[0] = 100.0
    assert [buckets.take("k") for _ in range(4)][-1] > 0  # refilled to the burst, no further
    for n in range(limits.MAX_TRACKED_KEYS + 10):
        buckets.take(f"key-{n}")
    assert len(buckets._buckets) == limits.MAX_TRACKED_KEYS


# -- Idempotency-Key: a client's retry never starts a second GPU job ----------------------------------------------
def keyed(key: str | bytes, headers: dict[str, str] = A) -> dict[str, str | bytes]:
    return {**headers, "idempotency-key": key}


async def test_a_retried_submit_answers_the_first_job_before_any_limit_and_queues_no_other(make_gateway):
    """The retry is looked up before the caps and the submit token: with the key's only token spent and its
    queue full, it still answers the first job (200, not 429), queues nothing and stores nothing."""
    async with make_gateway(auth={"submit_burst": 1, "submit_rate_per_minute": 0.001, "max_queued_per_key": 1}) as gw:
        gw.orchestrator.fingerprint = "weights-v2"
        first = await gw.client.post(f"/{APP}", json=job_body(), headers=keyed("retry-1"))
        assert first.status_code == 200, first.text
        request_id = first.json()["request_id"]
        stored = gw.stored("inputs/")
        # the same body, re-serialized with its keys in another order, as another client library would
        body = json.dumps(dict(reversed(list(job_body().items()))))
        again = await gw.client.post(f"/{APP}", content=body, headers=keyed("retry-1"))
        assert again.status_code == 200, again.text
        assert again.json()["request_id"] == request_id == again.headers["x-fal-request-id"]
        assert again.json()["status_url"] == first.json()["status_url"]
        assert await gw.service.store.queue_length() == 1 and gw.stored("inputs/") == stored
        assert (await gw.service.store.get(request_id, fingerprint(KEY_A))).model_fingerprint == "weights-v2"
        # without the key, the same body is a new request: refused at the caps, as any
        assert_fal_error(await gw.client.post(f"/{APP}", json=job_body(), headers=A), 429, "key_queue_cap")
        # the same key with another body: a client bug, named
        other = await gw.client.post(f"/{APP}", json=job_body(seed=6), headers=keyed("retry-1"))
        assert field_of(other) == ["header", "Idempotency-Key"]
        assert "different request body" in other.json()["detail"][0]["msg"]
        # keys are scoped per API key: B's "retry-1" is B's own
        theirs = await gw.client.post(f"/{APP}", json=job_body(), headers=keyed("retry-1", B))
        assert theirs.status_code == 200 and theirs.json()["request_id"] != request_id
        for bad in ("has space", "", "x" * 256, "caf\xe9".encode("latin-1")):
            malformed = await gw.client.post(f"/{APP}", json=job_body(), headers=keyed(bad, B))
            assert field_of(malformed) == ["header", "Idempotency-Key"], bad


async def test_concurrent_retries_of_one_idempotency_key_create_one_job(make_gateway):
    async with make_gateway() as gw:
        answers = await asyncio.gather(*(gw.client.post(f"/{APP}", json=job_body(), headers=keyed("burst"))
                                         for _ in range(5)))
        assert [a.status_code for a in answers] == [200] * 5
        ids = {a.json()["request_id"] for a in answers}
        assert len(ids) == 1 and await gw.service.store.queue_length() == 1
        (request_id,) = ids
        # the retries that lost the race deleted the inputs they had stored
        assert {k.split("/")[2] for k in gw.stored("inputs/")} == {request_id}


async def test_a_retried_run_answers_the_first_runs_outcome_and_starts_no_other(make_gateway):
    async with make_gateway(auth={"submit_burst": 2, "submit_rate_per_minute": 0.001}) as gw:
        gw.orchestrator.hold = asyncio.Event()
        first = asyncio.ensure_future(gw.client.post(f"/run/{APP}", json=job_body(), headers=keyed("run-1")))
        await wait_for(lambda: len(gw.orchestrator.started) == 1)  # its row (and the key's record) committed
        # a retry while the first run is still going (the client timed out): it waits for that run
        retry = asyncio.ensure_future(gw.client.post(f"/run/{APP}", json=job_body(), headers=keyed("run-1")))
        await asyncio.sleep(0.3)
        assert not retry.done()
        gw.orchestrator.hold.set()
        answers = await asyncio.wait_for(asyncio.gather(first, retry), 60)
        assert [a.status_code for a in answers] == [200, 200], [a.text for a in answers]
        assert answers[0].headers["x-fal-request-id"] == answers[1].headers["x-fal-request-id"]
        video = [a.json()["video"] for a in answers]
        assert video[0]["file_size"] == video[1]["file_size"]
        assert len(gw.orchestrator.started) == len(gw.orchestrator.calls) == 1
        # one more retry after it finished, with the key's submit tokens spent: answered, not 429
        spent = await gw.client.post(f"/run/{APP}", json=job_body(seed=9), headers=A)  # the second token
        assert spent.status_code == 200
        assert_fal_error(await gw.client.post(f"/run/{APP}", json=job_body(seed=9), headers=A), 429, "rate_limited")
        later = await gw.client.post(f"/run/{APP}", json=job_body(), headers=keyed("run-1"))
        assert later.status_code == 200 and later.headers["x-fal-request-id"] == answers[0].headers["x-fal-request-id"]
        assert len(gw.orchestrator.calls) == 2
        other = await gw.client.post(f"/run/{APP}", json=job_body(seed=6), headers=keyed("run-1"))
        assert field_of(other) == ["header", "Idempotency-Key"]


async def test_two_runs_with_one_key_at_the_same_moment_start_one_job_and_share_its_answer(make_gateway):
    """Neither finds the other's record (both reach the Orchestrator before a row exists): the store creates one
    row for the key and refuses the other, whose request then answers the winner's outcome."""
    async with make_gateway() as gw:
        gw.orchestrator.before_create = asyncio.Event()
        first = asyncio.ensure_future(gw.client.post(f"/run/{APP}", json=job_body(), headers=keyed("race")))
        await wait_for(lambda: len(gw.orchestrator.calls) == 1)
        second = asyncio.ensure_future(gw.client.post(f"/run/{APP}", json=job_body(), headers=keyed("race")))
        await wait_for(lambda: len(gw.orchestrator.calls) == 2)
        gw.orchestrator.before_create.set()
        answers = await asyncio.wait_for(asyncio.gather(first, second), 60)
        assert [a.status_code for a in answers] == [200, 200], [a.text for a in answers]
        assert len(gw.orchestrator.started) == 1
        assert {a.headers["x-fal-request-id"] for a in answers} == {gw.orchestrator.started[0]}
        assert answers[0].json()["video"]["file_size"] == answers[1].json()["video"]["file_size"]


async def wait_for(predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)
