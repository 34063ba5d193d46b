"""Delivers the webhooks the jobs database owes (its outbox), from every Orchestrator replica.

Each replica polls ``claim_webhooks``; a claimed delivery is leased to it alone, so each is attempted by one
replica at a time and delivered once. Every attempt is signed as fal signs (the job's owner is the user id) and
logged on the job (``webhook attempt 1/10 failed ...``, ``webhook delivered ...``); a failed one is due again after
the doubling back-off, up to ``webhook_attempts`` (fal: 10 attempts over about 2 hours).
"""

from __future__ import annotations

import asyncio
import logging

from deployments.config import AppArgs
from deployments.contracts import StoredResult
from deployments.jobstore import JobStore, WebhookDelivery
from deployments.orchestrator.webhook_delivery import post_webhook, retry_delay, webhook_payload
from deployments.runtime.background import BackgroundLoop
from deployments.runtime.webhook_signing import WebhookSigner
from deployments.storage import Storage, keys

logger = logging.getLogger("ray.serve")
MAX_IN_FLIGHT = 16


class WebhookWorker:
    def __init__(self, store: JobStore, storage: Storage, args: AppArgs, worker_id: str, signer: WebhookSigner):
        self.store, self.storage, self.args, self.worker_id, self.signer = store, storage, args, worker_id, signer
        self.guard = args.inputs.guard()
        self.in_flight: set[asyncio.Task] = set()
        self.loop = BackgroundLoop(f"webhook-deliveries-{worker_id}", self._deliver_loop)

    async def _deliver_loop(self) -> None:
        while True:
            deliveries: list[WebhookDelivery] = []
            room = MAX_IN_FLIGHT - len(self.in_flight)
            if room > 0:
                try:
                    deliveries = await self.store.claim_webhooks(self.worker_id, self.args.dispatch.webhook_lease_s,
                                                                 min(room, 8))
                except Exception:  # noqa: BLE001 - the database may be away for a while
                    logger.exception("webhook worker %s: claim failed; trying again", self.worker_id)
            for delivery in deliveries:
                task = asyncio.get_running_loop().create_task(self.deliver(delivery))
                self.in_flight.add(task)
                task.add_done_callback(self.in_flight.discard)
            if not deliveries:
                await asyncio.sleep(self.args.dispatch.poll_interval_s)

    async def deliver(self, delivery: WebhookDelivery) -> None:
        request_id, attempt, total = delivery.request_id, delivery.attempt, self.args.webhook_attempts
        try:
            job = await self.store.get(request_id, delivery.owner)
            if job is None:  # deleted by retention before it could be delivered
                await self.store.webhook_failed(request_id, attempt, "the job no longer exists")
                return
            if job.error is None:
                body = webhook_payload(request_id, True, StoredResult.model_validate(job.result).public(self.storage), None)
            else:
                body = webhook_payload(request_id, False, {"detail": job.error.detail}, job.error.message)
            delivered, outcome = await asyncio.to_thread(post_webhook, delivery.url, body, self.guard, self.signer,
                                                         keys.owner_segment(delivery.owner))
            if delivered:
                await self.store.webhook_delivered(
                    request_id, attempt, message=f"webhook delivered (attempt {attempt}/{total}, {outcome})")
            elif attempt < total:
                delay = retry_delay(attempt, self.args.webhook_first_delay_s)
                await self.store.webhook_failed(
                    request_id, attempt, outcome, retry_in_s=delay,
                    message=f"webhook attempt {attempt}/{total} failed ({outcome}); retrying in {delay:.0f} s")
            else:
                await self.store.webhook_failed(
                    request_id, attempt, outcome,
                    message=f"webhook attempt {attempt}/{total} failed ({outcome}); giving up")
        except Exception:  # noqa: BLE001 - the lease runs out and the delivery is due again
            logger.exception("webhook of %s (attempt %d) could not be settled", request_id, attempt)
