"""The one HMAC signer of the service: signed file links, upload URLs and upload tokens.

A signature covers a purpose (``file``, ``put``, ``upload-token``), a subject (a storage key or an owner) and an
expiry, so a signature made for one purpose is never valid for another.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time


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
