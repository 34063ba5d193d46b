"""The routes' dependencies: the serving object, and the caller's identity with its limits, as FastAPI
``Depends``. A refusal is raised (:class:`deployments.gateway.errors.FalError`, or a ``LimitError``) and answered
in fal's error shape by the app's handlers, so a route body starts with a known caller.

They are coroutines so FastAPI runs them on the event loop, not in its thread pool: the in-memory request budget
is then updated by one task at a time, without locks, and no request pays a thread hop for its key check."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from deployments.gateway.errors import FalError
from deployments.gateway.service import GatewayService
from deployments.storage import keys


async def gateway_service(request: Request) -> GatewayService:
    return request.app.state.gateway


Service = Annotated[GatewayService, Depends(gateway_service)]


async def authenticated(request: Request, service: Service) -> str:
    """The caller's owner id (``Authorization: Key <key>``); 401 without a key, 403 for an unknown one. Secrets are
    never logged."""
    result = service.keys.check(request.headers.get("authorization"))
    if result.owner is None:
        raise FalError(result.status, result.message,
                       headers={"www-authenticate": "Key"} if result.status == 401 else None)
    return result.owner


# The owner of a request that creates a job (the route checks its job limits, before it reads the body).
Owner = Annotated[str, Depends(authenticated)]


async def caller(owner: Owner, service: Service) -> str:
    """The owner of any other keyed request, after one token of its request budget (429 when spent)."""
    service.requests.take_or_refuse(keys.owner_segment(owner))
    return owner


Caller = Annotated[str, Depends(caller)]
