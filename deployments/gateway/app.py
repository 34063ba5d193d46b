"""The Gateway's FastAPI application around one :class:`deployments.gateway.service.GatewayService`.

Routers in the order their paths must be tried: fixed paths first, the fal submit pattern (``POST
/{owner}/{app}``, the most general) last.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from deployments.gateway.errors import install_error_handlers
from deployments.gateway.routers import files, health, jwks, playground, queue, sync, uploads
from deployments.gateway.service import GatewayService

EXPOSED_HEADERS = ["x-fal-request-id", "x-fal-request-timeout-type", "x-fal-error-type", "retry-after"]


def build_api(service: GatewayService) -> FastAPI:
    api = FastAPI(title="stable-avatar-serve", description="fal-ai/stable-avatar compatible video generation")
    api.add_middleware(CORSMiddleware, allow_origins=["*"], allow_methods=["GET", "POST", "PUT", "OPTIONS"],
                       allow_headers=["*"], expose_headers=EXPOSED_HEADERS)
    install_error_handlers(api)
    api.state.gateway = service
    for router in (playground.router, health.router, jwks.router, sync.router, queue.router, uploads.router,
                   files.router, queue.submit_router):
        api.include_router(router)
    return api
