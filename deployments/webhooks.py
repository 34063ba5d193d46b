"""Webhook delivery: POST the fal webhook payload, retry with exponential backoff, report every attempt."""

from __future__ import annotations

import asyncio
import http.client
import json
from collections.abc import Callable
from typing import Any

from pipeline.fetch import AddressGuard, pinned_connection

USER_AGENT = "stable-avatar-serve-webhook/1"


def webhook_payload(request_id: str, ok: bool, payload: Any, error: str | None) -> dict[str, Any]:
    """fal's webhook body: ``status`` OK|ERROR, the output (or error details) as ``payload``."""
    return {"request_id": request_id, "gateway_request_id": request_id, "status": "OK" if ok else "ERROR",
            "payload": payload, "error": error}


def _post(url: str, body: bytes, request_id: str, timeout_s: float, guard: AddressGuard) -> int:
    """POST to the checked address (resolved once, here; no redirects followed): the SSRF guard holds."""
    connection, path = pinned_connection(url, guard, timeout_s)
    try:
        connection.request("POST", path, body=body, headers={
            "content-type": "application/json", "user-agent": USER_AGENT, "x-fal-webhook-request-id": request_id})
        response = connection.getresponse()
        response.read(64 * 1024)
        return response.status
    finally:
        connection.close()


async def deliver_webhook(url: str, body: dict[str, Any], report: Callable[[str, str], None], guard: AddressGuard,
                          attempts: int = 5, first_delay_s: float = 1.0, timeout_s: float = 15.0) -> bool:
    """Deliver once successfully (2xx) or give up after ``attempts``; ``report(level, message)`` logs each try."""
    data = json.dumps(body).encode()
    delay = first_delay_s
    for attempt in range(1, attempts + 1):
        try:
            code = await asyncio.to_thread(_post, url, data, body["request_id"], timeout_s, guard)
            outcome = f"HTTP {code}"
            if 200 <= code < 300:
                report("INFO", f"webhook delivered (attempt {attempt}/{attempts}, {outcome})")
                return True
        except (OSError, ValueError, http.client.HTTPException) as exc:  # ValueError: the guard refused
            outcome = f"{type(exc).__name__}: {exc}"
        if attempt < attempts:
            report("WARN", f"webhook attempt {attempt}/{attempts} failed ({outcome}); retrying in {delay:.0f} s")
            await asyncio.sleep(delay)
            delay *= 2
        else:
            report("ERROR", f"webhook attempt {attempt}/{attempts} failed ({outcome}); giving up")
    return False
