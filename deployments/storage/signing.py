"""The one HMAC signer of the service (signed file links, upload URLs and upload tokens) and its one secret.

A signature covers a purpose (``file``, ``put``, ``upload-token``), a subject (a storage key or an owner) and an
expiry, so a signature made for one purpose is never valid for another.

The secret (:func:`service_secret`) is the same in every Gateway and Orchestrator replica and in every
application on the same jobs database: ``$STABLE_AVATAR_URL_SECRET`` (a Kubernetes Secret), else the local
storage config's ``url_secret``, else a random value created once in the jobs database with insert-if-absent.
It is never written to storage, where a public result link could reach it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import time
from typing import Protocol

URL_SECRET_ENV = "STABLE_AVATAR_URL_SECRET"
SECRET_NAME = "url-signing"  # its row in the jobs database


class SecretSource(Protocol):
    def shared_secret(self, name: str) -> str: ...


def service_secret(configured: str | None, store: SecretSource) -> bytes:
    """The signing secret: environment, then configuration, then the jobs database (created there once)."""
    env = os.environ.get(URL_SECRET_ENV, "").strip()
    if env:
        return env.encode()
    if configured:
        return configured.encode()
    return store.shared_secret(SECRET_NAME).encode()


class Signer:
    def __init__(self, secret: bytes):
        self._secret = secret

    def sign(self, purpose: str, subject: str, exp: int) -> str:
        mac = hmac.new(self._secret, f"{purpose}\n{subject}\n{int(exp)}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()

    def verify(self, sig: str, purpose: str, subject: str, exp: int | str) -> bool:
        """Constant-time check; expired, malformed or foreign signatures are refused (never raise)."""
        try:
            exp = int(exp)
            given = sig.encode("ascii")
        except (ValueError, TypeError, UnicodeEncodeError, AttributeError):
            return False
        if exp < time.time():
            return False
        return hmac.compare_digest(self.sign(purpose, subject, exp).encode(), given)
