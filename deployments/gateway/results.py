"""Stored results keep the video as a storage key; URLs (signed, expiring) are made each time one is read.

A result lives ``retention.results_s`` after its job completed. Past that it answers **410 Gone** with a detail
that says so (:func:`result_answer`), whether or not the sweeper has deleted the file yet, and a link is never
made to outlive its file: each one expires at ``min(storage.url_expiry_s, the result's remaining lifetime)``.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, Field

from deployments.contracts import StoredResult
from deployments.storage import Storage

if TYPE_CHECKING:
    from deployments.jobstore import JobView

RESULT_EXPIRED = "result_expired"  # error_type (and x-fal-error-type) of an expired result


class ResultAnswer(BaseModel):
    """The HTTP answer of the result route for a finished job: status, JSON body and headers (the Gateway adds
    ``x-fal-request-id``)."""

    status_code: int
    body: dict[str, Any]
    headers: dict[str, str] = Field(default_factory=dict)


def result_remaining_s(job: JobView, results_s: float, now: float | None = None) -> float:
    """Seconds until the job's result expires (<= 0: expired, or purged already)."""
    if job.result_purged:
        return 0.0
    if job.completed_at is None:
        return math.inf
    return job.completed_at + results_s - (time.time() if now is None else now)


def expired_answer(job: JobView, results_s: float) -> ResultAnswer:
    """410 Gone, fal error shape: the result existed and retention removed it."""
    days = results_s / 86400
    kept = f"{days:g} days" if days >= 1 else f"{results_s:g} seconds"
    detail = (f"The result of request {job.request_id} has expired: results are kept for {kept} after the "
              "request completes, and this one was deleted. Submit the request again to get a new result.")
    return ResultAnswer(status_code=410, body={"detail": detail, "error_type": RESULT_EXPIRED},
                        headers={"x-fal-error-type": RESULT_EXPIRED})


def result_answer(job: JobView, storage: Storage, results_s: float, now: float | None = None) -> ResultAnswer:
    """The result route's answer for a finished job: its error, 410 once the result expired (``results_s`` after
    completion, or purged by retention), else 200 with the output and a link that expires with the file."""
    if not job.finished:
        raise ValueError(f"job {job.request_id} is not finished ({job.status})")
    if job.error is not None:
        headers = {"x-fal-request-timeout-type": job.error.timeout_type} if job.error.timeout_type else {}
        body: dict[str, Any] = {"detail": job.error.detail}
        if job.error.error_type and isinstance(job.error.detail, str):
            body["error_type"] = job.error.error_type
            headers["x-fal-error-type"] = job.error.error_type
        return ResultAnswer(status_code=job.error.status_code, body=body, headers=headers)
    if job.result is None:
        raise ValueError(f"job {job.request_id} finished with neither a result nor an error")
    remaining = result_remaining_s(job, results_s, now)
    if remaining < 1:  # under a second left: a link could not outlive its file by less
        return expired_answer(job, results_s)
    expires = min(int(storage.config.url_expiry_s), int(remaining)) if math.isfinite(remaining) else None
    return ResultAnswer(status_code=200, body=StoredResult.model_validate(job.result).public(storage, expires))
