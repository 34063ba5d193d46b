"""API keys (``Authorization: Key <key>``, as fal clients send ``FAL_KEY``) and the per-key limits' settings.

The job limits (a submit token bucket and queued/running caps per key) are enforced by the jobs database, so every
Gateway replica shares them (:mod:`deployments.jobstore`); the request budget of the other routes, the SSE streams
and the uploads are limited by the Gateway (:mod:`deployments.gateway.limits`, :mod:`deployments.gateway.uploads`).

Keys come from an environment variable or a mounted secret file, are kept only as SHA-256 digests, and are compared
in constant time. A key's fingerprint (the first 16 hex digits of its digest) owns the jobs and uploads it made.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

OPEN_OWNER = ""  # owner of everything on a server that runs without keys


class AuthConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    keys_env: str = Field("STABLE_AVATAR_API_KEYS", description="env var with comma/space separated keys")
    keys_file: Path | None = Field(None, description="file with one key per line (e.g. a mounted Secret)")
    submit_rate_per_minute: float = Field(60.0, gt=0, description="sustained submits (queue and sync) per key")
    submit_burst: int = Field(10, ge=1, description="submits a key may make at once before the rate applies")
    max_queued_per_key: int = Field(50, ge=1, description="queued jobs one key may have")
    max_running_per_key: int | None = Field(4, ge=1, description="running jobs (queued ones started, and sync "
                                            "requests) one key may have; None: no cap")
    request_rate_per_minute: float = Field(12000.0, gt=0, description="sustained requests per key to every other "
                                           "keyed route (status, result, stream, cancel, progress, uploads), per "
                                           "Gateway replica")
    request_burst: int = Field(2000, ge=1, description="such requests a key may make at once before the rate "
                               "applies (fal-client polls status 10 times a second per request it waits for)")
    max_streams_per_key: int = Field(16, ge=1, description="SSE status streams one key may hold open, per Gateway "
                                     "replica")
    max_upload_mb: float = Field(300.0, gt=0, description="largest upload, on every upload route")
    upload_quota_mb: float = Field(4096.0, gt=0, description="bytes of live uploads (not yet deleted by "
                                   "retention.uploads_s) one key may hold")
    max_uploads_per_key: int = Field(1000, ge=1, le=100_000, description="live uploads one key may hold (each is "
                                     "an object that retention lists and deletes)")


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def fingerprint(key: str) -> str:
    return _digest(key).hex()[:16]


@dataclass
class AuthResult:
    owner: str | None  # None when refused
    status: int = 200  # 401 missing, 403 wrong
    message: str = ""


class ApiKeys:
    """The configured keys as digests; ``check`` answers an ``Authorization`` header."""

    def __init__(self, config: AuthConfig):
        raw: list[str] = os.environ.get(config.keys_env, "").replace(",", " ").split()
        keys_file = config.keys_file or (Path(p) if (p := os.environ.get(config.keys_env + "_FILE")) else None)
        if keys_file is not None:
            lines = Path(keys_file).read_text().splitlines()
            raw += [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
        self._digests = [_digest(k) for k in dict.fromkeys(raw)]

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def check(self, authorization: str | None) -> AuthResult:
        if not self.enabled:
            return AuthResult(OPEN_OWNER)
        scheme, _, key = (authorization or "").strip().partition(" ")
        key = key.strip()
        if scheme.lower() not in ("key", "bearer") or not key:
            return AuthResult(None, 401, "missing API key: send the header 'Authorization: Key <your key>'")
        given = _digest(key)
        matched = False
        for stored in self._digests:  # no early exit: the time taken does not depend on which key matched
            matched |= hmac.compare_digest(stored, given)
        if not matched:
            return AuthResult(None, 403, "invalid API key")
        return AuthResult(fingerprint(key))
