"""Gateway: the Serve shell around the FastAPI ingress (CPU). Any number of replicas.

The constructor opens the service state (jobs database, storage, signer) and builds the
:class:`~deployments.gateway.service.GatewayService` from the Orchestrator's handle and the deployments' readiness
probes; Serve then asks ``__serve_build_asgi_app__`` for the app (:func:`deployments.gateway.app.build_api`), whose
routers hold every HTTP route. What stays here is the Python-handle API (``generate``) and ``ready``.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI
from ray import serve

from deployments.config import AppArgs
from deployments.contracts import StoredResult
from deployments.gateway.app import build_api
from deployments.gateway.health import ON_DEMAND
from deployments.gateway.service import GatewayService, ReadinessCheck
from deployments.runtime.replica import replica_name
from deployments.runtime.service_state import open_service_state
from pipeline.schema import StableAvatarInput, StableAvatarOutput

logger = logging.getLogger("ray.serve")


class OrchestratorClient:
    """The Orchestrator's handle as the service's :class:`~deployments.gateway.service.SyncRunner`."""

    def __init__(self, handle: Any):
        self.handle = handle

    async def run_sync(self, request_id: str, job_input: dict[str, Any], seed: int, owner: str,
                       input_keys: list[str], rate_limited: bool, idempotency_key: str | None = None,
                       body_hash: str | None = None) -> StoredResult:
        return await self.handle.run_sync.remote(request_id, job_input, seed, owner, input_keys,
                                                 rate_limited=rate_limited, idempotency_key=idempotency_key,
                                                 body_hash=body_hash)

    async def model_fingerprint(self) -> str:
        return await self.handle.model_fingerprint.remote()


def readiness_checks(args: AppArgs, handles: dict[str, Any]) -> dict[str, ReadinessCheck]:
    """Each deployment's ``ready`` probe; a Denoiser that may scale to zero is not probed (``on_demand``)."""
    checks: dict[str, ReadinessCheck] = {}
    for name, handle in handles.items():
        scaling = getattr(args, name.lower()).autoscaling
        on_demand = name == "Denoiser" and scaling is not None and scaling.min_replicas == 0
        checks[name] = ON_DEMAND if on_demand else handle.ready.remote
    return checks


@serve.deployment(name="Gateway")
@serve.ingress()
class Gateway:
    def __init__(self, orchestrator, preprocessor, denoiser, postprocessor, args: AppArgs) -> None:
        handles = {"Orchestrator": orchestrator, "Preprocessor": preprocessor, "Denoiser": denoiser,
                   "Postprocessor": postprocessor}
        self.name = replica_name()
        self.service = GatewayService(args, open_service_state(args), OrchestratorClient(orchestrator),
                                      readiness_checks(args, handles), self.name)
        if not self.service.keys.enabled:
            logger.warning("*** NO API KEYS CONFIGURED: this server is OPEN; anyone who can reach it can submit "
                           "jobs and read every job. Set %s (or %s_FILE) to require keys. ***",
                           args.auth.keys_env, args.auth.keys_env)
        logger.info("gateway %s for %s, preset %s, storage %s, jobs database %s", self.name, args.app_id,
                    args.preset, self.service.storage.describe(), self.service.store.backend_name)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_api(self.service)

    # -- Python API: serve.get_app_handle("stable-avatar").generate.remote(StableAvatarInput(...)) -------------
    async def generate(self, request: StableAvatarInput) -> StableAvatarOutput:
        """A sync request from inside the cluster (owner: the open owner ``""``); the same row, rules and
        result as ``POST /run``. Raises ``LimitError`` at a limit and ``InputError`` for bad inputs."""
        return await self.service.generate(request)

    def ready(self) -> dict[str, Any]:
        """This replica's name and a fingerprint of its signing secret (equal fingerprints: equal secrets)."""
        return {"deployment": "Gateway", "replica": self.name,
                "secret_fingerprint": self.service.state.secret_fingerprint}
