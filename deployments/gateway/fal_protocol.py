"""The fal queue protocol's response bodies and header parsing, kept apart from the HTTP plumbing."""

from __future__ import annotations

from typing import Any

from deployments.jobstore import JobView, LogLine

TRUE_VALUES = {"1", "true", "yes", "on"}


def parse_bool(value: str | None) -> bool:
    """fal clients send ``logs`` as 1/0 (JS, fal SDK) or true/false (fal-client)."""
    return value is not None and value.strip().lower() in TRUE_VALUES


def parse_start_timeout(value: str | None) -> float | None:
    """``X-Fal-Request-Timeout``: seconds (a float string) the job may wait before it starts; must exceed 1."""
    if value is None or value == "":
        return None
    seconds = float(value)
    if not seconds > 1:
        raise ValueError("X-Fal-Request-Timeout must be a number of seconds greater than 1")
    return seconds


def request_urls(base: str, app_id: str, request_id: str) -> dict[str, str]:
    """Owner/app only (no sub-path), absolute, as both clients expect."""
    root = f"{base.rstrip('/')}/{app_id}/requests/{request_id}"
    return {"response_url": root, "status_url": f"{root}/status", "cancel_url": f"{root}/cancel"}


def status_body(job: JobView, position: int, logs: list[LogLine] | None, base: str) -> dict[str, Any]:
    """The status object of GET .../status (and of each SSE event, whose ``logs`` are the new lines only);
    ``logs`` None: the client did not ask for them."""
    body: dict[str, Any] = {"status": job.status, "request_id": job.request_id,
                            **request_urls(base, job.app_id, job.request_id)}
    if job.status == "IN_QUEUE":
        body["queue_position"] = position
    body["logs"] = None if logs is None else [line.model_dump(exclude={"line"}) for line in logs]
    # Not part of fal's schema; clients ignore it, the playground and CLI use it.
    body["progress"] = {"stage": job.stage, "fraction": round(job.progress, 4)}
    if job.status == "COMPLETED":
        body["metrics"] = {"inference_time": job.inference_time}
        if job.error is not None:
            body["error"] = job.error.message
            body["error_type"] = job.error.error_type
    return body
