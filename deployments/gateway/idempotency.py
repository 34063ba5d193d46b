"""The ``Idempotency-Key`` header of submit and ``/run``: a client's retry (fal's clients retry on 5xx and
time-outs) answers the job the first request created and never starts a second GPU job.

The key is looked up first, before the caps, the submit token and the body's inputs: a replay within the key's
window (``idempotency_window_s``, per API key) is neither charged nor refused at a limit. It carries the same body
(the SHA-256 of its JSON, canonical: key order and spacing do not matter) or it is a 422 naming the header. A first
request passes the key to the jobs database with the row it creates, under the lock that orders submits, so
retries racing each other through several Gateway replicas still create one job (the loser's stored inputs are
deleted and it answers the winner's job).
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from fastapi import Request

from deployments.gateway.errors import FalError, field_error

HEADER = "idempotency-key"
_KEY = re.compile(r"[\x21-\x7e]{1,255}")  # printable ASCII without spaces (the store's rule)
LOC = ["header", "Idempotency-Key"]


def idempotency_key(request: Request) -> str | None:
    """The request's key (None without the header); 422 naming the header when it is malformed."""
    value = request.headers.get(HEADER)
    if value is None:
        return None
    if not _KEY.fullmatch(value):
        raise field_error(LOC, "must be 1 to 255 printable ASCII characters without spaces")
    return value


def body_hash(data: Any) -> str:
    """SHA-256 hex of a parsed JSON body in canonical form."""
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def reused(key: str) -> FalError:
    return field_error(LOC, f"the Idempotency-Key {key!r} was already used with a different request body; use a "
                            "new key for a new request")
