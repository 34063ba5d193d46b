"""The fal queue protocol: submit, status (polled or streamed as SSE), result and cancel.

Every read and write goes to the jobs database, owner-scoped (another key's job is a 404). The server issues
every request id; a client's ``x-fal-request-id`` is only logged. A submit with an ``Idempotency-Key`` that
already created a job answers that job (:mod:`deployments.gateway.idempotency`), before anything else; otherwise its
caps and submit token are checked before its body is read (:mod:`deployments.gateway.limits`), and its ``data:``
inputs are written to storage once, under the job's own key. ``submit_router`` holds the submit routes, whose path
patterns are the most general: the app includes it last.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from deployments.gateway.dependencies import Caller, Owner, Service
from deployments.gateway.errors import FalError, field_error
from deployments.gateway.fal_protocol import parse_bool, parse_start_timeout, request_urls, status_body
from deployments.gateway.idempotency import idempotency_key, reused
from deployments.gateway.urls import base_url
from deployments.jobstore import IdempotencyKeyReusedError, LimitError, new_request_id
from deployments.runtime import metrics
from deployments.runtime.errors import error_response
from deployments.storage import keys
from guarded_fetch import InputError, check_webhook_url
from pipeline.schema import resolve_seed

logger = logging.getLogger("ray.serve")
SSE_POLL_S = 0.25
SSE_KEEPALIVE_S = 10.0
router = APIRouter()
submit_router = APIRouter()


class SlotStreamingResponse(StreamingResponse):
    """A stream that gives its slot back however it ends: finished, failed, or cut by the client (even before
    its first event, when the generator never started and so never reaches a ``finally`` of its own)."""

    def __init__(self, content: AsyncIterator[str], release: Callable[[], None], **options: Any):
        super().__init__(content, **options)
        self.release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.release()


@router.get("/{owner}/{app}/requests/{request_id}/status")
async def status(owner: str, app: str, request_id: str, request: Request, caller: Caller,
                 service: Service) -> JSONResponse:
    with_logs = parse_bool(request.query_params.get("logs"))
    snapshot = await service.snapshot(owner, app, request_id, caller, with_logs)
    job = snapshot.job
    body = status_body(job, snapshot.position, snapshot.logs.lines if snapshot.logs else None, base_url(request))
    return JSONResponse(body, status_code=200 if job.finished else 202, headers={"x-fal-request-id": request_id})


@router.get("/{owner}/{app}/requests/{request_id}/status/stream", response_model=None)
async def status_stream(owner: str, app: str, request_id: str, request: Request, caller: Caller,
                        service: Service) -> Response:
    """``data: <status>`` events, each with only the new log lines, until COMPLETED; a comment now and then.
    Each open stream holds one of the key's stream slots on this replica (429 when none is free)."""
    await service.snapshot(owner, app, request_id, caller)
    release = service.streams.acquire(keys.owner_segment(caller))
    with_logs, base, store = parse_bool(request.query_params.get("logs")), base_url(request), service.store

    async def events():
        cursor, last, last_sent_at = 0, None, time.monotonic()
        while True:
            snapshot = await store.status(request_id, caller, logs_since=cursor if with_logs else None)
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

    return SlotStreamingResponse(events(), release, media_type="text/event-stream", headers={
        "cache-control": "no-cache", "x-fal-request-id": request_id, "x-accel-buffering": "no"})


@router.get("/{owner}/{app}/requests/{request_id}")
async def result(owner: str, app: str, request_id: str, request: Request, caller: Caller,
                 service: Service) -> JSONResponse:
    snapshot = await service.snapshot(owner, app, request_id, caller)
    job = snapshot.job
    if not job.finished:
        return JSONResponse(status_body(job, snapshot.position, None, base_url(request)), status_code=202,
                            headers={"x-fal-request-id": request_id})
    return service.result_response(job, request)


@router.put("/{owner}/{app}/requests/{request_id}/cancel")
async def cancel(owner: str, app: str, request_id: str, caller: Caller, service: Service) -> JSONResponse:
    outcome = await service.store.cancel(request_id, caller) if service.is_app(owner, app) else "NOT_FOUND"
    code = {"CANCELLATION_REQUESTED": 202, "ALREADY_COMPLETED": 400, "NOT_FOUND": 404}[outcome]
    return JSONResponse({"status": outcome}, status_code=code, headers={"x-fal-request-id": request_id})


@submit_router.post("/{owner}/{app}")
async def submit(owner: str, app: str, request: Request, caller: Owner, service: Service) -> JSONResponse:
    return await _submit(owner, app, request, caller, service)


@submit_router.post("/{owner}/{app}/{subpath:path}")
async def submit_subpath(owner: str, app: str, subpath: str, request: Request, caller: Owner,
                         service: Service) -> JSONResponse:
    return await _submit(owner, app, request, caller, service)


def _lenient_int(text: str | None) -> int | None:
    """The number, or None (a malformed ``fal_max_queue_length`` is answered, 422, once the body is read)."""
    try:
        return None if text is None else int(text)
    except ValueError:
        return None


def _submitted(request: Request, service: Service, request_id: str, position: int, status: str = "IN_QUEUE"
               ) -> JSONResponse:
    response = {"status": status, "request_id": request_id, "queue_position": position,
                **request_urls(base_url(request), service.args.app_id, request_id)}
    if request.query_params.get("fal_webhook"):
        response["gateway_request_id"] = request_id
    return JSONResponse(response, headers={"x-fal-request-id": request_id})


async def _submit(owner: str, app: str, request: Request, caller: str, service: Service) -> JSONResponse:
    if not service.is_app(owner, app):
        raise FalError(404, f"unknown application {owner}/{app}")
    query, headers = request.query_params, request.headers
    key = idempotency_key(request)
    if key is not None and (earlier := await service.earlier_request(caller, key, request)) is not None:
        snapshot = await service.store.status(earlier, caller)  # a retry: the first one's job, nothing charged
        if snapshot is not None:
            return _submitted(request, service, earlier, snapshot.position, snapshot.job.status)
    await service.admit(caller, queued=True, max_queue_length=_lenient_int(query.get("fal_max_queue_length")))
    body, body_hash = await service.read_input(request)
    priority = headers.get("x-fal-queue-priority", "normal").strip().lower()
    if priority not in ("normal", "low"):
        raise field_error(["header", "x-fal-queue-priority"], "must be 'normal' or 'low'")
    try:
        start_timeout = parse_start_timeout(headers.get("x-fal-request-timeout"))
        max_queue = int(query["fal_max_queue_length"]) if "fal_max_queue_length" in query else None
    except ValueError as exc:
        raise field_error(["header"], str(exc)) from None
    webhook = query.get("fal_webhook")
    if webhook:
        try:  # the same SSRF guard as input URLs: no webhooks to private or loopback addresses
            await asyncio.to_thread(check_webhook_url, webhook, service.webhook_guard)
        except ValueError as exc:
            raise field_error(["query", "fal_webhook"], str(exc)) from None
    request_id = new_request_id()
    if headers.get("x-fal-request-id"):
        logger.info("request %s (the client calls it %r)", request_id, headers["x-fal-request-id"][:100])
    try:
        job_input, input_keys = await service.job_input(body, caller, request_id)
    except InputError as exc:
        status_code, payload = error_response(exc)
        return JSONResponse(payload, status_code=status_code)
    try:
        submitted = await service.store.submit(
            app_id=service.args.app_id, input=job_input.model_dump(), seed=resolve_seed(body.seed), owner=caller,
            priority=priority, webhook_url=webhook, start_timeout_s=start_timeout,
            max_queue_length=max_queue, input_keys=input_keys, request_id=request_id,
            rate_limited=False,  # its token was taken before the body was read
            model_fingerprint=await service.model_fingerprint(), idempotency_key=key,
            body_hash=body_hash if key is not None else None)
    except (LimitError, IdempotencyKeyReusedError) as refused:
        await service.forget_inputs(request_id, caller, input_keys)
        if isinstance(refused, IdempotencyKeyReusedError):
            raise reused(refused.key) from None
        raise
    if submitted.replayed:  # a retry of this key running at the same moment created the job first
        await service.forget_inputs(request_id, caller, input_keys)
    else:
        metrics.jobs_total().inc(tags={"outcome": "submitted"})
    return _submitted(request, service, submitted.request_id, submitted.queue_position)
