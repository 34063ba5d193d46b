"""Readiness (``GET /health``): storage answers, the jobs database answers, every deployment has loaded its models.

Each check has a deadline; a failed one is named with a short reason that never contains a secret (known secret
values are masked, and only the exception's type and first line are kept). A Denoiser that may scale to zero
(``denoiser.autoscaling.min_replicas: 0``) is not probed: probing would start a GPU replica for nothing, and its
absence is normal (the first window-step starts one, which takes as long as loading the model). It is reported as
``on_demand``.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

HEALTH_TIMEOUT_S = 10.0
MAX_REASON_CHARS = 200
SECRET_ENV_VARS = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "STABLE_AVATAR_URL_SECRET",
                   "STABLE_AVATAR_JOBS_DSN", "STABLE_AVATAR_API_KEYS", "STABLE_AVATAR_WEBHOOK_KEY")
ON_DEMAND = "on_demand (scaled to zero when idle; not probed)"


def redact(text: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    return text


def failure_reason(exc: BaseException, secrets: Iterable[str] = ()) -> str:
    """``Type: first line`` of the exception, secrets masked, bounded."""
    if isinstance(exc, TimeoutError):
        return f"no answer within {HEALTH_TIMEOUT_S:g} s"
    cause = exc
    while getattr(cause, "cause", None) is not None:  # Ray's RayTaskError carries the remote exception
        cause = cause.cause
    first = (str(cause).strip().splitlines() or [""])[0]
    known = [*secrets, *(os.environ.get(name, "") for name in SECRET_ENV_VARS)]
    reason = redact(f"{type(cause).__name__}: {first}" if first else type(cause).__name__, known)
    return reason[:MAX_REASON_CHARS]


async def run_checks(checks: dict[str, Callable[[], Awaitable[Any]] | str],
                     secrets: Iterable[str] = ()) -> tuple[dict[str, str], dict[str, str]]:
    """Run every check at once, each with the deadline; returns (passed, failed) by name. A check given as a
    string passes with that note."""
    secrets = list(secrets)
    passed: dict[str, str] = {}
    failed: dict[str, str] = {}

    async def one(name: str, check: Callable[[], Awaitable[Any]] | str) -> None:
        if isinstance(check, str):
            passed[name] = check
            return
        try:
            async with asyncio.timeout(HEALTH_TIMEOUT_S):
                await check()
        except Exception as exc:  # noqa: BLE001 - any failure means "not ready", named
            failed[name] = failure_reason(exc, secrets)
        else:
            passed[name] = "ok"

    await asyncio.gather(*(one(name, check) for name, check in checks.items()))
    return passed, failed
