"""Webhook delivery: POST the fal webhook payload, retry with exponential backoff, report every attempt."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

USER_AGENT = "stable-avatar-serve-webhook/1"


def webhook_payload(request_id: str, ok: bool, payload: Any, error: str | None) -> dict[str, Any]:
    """fal's webhook body: ``status`` OK|ERROR, the output (or error details) as ``payload``."""
    return {"request_id": request_id, "gateway_request_id": request_id, "status": "OK" if ok else "ERROR",
            "payload": payload, "error": error}


def _post(url: str, body: bytes, request_id: str, timeout_s: float) -> int:
    request = urllib.request.Request(url, data=body, method="POST", headers={
        "content-type": "application/json", "user-agent": USER_AGENT, "x-fal-webhook-request-id": request_id})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:  # noqa: S310 - URL checked on submit
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


async def deliver_webhook(url: str, body: dict[str, Any], report: Callable[[str, str], None],
                          attempts: int = 5, first_delay_s: float = 1.0, timeout_s: float = 15.0) -> bool:
    """Deliver once successfully (2xx) or give up after ``attempts``; ``report(level, message)`` logs each try."""
    data = json.dumps(body).encode()
    delay = first_delay_s
    for attempt in range(1, attempts + 1):
        try:
            code = await asyncio.to_thread(_post, url, data, body["request_id"], timeout_s)
            outcome = f"HTTP {code}"
            if 200 <= code < 300:
                report("INFO", f"webhook delivered (attempt {attempt}/{attempts}, {outcome})")
                return True
        except OSError as exc:
            outcome = f"{type(exc).__name__}: {exc}"
        if attempt < attempts:
            report("WARN", f"webhook attempt {attempt}/{attempts} failed ({outcome}); retrying in {delay:.0f} s")
            await asyncio.sleep(delay)
            delay *= 2
        else:
            report("ERROR", f"webhook attempt {attempt}/{attempts} failed ({outcome}); giving up")
    return False
