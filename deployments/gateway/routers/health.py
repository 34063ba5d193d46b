"""Readiness: storage, the jobs database and every deployment (see :mod:`deployments.gateway.health`)."""

from __future__ import annotations

import logging

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from deployments.gateway.dependencies import Service

logger = logging.getLogger("ray.serve")
router = APIRouter()


@router.get("/health")
async def health(service: Service) -> JSONResponse:
    passed, failed = await service.check_readiness()
    if failed:
        logger.warning("not ready: %s", failed)
        return JSONResponse({"status": "unavailable", "failed": failed, "checks": passed}, status_code=503)
    args = service.args
    return JSONResponse({"status": "ok", "app_id": args.app_id, "preset": args.preset,
                         "auth_required": service.keys.enabled, "checks": passed})
