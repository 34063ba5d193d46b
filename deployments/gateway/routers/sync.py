"""The sync route (``POST /run/<app_id>``: the output in the answer) and ``GET /progress/<id>``."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from deployments.contracts import JobCancelled
from deployments.gateway.dependencies import Caller, Owner, Service
from deployments.gateway.errors import FalError, fal_error
from deployments.gateway.urls import absolute
from deployments.jobstore import FencedError, LimitError, cancelled_error, new_request_id
from deployments.runtime.errors import error_response, root_cause

logger = logging.getLogger("ray.serve")
router = APIRouter()


@router.post("/run/{app_id:path}")
async def run_sync(app_id: str, request: Request, owner: Owner, service: Service) -> JSONResponse:
    if app_id.strip("/") != service.args.app_id:
        raise FalError(404, f"unknown application {app_id!r}")
    await service.admit(owner, queued=False)
    body = await service.read_input(request)
    request_id = new_request_id()
    if request.headers.get("x-fal-request-id"):  # the client's own name for it: logged, never used for state
        logger.info("sync request %s (the client calls it %r)", request_id, request.headers["x-fal-request-id"][:100])
    try:
        stored = await service.run_sync(body, owner, request_id)
    except LimitError:
        raise
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
        return JSONResponse(payload, status_code=status, headers={"x-fal-request-id": request_id})
    output = stored.public(service.storage)
    output["video"]["url"] = absolute(output["video"]["url"], request)
    return JSONResponse(output, headers={"x-fal-request-id": request_id})


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
