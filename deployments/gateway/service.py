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
from fastapi.responses import JSONResponse

from deployments.config import AppArgs
from deployments.contracts import JobInput, StoredResult
from deployments.gateway.auth import ApiKeys
from deployments.gateway.bodies import read_json, validated
from deployments.gateway.errors import FalError
from deployments.gateway.health import run_checks
from deployments.gateway.idempotency import body_hash, reused
from deployments.gateway.job_inputs import build_job_input
from deployments.gateway.limits import StreamSlots, TokenBuckets, admit_job
from deployments.gateway.results import result_answer
from deployments.gateway.uploads import UploadPolicy
from deployments.gateway.urls import absolute
from deployments.jobstore import (
    AlreadySubmittedError,
    IdempotencyKeyReusedError,
    JobSnapshot,
    JobView,
    LimitError,
    new_request_id,
)
from deployments.runtime.errors import root_cause
from deployments.runtime.service_state import ServiceState
from pipeline.schema import StableAvatarInput, StableAvatarOutput, resolve_seed

logger = logging.getLogger("ray.serve")

ReadinessCheck = Callable[[], Awaitable[Any]] | str  # an awaitable probe, or a note for a check not made


class SyncRunner(Protocol):
    """What the Gateway needs of the Orchestrator: run one sync request under its own lease (``rate_limited``
    False: the Gateway took the request's submit token already; an idempotency key that already started a job
    raises ``AlreadySubmittedError``), and the application's model fingerprint (recorded with every submit)."""

    async def run_sync(self, request_id: str, job_input: dict[str, Any], seed: int, owner: str,
                       input_keys: list[str], rate_limited: bool, idempotency_key: str | None = None,
                       body_hash: str | None = None) -> StoredResult: ...

    async def model_fingerprint(self) -> str: ...


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
        self.uploads = UploadPolicy(auth, self.storage, self.store, args.retention.uploads_s)
        self._fingerprint: str | None = None

    def is_app(self, owner: str, app: str) -> bool:
        return (owner, app) == (self.app_owner, self.app_alias)

    # -- limits (deployments.gateway.limits) -------------------------------------------------------------------
    async def admit(self, owner: str, queued: bool, max_queue_length: int | None = None) -> None:
        """A new job's caps and submit token, before its body is read (LimitError when refused)."""
        await admit_job(self.store, owner, queued, max_queue_length)

    async def model_fingerprint(self) -> str:
        """The application's model fingerprint, as its Orchestrator knows it (asked once)."""
        if self._fingerprint is None:
            self._fingerprint = await self.orchestrator.model_fingerprint()
        return self._fingerprint

    # -- reading a job's input --------------------------------------------------------------------------------
    async def read_input(self, request: Request) -> tuple[StableAvatarInput, str]:
        """A size-limited JSON body validated into the fal input (413, or 422 in fal's ``detail`` format), and the
        SHA-256 of the JSON it held (what an Idempotency-Key's retries must repeat)."""
        data = await read_json(request, self.max_body,
                               f"request body larger than {self.max_body} bytes; upload large files instead")
        return validated(StableAvatarInput, data), body_hash(data)

    async def earlier_request(self, owner: str, key: str, request: Request) -> str | None:
        """The job ``owner``'s Idempotency-Key ``key`` created within its window (None: none); its body is read
        only then, and must hash as the first one's (else 422 naming the header)."""
        earlier = await self.store.idempotent_request(owner, key)
        if earlier is None:
            return None
        request_id, first_hash = earlier
        _, this_hash = await self.read_input(request)
        if this_hash != first_hash:
            raise reused(key)
        return request_id

    async def finished_job(self, request_id: str, owner: str, poll_s: float = 0.5) -> JobView:
        """The job once it has finished (a replayed ``/run`` waits for the run its first request started)."""
        while True:
            job = await self.store.get(request_id, owner)
            if job is None:
                raise FalError(404, "Request not found", request_id=request_id)
            if job.finished:
                return job
            await asyncio.sleep(poll_s)

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
    async def run_sync(self, body: StableAvatarInput, owner: str, request_id: str,
                       idempotency_key: str | None = None, body_hash: str | None = None) -> StoredResult:
        """The stored result of an admitted sync request (:meth:`admit`), run by an Orchestrator replica under its
        own lease (its row is created there). A ``LimitError`` and an ``AlreadySubmittedError`` (the idempotency
        key's first request runs already) are raised unwrapped; the inputs of a refused request are deleted."""
        job_input, keys = await self.job_input(body, owner, request_id)
        try:
            return await self.orchestrator.run_sync(request_id, job_input.model_dump(), resolve_seed(body.seed),
                                                    owner, keys, rate_limited=False, idempotency_key=idempotency_key,
                                                    body_hash=body_hash)
        except Exception as exc:
            await self.forget_inputs(request_id, owner, keys)
            cause = root_cause(exc)
            if isinstance(cause, LimitError | AlreadySubmittedError | IdempotencyKeyReusedError):
                raise cause from None
            raise

    async def generate(self, body: StableAvatarInput) -> StableAvatarOutput:
        """A sync request from inside the cluster (the Python handle; owner: the open owner ``""``): the same
        row, rules and result as ``POST /run``, its video link as the storage makes it."""
        await self.admit("", queued=False)
        stored = await self.run_sync(body, "", new_request_id())
        return StableAvatarOutput.model_validate(stored.public(self.storage))

    def result_response(self, job: JobView, request: Request) -> JSONResponse:
        """A finished job's answer: its error; 410 once the result expired (``retention.results_s`` after
        completion, swept or not); else the output, with a link that expires no later than its file."""
        answer = result_answer(job, self.storage, self.args.retention.results_s)
        if answer.status_code == 200:
            answer.body["video"]["url"] = absolute(answer.body["video"]["url"], request)
        return JSONResponse(answer.body, status_code=answer.status_code,
                            headers={**answer.headers, "x-fal-request-id": job.request_id})

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
