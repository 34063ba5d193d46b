"""Webhooks: fal's payload, one signed, SSRF-guarded POST per delivery attempt, and the retry schedule.

Deliveries are owed through the jobs database's outbox (a row written when the job finished) and leased to one
Orchestrator replica at a time (:class:`deployments.orchestrator.webhook_worker.WebhookWorker`), so each is delivered once
even with many replicas and applications; an attempt that fails is due again after :func:`retry_delay`. Each
attempt is signed when it is made, as fal signs (:mod:`deployments.runtime.webhook_signing`).
"""

from __future__ import annotations

import http.client
import json
from typing import Any

from deployments.runtime.webhook_signing import WebhookSigner
from guarded_fetch import AddressGuard, pinned_connection

USER_AGENT = "stable-avatar-serve-webhook/1"
TIMEOUT_S = 15.0


def webhook_payload(request_id: str, ok: bool, payload: Any, error: str | None) -> dict[str, Any]:
    """fal's webhook body: ``status`` OK|ERROR, the output (or error details) as ``payload``."""
    return {"request_id": request_id, "gateway_request_id": request_id, "status": "OK" if ok else "ERROR",
            "payload": payload, "error": error}


def post_webhook(url: str, body: dict[str, Any], guard: AddressGuard, signer: WebhookSigner, user_id: str,
                 timeout_s: float = TIMEOUT_S) -> tuple[bool, str]:
    """One attempt: (delivered, what happened). POSTs to the checked address (resolved once, here; no redirects
    followed), so the SSRF guard holds; a refused or unreachable target is an outcome, not an exception. The
    ``X-Fal-Webhook-*`` headers sign exactly the bytes sent, at the time of this attempt."""
    data = json.dumps(body).encode()
    try:
        connection, path = pinned_connection(url, guard, timeout_s)
        try:
            connection.request("POST", path, body=data, headers={
                "content-type": "application/json", "user-agent": USER_AGENT,
                **signer.headers(body["request_id"], user_id, data)})
            response = connection.getresponse()
            response.read(64 * 1024)
            code = response.status
        finally:
            connection.close()
    except (OSError, ValueError, http.client.HTTPException) as exc:  # ValueError: the guard refused the host
        return False, f"{type(exc).__name__}: {exc}"
    return 200 <= code < 300, f"HTTP {code}"


def retry_delay(attempt: int, first_delay_s: float) -> float:
    """Seconds before attempt ``attempt + 1``: ``first_delay_s``, doubled after each failed attempt."""
    return first_delay_s * 2 ** (attempt - 1)
