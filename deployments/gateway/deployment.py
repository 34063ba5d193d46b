"""Gateway: the FastAPI ingress (CPU). fal queue routes, sync route, uploads, signed files, health, Python API.

Any number of replicas: every read (status, result, SSE stream, progress) and every write (submit, cancel) goes
to the jobs database directly, owner-scoped (another key's job is a 404), so no single actor sits on the read
path and nothing here touches a GPU replica. The server issues every request id; a client's
``x-fal-request-id`` is only logged. Submit and ``/run`` share the per-key rate limit and caps (the database's
token bucket and counts), and ``data:`` inputs are written to storage once, here, under the job's own key.
"""

import asyncio
import json
import logging
import math
import mimetypes
import re
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from ray import serve

from deployments.config import AppArgs
from deployments.contracts import JobCancelled, StoredResult
from deployments.gateway.auth import ApiKeys
from deployments.gateway.fal_protocol import parse_bool, parse_start_timeout, request_urls, status_body
from deployments.gateway.health import ON_DEMAND, run_checks
from deployments.gateway.job_inputs import build_job_input
from deployments.gateway.results import result_answer
from deployments.jobstore import (
    FencedError,
    JobSnapshot,
    KeyQueueCapError,
    KeyRunningCapError,
    LimitError,
    QueueFullError,
    RateLimitedError,
    cancelled_error,
    new_request_id,
)
from deployments.runtime import metrics
from deployments.runtime.errors import error_response, root_cause
from deployments.runtime.replica import replica_name
from deployments.runtime.service_state import open_service_state
from deployments.storage import LocalStorage, StorageError, StorageNotFoundError, keys, validate_key
from guarded_fetch import InputError, check_webhook_url
from pipeline.schema import StableAvatarInput, StableAvatarOutput, resolve_seed

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
# Which limit refused a submit or a sync request: the 429's error_type, and when to try again.
LIMIT_TYPES: dict[type[LimitError], tuple[str, int]] = {
    RateLimitedError: ("rate_limited", 1), QueueFullError: ("queue_full", 10),
    KeyQueueCapError: ("key_queue_cap", 10), KeyRunningCapError: ("key_running_cap", 5)}
_OWNER_SEGMENT = re.compile(r"[A-Za-z0-9]{1,64}")


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


def _limit_response(refused: LimitError) -> JSONResponse:
    """429 naming the limit (``error_type``: rate_limited, queue_full, key_queue_cap, key_running_cap)."""
    error_type, retry_after = LIMIT_TYPES.get(type(refused), ("rate_limited", 5))
    if isinstance(refused, RateLimitedError):
        retry_after = max(1, math.ceil(refused.retry_after_s))
    return _fal_error(429, refused.message, error_type=error_type, headers={"retry-after": str(retry_after)})


def _database_errors() -> tuple[type[BaseException], ...]:
    import sqlite3

    errors: list[type[BaseException]] = [sqlite3.OperationalError, sqlite3.DatabaseError]
    try:
        import psycopg

        errors.append(psycopg.OperationalError)
    except ImportError:  # PostgreSQL is optional for the embedded set-up
        pass
    return tuple(errors)


async def _unavailable(request: Request, exc: Exception) -> JSONResponse:
    """The jobs database or the storage is away (a restart, a failover): 503, which clients retry."""
    what = "storage" if isinstance(exc, StorageError) else "jobs database"
    logger.warning("%s %s: the %s is unavailable: %s", request.method, request.url.path, what, type(exc).__name__)
    return _fal_error(503, f"the {what} is unavailable right now; retry shortly",
                      error_type="service_unavailable", headers={"retry-after": "2"})


for _error in (*_database_errors(), StorageError):
    api.add_exception_handler(_error, _unavailable)


@serve.deployment(name="Gateway")
@serve.ingress(api)
class Gateway:
    def __init__(self, orchestrator, preprocessor, denoiser, postprocessor, args: AppArgs) -> None:
        self.orchestrator, self.args = orchestrator, args
        self.deployments = {"Orchestrator": orchestrator, "Preprocessor": preprocessor, "Denoiser": denoiser,
                            "Postprocessor": postprocessor}
        self.state = open_service_state(args)
        self.store, self.storage, self.signer = self.state.store, self.state.storage, self.state.signer
        self.app_owner, _, self.app_alias = args.app_id.partition("/")
        self.keys = ApiKeys(args.auth)
        self.webhook_guard = args.inputs.guard()
        self.max_body = int(args.max_request_body_mb * 2**20)
        self.name = replica_name()
        if not self.keys.enabled:
            logger.warning("*** NO API KEYS CONFIGURED: this server is OPEN; anyone who can reach it can submit "
                           "jobs and read every job. Set %s (or %s_FILE) to require keys. ***",
                           args.auth.keys_env, args.auth.keys_env)
        logger.info("gateway %s for %s, preset %s, storage %s, jobs database %s", self.name, args.app_id,
                    args.preset, self.storage.describe(), self.store.backend_name)

    # -- Python API: serve.get_app_handle("stable-avatar").generate.remote(StableAvatarInput(...)) -------------
    async def generate(self, request: StableAvatarInput) -> StableAvatarOutput:
        """A sync request from inside the cluster (owner: the open owner ``""``); the same row, rules and
        result as ``POST /run``. Raises ``LimitError`` at a limit and ``InputError`` for bad inputs."""
        stored = await self._run_sync(request, "", new_request_id())
        return StableAvatarOutput.model_validate(stored.public(self.storage))

    def ready(self) -> dict[str, Any]:
        """This replica's name and a fingerprint of its signing secret (equal fingerprints: equal secrets)."""
        return {"deployment": "Gateway", "replica": self.name, "secret_fingerprint": self.state.secret_fingerprint}

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

    async def _job_input(self, body: StableAvatarInput, owner: str, request_id: str):
        """The row's input and the objects written for it (``data:`` inputs stored under the job's key)."""
        async def owns_job(other: str) -> bool:
            return await self.store.get(other, owner) is not None

        return await build_job_input(body, owner, request_id, self.storage, self.args.inputs.fetch,
                                     asyncio.to_thread, owns_job)

    async def _forget_inputs(self, request_id: str, owner: str, keys: list[str]) -> None:
        """Delete the input objects of a request whose row was never created (refused at a limit)."""
        if keys and await self.store.get(request_id, owner) is None:
            for key in keys:
                await asyncio.to_thread(self.storage.delete, key)

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
        """Readiness: storage, the jobs database and every deployment (see deployments.gateway.health)."""
        checks: dict[str, Any] = {"storage": lambda: asyncio.to_thread(self.storage.check),
                                  "jobs": self.store.ping}
        for name, handle in self.deployments.items():
            scaling = getattr(self.args, name.lower()).autoscaling
            if name == "Denoiser" and scaling is not None and scaling.min_replicas == 0:
                checks[name] = ON_DEMAND
            else:
                checks[name] = handle.ready.remote
        passed, failed = await run_checks(checks, [self.state.secret_text])
        if failed:
            logger.warning("not ready: %s", failed)
            return JSONResponse({"status": "unavailable", "failed": failed, "checks": passed}, status_code=503)
        return JSONResponse({"status": "ok", "app_id": self.args.app_id, "preset": self.args.preset,
                             "auth_required": self.keys.enabled, "checks": passed})

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
        request_id = new_request_id()
        if request.headers.get("x-fal-request-id"):  # the client's own name for it: logged, never used for state
            logger.info("sync request %s (the client calls it %r)", request_id,
                        request.headers["x-fal-request-id"][:100])
        try:
            stored = await self._run_sync(body, owner, request_id)
        except LimitError as refused:
            return _limit_response(refused)
        except Exception as exc:  # noqa: BLE001 - mapped to a fal error body
            cause = root_cause(exc)
            if isinstance(cause, JobCancelled):
                error = cancelled_error()
                return _fal_error(error.status_code, error.detail, request_id, error.error_type)
            if isinstance(cause, FencedError):
                return _fal_error(503, "the request lost its runner; retry", request_id, "runner_disconnected")
            status, payload = error_response(exc)
            if status >= 500:
                logger.error("sync request %s failed", request_id, exc_info=exc)
            return JSONResponse(payload, status_code=status, headers={"x-fal-request-id": request_id})
        output = stored.public(self.storage)
        output["video"]["url"] = _absolute(output["video"]["url"], request)
        return JSONResponse(output, headers={"x-fal-request-id": request_id})

    async def _run_sync(self, body: StableAvatarInput, owner: str, request_id: str) -> StoredResult:
        """The stored result of a sync request, run by an Orchestrator replica under its own lease (its row is
        created there). A ``LimitError`` is raised unwrapped; the inputs of a refused request are deleted."""
        job_input, keys = await self._job_input(body, owner, request_id)
        try:
            return await self.orchestrator.run_sync.remote(request_id, job_input.model_dump(),
                                                           resolve_seed(body.seed), owner, keys)
        except Exception as exc:
            await self._forget_inputs(request_id, owner, keys)
            cause = root_cause(exc)
            if isinstance(cause, LimitError):
                raise cause from None
            raise

    @api.get("/progress/{request_id}")
    async def progress(self, request_id: str, request: Request) -> JSONResponse:
        """Stage, progress and log lines of any request of the caller (queued or sync; 404 for another key's)."""
        owner = self._authorize(request)
        if isinstance(owner, JSONResponse):
            return owner
        snapshot = await self.store.status(request_id, owner, logs_since=0)
        if snapshot is None:
            return _fal_error(404, "Request not found", request_id)
        job = snapshot.job
        assert snapshot.logs is not None
        return JSONResponse({"request_id": request_id, "status": job.status, "stage": job.stage,
                             "progress": round(job.progress, 4), "queue_position": snapshot.position,
                             "logs": [line.message for line in snapshot.logs.lines]},
                            headers={"x-fal-request-id": request_id})

    # -- fal queue protocol ------------------------------------------------------------------------------------
    def _is_app(self, owner: str, app: str) -> bool:
        return (owner, app) == (self.app_owner, self.app_alias)

    async def _lookup(self, owner: str, app: str, request_id: str, request: Request,
                      logs: bool = False) -> tuple[JobSnapshot, str] | JSONResponse:
        """(the job's snapshot, caller) for a caller allowed to see it; otherwise the 401/403/404 answer."""
        caller = self._authorize(request)
        if isinstance(caller, JSONResponse):
            return caller
        snapshot = (await self.store.status(request_id, caller, logs_since=0 if logs else None)
                    if self._is_app(owner, app) else None)
        if snapshot is None:
            return _fal_error(404, "Request not found", request_id)
        return snapshot, caller

    @api.get("/{owner}/{app}/requests/{request_id}/status")
    async def status(self, owner: str, app: str, request_id: str, request: Request) -> JSONResponse:
        with_logs = parse_bool(request.query_params.get("logs"))
        found = await self._lookup(owner, app, request_id, request, with_logs)
        if isinstance(found, JSONResponse):
            return found
        snapshot, _ = found
        job = snapshot.job
        body = status_body(job, snapshot.position, snapshot.logs.lines if snapshot.logs else None,
                           _base_url(request))
        return JSONResponse(body, status_code=200 if job.finished else 202,
                            headers={"x-fal-request-id": request_id})

    @api.get("/{owner}/{app}/requests/{request_id}/status/stream", response_model=None)
    async def status_stream(self, owner: str, app: str, request_id: str, request: Request) -> Response:
        found = await self._lookup(owner, app, request_id, request)
        if isinstance(found, JSONResponse):
            return found
        caller = found[1]
        with_logs, base = parse_bool(request.query_params.get("logs")), _base_url(request)

        async def events():
            cursor, last, last_sent_at = 0, None, time.monotonic()
            while True:
                snapshot = await self.store.status(request_id, caller, logs_since=cursor if with_logs else None)
                if snapshot is None:
                    return
                job = snapshot.job
                seen = (job.status, snapshot.position, job.log_count, job.stage, round(job.progress, 3))
                if seen != last:
                    lines = snapshot.logs.lines if snapshot.logs is not None else None
                    if snapshot.logs is not None:
                        cursor = snapshot.logs.cursor
                    last, last_sent_at = seen, time.monotonic()
                    yield f"data: {json.dumps(status_body(job, snapshot.position, lines, base))}\n\n"
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
        snapshot, _ = found
        job = snapshot.job
        if not job.finished:
            return JSONResponse(status_body(job, snapshot.position, None, _base_url(request)), status_code=202,
                                headers={"x-fal-request-id": request_id})
        # its error; 410 once the result expired (retention.results_s after completion, swept or not); else the
        # output, with a link that expires no later than its file
        answer = result_answer(job, self.storage, self.args.retention.results_s)
        if answer.status_code == 200:
            answer.body["video"]["url"] = _absolute(answer.body["video"]["url"], request)
        return JSONResponse(answer.body, status_code=answer.status_code,
                            headers={**answer.headers, "x-fal-request-id": request_id})

    @api.put("/{owner}/{app}/requests/{request_id}/cancel")
    async def cancel(self, owner: str, app: str, request_id: str, request: Request) -> JSONResponse:
        caller = self._authorize(request)
        if isinstance(caller, JSONResponse):
            return caller
        outcome = await self.store.cancel(request_id, caller) if self._is_app(owner, app) else "NOT_FOUND"
        code = {"CANCELLATION_REQUESTED": 202, "ALREADY_COMPLETED": 400, "NOT_FOUND": 404}[outcome]
        return JSONResponse({"status": outcome}, status_code=code, headers={"x-fal-request-id": request_id})

    # -- storage uploads (JS: initiate + PUT; Python: token + files/upload) ------------------------------------
    # Every upload lands under uploads/<owner>/ of the caller: the initiate route signs (owner, key) together,
    # and the PUT and token routes check the key's prefix against the signed owner before writing.
    @api.post("/storage/upload/initiate")
    async def upload_initiate(self, body: UploadInitiate, request: Request) -> JSONResponse:
        owner = self._authorize(request)
        if isinstance(owner, JSONResponse):
            return owner
        subject = keys.owner_segment(owner)
        key = keys.upload_key(subject, _safe_name(body.file_name))
        upload_url = self.storage.upload_url(key, body.content_type, UPLOAD_TOKEN_TTL_S)
        if upload_url is None:
            exp = int(time.time()) + UPLOAD_TOKEN_TTL_S
            sig = self.signer.sign("put", f"{subject}\n{key}", exp)
            upload_url = f"{_base_url(request)}/storage/upload/put/{key}?owner={subject}&exp={exp}&sig={sig}"
        return JSONResponse({"upload_url": upload_url, "file_url": _absolute(self.storage.url(key), request)})

    @api.put("/storage/upload/put/{key:path}")
    async def upload_put(self, key: str, request: Request, owner: str = "", exp: int = 0,
                         sig: str = "") -> JSONResponse:
        if not self.signer.verify(sig, "put", f"{owner}\n{key}", exp):
            return _fal_error(403, "invalid or expired upload URL")
        if not _OWNER_SEGMENT.fullmatch(owner) or not key.startswith(keys.uploads_prefix(owner)):
            return _fal_error(403, "uploads may only be written under the caller's own uploads/<owner>/ prefix")
        try:
            validate_key(key)
        except ValueError as exc:
            return _fal_error(422, [{"loc": ["path", "key"], "msg": str(exc), "type": "value_error"}])
        data = await self._read_body(request, MAX_UPLOAD_BYTES)
        if data is None:
            return _fal_error(413, f"upload larger than {MAX_UPLOAD_BYTES} bytes")
        await asyncio.to_thread(self.storage.put_bytes, key, data,
                                request.headers.get("content-type", "application/octet-stream"))
        return JSONResponse({"status": "ok", "file_size": len(data)})

    @api.post("/storage/auth/token")
    async def upload_token(self, request: Request) -> JSONResponse:
        owner = self._authorize(request)
        if isinstance(owner, JSONResponse):
            return owner
        exp, subject = int(time.time()) + UPLOAD_TOKEN_TTL_S, keys.owner_segment(owner)
        token = f"{exp}.{subject}.{self.signer.sign('upload-token', subject, exp)}"
        return JSONResponse({"token": token, "token_type": "Bearer", "base_url": _base_url(request),
                             "expires_at": datetime.fromtimestamp(exp, UTC).isoformat()})

    @api.post("/files/upload")
    async def files_upload(self, request: Request) -> JSONResponse:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        exp_text, _, rest = token.partition(".")
        subject, _, sig = rest.partition(".")
        valid = scheme.lower() == "bearer" and exp_text.isdigit() and _OWNER_SEGMENT.fullmatch(subject)
        if not valid or not self.signer.verify(sig, "upload-token", subject, int(exp_text)):
            return _fal_error(401, "a valid upload token is required (POST /storage/auth/token)")
        name = _safe_name(request.headers.get("x-fal-file-name") or "upload.bin")
        key = keys.upload_key(subject, name)
        if not keys.is_upload_key_of(key, subject):  # the name is one plain segment
            return _fal_error(403, "uploads may only be written under the caller's own uploads/<owner>/ prefix")
        data = await self._read_body(request, MAX_UPLOAD_BYTES)
        if data is None:
            return _fal_error(413, f"upload larger than {MAX_UPLOAD_BYTES} bytes")
        await asyncio.to_thread(self.storage.put_bytes, validate_key(key), data,
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
        request_id = new_request_id()
        if headers.get("x-fal-request-id"):
            logger.info("request %s (the client calls it %r)", request_id, headers["x-fal-request-id"][:100])
        try:
            job_input, keys = await self._job_input(body, caller, request_id)
        except InputError as exc:
            status, payload = error_response(exc)
            return JSONResponse(payload, status_code=status)
        try:
            submitted = await self.store.submit(
                app_id=self.args.app_id, input=job_input.model_dump(), seed=resolve_seed(body.seed), owner=caller,
                priority=priority, webhook_url=query.get("fal_webhook"), start_timeout_s=start_timeout,
                max_queue_length=max_queue, input_keys=keys, request_id=request_id)
        except LimitError as refused:
            await self._forget_inputs(request_id, caller, keys)
            return _limit_response(refused)
        metrics.jobs_total().inc(tags={"outcome": "submitted"})
        response = {"status": "IN_QUEUE", "request_id": request_id, "queue_position": submitted.queue_position,
                    **request_urls(_base_url(request), self.args.app_id, request_id)}
        if query.get("fal_webhook"):
            response["gateway_request_id"] = request_id
        return JSONResponse(response, headers={"x-fal-request-id": request_id})
