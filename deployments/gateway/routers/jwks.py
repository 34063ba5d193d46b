"""The public keys that verify our webhooks, as a JWKS (``GET /.well-known/jwks.json``), where a receiver written
for fal fetches them (:mod:`deployments.runtime.webhook_signing`)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from deployments.gateway.dependencies import Service

router = APIRouter()


@router.get("/.well-known/jwks.json")
async def jwks(service: Service) -> JSONResponse:
    return JSONResponse(service.state.webhook_signer.jwks(), headers={"cache-control": "public, max-age=3600"})
