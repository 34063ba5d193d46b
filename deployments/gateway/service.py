"""The Gateway's serving object: everything its routes work with, injected, so the routes run in any process.

:class:`GatewayService` holds the app arguments, the jobs database, the storage, the signer, the API keys, the
Orchestrator (anything with its async ``run_sync``) and the readiness checks of the deployments. The Serve class
(:mod:`deployments.gateway.deployment`) builds one from Ray handles; tests build one from a SQLite store, local
storage and a fake Orchestrator, and call the routes through an ASGI client.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from fastapi import Request

from deployments.config import AppArgs
from deployments.contracts import JobInput, StoredResult
from deployments.gateway.auth import ApiKeys
from deployments.gateway.bodies import read_model
from deployments.gateway.errors import FalError
from deployments.gateway.health import run_checks
from deployments.gateway.job_inputs import build_job_input
from deployments.gateway.limits import StreamSlots, TokenBuckets, admit_job
from deployments.gateway.uploads import UploadPolicy
from deployments.jobstore import JobSnapshot, LimitError, new_request_id
from deployments.runtime.errors import root_cause
from deployments.runtime.service_state import ServiceState
from pipeline.schema import StableAvatarInput, StableAvatarOutput, resolve_seed

logger = logging.getLogger("ray.serve")

ReadinessCheck = Callable[[], Awaitable[Any]] | str  # an awaitable probe, or a note for a check not made


class SyncRunner(Protocol):
    """What the Gateway needs of the Orchestrator: run one sync request under its own lease (``rate_limited``
    False: the Gateway took the request's submit token already)."""

    async def run_sync(self, request_id: str, job_input: dict[str, Any], seed: int, owner: str,
                       input_keys: list[str], rate_limited: bool) -> StoredResult: ...


class GatewayService:
    def __init__(self, args: AppArgs, state: ServiceState, orchestrator: SyncRunner,
                 readiness: dict[str, ReadinessCheck], name: str = "gateway"):
        self.args, self.state, self.orchestrator, self.readiness, self.name = args, state, orchestrator, readiness, name
        self.store, self.storage, self.signer = state.store, state.storage, state.signer
        self.app_owner, _, self.app_alias = args.app_id.partition("/")
        self.keys = ApiKeys(args.auth)
        self.webhook_guard = args.inputs.guard()
        self.max_body = int(args.max_request_body_mb * 2**20)
        auth = args.auth
        self.requests = TokenBuckets(auth.request_rate_per_minute / 60.0, auth.request_burst)
        self.streams = StreamSlots(auth.max_streams_per_key)
        self.uploads = UploadPolicy(auth, self.storage, args.retention.uploads_s)

    def is_app(self, owner: str, app: str) -> bool:
        return (owner, app) == (self.app_owner, self.app_alias)

    # -- limits (deployments.gateway.limits) -------------------------------------------------------------------
    async def admit(self, owner: str, queued: bool, max_queue_length: int | None = None) -> None:
        """A new job's caps and submit token, before its body is read (LimitError when refused)."""
        await admit_job(self.store, owner, queued, max_queue_length)

    # -- reading a job's input --------------------------------------------------------------------------------
    async def read_input(self, request: Request) -> StableAvatarInput:
        """A size-limited JSON body validated into the fal input (413, or 422 in fal's ``detail`` format)."""
        return await read_model(request, StableAvatarInput, self.max_body,
                                f"request body larger than {self.max_body} bytes; upload large files instead")

    async def job_input(self, body: StableAvatarInput, owner: str, request_id: str) -> tuple[JobInput, list[str]]:
        """The row's input and the objects written for it (``data:`` inputs stored under the job's key)."""
        async def owns_job(other: str) -> bool:
            return await self.store.get(other, owner) is not None

        return await build_job_input(body, owner, request_id, self.storage, self.args.inputs.fetch,
                                     asyncio.to_thread, owns_job)

    async def forget_inputs(self, request_id: str, owner: str, keys: list[str]) -> None:
        """Delete the input objects of a request whose row was never created (refused at a limit)."""
        if keys and await self.store.get(request_id, owner) is None:
            for key in keys:
                await asyncio.to_thread(self.storage.delete, key)

    # -- jobs -------------------------------------------------------------------------------------------------
    async def run_sync(self, body: StableAvatarInput, owner: str, request_id: str) -> StoredResult:
        """The stored result of an admitted sync request (:meth:`admit`), run by an Orchestrator replica under its
        own lease (its row is created there). A ``LimitError`` is raised unwrapped; the inputs of a refused
        request are deleted."""
        job_input, keys = await self.job_input(body, owner, request_id)
        try:
            return await self.orchestrator.run_sync(request_id, job_input.model_dump(), resolve_seed(body.seed),
                                                    owner, keys, rate_limited=False)
        except Exception as exc:
            await self.forget_inputs(request_id, owner, keys)
            cause = root_cause(exc)
            if isinstance(cause, LimitError):
                raise cause from None
            raise

    async def generate(self, body: StableAvatarInput) -> StableAvatarOutput:
        """A sync request from inside the cluster (the Python handle; owner: the open owner ``""``): the same
        row, rules and result as ``POST /run``, its video link as the storage makes it."""
        await self.admit("", queued=False)
        stored = await self.run_sync(body, "", new_request_id())
        return StableAvatarOutput.model_validate(stored.public(self.storage))

    async def snapshot(self, owner: str, app: str, request_id: str, caller: str, logs: bool = False) -> JobSnapshot:
        """The job's snapshot for a caller allowed to see it, else 404 (another key's job does not exist)."""
        snapshot = (await self.store.status(request_id, caller, logs_since=0 if logs else None)
                    if self.is_app(owner, app) else None)
        if snapshot is None:
            raise FalError(404, "Request not found", request_id=request_id)
        return snapshot

    # -- readiness --------------------------------------------------------------------------------------------
    async def check_readiness(self) -> tuple[dict[str, str], dict[str, str]]:
        """(passed, failed) by name: storage, the jobs database and every deployment."""
        checks: dict[str, ReadinessCheck] = {"storage": lambda: asyncio.to_thread(self.storage.check),
                                             "jobs": self.store.ping, **self.readiness}
        return await run_checks(checks, [self.state.secret_text])
