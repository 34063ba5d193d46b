"""Webhooks signed as fal signs them, checked by a receiver written as fal's users write one.

The receiver here is independent of the service's code: it reads the four ``X-Fal-Webhook-*`` headers, rejects a
timestamp more than 300 s away, rebuilds ``request_id \\n user_id \\n timestamp \\n sha256(body)`` and tries each
key of the JWKS the Gateway publishes, with ``cryptography``. Deliveries go from a real ``WebhookWorker`` (the
Orchestrator's) over HTTP to a real server on loopback; the jobs database is SQLite, shared by the "Gateway" and
"Orchestrator" states as replicas share it.
"""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from deployments.config import AppArgs
from deployments.contracts import StoredResult, StoredVideo
from deployments.gateway.app import build_api
from deployments.gateway.auth import fingerprint
from deployments.gateway.service import GatewayService
from deployments.orchestrator.webhook_delivery import retry_delay
from deployments.orchestrator.webhook_worker import WebhookWorker
from deployments.runtime.service_state import ServiceState, open_service_state
from deployments.runtime.webhook_signing import WEBHOOK_KEY_ENV, WEBHOOK_SECRET_NAME, WebhookSigner
from deployments.storage import keys

pytestmark = pytest.mark.anyio
KEYS_ENV = "STABLE_AVATAR_WEBHOOK_TEST_KEYS"
API_KEY = "webhook-test-key-0123456789"
MAX_SKEW_S = 300


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# -- the receiver, as a fal user writes it --------------------------------------------------------------------
def _b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def fal_receiver_accepts(headers: dict[str, str], body: bytes, jwks: dict[str, Any],
                         now: float | None = None) -> bool:
    """True when the delivery is signed by one of the JWKS's keys and its timestamp is within 300 s."""
    try:
        request_id = headers["x-fal-webhook-request-id"]
        user_id = headers["x-fal-webhook-user-id"]
        timestamp = headers["x-fal-webhook-timestamp"]
        signature = bytes.fromhex(headers["x-fal-webhook-signature"])
    except (KeyError, ValueError):
        return False
    if abs((time.time() if now is None else now) - int(timestamp)) > MAX_SKEW_S:
        return False
    message = "\n".join([request_id, user_id, timestamp, hashlib.sha256(body).hexdigest()]).encode()
    for jwk in jwks["keys"]:
        if jwk.get("kty") != "OKP" or jwk.get("crv") != "Ed25519":
            continue
        public = ed25519.Ed25519PublicKey.from_public_bytes(_b64url_decode(jwk["x"]))
        try:
            public.verify(signature, message)
            return True
        except InvalidSignature:
            continue
    return False


class Receiver(http.server.BaseHTTPRequestHandler):
    """Records every delivery (headers, raw body) and answers the next code of ``answers`` (then 200)."""

    deliveries: list[tuple[dict[str, str], bytes]] = []
    answers: list[int] = []

    def do_POST(self):  # noqa: N802 - http.server naming
        body = self.rfile.read(int(self.headers["content-length"]))
        self.deliveries.append(({k.lower(): v for k, v in self.headers.items()}, body))
        self.send_response(self.answers.pop(0) if self.answers else 200)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def receiver() -> Iterator[str]:
    Receiver.deliveries, Receiver.answers = [], []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hook"
    finally:
        server.shutdown()


# -- the service's side --------------------------------------------------------------------------------------
def service_args(root: Path, **extra: Any) -> AppArgs:
    return AppArgs.model_validate({"storage": {"kind": "local", "root": str(root)}, "auth": {"keys_env": KEYS_ENV},
                                   "inputs": {"allow_private_hosts": ["127.0.0.1"]}, **extra})


@pytest.fixture
def states(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """``open_states(args)`` -> a (Gateway, Orchestrator) pair of service states on one jobs database."""
    monkeypatch.setenv(KEYS_ENV, API_KEY)
    monkeypatch.delenv(WEBHOOK_KEY_ENV, raising=False)
    opened: list[ServiceState] = []

    def open_states(args: AppArgs) -> tuple[ServiceState, ServiceState]:
        pair = open_service_state(args), open_service_state(args)
        opened.extend(pair)
        return pair

    yield open_states
    for state in opened:
        state.store.close()


async def published_jwks(gateway_state: ServiceState, args: AppArgs) -> dict[str, Any]:
    app = build_api(GatewayService(args, gateway_state, orchestrator=None, readiness={}))  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://gateway.test") as client:
        answer = await client.get("/.well-known/jwks.json")
    assert answer.status_code == 200 and answer.headers["content-type"] == "application/json"
    return answer.json()


async def finished_job_with_webhook(state: ServiceState, hook: str) -> str:
    """A job of API_KEY's, submitted with ``hook`` and completed with a result: its webhook is owed."""
    owner = fingerprint(API_KEY)
    submitted = await state.store.submit(app_id="fal-ai/stable-avatar", input={"request": {}}, seed=3, owner=owner,
                                         webhook_url=hook)
    claimed = await state.store.claim("runner", 30)
    assert claimed is not None and claimed.request_id == submitted.request_id
    key = keys.result_key(claimed.request_id, claimed.epoch)
    state.storage.put_bytes(key, b"mp4", "video/mp4")
    result = StoredResult(video=StoredVideo(key=key, file_size=3), seed=3)
    await state.store.complete(claimed.request_id, claimed.epoch, result=result.model_dump(), result_keys=[key])
    return claimed.request_id


async def deliver_due(worker: WebhookWorker) -> int:
    deliveries = await worker.store.claim_webhooks("test-worker", 60, 10)
    for delivery in deliveries:
        await worker.deliver(delivery)
    return len(deliveries)


# -- tests ---------------------------------------------------------------------------------------------------
async def test_a_delivery_verifies_with_the_published_keys_as_a_fal_receiver_checks_it(tmp_path, states, receiver):
    args = service_args(tmp_path / "data")
    gateway, orchestrator = states(args)
    worker = WebhookWorker(orchestrator.store, orchestrator.storage, args, "orchestrator-1",
                           orchestrator.webhook_signer)
    request_id = await finished_job_with_webhook(orchestrator, receiver)
    before = time.time()
    assert await deliver_due(worker) == 1
    ((headers, body),) = Receiver.deliveries
    jwks = await published_jwks(gateway, args)  # the Gateway publishes what the Orchestrator signs with
    assert fal_receiver_accepts(headers, body, jwks)
    assert headers["x-fal-webhook-request-id"] == request_id
    assert headers["x-fal-webhook-user-id"] == fingerprint(API_KEY)
    assert before - 1 <= int(headers["x-fal-webhook-timestamp"]) <= time.time() + 1
    payload = json.loads(body)
    assert payload["request_id"] == request_id and payload["status"] == "OK"
    assert payload["payload"]["video"]["file_size"] == 3
    # Anything changed, and the receiver refuses it.
    assert not fal_receiver_accepts(headers, body + b" ", jwks)
    assert not fal_receiver_accepts({**headers, "x-fal-webhook-request-id": "0" * 32}, body, jwks)
    assert not fal_receiver_accepts({**headers, "x-fal-webhook-user-id": "public"}, body, jwks)
    assert not fal_receiver_accepts(headers, body, jwks, now=time.time() + MAX_SKEW_S + 5)  # a replay, later
    other = WebhookSigner([ed25519.Ed25519PrivateKey.generate()]).jwks()
    assert not fal_receiver_accepts(headers, body, other)
    assert (await orchestrator.store.webhook_state(request_id))["state"] == "delivered"


async def test_a_failed_attempt_is_retried_signed_afresh(tmp_path, states, receiver):
    args = service_args(tmp_path / "data", webhook_first_delay_s=0.0)
    gateway, orchestrator = states(args)
    worker = WebhookWorker(orchestrator.store, orchestrator.storage, args, "orchestrator-1",
                           orchestrator.webhook_signer)
    request_id = await finished_job_with_webhook(orchestrator, receiver)
    Receiver.answers = [503]
    assert await deliver_due(worker) == 1
    time.sleep(1.1)  # the next attempt is signed in a later second
    assert await deliver_due(worker) == 1
    (first, _), (second, body) = Receiver.deliveries
    jwks = await published_jwks(gateway, args)
    assert fal_receiver_accepts(second, body, jwks)
    assert int(second["x-fal-webhook-timestamp"]) > int(first["x-fal-webhook-timestamp"])
    assert second["x-fal-webhook-signature"] != first["x-fal-webhook-signature"]
    logs = await orchestrator.store.logs(request_id, fingerprint(API_KEY))
    messages = [line.message for line in logs.lines]
    assert any(m.startswith("webhook attempt 1/10 failed (HTTP 503)") for m in messages), messages
    assert any(m.startswith("webhook delivered (attempt 2/10") for m in messages), messages


def test_the_retry_schedule_is_fals_10_attempts_over_about_2_hours():
    args = AppArgs()
    assert args.webhook_attempts == 10
    waits = [retry_delay(attempt, args.webhook_first_delay_s) for attempt in range(1, args.webhook_attempts)]
    assert waits == sorted(waits) and waits[0] == args.webhook_first_delay_s
    assert 1.9 * 3600 <= sum(waits) <= 2.1 * 3600, sum(waits)


def pem(key: Any) -> str:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


async def test_keys_from_the_secret_sign_with_the_first_and_publish_them_all(tmp_path, states, receiver,
                                                                            monkeypatch):
    new, old = ed25519.Ed25519PrivateKey.generate(), ed25519.Ed25519PrivateKey.generate()
    monkeypatch.setenv(WEBHOOK_KEY_ENV, pem(new) + pem(old))
    args = service_args(tmp_path / "data")
    gateway, orchestrator = states(args)
    worker = WebhookWorker(orchestrator.store, orchestrator.storage, args, "orchestrator-1",
                           orchestrator.webhook_signer)
    await finished_job_with_webhook(orchestrator, receiver)
    await deliver_due(worker)
    ((headers, body),) = Receiver.deliveries
    jwks = await published_jwks(gateway, args)
    assert [k["x"] for k in jwks["keys"]] == [WebhookSigner([k]).jwks()["keys"][0]["x"] for k in (new, old)]
    assert len({k["kid"] for k in jwks["keys"]}) == 2
    assert fal_receiver_accepts(headers, body, jwks)  # the receiver tries each key
    assert fal_receiver_accepts(headers, body, {"keys": jwks["keys"][:1]})  # signed by the first
    assert not fal_receiver_accepts(headers, body, {"keys": jwks["keys"][1:]})
    assert WEBHOOK_SECRET_NAME not in _secret_names(orchestrator)  # none made in the database


def _secret_names(state: ServiceState) -> set[str]:
    with state.store.sync.backend.read() as cur:
        cur.execute("SELECT name FROM service_secrets")
        return {row["name"] for row in cur.fetchall()}


async def test_without_a_secret_one_key_is_made_once_in_the_jobs_database(tmp_path, states):
    args = service_args(tmp_path / "data")
    gateway, orchestrator = states(args)
    jwks = await published_jwks(gateway, args)
    assert len(jwks["keys"]) == 1 and jwks == orchestrator.webhook_signer.jwks()
    assert WEBHOOK_SECRET_NAME in _secret_names(orchestrator)
    again, _ = states(args)  # a restarted replica: the same key
    assert again.webhook_signer.jwks() == jwks
    other_args = service_args(tmp_path / "elsewhere")  # another database: another key
    assert states(other_args)[0].webhook_signer.jwks() != jwks


def test_a_published_key_is_a_jwk_with_its_rfc_7638_thumbprint():
    """RFC 8037, appendix A.1-A.3: the ED25519 test key's public half and its thumbprint."""
    private = ed25519.Ed25519PrivateKey.from_private_bytes(
        _b64url_decode("nWGxne_9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A"))
    (jwk,) = WebhookSigner([private]).jwks()["keys"]
    assert (jwk["kty"], jwk["crv"], jwk["x"]) == ("OKP", "Ed25519", "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo")
    assert jwk["kid"] == "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"


def test_a_bad_configured_key_stops_the_start_naming_the_variable(tmp_path, states, monkeypatch):
    args = service_args(tmp_path / "data")
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    for value, problem in (("not a key", "no PEM key found"), (pem(rsa_key), "not an ED25519 key"),
                           ("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----", "not an unencrypted")):
        monkeypatch.setenv(WEBHOOK_KEY_ENV, value)
        with pytest.raises(ValueError, match=problem) as refused:
            states(args)
        assert WEBHOOK_KEY_ENV in str(refused.value)
