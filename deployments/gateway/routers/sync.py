"""The sync route (``POST /run/<app_id>``: the output in the answer) and ``GET /progress/<id>``.

With an ``Idempotency-Key`` that already started a run (:mod:`deployments.gateway.idempotency`), the route waits
for that run and answers its outcome: a client retrying after a time-out never starts a second GPU job.
"""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from deployments.contracts import JobCancelled
from deployments.gateway.dependencies import Caller, Owner, Service
from deployments.gateway.errors import FalError, fal_error
from deployments.gateway.idempotency import idempotency_key, reused
from deployments.gateway.urls import absolute
from deployments.jobstore import (
    AlreadySubmittedError,
    FencedError,
    IdempotencyKeyReusedError,
    LimitError,
    cancelled_error,
    new_request_id,
)
from deployments.runtime.errors import error_response, root_cause

logger = logging.getLogger("ray.serve")
router = APIRouter()


@router.post("/run/{app_id:path}")
async def run_sync(app_id: str, request: Request, owner: Owner, service: Service) -> JSONResponse:
    if app_id.strip("/") != service.args.app_id:
        raise FalError(404, f"unknown application {app_id!r}")
    key = idempotency_key(request)
    if key is not None and (earlier := await service.earlier_request(owner, key, request)) is not None:
        return await _outcome_of(earlier, owner, request, service)  # a retry: nothing charged, nothing started
    await service.admit(owner, queued=False)
    body, body_hash = await service.read_input(request)
    request_id = new_request_id()
    if request.headers.get("x-fal-request-id"):  # the client's own name for it: logged, never used for state
        logger.info("sync request %s (the client calls it %r)", request_id, request.headers["x-fal-request-id"][:100])
    try:
        stored = await service.run_sync(body, owner, request_id, key, body_hash if key is not None else None)
    except LimitError:
        raise
    except AlreadySubmittedError as exc:  # a retry of this key running at the same moment started it first
        return await _outcome_of(exc.request_id, owner, request, service)
    except IdempotencyKeyReusedError as exc:
        raise reused(exc.key) from None
    except Exception as exc:  # noqa: BLE001 - mapped to a fal error body
        cause = root_cause(exc)
        if isinstance(cause, JobCancelled):
            error = cancelled_error()
            return fal_error(error.status_code, error.detail, request_id, error.error_type)
        if isinstance(cause, FencedError):
            return fal_error(503, "the request lost its runner; retry", request_id, "runner_disconnected")
        status, payload = error_response(exc)
        if status >= 500:
            logger.error("sync request %s failed", request_id, exc_info=exc)
            job = await service.store.get(request_id, owner)
            if job is not None and job.finished and job.error is not None:  # as the run settled it (a fault: 503)
                return service.result_response(job, request)
        return JSONResponse(payload, status_code=status, headers={"x-fal-request-id": request_id})
    output = stored.public(service.storage)
    output["video"]["url"] = absolute(output["video"]["url"], request)
    return JSONResponse(output, headers={"x-fal-request-id": request_id})


async def _outcome_of(request_id: str, owner: str, request: Request, service: Service) -> JSONResponse:
    """The answer of the run ``request_id`` (waited for): its output, or its error."""
    return service.result_response(await service.finished_job(request_id, owner), request)


@router.get("/progress/{request_id}")
async def progress(request_id: str, caller: Caller, service: Service) -> JSONResponse:
    """Stage, progress and log lines of any request of the caller (queued or sync; 404 for another key's)."""
    snapshot = await service.store.status(request_id, caller, logs_since=0)
    if snapshot is None:
        raise FalError(404, "Request not found", request_id=request_id)
    job = snapshot.job
    assert snapshot.logs is not None
    return JSONResponse({"request_id": request_id, "status": job.status, "stage": job.stage,
                         "progress": round(job.progress, 4), "queue_position": snapshot.position,
                         "logs": [line.message for line in snapshot.logs.lines]},
                        headers={"x-fal-request-id": request_id})
