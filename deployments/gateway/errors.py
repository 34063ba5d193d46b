"""Every refusal the Gateway makes, in fal's error shape: ``{"detail": ..., "error_type"?: ...}`` with the
``x-fal-error-type`` header, raised as :class:`FalError` by routes and dependencies and answered by the handlers
:func:`install_error_handlers` registers (limits of the jobs database: 429 naming the limit; the database or the
storage away: 503, which clients retry)."""

from __future__ import annotations

import logging
import math
import sqlite3
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from deployments.jobstore import (
    KeyQueueCapError,
    KeyRunningCapError,
    LimitError,
    QueueFullError,
    RateLimitedError,
)
from deployments.storage import StorageError

logger = logging.getLogger("ray.serve")

# Which limit refused a request: the 429's error_type, and when to try again.
LIMIT_TYPES: dict[type[LimitError], tuple[str, int]] = {
    RateLimitedError: ("rate_limited", 1), QueueFullError: ("queue_full", 10),
    KeyQueueCapError: ("key_queue_cap", 10), KeyRunningCapError: ("key_running_cap", 5)}


class FalError(Exception):
    """An answer in fal's error shape; ``detail`` is a message or FastAPI's list of ``{loc, msg, type}``."""

    def __init__(self, status_code: int, detail: Any, error_type: str | None = None,
                 headers: dict[str, str] | None = None, request_id: str | None = None):
        super().__init__(detail)
        self.status_code, self.detail, self.error_type = status_code, detail, error_type
        self.headers, self.request_id = dict(headers or {}), request_id

    def response(self) -> JSONResponse:
        return fal_error(self.status_code, self.detail, self.request_id, self.error_type, self.headers)


def fal_error(status: int, detail: Any, request_id: str | None = None, error_type: str | None = None,
              headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"detail": detail} | ({"error_type": error_type} if error_type else {})
    extra = dict(headers or {})
    if request_id:
        extra["x-fal-request-id"] = request_id
    if error_type:
        extra["x-fal-error-type"] = error_type
    return JSONResponse(body, status_code=status, headers=extra)


def field_error(loc: list[str], message: str, status: int = 422, kind: str = "value_error") -> FalError:
    """A 4xx naming the field (``loc`` as FastAPI writes it: ``["body", "image_url"]``, ``["query", ...]``)."""
    return FalError(status, [{"loc": loc, "msg": message, "type": kind}])


def validation_detail(exc: ValidationError) -> list[dict[str, Any]]:
    """pydantic's errors as fal's 422 ``detail`` list, every ``loc`` under ``body``."""
    return [{"loc": ["body", *err["loc"]], "msg": err["msg"], "type": err["type"]}
            for err in exc.errors(include_url=False, include_context=False, include_input=False)]


def limit_response(refused: LimitError) -> JSONResponse:
    """429 naming the limit (``error_type``: rate_limited, queue_full, key_queue_cap, key_running_cap, or the
    ``error_type`` of one of the Gateway's own limits, such as too_many_streams)."""
    error_type, retry_after = LIMIT_TYPES.get(type(refused), (getattr(refused, "error_type", "rate_limited"), 5))
    if isinstance(refused, RateLimitedError):
        retry_after = max(1, math.ceil(refused.retry_after_s))
    return fal_error(429, refused.message, error_type=error_type, headers={"retry-after": str(retry_after)})


def database_errors() -> tuple[type[BaseException], ...]:
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
    return fal_error(503, f"the {what} is unavailable right now; retry shortly",
                     error_type="service_unavailable", headers={"retry-after": "2"})


async def _fal_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, FalError)
    return exc.response()


async def _limit(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, LimitError)
    return limit_response(exc)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(FalError, _fal_error)
    app.add_exception_handler(LimitError, _limit)
    for error in (*database_errors(), StorageError):
        app.add_exception_handler(error, _unavailable)
