"""What every Gateway and Orchestrator replica opens at start: the jobs database, the signing secret (shared
through it), the storage that signs links with that secret, and the webhook keys (the Orchestrator signs with
them, the Gateway publishes them)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from deployments.config import AppArgs
from deployments.jobstore import JobStore, make_job_store
from deployments.runtime.webhook_signing import WebhookSigner, webhook_signer
from deployments.storage import LocalStorageConfig, Storage, make_storage
from deployments.storage.signing import Signer, service_secret


@dataclass
class ServiceState:
    store: JobStore
    storage: Storage
    signer: Signer
    secret_fingerprint: str  # for tests and logs: equal fingerprints mean equal secrets (the secret is not shown)
    secret_text: str  # only to mask it in messages (health reasons)
    webhook_signer: WebhookSigner


def secret_fingerprint(secret: bytes) -> str:
    return hashlib.sha256(b"stable-avatar fingerprint\n" + secret).hexdigest()[:12]


def open_service_state(args: AppArgs) -> ServiceState:
    """Blocking (connects, applies migrations, may create the secret): call it from a replica's constructor."""
    store = make_job_store(args.jobs_config(), args.default_jobs_path(), args.job_limits())
    try:
        configured = args.storage.url_secret if isinstance(args.storage, LocalStorageConfig) else None
        secret = service_secret(configured, store.sync)
        return ServiceState(store, make_storage(args.storage, secret), Signer(secret), secret_fingerprint(secret),
                            secret.decode(errors="replace"), webhook_signer(store.sync))
    except BaseException:  # a configuration error stops the replica: leave no connection behind
        store.close()
        raise
