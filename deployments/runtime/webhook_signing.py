"""Webhook signatures as fal makes them: ED25519 over the request id, the user id, a timestamp and the body's hash.

Every delivery carries::

    X-Fal-Webhook-Request-Id   the job's request id
    X-Fal-Webhook-User-Id      the job's owner (the API key's fingerprint; ``public`` on a server without keys)
    X-Fal-Webhook-Timestamp    Unix seconds, when this attempt was signed
    X-Fal-Webhook-Signature    hex ED25519 signature of
                               request_id + "\\n" + user_id + "\\n" + timestamp + "\\n" + sha256(raw body).hexdigest()

and the public keys are published as a JWKS (``{"keys": [{"kty": "OKP", "crv": "Ed25519", "x": <base64url>,
"kid": <RFC 7638 thumbprint>, "use": "sig", "alg": "EdDSA"}]}``) at ``/.well-known/jwks.json``, so a receiver
written for fal verifies ours unchanged (docs/security.md).

The private key (:func:`webhook_signer`): ``$STABLE_AVATAR_WEBHOOK_KEY`` (a Kubernetes Secret) holds one or more
PKCS#8 PEM ED25519 keys (``openssl genpkey -algorithm ed25519``): the first signs, all are published, so a new key
can be published before it signs. Without it, one key is derived from a random secret created once in the jobs
database (insert-if-absent), the same in every Gateway and Orchestrator replica of every application on it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import time
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from deployments.storage.signing import SecretSource

WEBHOOK_KEY_ENV = "STABLE_AVATAR_WEBHOOK_KEY"
WEBHOOK_SECRET_NAME = "webhook-signing"  # its row in the jobs database
_PEM_BLOCK = re.compile(r"-----BEGIN [A-Z ]+-----.+?-----END [A-Z ]+-----", re.DOTALL)


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def signed_message(request_id: str, user_id: str, timestamp: str, body: bytes) -> bytes:
    return "\n".join((request_id, user_id, timestamp, hashlib.sha256(body).hexdigest())).encode()


class WebhookSigner:
    """Signs with the first key; publishes every key's public half."""

    def __init__(self, keys: list[Ed25519PrivateKey]):
        if not keys:
            raise ValueError("a webhook signer needs at least one key")
        self._keys = keys

    @classmethod
    def from_pem(cls, text: str, where: str = WEBHOOK_KEY_ENV) -> WebhookSigner:
        blocks = _PEM_BLOCK.findall(text)
        if not blocks:
            raise ValueError(f"{where}: no PEM key found (make one with `openssl genpkey -algorithm ed25519`)")
        keys = []
        for number, block in enumerate(blocks, start=1):
            try:
                key = serialization.load_pem_private_key(block.encode(), password=None)
            except (ValueError, TypeError) as exc:
                raise ValueError(f"{where}: key {number} is not an unencrypted PKCS#8 PEM private key "
                                 f"({type(exc).__name__})") from None
            if not isinstance(key, Ed25519PrivateKey):
                raise ValueError(f"{where}: key {number} is a {type(key).__name__}, not an ED25519 key")
            keys.append(key)
        return cls(keys)

    @classmethod
    def from_secret(cls, secret: str) -> WebhookSigner:
        """The one key derived from a random secret (the jobs database's ``webhook-signing``)."""
        seed = hashlib.sha256(b"stable-avatar webhook ed25519 key\n" + secret.encode()).digest()
        return cls([Ed25519PrivateKey.from_private_bytes(seed)])

    def headers(self, request_id: str, user_id: str, body: bytes, now: float | None = None) -> dict[str, str]:
        """The four ``X-Fal-Webhook-*`` headers of one delivery attempt of ``body`` (the exact bytes sent)."""
        timestamp = str(int(time.time() if now is None else now))
        signature = self._keys[0].sign(signed_message(request_id, user_id, timestamp, body)).hex()
        return {"x-fal-webhook-request-id": request_id, "x-fal-webhook-user-id": user_id,
                "x-fal-webhook-timestamp": timestamp, "x-fal-webhook-signature": signature}

    def jwks(self) -> dict[str, Any]:
        return {"keys": [_jwk(key) for key in self._keys]}


def _jwk(key: Ed25519PrivateKey) -> dict[str, str]:
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    members = {"crv": "Ed25519", "kty": "OKP", "x": _b64url(raw)}  # RFC 7638: the required members, sorted
    thumbprint = _b64url(hashlib.sha256(json.dumps(members, separators=(",", ":")).encode()).digest())
    return {"kty": "OKP", "crv": "Ed25519", "x": members["x"], "kid": thumbprint, "use": "sig", "alg": "EdDSA"}


def webhook_signer(store: SecretSource) -> WebhookSigner:
    """The service's webhook keys: the environment's, else the one derived from the jobs database's secret.
    Blocking (may create the secret); raises ValueError naming what is wrong with a configured key."""
    configured = os.environ.get(WEBHOOK_KEY_ENV, "").strip()
    if configured:
        return WebhookSigner.from_pem(configured)
    return WebhookSigner.from_secret(store.shared_secret(WEBHOOK_SECRET_NAME))
