"""Gateway: the FastAPI ingress (CPU). fal queue routes, sync route, uploads, signed files, health, Python API.

Status reads go to the JobQueue's memory (one replica, so every Gateway replica sees the same state); nothing here
touches a GPU replica.
"""

import asyncio
import json
import logging
import mimetypes
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from ray import serve

from deployments.auth import ApiKeys
from deployments.config import AppArgs
from deployments.errors import error_response, root_cause
from deployments.fal_protocol import parse_bool, parse_start_timeout, request_urls, status_body
from deployments.job_queue import QueueFullError, RateLimitedError
from deployments.jobs import JobRecord
from deployments.results import public_result
from deployments.signing import Signer
from deployments.storage import LocalStorage, StorageNotFoundError, make_storage, validate_key
from pipeline.fetch import AddressGuard, check_webhook_url
from pipeline.schema import StableAvatarInput, StableAvatarOutput

logger = logging.getLogger("ray.serve")
api = FastAPI(title="stable-avatar-serve", description="fal-ai/stable-avatar compatible video generation")
api.add_middleware(
    CORSMiddleware, allow_origins=["*"], allow_methods=["GET", "POST", "PUT", "OPTIONS"], allow_headers=["*"],
    expose_headers=["x-fal-request-id", "x-fal-request-timeout-type", "x-fal-error-type", "retry-after"],
)
STATIC_DIR = Path(__file__).resolve().parent / "static"
SSE_POLL_S = 0.25
SSE_KEEPALIVE_S = 10.0
UPLOAD_TOKEN_TTL_S = 3600
MAX_UPLOAD_BYTES = 300 * 1024 * 1024


class UploadInitiate(BaseModel):
    content_type: str = "application/octet-stream"
    file_name: str = "upload.bin"


def _base_url(request: Request) -> str:
    return str(request.base_url).rstrip("/")


def _absolute(url: str, request: Request) -> str:
    """Local-storage URLs are relative (``/files/...``) unless a public base URL is configured."""
    return _base_url(request) + url if url.startswith("/") else url


def _safe_name(name: str) -> str:
    cleaned = "".join(c if c.isalnum() or c in "._-" else "_" for c in name.strip())[:100].lstrip(".")
    return cleaned or "upload.bin"


def _fal_error(status: int, detail, request_id: str | None = None, error_type: str | None = None,
               headers: dict | None = None) -> JSONResponse:
    body = {"detail": detail} | ({"error_type": error_type} if error_type else {})
    extra = dict(headers or {})
    if request_id:
        extra["x-fal-request-id"] = request_id
    if error_type:
        extra["x-fal-error-type"] = error_type
    return JSONResponse(body, status_code=status, headers=extra)


@serve.deployment(name="Gateway")
@serve.ingress(api)
class Gateway:
    def __init__(self, orchestrator, job_queue, args: AppArgs) -> None:
        self.orchestrator, self.job_queue, self.args = orchestrator, job_queue, args
        self.storage = make_storage(args.storage)
        self.signer = Signer(self.storage.signing_secret())
        self.app_owner, _, self.app_alias = args.app_id.partition("/")
        self.keys = ApiKeys(args.auth)
        self.webhook_guard = AddressGuard(args.inputs.allow_private_hosts)
        self.max_body = int(args.max_request_body_mb * 2**20)
        if not self.keys.enabled:
            logger.warning("*** NO API KEYS CONFIGURED: this server is OPEN; anyone who can reach it can submit "
                           "jobs and read every job. Set %s (or %s_FILE) to require keys. ***",
                           args.auth.keys_env, args.auth.keys_env)
        logger.info("gateway for %s, preset %s, storage %s", args.app_id, args.preset, self.storage.describe())

    # -- Python API: serve.get_app_handle("stable-avatar").generate.remote(StableAvatarInput(...)) -------------
    async def generate(self, request: StableAvatarInput) -> StableAvatarOutput:
        return await self.orchestrator.generate.remote(request, uuid.uuid4().hex)

    # -- access --------------------------------------------------------------------------------------------------
    def _authorize(self, request: Request) -> str | JSONResponse:
        """The caller's owner id, or the 401/403 answer. Secrets are never logged."""
        result = self.keys.check(request.headers.get("authorization"))
        if result.owner is None:
            return _fal_error(result.status, result.message,
                              headers={"www-authenticate": "Key"} if result.status == 401 else None)
        return result.owner

    async def _parse_input(self, request: Request) -> StableAvatarInput | JSONResponse:
        """Read a size-limited JSON body and validate it into the fal input (422 in fal's ``detail`` format)."""
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.max_body:
            return _fal_error(413, f"request body larger than {self.max_body} bytes; upload large files instead")
        raw = await self._read_body(request, self.max_body)
        if raw is None:
            return _fal_error(413, f"request body larger than {self.max_body} bytes; upload large files instead")
        try:
            payload = json.loads(raw or b"null")
            return StableAvatarInput.model_validate(payload)
        except json.JSONDecodeError as exc:
            return _fal_error(422, [{"loc": ["body"], "msg": f"invalid JSON: {exc}", "type": "json_invalid"}])
        except ValidationError as exc:
            detail = [{"loc": ["body", *err["loc"]], "msg": err["msg"], "type": err["type"]}
                      for err in exc.errors(include_url=False, include_context=False, include_input=False)]
            return _fal_error(422, detail)

    # -- playground (static files shipped in the package; relative URLs, so it works under a route prefix) ------
    @api.get("/", response_model=None)
    async def playground(self) -> Response:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    @api.get("/static/{name:path}", response_model=None)
    async def static(self, name: str) -> Response:
        path = (STATIC_DIR / name).resolve()
        if not path.is_file() or STATIC_DIR.resolve() not in path.parents:
            return JSONResponse({"detail": "not found"}, status_code=404)
        return FileResponse(path, media_type=mimetypes.guess_type(path.name)[0] or "application/octet-stream")

    # -- health and sync ---------------------------------------------------------------------------------------
    @api.get("/health")
    async def health(self) -> JSONResponse:
        try:
            await asyncio.gather(self.orchestrator.ping.remote(), self.job_queue.queue_length.remote())
        except Exception as exc:  # noqa: BLE001 - any failure means "not ready"
            return JSONResponse({"status": "unavailable", "reason": type(exc).__name__}, status_code=503)
        return JSONResponse({"status": "ok", "app_id": self.args.app_id, "preset": self.args.preset,
                             "auth_required": self.keys.enabled})

    @api.post("/run/{app_id:path}")
    async def run_sync(self, app_id: str, request: Request) -> JSONResponse:
        owner = self._authorize(request)
        if isinstance(owner, JSONResponse):
            return owner
        if app_id.strip("/") != self.args.app_id:
            return JSONResponse({"detail": f"unknown application {app_id!r}"}, status_code=404)
        body = await self._parse_input(request)
        if isinstance(body, JSONResponse):
            return body
        request_id = request.headers.get("x-fal-request-id") or uuid.uuid4().hex
        try:
            output: StableAvatarOutput = await self.orchestrator.generate.remote(body, request_id, owner)
        except Exception as exc:  # noqa: BLE001 - mapped to a fal error body
            status, payload = error_response(exc)
            if status >= 500:
                logger.exception("request %s failed", request_id)
            return JSONResponse(payload, status_code=status, headers={"x-fal-request-id": request_id})
        output.video.url = _absolute(output.video.url, request)
        return JSONResponse(output.model_dump(), headers={"x-fal-request-id": request_id})

    @api.get("/progress/{request_id}")
    async def progress(self, request_id: str, request: Request) -> JSONResponse:
        """Progress of a sync request sent with an ``x-fal-request-id`` header (queued jobs: use /status)."""
        owner = self._authorize(request)
        if isinstance(owner, JSONResponse):
            return owner
        state = await self.orchestrator.get_progress.remote(request_id)
        if state is None:
            return JSONResponse({"detail": "unknown request"}, status_code=404)
        return JSONResponse(state)

    # -- fal queue protocol ------------------------------------------------------------------------------------
    def _is_app(self, owner: str, app: str) -> bool:
        return (owner, app) == (self.app_owner, self.app_alias)

    async def _lookup(self, owner: str, app: str, request_id: str,
                      request: Request) -> tuple[JobRecord, int, str] | JSONResponse:
        """(job, queue position, caller) for a caller allowed to see it; otherwise the 401/403/404 answer."""
        caller = self._authorize(request)
        if isinstance(caller, JSONResponse):
            return caller
        found = (await self.job_queue.get_with_position.remote(request_id, caller)
                 if self._is_app(owner, app) else None)
        if found is None:
            return _fal_error(404, "Request not found", request_id)
        return found[0], found[1], caller

    @api.get("/{owner}/{app}/requests/{request_id}/status")
    async def status(self, owner: str, app: str, request_id: str, request: Request) -> JSONResponse:
        found = await self._lookup(owner, app, request_id, request)
        if isinstance(found, JSONResponse):
            return found
        job, position, _ = found
        body = status_body(job, position, parse_bool(request.query_params.get("logs")), _base_url(request))
        return JSONResponse(body, status_code=200 if job.finished else 202,
                            headers={"x-fal-request-id": request_id})

    @api.get("/{owner}/{app}/requests/{request_id}/status/stream", response_model=None)
    async def status_stream(self, owner: str, app: str, request_id: str, request: Request) -> Response:
        found = await self._lookup(owner, app, request_id, request)
        if isinstance(found, JSONResponse):
            return found
        caller = found[2]
        with_logs, base = parse_bool(request.query_params.get("logs")), _base_url(request)

        async def events():
            sent_logs, last, last_sent_at = 0, None, time.monotonic()
            while True:
                found = await self.job_queue.get_with_position.remote(request_id, caller)
                if found is None:
                    return
                job, position = found
                snapshot = (job.status, position, len(job.logs), job.stage, round(job.progress, 3))
                if snapshot != last:
                    body = status_body(job, position, with_logs, base, logs_from=sent_logs)
                    sent_logs, last, last_sent_at = len(job.logs), snapshot, time.monotonic()
                    yield f"data: {json.dumps(body)}\n\n"
                    if job.finished:
                        return
                elif time.monotonic() - last_sent_at > SSE_KEEPALIVE_S:
                    last_sent_at = time.monotonic()
                    yield ": keep-alive\n\n"
                await asyncio.sleep(SSE_POLL_S)

        return StreamingResponse(events(), media_type="text/event-stream", headers={
            "cache-control": "no-cache", "x-fal-request-id": request_id, "x-accel-buffering": "no"})

    @api.get("/{owner}/{app}/requests/{request_id}")
    async def result(self, owner: str, app: str, request_id: str, request: Request) -> JSONResponse:
        found = await self._lookup(owner, app, request_id, request)
        if isinstance(found, JSONResponse):
            return found
        job, position, _ = found
        if not job.finished:
            return JSONResponse(status_body(job, position, False, _base_url(request)), status_code=202,
                                headers={"x-fal-request-id": request_id})
        if job.error is not None:
            headers = {"x-fal-request-timeout-type": job.error.timeout_type} if job.error.timeout_type else None
            error_type = job.error.error_type if isinstance(job.error.detail, str) else None
            return _fal_error(job.error.status_code, job.error.detail, request_id, error_type, headers)
        output = public_result(job.result, self.storage) or {}
        output["video"]["url"] = _absolute(output["video"]["url"], request)
        return JSONResponse(output, headers={"x-fal-request-id": request_id})

    @api.put("/{owner}/{app}/requests/{request_id}/cancel")
    async def cancel(self, owner: str, app: str, request_id: str, request: Request) -> JSONResponse:
        caller = self._authorize(request)
        if isinstance(caller, JSONResponse):
            return caller
        outcome = (await self.job_queue.cancel.remote(request_id, caller)
                   if self._is_app(owner, app) else "NOT_FOUND")
        code = {"CANCELLATION_REQUESTED": 202, "ALREADY_COMPLETED": 400, "NOT_FOUND": 404}[outcome]
        return JSONResponse({"status": outcome}, status_code=code, headers={"x-fal-request-id": request_id})

    # -- storage uploads (JS: initiate + PUT; Python: token + files/upload) ------------------------------------
    @api.post("/storage/upload/initiate")
    async def upload_initiate(self, body: UploadInitiate, request: Request) -> JSONResponse:
        owner = self._authorize(request)
        if isinstance(owner, JSONResponse):
            return owner
        key = f"uploads/{owner or 'public'}/{uuid.uuid4().hex}/{_safe_name(body.file_name)}"
        upload_url = self.storage.upload_url(key, body.content_type, UPLOAD_TOKEN_TTL_S)
        if upload_url is None:
            exp = int(time.time()) + UPLOAD_TOKEN_TTL_S
            upload_url = f"{_base_url(request)}/storage/upload/put/{key}?exp={exp}&sig={self.signer.sign('put', key, exp)}"
        return JSONResponse({"upload_url": upload_url, "file_url": _absolute(self.storage.url(key), request)})

    @api.put("/storage/upload/put/{key:path}")
    async def upload_put(self, key: str, request: Request, exp: int = 0, sig: str = "") -> JSONResponse:
        if not self.signer.verify(sig, "put", key, exp):
            return _fal_error(403, "invalid or expired upload URL")
        data = await self._read_body(request, MAX_UPLOAD_BYTES)
        if data is None:
            return _fal_error(413, f"upload larger than {MAX_UPLOAD_BYTES} bytes")
        await asyncio.to_thread(self.storage.put_bytes, validate_key(key), data,
                                request.headers.get("content-type", "application/octet-stream"))
        return JSONResponse({"status": "ok", "file_size": len(data)})

    @api.post("/storage/auth/token")
    async def upload_token(self, request: Request) -> JSONResponse:
        owner = self._authorize(request)
        if isinstance(owner, JSONResponse):
            return owner
        exp, subject = int(time.time()) + UPLOAD_TOKEN_TTL_S, owner or "public"
        token = f"{exp}.{subject}.{self.signer.sign('upload-token', subject, exp)}"
        return JSONResponse({"token": token, "token_type": "Bearer", "base_url": _base_url(request),
                             "expires_at": datetime.fromtimestamp(exp, UTC).isoformat()})

    @api.post("/files/upload")
    async def files_upload(self, request: Request) -> JSONResponse:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        exp_text, _, rest = token.partition(".")
        subject, _, sig = rest.partition(".")
        if scheme.lower() != "bearer" or not exp_text.isdigit() or not subject.isalnum() or not self.signer.verify(
                sig, "upload-token", subject, int(exp_text)):
            return _fal_error(401, "a valid upload token is required (POST /storage/auth/token)")
        data = await self._read_body(request, MAX_UPLOAD_BYTES)
        if data is None:
            return _fal_error(413, f"upload larger than {MAX_UPLOAD_BYTES} bytes")
        name = _safe_name(request.headers.get("x-fal-file-name") or "upload.bin")
        key = f"uploads/{subject}/{uuid.uuid4().hex}/{name}"
        await asyncio.to_thread(self.storage.put_bytes, key, data,
                                request.headers.get("content-type", "application/octet-stream"))
        return JSONResponse({"access_url": _absolute(self.storage.url(key), request)})

    @staticmethod
    async def _read_body(request: Request, limit: int) -> bytes | None:
        """The body, or None as soon as it exceeds ``limit`` (a lying Content-Length does not matter)."""
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                return None
            chunks.append(chunk)
        return b"".join(chunks)

    # -- signed local files ------------------------------------------------------------------------------------
    @api.get("/files/{key:path}", response_model=None)
    async def files(self, key: str, exp: int = 0, sig: str = "") -> Response:
        if not isinstance(self.storage, LocalStorage):
            return JSONResponse({"detail": "not found"}, status_code=404)
        try:
            if not self.storage.verify_signature(key, exp, sig):
                return JSONResponse({"detail": "invalid or expired link"}, status_code=403)
            path = self.storage.path_for(key)
        except (ValueError, StorageNotFoundError):
            return JSONResponse({"detail": "not found"}, status_code=404)
        if not path.is_file():
            return JSONResponse({"detail": "not found"}, status_code=404)
        media_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        return FileResponse(path, media_type=media_type, filename=path.name)

    # -- submit (last: its path pattern is the most general) ---------------------------------------------------
    @api.post("/{owner}/{app}")
    async def submit(self, owner: str, app: str, request: Request) -> JSONResponse:
        return await self._submit(owner, app, request)

    @api.post("/{owner}/{app}/{subpath:path}")
    async def submit_subpath(self, owner: str, app: str, subpath: str, request: Request) -> JSONResponse:
        return await self._submit(owner, app, request)

    async def _submit(self, owner: str, app: str, request: Request) -> JSONResponse:
        caller = self._authorize(request)
        if isinstance(caller, JSONResponse):
            return caller
        if not self._is_app(owner, app):
            return _fal_error(404, f"unknown application {owner}/{app}")
        body = await self._parse_input(request)
        if isinstance(body, JSONResponse):
            return body
        query, headers = request.query_params, request.headers
        priority = headers.get("x-fal-queue-priority", "normal").strip().lower()
        if priority not in ("normal", "low"):
            return _fal_error(422, [{"loc": ["header", "x-fal-queue-priority"],
                                     "msg": "must be 'normal' or 'low'", "type": "value_error"}])
        try:
            start_timeout = parse_start_timeout(headers.get("x-fal-request-timeout"))
            max_queue = int(query["fal_max_queue_length"]) if "fal_max_queue_length" in query else None
        except ValueError as exc:
            return _fal_error(422, [{"loc": ["header"], "msg": str(exc), "type": "value_error"}])
        if query.get("fal_webhook"):
            try:  # the same SSRF guard as input URLs: no webhooks to private or loopback addresses
                await asyncio.to_thread(check_webhook_url, query["fal_webhook"], self.webhook_guard)
            except ValueError as exc:
                return _fal_error(422, [{"loc": ["query", "fal_webhook"], "msg": str(exc), "type": "value_error"}])
        try:
            submitted = await self.job_queue.submit.remote(
                body, self.args.app_id, owner=caller, priority=priority, webhook_url=query.get("fal_webhook"),
                start_timeout_s=start_timeout, max_queue_length=max_queue)
        except Exception as exc:  # noqa: BLE001 - Ray wraps the JobQueue's exception
            cause = root_cause(exc)
            if isinstance(cause, QueueFullError):
                return _fal_error(429, str(cause), headers={"retry-after": "10"})
            if isinstance(cause, RateLimitedError):
                return _fal_error(429, str(cause), headers={"retry-after": str(max(1, round(cause.retry_after_s)))})
            raise
        request_id = submitted["request_id"]
        response = {"status": "IN_QUEUE", "request_id": request_id, "queue_position": submitted["queue_position"],
                    **request_urls(_base_url(request), self.args.app_id, request_id)}
        if query.get("fal_webhook"):
            response["gateway_request_id"] = request_id
        return JSONResponse(response, headers={"x-fal-request-id": request_id})
