"""HMAC signatures for upload URLs and upload tokens (the secret is shared through the storage backend)."""

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

    def verify(self, sig: str, purpose: str, subject: str, exp: int) -> bool:
        """Constant-time check; expired signatures are refused."""
        if int(exp) < time.time():
            return False
        return hmac.compare_digest(self.sign(purpose, subject, exp).encode(), sig.encode())
